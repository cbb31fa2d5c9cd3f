"""The end of a search: the parent run's params, metrics, figures and tables, its model (registered
with the alias `champion`), the selection on its description; summary.json and trials.csv."""

from __future__ import annotations

import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from softfine.errors import first_line

from .account import read_account
from .cli import PROG
from .console import counted_on, ended_counts, f1, print_summary, run_page, seeds_f1, value_text
from .plan import Plan
from .record import SearchRecord
from .results import busy_fraction, by_trial, max_overlap, number, seed_stats, slot_resource, write_table
from .runs import COUNT_KEYS, SELECTED_TAG
from .space import METRIC, SYMBOLS, fused_groups, point_name, point_of
from .storage import SearchFiles, write_json

STATUSES = ("TERMINATED", "STOPPED", "ERROR", "NOT STARTED")


def finish(
    plan: Plan,
    tracker,
    record: SearchRecord,
    files: SearchFiles,
    cluster: dict,
    rows: list[dict],
    seed_rows: list[dict],
    selected: dict | None,
    seconds: float,
) -> dict:
    """The parent run's params, metrics, files, model and description; summary.json and trials.csv
    pushed with the search's files, then the record "done"; the console's summary."""
    folder = files.folder
    all_rows = rows + seed_rows
    unlogged = [op for phase in ("search", "seeds") for op in read_account(folder, phase)[1]]
    retries = mark_retries(all_rows, folder)
    figures = _figures(plan, folder, rows, all_rows, selected)
    summary, metrics = _summary(plan, rows, seed_rows, seconds, cluster, retries)
    summary.update(
        experiment_id=record.experiment_id, parent_run_id=record.parent_run_id, results=files.location
    )
    params = _selection_figures(plan, summary, metrics, selected)
    if seed_rows:
        stats = seed_stats(seed_rows)
        summary.update(stats)
        metrics.update({k: v for k, v in stats.items() if k != "seed_values"})
    _log_parent(tracker, record.parent_run_id, params, metrics, figures, folder)
    if selected is not None and selected.get("checkpoint"):
        _log_model(tracker, plan, summary, record.parent_run_id, selected)
    mark_selection(tracker, plan, summary, selected)
    done = selected is not None and (plan.mode == "search" or summary["seeds_finished"] == summary["seeds"])
    end = "FINISHED" if done else "FAILED"
    tracker.attempt(
        "close the parent run", lambda: tracker.client.set_terminated(record.parent_run_id, status=end)
    )
    summary["mlflow_account"] = {
        "driver_failures": tracker.failures,
        "unlogged_updates": len(unlogged),
        "trials_with_unlogged": sorted({op["trial_id"] for op in unlogged}),
    }
    restarted = [r for r in all_rows if r.get("restarted")]
    if restarted:  # trials whose damaged checkpoint was not resumed from (trial.py)
        summary["restarted"] = [{"trial_id": r["trial_id"], "why": r["restarted"]} for r in restarted]
    write_json(folder / "summary.json", summary)
    print_summary(plan, summary, rows, seed_rows)
    files.push()  # the summary, trials.csv and the figures (the record last: "done" once they are there)
    record.done(summary, files)
    for row in restarted:
        point = point_name(point_of(row, plan.keys))
        print(f"{PROG}: trial {row['trial_id']} ({point}): {row['restarted']}", flush=True)
    return summary


def mark_retries(rows: list[dict], folder: Path) -> list[dict]:
    """The phases' retries (--max-failures); each row's `retried_after`: how its failed attempts ended."""
    from .account import describe_retry, read_retries

    retries = [{**r, "phase": phase} for phase in ("search", "seeds") for r in read_retries(folder, phase)]
    for row in rows:
        mine = [r for r in retries if r["trial_id"] == row["trial_id"] and r["phase"] == row["phase"]]
        row["retried_after"] = "; ".join(describe_retry(r) for r in mine)
    return retries


