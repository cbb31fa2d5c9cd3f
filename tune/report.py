"""The end of a search: the parent run's params, metrics, figures, tables and model (registered
with the alias `champion`), summary.json and trials.csv beside the Ray results, and the console
summary."""

from __future__ import annotations

import logging
import math
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from .cli import PROG
from .plan import Plan
from .results import busy_fraction, by_trial, max_overlap, seed_stats, slot_resource, write_table
from .space import METRIC, SYMBOLS, point_name, point_of
from .tracking import COUNT_KEYS, REPO, RUNS_VIEW, SELECTED_TAG, write_json

log = logging.getLogger("softfine.tune")


def finish(
    plan: Plan,
    tracker,
    folder: Path,
    experiment_id: str,
    parent_run_id: str,
    rows: list[dict],
    seed_rows: list[dict],
    selected: dict | None,
    seconds: float,
    unlogged: list[dict],
    cluster: dict,
    location: str | None = None,
) -> dict:
    """The parent run's params, metrics and artifacts; summary.json and trials.csv beside the Ray
    results (in `folder`, the search's folder or its working copy; `location`: where the search's
    files are kept, as shown); the summary on the console, with an account of what MLflow did not
    get (`unlogged`: the child runs' updates that the callbacks could not send)."""
    all_rows = rows + seed_rows
    retries = mark_retries(all_rows, folder)
    files = _figures(plan, folder, rows, all_rows, selected)
    summary, metrics = _summary(plan, rows, seed_rows, seconds, cluster, retries)
    summary.update(experiment_id=experiment_id, parent_run_id=parent_run_id, results=location or str(folder))
    params = _selection_figures(plan, summary, metrics, selected)
    if seed_rows:
        stats = seed_stats(seed_rows)
        summary.update(stats)
        metrics.update({k: v for k, v in stats.items() if k not in ("seeds", "seed_values")})
        metrics["seeds"] = stats["seeds"]
    _log_parent(tracker, parent_run_id, params, metrics, files, folder)
    if selected is not None and selected.get("checkpoint"):
        _log_model(tracker, plan, summary, parent_run_id, selected)
    mark_selection(tracker, plan, summary, selected)
    complete = selected is not None and (
        plan.mode == "search" or summary["seeds_finished"] == summary["seeds"]
    )
    tracker.attempt(
        "close the parent run",
        lambda: tracker.client.set_terminated(parent_run_id, status="FINISHED" if complete else "FAILED"),
    )
    summary["mlflow_account"] = {
        "driver_failures": tracker.failures,
        "unlogged_updates": len(unlogged),
        "trials_with_unlogged": sorted({op["trial_id"] for op in unlogged}),
    }
    write_json(folder / "summary.json", summary)
    print_summary(plan, summary, rows, seed_rows)
    return summary


def _figures(plan: Plan, folder: Path, rows: list[dict], all_rows: list[dict], selected: dict | None) -> dict:
    """trials.csv, the occupancy timeline and (a search) the dev-F1 figure, in `folder`."""
    from .plots import plot_dev_f1, plot_timeline

    flags = plan.flags
    files = {"trials table": write_table(all_rows, folder / "trials.csv")}
    # Every search's occupancy: its trial slots are GPUs, or CPUs in a CPU search (busy_fraction).
    slots = slot_resource(flags.gpus_per_trial)
    per_trial = flags.gpus_per_trial if slots == "gpu" else flags.cpus_per_trial
    files["occupancy timeline"] = plot_timeline(
        by_trial(all_rows),  # a fused trial holds its slot once, whatever its number of points
        folder / "occupancy_timeline.png",
        f"{plan.name}: trials on the cluster's {slots.upper()}s ({per_trial:g} {slots.upper()} per trial)",
    )
    if plan.mode == "search":
        files["dev F1 plot"] = plot_dev_f1(
            rows,
            folder / "dev_f1_vs_hyperparameters.png",
            f"SoftFiNE {flags.sampler} search on {plan.dataset}: best dev F1 per point",
            plan.keys,
            selected,
        )
    return files


