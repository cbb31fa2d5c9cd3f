"""A search's results as rows: one per grid point (its point, scores, counts, placement, child run),
the selection by dev F1, trials.csv, the seeds' mean and standard deviation, the slots' occupancy."""

from __future__ import annotations

import csv
import math
import statistics
from pathlib import Path

from .runs import COUNT_KEYS
from .space import FUSED, METRIC, SEARCHED, point_key, point_of, point_values
from .storage import uri_of


def number(value) -> float | None:
    """The value where it is a number (a score, a count), None where it is missing, a flag or NaN."""
    real = isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value)
    return value if real else None


def hyperparameters(point: dict, base) -> dict:
    """A point's searched values and its soft scope (the base config's where it is not searched)."""
    values = point_values(point)
    return {**{k: values[k] for k in SEARCHED}, "soft_scope": values.get("soft_scope", base.soft_scope)}


def _status(result, metrics: dict) -> str:
    """ERROR, TERMINATED (its final result), STOPPED (early, by the scheduler) or NOT STARTED."""
    if result.error is not None:
        return "ERROR"
    if metrics.get("final"):
        return "TERMINATED"
    return "STOPPED" if metrics else "NOT STARTED"


def trial_rows(results: list, runs: dict[str, str], phase: str, base, grid) -> list[dict]:
    """One row per grid point of a Ray ResultGrid (a fused trial's each), with its MLflow child run,
    in the grid's order (in_grid_order)."""
    from .child_runs import run_key
    from .trial import member_dirs, member_results, members_of

    rows = []
    for result in results:
        config, metrics = result.config or {}, result.metrics or {}
        trial_id = metrics.get("trial_id") or (Path(result.path).name.split("_")[-1] if result.path else "")
        fused, points = FUSED in config, members_of(config)
        parts = member_results(metrics) if metrics else [{} for _ in points]
        saved = uri_of(result.checkpoint.filesystem, result.checkpoint.path) if result.checkpoint else ""
        error = str(result.error).strip().splitlines()[-1][:500] if result.error is not None else ""
        for member, (point, part, folder) in enumerate(zip(points, parts, member_dirs(config))):
            row = {
                "trial": None,  # numbered in the grid's order (in_grid_order)
                "trial_id": trial_id,
                "phase": phase,
                "status": _status(result, metrics),
                "mlflow_run_id": runs.get(run_key(trial_id, member if fused else None), ""),
                **hyperparameters(point, base),
                "seed": point.get("seed", base.seed),
                "fused_group_size": len(points),
            }
            for key in (METRIC, "best_step", "test_precision", "test_recall", "test_f1", *COUNT_KEYS):
                row[key] = part.get(key)
            row.update({k: v for k, v in part.items() if k.startswith("test_f1_level")})
            row.update({k: metrics.get(k, "") for k in ("node_id", "node_ip", "gpu_ids")})
            row.update(
                gpu_share=metrics.get("gpu_share", 0.0),
                trial_start_time=metrics.get("trial_start_time"),
                # a trial stopped early has no end time of its own: its last report's
                trial_end_time=metrics.get("trial_end_time") or metrics.get("timestamp"),
                evaluations=metrics.get("training_iteration"),
                restarted=metrics.get("restarted", ""),  # a damaged checkpoint, trained again (trial.py)
                checkpoint=f"{saved.rstrip('/')}/{folder}" if saved and fused else saved,
                error=error,
            )
            rows.append(row)
    return in_grid_order(rows, grid)


def in_grid_order(rows: list[dict], grid) -> list[dict]:
    """The rows as their points stand in the grid, then by seed (a point sampled twice: as Ray lists
    them), numbered: Ray lists a resumed search's trials in another order, and a tie on dev F1 goes
    to the first row (select), as it would have without the interruption."""
    place = {point_key(p): i for i, p in enumerate(grid.points())}
    keys = grid.keys()
    rows = sorted(rows, key=lambda r: (place.get(point_key(point_of(r, keys)), len(place)), r["seed"]))
    for number, row in enumerate(rows):
        row["trial"] = number
    return rows


def by_trial(rows: list[dict]) -> list[dict]:
    """One row per Ray trial (a fused group's first point): what held the cluster's slots."""
    firsts: dict[tuple, dict] = {}
    for row in rows:
        firsts.setdefault((row["phase"], row["trial_id"]), row)
    return list(firsts.values())


def select(rows: list[dict]) -> dict | None:
    """The trial with the best dev F1 (the first row on a tie: in_grid_order); test F1 plays no part."""
    scored = [r for r in rows if number(r.get(METRIC)) is not None]
    if not scored:
        return None
    best = max(r[METRIC] for r in scored)
    return min((r for r in scored if r[METRIC] == best), key=lambda r: r["trial"])


def write_table(rows: list[dict], path: Path) -> Path:
    """The rows as CSV, their keys as columns in the order first seen."""
    columns = list(dict.fromkeys(k for row in rows for k in row))
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows([{k: ("" if v is None else v) for k, v in row.items()} for row in rows])
    return path


def finished(rows: list[dict]) -> list[dict]:
    return [r for r in rows if r["status"] == "TERMINATED"]


def _mean_std(values: list[float]) -> tuple[float, float]:
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def seed_stats(rows: list[dict]) -> dict:
    """Mean and std of dev and test F1 over the seeds that finished, and what they were counted on."""
    done = finished(rows)
    stats = {"seeds": len(rows), "seed_values": sorted(r["seed"] for r in rows), "seeds_finished": len(done)}
    for split, key in (("dev", METRIC), ("test", "test_f1")):
        values = [r[key] for r in done if number(r.get(key)) is not None]
        stats[f"seeds_{split}_f1_mean"], stats[f"seeds_{split}_f1_std"] = _mean_std(values)
    for key in COUNT_KEYS:  # the same sentences for every seed: the first one's
        stats[f"seeds_{key}"] = next((r[key] for r in done if number(r.get(key)) is not None), None)
    return stats


def timed(rows: list[dict]) -> list[dict]:
    """The trials with a start and an end time (a trial that never started has neither)."""
    times = ("trial_start_time", "trial_end_time")
    return [r for r in rows if all(number(r.get(k)) is not None for k in times)]


def max_overlap(rows: list[dict]) -> int:
    """The most trials that ran at the same time (from their start and end times)."""
    ran = timed(rows)
    events = sorted([(r["trial_start_time"], 1) for r in ran] + [(r["trial_end_time"], -1) for r in ran])
    running = most = 0
    for _, change in events:
        running += change
        most = max(most, running)
    return most


def slot_resource(gpus_per_trial: float) -> str:
    """What a search's trial slots are: GPUs when its trials ask for GPUs, else CPUs."""
    return "gpu" if gpus_per_trial > 0 else "cpu"


def busy_fraction(rows: list[dict], resource: str, capacity: float, cpus_per_trial: float) -> float | None:
    """The share of the slot-time (`capacity` GPUs or CPUs, first start to last end) that trials held: each
    its GPU share per GPU, or its --cpus-per-trial. None without slots or timed trials."""
    ran = timed(rows)
    if capacity <= 0 or not ran:
        return None
    span = max(r["trial_end_time"] for r in ran) - min(r["trial_start_time"] for r in ran)
    if span <= 0:
        return None
    held = 0.0
    for r in ran:
        gpus = len([g for g in str(r.get("gpu_ids") or "").split(",") if g])
        each = float(r.get("gpu_share") or 0) * gpus if resource == "gpu" else cpus_per_trial
        held += (r["trial_end_time"] - r["trial_start_time"]) * each
    return held / (capacity * span)
