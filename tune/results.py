"""A search's results as rows: one per trial (its point, scores, counts, placement, child run),
the selection by dev F1, the table, and the seeds' mean and standard deviation."""

from __future__ import annotations

import csv
import math
import statistics
from pathlib import Path

from .space import FUSED, METRIC, SEARCHED, point_values
from .storage import uri_of
from .tracking import COUNT_KEYS


def hyperparameters(point: dict, base) -> dict:
    """alpha_aug, alpha_fea, beta, gamma and soft_scope of a trial (the base config's scope where
    it is not searched), for tables."""
    values = point_values(point)
    return {**{k: values[k] for k in SEARCHED}, "soft_scope": values.get("soft_scope", base.soft_scope)}


def trial_rows(results: list, runs: dict[str, str], phase: str, base) -> list[dict]:
    """One row per grid point of a Ray ResultGrid (a fused trial's points each get one, with the
    trial's status, placement and times), with its MLflow child run."""
    from .callback import run_key
    from .trial import member_dirs, member_results, members_of

    rows = []
    for result in results:
        config, metrics = result.config or {}, result.metrics or {}
        trial_id = metrics.get("trial_id") or (Path(result.path).name.split("_")[-1] if result.path else "")
        if result.error is not None:
            status = "ERROR"
        elif metrics.get("final"):
            status = "TERMINATED"
        elif metrics:
            status = "STOPPED"  # stopped early by the scheduler
        else:
            status = "NOT STARTED"
        fused = FUSED in config
        points = members_of(config)
        parts = member_results(metrics) if metrics else [{} for _ in points]
        for number, (point, part, folder) in enumerate(zip(points, parts, member_dirs(config))):
            checkpoint = (
                uri_of(result.checkpoint.filesystem, result.checkpoint.path) if result.checkpoint else ""
            )
            row = {
                "trial": len(rows),
                "trial_id": trial_id,
                "phase": phase,
                "status": status,
                "mlflow_run_id": runs.get(run_key(trial_id, number if fused else None), ""),
                **hyperparameters(point, base),
                "seed": point.get("seed", base.seed),
                "fused_group_size": len(points),
            }
            for key in (METRIC, "best_step", "test_precision", "test_recall", "test_f1", *COUNT_KEYS):
                row[key] = part.get(key)
            row.update({k: v for k, v in part.items() if k.startswith("test_f1_level")})
            row.update(
                node_id=metrics.get("node_id", ""),
                node_ip=metrics.get("node_ip", ""),
                gpu_ids=metrics.get("gpu_ids", ""),
                gpu_share=metrics.get("gpu_share", 0.0),
                trial_start_time=metrics.get("trial_start_time"),
                # a trial stopped early has no end time of its own: its last report's
                trial_end_time=metrics.get("trial_end_time") or metrics.get("timestamp"),
                evaluations=metrics.get("training_iteration"),
                restarted=metrics.get("restarted", ""),  # a damaged checkpoint, trained again (trial.py)
                checkpoint=f"{checkpoint.rstrip('/')}/{folder}" if checkpoint and fused else checkpoint,
                error=str(result.error).strip().splitlines()[-1][:500] if result.error is not None else "",
            )
            rows.append(row)
    return rows


def by_trial(rows: list[dict]) -> list[dict]:
    """One row per Ray trial (the first point of each fused group): what held the cluster's slots,
    for the occupancy figures."""
    seen, kept = set(), []
    for row in rows:
        if (row["phase"], row["trial_id"]) not in seen:
            seen.add((row["phase"], row["trial_id"]))
            kept.append(row)
    return kept


def select(rows: list[dict]) -> dict | None:
    """The trial with the best dev F1 (the earliest one on a tie); test F1 plays no part."""
    scored = [r for r in rows if isinstance(r.get(METRIC), (int, float)) and not math.isnan(r[METRIC])]
    if not scored:
        return None
    best = max(r[METRIC] for r in scored)
    return min((r for r in scored if r[METRIC] == best), key=lambda r: r["trial"])


