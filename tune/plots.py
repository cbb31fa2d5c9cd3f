"""The search's figures for the parent run: dev F1 against each hyperparameter, and Optuna's own
plots of the study (parameter importances, slice, the beta x gamma contour, optimisation history)."""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Sequence
from pathlib import Path

from .space import METRIC, SEARCHED, SYMBOLS

log = logging.getLogger("softfine.tune")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # Optuna's slice and contour plots draw categorical values (our grid's) as strings that parse
    # as numbers; matplotlib then logs an INFO line per axis that says nothing about the search.
    logging.getLogger("matplotlib.category").setLevel(logging.WARNING)

    return plt


def plot_dev_f1(
    rows: list[dict], path: Path, title: str, keys: Sequence[str] = SEARCHED, selected: dict | None = None
) -> Path:
    """Dev F1 of every point against each hyperparameter (alpha_aug, alpha_fea, beta, gamma, and
    soft_scope when searched), one panel each, two panels a row: the points, the mean per value and
    the selected point (a star). Sized to be read in MLflow's artifact view, about 900 pixels wide."""
    plt = _pyplot()
    scored = [r for r in rows if isinstance(r.get(METRIC), (int, float))]
    columns, lines = 2, math.ceil(len(keys) / 2)
    figure, axes = plt.subplots(lines, columns, figsize=(9, 0.6 + 3.2 * lines), sharey=True, squeeze=False)
    star = (
        None
        if selected is None
        else f"selected: {', '.join(_tick(selected[k]) for k in keys)} (dev F1 {selected['best_dev_f1']:.4f})"
    )
    for ax, key in zip(axes.flat, keys):
        _dev_f1_panel(ax, scored, key, selected, star)
    for ax in axes.flat[len(keys) :]:
        ax.set_visible(False)
    for ax in axes[:, 0]:
        ax.set_ylabel("dev F1", fontsize=12)
    handles, labels = axes.flat[0].get_legend_handles_labels()
    figure.legend(
        handles, labels, loc="upper center", bbox_to_anchor=(0.5, 0.93), ncol=3, fontsize=11, frameon=False
    )
    figure.suptitle(title, fontsize=13)
    figure.tight_layout(rect=(0, 0, 1, 0.88))
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def _tick(value) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _dev_f1_panel(ax, scored: list[dict], key: str, selected: dict | None, star: str | None) -> None:
    """One hyperparameter's panel: the points (spread a little sideways, so that equal scores stay
    visible), the mean per value, and the selected point."""
    values = sorted({r[key] for r in scored})
    positions = {v: i for i, v in enumerate(values)}
    offset = [0.08 * ((n % 5) - 2) for n in range(len(scored))]
    ax.scatter(
        [positions[r[key]] + d for r, d in zip(scored, offset)],
        [r[METRIC] for r in scored],
        s=30,
        alpha=0.55,
        label="a point",
    )
    means = [
        sum(r[METRIC] for r in scored if r[key] == v) / max(1, sum(r[key] == v for r in scored))
        for v in values
    ]
    ax.plot(range(len(values)), means, color="black", marker="D", label="mean per value")
    chosen = [
        (positions[r[key]] + d, r[METRIC])
        for r, d in zip(scored, offset)
        if selected is not None and r.get("trial") == selected.get("trial")
    ]
    if chosen:
        ax.scatter(*zip(*chosen), marker="*", s=320, color="tab:red", edgecolor="black", zorder=5, label=star)
    ax.set_xticks(range(len(values)), [_tick(v) for v in values])
    ax.set_xlim(-0.5, len(values) - 0.5)
    ax.set_xlabel(SYMBOLS[key], fontsize=13)
    ax.tick_params(labelsize=11)
    ax.grid(alpha=0.3)


def optuna_figures(storage: str, study_name: str) -> dict:
    """{artifact file: matplotlib Figure} of Optuna's plots of the search's study. A plot that the
    study cannot give (e.g. importances need two finished trials with different values) is left
    out with a note in the log; a study of fewer than two finished trials gets none."""
    import optuna
    from optuna.visualization import matplotlib as ovm

    _pyplot()
    study = optuna.load_study(study_name=study_name, storage=storage)
    if len(study.get_trials(deepcopy=False, states=[optuna.trial.TrialState.COMPLETE])) < 2:
        log.info("Optuna: a study of fewer than two finished trials has no plots")
        return {}
    target = "dev F1"  # the study's objective, which Optuna's axes call "Objective Value" unless named
    plots = {
        "optuna/param_importances.png": lambda: ovm.plot_param_importances(study, target_name=target),
        "optuna/slice.png": lambda: ovm.plot_slice(study, target_name=target),
        "optuna/contour_beta_gamma.png": lambda: ovm.plot_contour(
            study, params=["beta", "gamma"], target_name=target
        ),
        "optuna/optimization_history.png": lambda: ovm.plot_optimization_history(study, target_name=target),
    }
    figures = {}
    for name, plot in plots.items():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # Optuna's matplotlib plots are "experimental"
                axes = plot()
        except Exception as err:  # noqa: BLE001 - a plot the study cannot give is no failure of the search
            log.warning(
                "Optuna: no %s (%s)", name, str(err).splitlines()[0] if str(err) else type(err).__name__
            )
            continue
        first = axes.flat[0] if hasattr(axes, "flat") else axes
        figure = first.get_figure()
        figure.set_size_inches(max(figure.get_size_inches()[0], 8), max(figure.get_size_inches()[1], 5))
        figures[name] = figure
    return figures


def plot_timeline(rows: list[dict], path: Path, title: str) -> Path:
    """The trials as bars on the GPUs (node, GPU id) that Ray gave them, over the search's time;
    trials sharing a GPU are drawn in its lane, stacked. CPU trials get one lane per node."""
    plt = _pyplot()
    timed = sorted(
        (r for r in rows if r.get("trial_start_time") and r.get("trial_end_time")),
        key=lambda r: r["trial_start_time"],
    )
    lanes: dict[tuple, list] = {}
    for row in timed:
        for gpu in str(row.get("gpu_ids") or "").split(",") if row.get("gpu_ids") else ["cpu"]:
            lanes.setdefault((str(row.get("node_id", ""))[:8], gpu), []).append(row)
    start = min((r["trial_start_time"] for r in timed), default=0.0)
    figure, ax = plt.subplots(figsize=(10, 1 + 0.6 * max(1, len(lanes))))
    for y, (_, lane_rows) in enumerate(sorted(lanes.items())):
        ends: list[float] = []  # the end of each stacked slot, to stack trials that overlap
        for row in lane_rows:
            slot = next((i for i, end in enumerate(ends) if end <= row["trial_start_time"]), len(ends))
            ends[slot : slot + 1] = [row["trial_end_time"]]
            height = 0.8 / max(1, round(1 / float(row.get("gpu_share") or 1)))
            ax.broken_barh(
                [(row["trial_start_time"] - start, row["trial_end_time"] - row["trial_start_time"])],
                (y - 0.4 + slot * height, height * 0.9),
                color="tab:red" if row.get("status") == "ERROR" else "tab:blue",
                alpha=0.7,
            )
    ax.set_yticks(
        range(len(lanes)),
        [f"node {node} " + ("CPUs" if gpu == "cpu" else f"GPU {gpu}") for node, gpu in sorted(lanes)],
    )
    ax.set_xlabel("seconds since the first trial started")
    ax.set_title(title)
    ax.grid(axis="x", alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