def _summary(
    plan: Plan, rows: list[dict], seed_rows: list[dict], seconds: float, cluster: dict, retries: list[dict]
) -> tuple[dict, dict]:
    """The summary's counts and settings, and the parent run's search metrics."""
    flags = plan.flags
    counted = rows if plan.mode == "search" else seed_rows
    slots = slot_resource(flags.gpus_per_trial)
    busy_key = f"{slots}_busy_fraction"
    counts = {
        s: sum(r["status"] == s for r in counted) for s in ("TERMINATED", "STOPPED", "ERROR", "NOT STARTED")
    }
    summary: dict = {
        "search": plan.name,
        "mode": plan.mode,
        "dataset": plan.dataset,
        "trials": len(counted),
        **{k.lower().replace(" ", "_"): v for k, v in counts.items()},
        "wall_seconds": round(seconds, 1),
        "fuse": plan.fuse,
        "ray_trials": len(by_trial(counted)),
        "max_trials_at_once": max_overlap(by_trial(counted)),
        "trial_slots": slots,
        busy_key: busy_fraction(
            by_trial(rows + seed_rows), slots, cluster[f"{slots}s"], flags.cpus_per_trial
        ),
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
        busy_key: summary[busy_key],
    }
    return summary, metrics


def _selection_figures(plan: Plan, summary: dict, metrics: dict, selected: dict | None) -> dict:
    """The selected point (and its scores) into the summary and metrics; the parent's params of it."""
    params: dict = {}
    if selected is None:
        return params
    summary["selected"] = {k: selected[k] for k in plan.keys}
    params.update({f"selected_{k}": selected[k] for k in plan.keys})
    if plan.mode == "search":
        best = {
            METRIC: selected[METRIC],
            "best_test_f1": selected.get("test_f1"),
            **{f"best_{key}": selected.get(key) for key in COUNT_KEYS},
        }
        summary.update(
            best, selected_trial_id=selected["trial_id"], selected_run_id=selected["mlflow_run_id"]
        )
        params.update(selected_trial_id=selected["trial_id"], selected_run_id=selected["mlflow_run_id"])
        metrics.update({f"best_{k}": v for k, v in selected.items() if k.startswith("test_")})
        metrics.update(best)
    else:  # one configuration: its model is the seed with the best dev F1
        summary.update(model_seed=selected["seed"], model_run_id=selected["mlflow_run_id"])
        params.update(model_seed=selected["seed"], model_run_id=selected["mlflow_run_id"])
    return params


def _log_parent(tracker, parent_run_id: str, params: dict, metrics: dict, files: dict, folder: Path) -> None:
    """The selection's params, the search's metrics (numbers only) and its files on the parent run."""
    metrics = {
        k: v
        for k, v in metrics.items()
        if isinstance(v, (int, float)) and not isinstance(v, bool) and not math.isnan(v)
    }
    if params:
        tracker.attempt(
            "log the selected hyperparameters",
            lambda: tracker.client.log_batch(parent_run_id, params=_params(params)),
        )
    tracker.attempt(
        "log the search metrics", lambda: tracker.client.log_batch(parent_run_id, metrics=_metrics(metrics))
    )
    for what, path in files.items():
        if path is not None:
            tracker.attempt(
                f"log the {what}", lambda p=path: tracker.client.log_artifact(parent_run_id, str(p))
            )
    if files.get("dev F1 plot") is not None:
        log_study(tracker, parent_run_id, folder)


def _log_model(tracker, plan: Plan, summary: dict, parent_run_id: str, selected: dict) -> None:
    """The selected checkpoint as the parent's model, loaded first (log_checked_model); registered
    as the dataset's champion after a search."""
    summary["model_uri"], summary["model_error"] = log_checked_model(
        tracker, plan.tracking.uri, parent_run_id, selected["checkpoint"]
    )
    summary["selected_checkpoint"] = selected["checkpoint"]
    if summary["model_uri"] and plan.mode == "search":
        summary["registered_model"] = tracker.attempt(
            "register the selected model",
            lambda: register(tracker.client, summary["model_uri"], plan, parent_run_id, selected),
        )


def mark_retries(rows: list[dict], folder: Path) -> list[dict]:
    """The phases' retries (--max-failures), each with its trial's point; on the rows, the
    `retried_after` column: where and when each failed attempt ended, and why."""
    from .callback import describe_retry, read_retries

    retries = [
        {**retry, "phase": phase} for phase in ("search", "seeds") for retry in read_retries(folder, phase)
    ]
    for row in rows:
        row["retried_after"] = "; ".join(
            describe_retry(r)
            for r in retries
            if r["trial_id"] == row["trial_id"] and r["phase"] == row["phase"]
        )
    return retries


def _params(values: dict) -> list:
    from mlflow.entities import Param

    return [Param(k, str(v)) for k, v in values.items()]