def _figures(plan: Plan, folder: Path, rows: list[dict], all_rows: list[dict], selected: dict | None) -> dict:
    """trials.csv, the occupancy timeline and (a search) the dev-F1 figure, in `folder`."""
    from .plots import plot_dev_f1, plot_timeline

    flags, files = plan.flags, {"trials table": write_table(all_rows, folder / "trials.csv")}
    # Every search's occupancy: its trial slots are GPUs, or CPUs in a CPU search (busy_fraction).
    slots = slot_resource(flags.gpus_per_trial)
    per_trial = flags.gpus_per_trial if slots == "gpu" else flags.cpus_per_trial
    title = f"{plan.name}: trials on the cluster's {slots.upper()}s ({per_trial:g} {slots.upper()} per trial)"
    # A fused trial holds its slot once, whatever its number of points.
    files["occupancy timeline"] = plot_timeline(by_trial(all_rows), folder / "occupancy_timeline.png", title)
    if plan.mode == "search":
        title = f"SoftFiNE {flags.sampler} search on {plan.dataset}: best dev F1 per point"
        path = folder / "dev_f1_vs_hyperparameters.png"
        files["dev F1 plot"] = plot_dev_f1(rows, path, title, plan.keys, selected)
    return files


def _summary(
    plan: Plan, rows: list[dict], seed_rows: list[dict], seconds: float, cluster: dict, retries: list[dict]
) -> tuple[dict, dict]:
    """The summary's counts and settings, and the parent run's search metrics."""
    counted = rows if plan.mode == "search" else seed_rows
    trials = by_trial(counted)
    counts = {s: sum(r["status"] == s for r in counted) for s in STATUSES}
    slots = slot_resource(plan.flags.gpus_per_trial)
    busy = busy_fraction(by_trial(rows + seed_rows), slots, cluster[f"{slots}s"], plan.flags.cpus_per_trial)
    summary: dict = {
        "search": plan.name,
        "mode": plan.mode,
        "dataset": plan.dataset,
        "trials": len(counted),
        **{k.lower().replace(" ", "_"): v for k, v in counts.items()},
        "wall_seconds": round(seconds, 1),
        "fuse": plan.fuse,
        "ray_trials": len(trials),
        "max_trials_at_once": max_overlap(trials),
        "trial_slots": slots,
        f"{slots}_busy_fraction": busy,
        "soft_labels": plan.base.soft,
        "augmentation": plan.base.aug,
        "soft_scope": plan.grid.soft_scope,
        "mlflow_uri": plan.tracking.display,
        "experiment_id": None,
        "parent_run_id": None,
        "results": None,
        "retries": retries,
    }
    metrics = {
        "trials_finished": counts["TERMINATED"],
        "trials_failed": counts["ERROR"],
        "trials_retried": len({r["trial_id"] for r in retries}),
        "trials_stopped_early": counts["STOPPED"],
        "search_wall_seconds": seconds,
        "max_trials_at_once": summary["max_trials_at_once"],
        f"{slots}_busy_fraction": busy,
    }
    return summary, metrics


def _selection_figures(plan: Plan, summary: dict, metrics: dict, selected: dict | None) -> dict:
    """The selected point (and its scores) into the summary and metrics; the parent's params of it."""
    if selected is None:
        return {}
    summary["selected"] = {k: selected[k] for k in plan.keys}
    params = {f"selected_{k}": selected[k] for k in plan.keys}
    if plan.mode == "seeds":  # one configuration: its model is the seed with the best dev F1
        model = {"model_seed": selected["seed"], "model_run_id": selected["mlflow_run_id"]}
        summary.update(model)
        return {**params, **model}
    best = {METRIC: selected[METRIC], "best_test_f1": selected.get("test_f1")}
    best.update({f"best_{key}": selected.get(key) for key in COUNT_KEYS})
    run = {"selected_trial_id": selected["trial_id"], "selected_run_id": selected["mlflow_run_id"]}
    summary.update(best, **run)
    metrics.update({f"best_{k}": v for k, v in selected.items() if k.startswith("test_")})
    metrics.update(best)
    return {**params, **run}


def _log_parent(tracker, run: str, params: dict, metrics: dict, files: dict, folder: Path) -> None:
    """The selection's params, the search's metrics (numbers only) and its files on the parent run."""
    from mlflow.entities import Metric, Param

    client, now = tracker.client, int(time.time() * 1000)
    if params:
        values = [Param(k, str(v)) for k, v in params.items()]
        tracker.attempt("log the selected hyperparameters", lambda: client.log_batch(run, params=values))
    scores = [Metric(k, float(v), now, 0) for k, v in metrics.items() if number(v) is not None]
    tracker.attempt("log the search metrics", lambda: client.log_batch(run, metrics=scores))
    for what, path in files.items():
        if path is not None:
            tracker.attempt(f"log the {what}", lambda p=path: client.log_artifact(run, str(p)))
    if files.get("dev F1 plot") is not None:
        log_study(tracker, run, folder)