def write_table(rows: list[dict], path: Path) -> Path:
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows([{k: ("" if v is None else v) for k, v in row.items()} for row in rows])
    return path


def timed(rows: list[dict]) -> list[dict]:
    """The trials with a start and an end time (a trial that never started has neither)."""
    return [
        r
        for r in rows
        if all(isinstance(r.get(k), (int, float)) for k in ("trial_start_time", "trial_end_time"))
    ]


def max_overlap(rows: list[dict]) -> int:
    """The most trials that ran at the same time (from their start and end times)."""
    events = []
    for r in timed(rows):
        events += [(r["trial_start_time"], 1), (r["trial_end_time"], -1)]
    running = most = 0
    for _, change in sorted(events, key=lambda e: (e[0], e[1])):
        running += change
        most = max(most, running)
    return most


def _mean_std(values: list[float]) -> tuple[float, float]:
    values = [v for v in values if isinstance(v, (int, float)) and not math.isnan(v)]
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def _first(rows: list[dict], key: str):
    return next((r[key] for r in rows if isinstance(r.get(key), (int, float))), None)


def finished(rows: list[dict]) -> list[dict]:
    return [r for r in rows if r["status"] == "TERMINATED"]


def seed_stats(rows: list[dict]) -> dict:
    """Mean and standard deviation of dev and test F1 over the seeds' runs that finished (a seed
    that failed or stopped has no final result), and what the F1s were computed on (the same dev
    and test sentences for every seed)."""
    done = finished(rows)
    dev_mean, dev_std = _mean_std([r[METRIC] for r in done])
    test_mean, test_std = _mean_std([r.get("test_f1") for r in done])
    return {
        "seeds": len(rows),
        "seed_values": sorted(r["seed"] for r in rows),
        "seeds_finished": len(done),
        "seeds_dev_f1_mean": dev_mean,
        "seeds_dev_f1_std": dev_std,
        "seeds_test_f1_mean": test_mean,
        "seeds_test_f1_std": test_std,
        **{f"seeds_{key}": _first(done, key) for key in COUNT_KEYS},
    }


def slot_resource(gpus_per_trial: float) -> str:
    """What a search's trial slots are: GPUs when its trials ask for GPUs (--gpus-per-trial > 0),
    else CPUs."""
    return "gpu" if gpus_per_trial > 0 else "cpu"


def busy_fraction(rows: list[dict], resource: str, capacity: float, cpus_per_trial: float) -> float | None:
    """The busy fraction of a search's trial slots: the share of the cluster's slot-time that
    trials held while the search had trials left, in (0, 1].

    Slot-time is the cluster's amount of the slot resource (`resource`, see slot_resource; `capacity`
    GPUs or CPUs) times the span from the first trial's start to the last one's end. A trial holds,
    for its duration, its share of each of its GPUs (Ray's ids and share, from its own results) in a
    GPU search, and the CPUs Ray reserved for it (--cpus-per-trial) in a CPU search. For CPUs this is
    the trial-seconds over capacity / cpus_per_trial slots: 1 when that many trials ran all the time;
    less when a CPU stays idle, also when cpus_per_trial does not divide the CPUs (3 CPUs, 2 per trial:
    at most 2/3). None without the resource or a timed trial."""
    ran = timed(rows)
    if capacity <= 0 or not ran:
        return None
    span = max(r["trial_end_time"] for r in ran) - min(r["trial_start_time"] for r in ran)

    def held(row: dict) -> float:
        if resource == "gpu":
            return float(row.get("gpu_share") or 0) * len(
                [g for g in str(row.get("gpu_ids") or "").split(",") if g]
            )
        return cpus_per_trial

    if span <= 0:
        return None
    return sum((r["trial_end_time"] - r["trial_start_time"]) * held(r) for r in ran) / (capacity * span)