def _metrics(values: dict) -> list:
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    return [Metric(k, float(v), now, 0) for k, v in values.items() if isinstance(v, (int, float))]


def log_study(tracker, parent_run_id: str, folder: Path) -> None:
    """Optuna's plots of the search's study and its trials table, on the parent run (optuna/)."""
    import optuna

    from .plots import optuna_figures
    from .tuner import OPTUNA_DB

    storage = f"sqlite:///{folder / OPTUNA_DB}"
    figures = optuna_figures(storage, folder.name)
    for name, figure in figures.items():
        tracker.attempt(
            f"log {name}", lambda f=figure, n=name: tracker.client.log_figure(parent_run_id, f, n)
        )
    table = optuna.load_study(study_name=folder.name, storage=storage).trials_dataframe()
    table = table.astype(
        {c: str for c in table.columns if str(table[c].dtype).startswith(("datetime", "timedelta"))}
    )
    tracker.attempt(
        "log the study's trials table",
        lambda: tracker.client.log_table(parent_run_id, data=table, artifact_file="optuna/trials.json"),
    )
    import matplotlib.pyplot as plt

    plt.close("all")


def register(client, model_uri: str, plan: Plan, parent_run_id: str, selected: dict) -> str:
    """The selected model as a new version of the dataset's registered model, with the alias
    `champion` moved to it, its point, data and search as tags and a one-line description; returns
    "NAME@champion (version N)"."""
    from mlflow.exceptions import MlflowException

    name = f"softfine-{plan.dataset}"
    tags = {
        **{k: _value(selected[k]) for k in plan.keys},
        "dataset": plan.dataset,
        METRIC: str(selected[METRIC]),
        "test_f1": str(selected.get("test_f1")),
        "softfine.search": plan.name,
        "softfine.search_run_id": parent_run_id,
        "softfine.selected_run_id": selected["mlflow_run_id"],
    }
    description = (
        f"SoftFiNE on {plan.dataset}, {point_text(selected, plan.keys)}: dev F1 "
        f"{selected['best_dev_f1']:.4f}, test F1 {_f1(selected.get('test_f1'))}; selected by the search "
        f"{plan.name} (MLflow run {parent_run_id})."
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
    """What a search runs, counted as it is: "grid search on resume: 36 points in 3 fused Ray
    trials of at most 12 points" (the parent run's note, the console's first line)."""
    if plan.mode == "seeds":
        return f"one configuration with {points} seeds on {plan.dataset}, one Ray trial each"
    size = (
        f"{points} points in {ray_trials} fused Ray trials of at most {plan.fuse} points"
        if plan.fuse != 1
        else f"{points} points, one Ray trial each"
    )
    then = f", then the selection with {plan.flags.seeds} seeds" if plan.flags.seeds else ""
    return f"{plan.flags.sampler} search on {plan.dataset}: {size}{then}"


def planned_ray_trials(plan: Plan) -> int:
    """The Ray trials of the search's first phase: a fused grid's groups, else one per point."""
    from .space import fused_groups

    if plan.mode == "search" and plan.fuse != 1:
        return len(fused_groups(plan.grid.points(), plan.fuse, plan.base))
    return plan.num_samples


def point_text(row: dict, keys: Sequence[str]) -> str:
    """ "(α_aug, α_fea, β, γ) = (0.01, 0.005, 2, 2.5)" (with the soft scope when it is searched)."""
    return f"({', '.join(SYMBOLS[k] for k in keys)}) = ({', '.join(_value(row[k]) for k in keys)})"


def run_link(experiment_id: str, run_id: str, text: str) -> str:
    """A Markdown link to a run's page, relative to the UI's address (a run's description)."""
    return f"[{text}](#/experiments/{experiment_id}/runs/{run_id}?{RUNS_VIEW})"


def _mean_std(summary: dict, split: str) -> str:
    """ "0.6123 ± 0.0100" of the seeds' F1 on a split."""
    return f"{_f1(summary[f'seeds_{split}_f1_mean'])} ± {_f1(summary[f'seeds_{split}_f1_std'])}"


def selection_head(plan: Plan, summary: dict, selected: dict | None) -> str:
    """The description's first paragraph: the selection, its dev and test F1 with what they were
    counted on, a link to its child run, the model."""
    if selected is None:
        return "**Nothing selected**: no trial produced a dev F1."
    point, experiment = point_of(selected, plan.keys), summary["experiment_id"]
    if plan.mode == "seeds":  # the model is the seed with the best dev F1
        link = run_link(
            experiment, selected["mlflow_run_id"], point_name({**point, "seed": selected["seed"]})
        )
        return (
            f"**{point_text(selected, plan.keys)} with {summary['seeds']} seeds**: dev F1 "
            f"**{_mean_std(summary, 'dev')}**{_on(summary, 'seeds_', 'dev')}; test F1 "
            f"**{_mean_std(summary, 'test')}**{_on(summary, 'seeds_', 'test')} (mean ± standard deviation). "
            f"The model is {link}'s, the best dev F1."
        )
    link = run_link(experiment, selected["mlflow_run_id"], point_name(point))
    model = (
        f"; its model: `models:/softfine-{plan.dataset}@champion`" if summary.get("registered_model") else ""
    )
    seeds = (
        f" With {summary['seeds']} seeds: dev F1 {_mean_std(summary, 'dev')}, test F1 "
        f"{_mean_std(summary, 'test')}."
        if "seeds" in summary
        else ""
    )
    return (
        f"**Selected {point_text(selected, plan.keys)}**: dev F1 **{_f1(summary['best_dev_f1'])}**"
        f"{_on(summary, 'best_', 'dev')}; test F1 **{_f1(summary['best_test_f1'])}**"
        f"{_on(summary, 'best_', 'test')}. Its run: {link}{model}.{seeds}"
    )


def selection_note(plan: Plan, summary: dict, selected: dict | None) -> str:
    """The parent run's description once the search has ended: the selection first, then what the
    search ran (as counted at its end) and its command."""
    counts = (
        f"{summary['terminated']} finished, {summary['stopped']} stopped early, {summary['error']} "
        "failed, in "
        f"{summary['wall_seconds']:.0f} s"
    )
    point = f"its {','.join(SYMBOLS[k] for k in plan.keys)}"
    naming = (
        "by its seed"
        if plan.mode == "seeds"
        else f"by {point}, a seed's by its seed"
        if plan.flags.seeds
        else f"by {point}"
    )
    return (
        f"{selection_head(plan, summary, selected)}\n\nSoftFiNE "
        f"{describe_search(plan, summary['trials'], summary['ray_trials'])} ({counts}); a child run is named "
        f"{naming}. Command: `{PROG} {' '.join(plan.argv)}`"
    )


def mark_selection(tracker, plan: Plan, summary: dict, selected: dict | None) -> None:
    """The selection on the parent run's description (what MLflow's run page shows first) and,
    as SELECTED_TAG, on the child run whose model the parent has."""
    parent = summary["parent_run_id"]
    if selected is not None and selected.get("mlflow_run_id"):
        tracker.attempt(
            "tag the selected run",
            lambda: tracker.client.set_tag(selected["mlflow_run_id"], SELECTED_TAG, "true"),
        )
    tracker.attempt(
        "describe the selection on the parent run",
        lambda: tracker.client.set_tag(
            parent, "mlflow.note.content", selection_note(plan, summary, selected)
        ),
    )


def log_checked_model(
    tracker, uri: str, parent_run_id: str, checkpoint: str
) -> tuple[str | None, str | None]:
    """(its model URI, None): the selected checkpoint logged as the parent run's model once it has
    been loaded and has tagged an example; (None, why) when it cannot be: a damaged model is
    never logged, registered or served."""
    from ray.tune import Checkpoint

    from .tracking import check_model, log_model

    with tempfile.TemporaryDirectory(prefix="softfine-selected-") as tmp:
        local = Path(Checkpoint(checkpoint).to_directory(tmp)) / "best"
        try:
            check_model(local)
        except Exception as err:  # noqa: BLE001 - whatever loading or tagging raised: the model is unusable
            why = (str(err).strip().splitlines() or [type(err).__name__])[0]
            return (
                None,
                f"the selected checkpoint {checkpoint} cannot be loaded ({why[:300]}); nothing was logged as "
                "the model or registered",
            )
        return tracker.attempt("log the selected model", lambda: log_model(uri, parent_run_id, local)), None


def ui_hint(store, experiment_id: str, run_id: str) -> str:
    from .tracking import default_tracking_uri, is_remote

    # MLflow 3.17's pages open in GenAI mode unless the address (or the browser) says Model training.
    page = f"#/experiments/{experiment_id}/runs/{run_id}?{RUNS_VIEW}"
    if is_remote(store.uri):  # the server's address without credentials (the browser asks for them)
        return f"open {store.uri.rstrip('/')}/{page}"
    server = REPO / "mlflow" / "server.sh"
    if store.uri == default_tracking_uri() and server.is_file():  # the repository's server serves this store
        return (
            f"run `{server.relative_to(REPO)}` (the UI on this store), then open http://127.0.0.1:5000/{page}"
        )
    return (
        f"run `mlflow ui --backend-store-uri {store.display} --host 127.0.0.1 --port 5000`, then open "
        f"http://127.0.0.1:5000/{page}"
    )


def short(text: str, width: int = 160) -> str:
    return text if len(text) <= width else text[: width - 3] + "..."


def _value(value) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _f1(value) -> str:
    return f"{value:.4f}" if isinstance(value, (int, float)) and not math.isnan(value) else "-"


def _on(summary: dict, prefix: str, split: str) -> str:
    """ "on N sentences, M gold entities" of a split, where known."""
    sentences, entities = (
        summary.get(f"{prefix}{split}_sentences"),
        summary.get(f"{prefix}{split}_gold_entities"),
    )
    if sentences is None:
        return ""
    return f" on {sentences:g} sentences, {entities:g} gold entities"


def _busy(summary: dict) -> str:
    """How busy the trial slots were, for the summary's first line."""
    slots = summary["trial_slots"]
    fraction = summary[f"{slots}_busy_fraction"]
    if fraction is None:
        return "."
    return f"; the {slots.upper()}s were busy {fraction:.0%} of the time while trials remained."


def print_summary(plan: Plan, summary: dict, rows: list[dict], seed_rows: list[dict]) -> None:
    """The search's last screen: what ran, the best points, retries and failures, the selection,
    the seeds, where MLflow and the results are."""
    out = [
        *_headline(plan, summary),
        *(_ranking(plan, rows) if plan.mode == "search" else []),
        *_problems(plan.keys, rows + seed_rows),
        *_selection(plan, summary),
        *(_seeds(plan, summary) if seed_rows else []),
        *_mlflow(plan, summary),
    ]
    print("\n".join(out), flush=True)


def _f1(value) -> str:
    return f"{value:.4f}" if isinstance(value, (int, float)) and not math.isnan(value) else "  -   "


def _headline(plan: Plan, summary: dict) -> list[str]:
    out = []
    kind = "Seeds" if plan.mode == "seeds" else "Search"
    what = (
        f"{summary['trials']} points in {summary['ray_trials']} fused trials of at most "
        f"{summary['fuse']} points"
        if summary["fuse"] != 1
        else f"{summary['trials']} trials"
    )
    out.append(
        f"\n{'=' * 100}\n{kind} {summary['search']} on {plan.dataset}: {what} "
        f"({summary['terminated']} finished, {summary['stopped']} stopped early, {summary['error']} failed) "
        f"in {summary['wall_seconds']:.0f} s, at most {summary['max_trials_at_once']} at once"
        + _busy(summary)
    )
    return out


def _ranking(plan: Plan, rows: list[dict]) -> list[str]:
    scope, out = "soft_scope" in plan.keys, []
    ranked = sorted(
        [r for r in rows if isinstance(r.get(METRIC), (int, float))],
        key=lambda r: (-r[METRIC], r["trial"]),
    )
    out.append(
        f"Best configurations by dev F1 (the first {min(5, len(ranked))} of {len(ranked)}; all in "
        "trials.csv):"
    )
    out.append(
        f"  {'rank':>4}  {'α_aug':>6} {'α_fea':>6} {'β':>4} {'γ':>4}  "
        + ("scope    " if scope else "")
        + f"{'dev F1':>6}  {'test F1':>7}  {'status':<10}  MLflow run"
    )
    for rank, r in enumerate(ranked[:5], 1):
        out.append(
            f"  {rank:>4}  {r['alpha_aug']:>6g} {r['alpha_fea']:>6g} {r['beta']:>4g} {r['gamma']:>4g}  "
            + (f"{r['soft_scope']:<7}  " if scope else "")
            + f"{_f1(r[METRIC])}  {_f1(r.get('test_f1')):>7}  {r['status']:<10}  "
            + r["mlflow_run_id"]
        )
    return out


def _problems(keys, rows: list[dict]) -> list[str]:
    """Trials retried from a checkpoint, and failed ones (ten of each at most)."""
    out = []
    for r in [r for r in rows if r.get("retried_after")][:10]:
        out.append(
            f"  retried from its last checkpoint: trial {r['trial_id']} ("
            + ", ".join(_value(r[k]) for k in keys)
            + f", seed {r['seed']}), {r['status']} in the end; {short(r['retried_after'], 400)}"
        )
    for r in [r for r in rows if r["status"] == "ERROR"][:10]:
        out.append(
            f"  failed: trial {r['trial_id']} ("
            + ", ".join(_value(r[k]) for k in keys)
            + f", seed {r['seed']}): {r['error']}"
        )
    return out


def _selection(plan: Plan, summary: dict) -> list[str]:
    keys, scope, out = plan.keys, "soft_scope" in plan.keys, []
    setting = (
        f"soft labels {'on' if plan.base.soft else 'off (--no-soft)'}, augmentation "
        f"{'on' if plan.base.aug else 'off (--no-aug)'}"
        + ("" if scope else f", soft scope {plan.base.soft_scope}")
    )
    point = " ".join(f"{k}={_value(v)}" for k, v in summary.get("selected", {}).items())
    if plan.mode == "seeds":
        out.append(
            "Configuration: "
            f"{point or ' '.join(f'{k}={_value(v)}' for k, v in plan.grid.points()[0].items())}"
            f" ({setting}), seeds {', '.join(map(str, summary['seed_values']))}."
        )
    elif "selected" in summary:
        out.append(
            f"Selected: {point} ({setting}): dev F1 "
            f"{_f1(summary['best_dev_f1'])}{_on(summary, 'best_', 'dev')}, "
            f"test F1 {_f1(summary['best_test_f1'])}{_on(summary, 'best_', 'test')}"
        )
        paper = plan.preset.get("paper_selection")
        if paper:
            out.append(
                "  (the paper selected "
                + ", ".join(f"{k}={paper[k]:g}" for k in keys if k in paper)
                + f" on {plan.dataset})"
            )
    else:
        out.append("No trial produced a dev F1: nothing selected.")
    return out


def _seeds(plan: Plan, summary: dict) -> list[str]:
    out = []
    which = "The configuration" if plan.mode == "seeds" else "Selected configuration"
    failed = summary["seeds"] - summary["seeds_finished"]
    left_out = f" ({failed} did not finish: left out of the mean)" if failed else ""
    dev, test = (
        f"{_f1(summary[f'seeds_{split}_f1_mean'])} ± {_f1(summary[f'seeds_{split}_f1_std'])}"
        f"{_on(summary, 'seeds_', split)}"
        for split in ("dev", "test")
    )
    out.append(
        f"{which} with {summary['seeds']} seeds{left_out}: dev F1 {dev}; test F1 {test} "
        "(mean ± standard deviation)"
    )
    return out


def _mlflow(plan: Plan, summary: dict) -> list[str]:
    """Where the runs, the UI and the model are, and what MLflow could not record."""
    out = []
    out.append(
        f"MLflow: experiment {plan.experiment_name}, parent run {summary['parent_run_id']} at "
        f"{plan.tracking.display}"
    )
    out.append(f"  {ui_hint(plan.tracking, summary['experiment_id'], summary['parent_run_id'])}")
    if summary.get("model_uri"):
        which = (
            f" (seed {summary['model_seed']}, the best dev F1 of the seeds)" if plan.mode == "seeds" else ""
        )
        registered = (
            f", registered as {summary['registered_model']}: models:/softfine-{plan.dataset}@champion"
            if summary.get("registered_model")
            else ""
        )
        out.append(
            f"  model{which}: mlflow.pyfunc.load_model('runs:/{summary['parent_run_id']}/model'){registered}"
        )
    account = summary["mlflow_account"]
    if account["driver_failures"] or account["unlogged_updates"]:
        out.append(
            f"MLflow could not record everything: {account['unlogged_updates']} update(s) of "
            f"{len(account['trials_with_unlogged'])} trial(s) and {len(account['driver_failures'])} "
            "update(s) "
            "of the parent run were not logged:"
        )
        if account["unlogged_updates"]:
            out.append(
                f"  the trials' updates are kept in {summary['results']}/mlflow_unlogged.*.jsonl "
                f"(trials {', '.join(account['trials_with_unlogged'][:10])})"
            )
        for failure in account["driver_failures"][:20]:
            out.append(f"  parent: {short(failure)}")
        out.append(
            f"  The results themselves are complete in {summary['results']} (summary.json, trials.csv)."
        )
    else:
        out.append("MLflow recorded every trial and the parent run.")
    out.append(f"Ray results: {summary['results']}\n{'=' * 100}")
    return out