def log_study(tracker, parent_run_id: str, folder: Path) -> None:
    """Optuna's plots of the search's study and its trials table, on the parent run (optuna/)."""
    import optuna

    from .plots import optuna_figures
    from .tuner import OPTUNA_DB

    storage, client = f"sqlite:///{folder / OPTUNA_DB}", tracker.client
    for name, figure in optuna_figures(storage, folder.name).items():
        tracker.attempt(f"log {name}", lambda f=figure, n=name: client.log_figure(parent_run_id, f, n))
    table = optuna.load_study(study_name=folder.name, storage=storage).trials_dataframe()
    table = table.astype({c: str for c in table if str(table[c].dtype).startswith(("datetime", "timedelta"))})
    tracker.attempt(
        "log the study's trials table",
        lambda: client.log_table(parent_run_id, data=table, artifact_file="optuna/trials.json"),
    )
    import matplotlib.pyplot as plt

    plt.close("all")


def _log_model(tracker, plan: Plan, summary: dict, parent_run_id: str, selected: dict) -> None:
    """The selected checkpoint, checked, as the parent's model; after a search, the dataset's champion."""
    summary["model_uri"], summary["model_error"] = log_checked_model(
        tracker, plan.tracking.uri, parent_run_id, selected["checkpoint"]
    )
    summary["selected_checkpoint"] = selected["checkpoint"]
    if summary["model_uri"] and plan.mode == "search":
        summary["registered_model"] = tracker.attempt(
            "register the selected model",
            lambda: register(tracker.client, summary["model_uri"], plan, parent_run_id, selected),
        )


def log_checked_model(tracker, uri: str, run_id: str, checkpoint: str) -> tuple[str | None, str | None]:
    """The selected checkpoint as the parent's model once it loads and tags an example: (URI, None), else
    (None, why): a damaged model is never logged or served."""
    from ray.tune import Checkpoint

    from .model import check_model, log_model

    with tempfile.TemporaryDirectory(prefix="softfine-selected-") as tmp:
        local = Path(Checkpoint(checkpoint).to_directory(tmp)) / "best"
        try:
            check_model(local)
        except Exception as err:  # noqa: BLE001 - whatever loading or tagging raised: the model is unusable
            return None, (
                f"the selected checkpoint {checkpoint} cannot be loaded ({first_line(err)}); nothing was "
                "logged as the model or registered"
            )
        return tracker.attempt("log the selected model", lambda: log_model(uri, run_id, local)), None


def register(client, model_uri: str, plan: Plan, parent_run_id: str, selected: dict) -> str:
    """The selected model as a new version of softfine-DATASET, tagged, the alias `champion` on it."""
    from mlflow.exceptions import MlflowException

    name = f"softfine-{plan.dataset}"
    tags = {
        **{k: value_text(selected[k]) for k in plan.keys},
        "dataset": plan.dataset,
        METRIC: str(selected[METRIC]),
        "test_f1": str(selected.get("test_f1")),
        "softfine.search": plan.name,
        "softfine.search_run_id": parent_run_id,
        "softfine.selected_run_id": selected["mlflow_run_id"],
    }
    description = (
        f"SoftFiNE on {plan.dataset}, {point_text(selected, plan.keys)}: dev F1 {selected[METRIC]:.4f}, test "
        f"F1 {f1(selected.get('test_f1'))}; selected by the search {plan.name} (MLflow run {parent_run_id})."
    )
    try:  # the client's calls, not mlflow.register_model, which prints two lines of its own
        client.create_registered_model(name)
    except MlflowException as err:
        if err.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    model_id = model_uri.removeprefix("models:/") if model_uri.startswith("models:/m-") else None
    version = client.create_model_version(
        name, model_uri, run_id=parent_run_id, tags=tags, description=description, model_id=model_id
    )
    client.set_registered_model_alias(name, "champion", version.version)
    return f"{name}@champion (version {version.version})"


# -- The selection where MLflow's UI shows it first: the parent run's description ------------------


def describe_search(plan: Plan, points: int, ray_trials: int) -> str:
    """What a search runs, counted as it is (the parent run's note, the console's first line)."""
    if plan.mode == "seeds":
        return f"one configuration with {points} seeds on {plan.dataset}, one Ray trial each"
    size = f"{points} points in {ray_trials} fused Ray trials of at most {plan.fuse} points"
    if plan.fuse == 1:
        size = f"{points} points, one Ray trial each"
    then = f", then the selection with {plan.flags.seeds} seeds" if plan.flags.seeds else ""
    return f"{plan.flags.sampler} search on {plan.dataset}: {size}{then}"


def planned_ray_trials(plan: Plan) -> int:
    """The Ray trials of the search's first phase: a fused grid's groups, else one per point."""
    if plan.mode == "search" and plan.fuse != 1:
        return len(fused_groups(plan.grid.points(), plan.fuse, plan.base))
    return plan.num_samples


def mark_selection(tracker, plan: Plan, summary: dict, selected: dict | None) -> None:
    """The selection on the parent run's description and, as SELECTED_TAG, on its child run."""
    client, parent = tracker.client, summary["parent_run_id"]
    if selected is not None and (run := selected.get("mlflow_run_id")):
        tracker.attempt("tag the selected run", lambda: client.set_tag(run, SELECTED_TAG, "true"))
    tracker.attempt(
        "describe the selection on the parent run",
        lambda: client.set_tag(parent, "mlflow.note.content", selection_note(plan, summary, selected)),
    )


def selection_note(plan: Plan, summary: dict, selected: dict | None) -> str:
    """The parent run's description: the selection first, then what the search ran, and its command."""
    naming = f"by its {','.join(SYMBOLS[k] for k in plan.keys)}"
    if plan.mode == "seeds":
        naming = "by its seed"
    elif plan.flags.seeds:
        naming += ", a seed's by its seed"
    what = describe_search(plan, summary["trials"], summary["ray_trials"])
    return (
        f"{selection_head(plan, summary, selected)}\n\nSoftFiNE {what} ({ended_counts(summary)}, in "
        f"{summary['wall_seconds']:.0f} s); a child run is named {naming}. Command: "
        f"`{PROG} {' '.join(plan.argv)}`"
    )


def selection_head(plan: Plan, summary: dict, selected: dict | None) -> str:
    """The description's first paragraph: the selection, its F1s and what they were counted on, its run."""
    if selected is None:
        return "**Nothing selected**: no trial produced a dev F1."
    point, page = point_of(selected, plan.keys), run_page(summary["experiment_id"], selected["mlflow_run_id"])
    if plan.mode == "seeds":  # the model is the seed with the best dev F1
        link = f"[{point_name({**point, 'seed': selected['seed']})}]({page})"
        return (
            f"**{point_text(selected, plan.keys)} with {summary['seeds']} seeds**: dev F1 "
            f"**{seeds_f1(summary, 'dev')}**{counted_on(summary, 'seeds_', 'dev')}; test F1 "
            f"**{seeds_f1(summary, 'test')}**{counted_on(summary, 'seeds_', 'test')} (mean ± standard "
            f"deviation). The model is {link}'s, the best dev F1."
        )
    model, seeds = f"; its model: `models:/softfine-{plan.dataset}@champion`", ""
    if "seeds" in summary:
        seeds = f" With {summary['seeds']} seeds: dev F1 {seeds_f1(summary, 'dev')}, test F1 "
        seeds += f"{seeds_f1(summary, 'test')}."
    return (
        f"**Selected {point_text(selected, plan.keys)}**: dev F1 **{f1(summary[METRIC])}**"
        f"{counted_on(summary, 'best_', 'dev')}; test F1 **{f1(summary['best_test_f1'])}**"
        f"{counted_on(summary, 'best_', 'test')}. Its run: [{point_name(point)}]({page})"
        f"{model if summary.get('registered_model') else ''}.{seeds}"
    )


def point_text(row: dict, keys: Sequence[str]) -> str:
    """ "(α_aug, α_fea, β, γ) = (0.01, 0.005, 2, 2.5)" (with the soft scope when it is searched)."""
    return f"({', '.join(SYMBOLS[k] for k in keys)}) = ({', '.join(value_text(row[k]) for k in keys)})"
