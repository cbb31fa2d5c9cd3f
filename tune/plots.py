"""The search's figures for the parent run: dev F1 against each hyperparameter, the trials on the
cluster's slots over time, and Optuna's own plots of the study."""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Sequence
from pathlib import Path

from .console import value_text
from .results import number, timed
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
    """Dev F1 of every point against each searched hyperparameter, the selected point a star."""
    plt = _pyplot()
    scored = [r for r in rows if number(r.get(METRIC)) is not None]
    lines = math.ceil(len(keys) / 2)
    figure, axes = plt.subplots(lines, 2, figsize=(9, 0.6 + 3.2 * lines), sharey=True, squeeze=False)
    star = None
    if selected is not None:
        star = f"selected: {', '.join(value_text(selected[k]) for k in keys)} (dev F1 {selected[METRIC]:.4f})"
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


def _dev_f1_panel(ax, scored: list[dict], key: str, selected: dict | None, star: str | None) -> None:
    """One hyperparameter's panel: the points (spread sideways: equal scores stay visible), the means."""
    values = sorted({r[key] for r in scored})
    positions = {v: i for i, v in enumerate(values)}
    spread = [positions[r[key]] + 0.08 * ((n % 5) - 2) for n, r in enumerate(scored)]
    ax.scatter(spread, [r[METRIC] for r in scored], s=30, alpha=0.55, label="a point")
    groups = [[r[METRIC] for r in scored if r[key] == v] for v in values]
    means = [sum(g) / len(g) for g in groups]
    ax.plot(range(len(values)), means, color="black", marker="D", label="mean per value")
    chosen = [
        (x, r[METRIC])
        for r, x in zip(scored, spread)
        if selected is not None and r.get("trial") == selected.get("trial")
    ]
    if chosen:
        ax.scatter(*zip(*chosen), marker="*", s=320, color="tab:red", edgecolor="black", zorder=5, label=star)
    ax.set_xticks(range(len(values)), [value_text(v) for v in values])
    ax.set_xlim(-0.5, len(values) - 0.5)
    ax.set_xlabel(SYMBOLS[key], fontsize=13)
    ax.tick_params(labelsize=11)
    ax.grid(alpha=0.3)


def optuna_figures(storage: str, study_name: str) -> dict:
    """{artifact file: matplotlib Figure} of Optuna's plots of the study; a plot the study cannot
    give (importances need two different finished trials) is left out with a note in the log."""
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
            log.warning("Optuna: no %s (%s)", name, (str(err).splitlines() or [type(err).__name__])[0])
            continue
        figure = (axes.flat[0] if hasattr(axes, "flat") else axes).get_figure()
        width, height = figure.get_size_inches()
        figure.set_size_inches(max(width, 8), max(height, 5))
        figures[name] = figure
    return figures


def plot_timeline(rows: list[dict], path: Path, title: str) -> Path:
    """The trials as bars over time on the GPUs Ray gave them (CPU trials: a lane per node)."""
    plt = _pyplot()
    lanes: dict[tuple, list] = {}
    for row in sorted(timed(rows), key=lambda r: r["trial_start_time"]):
        for gpu in str(row.get("gpu_ids") or "").split(",") if row.get("gpu_ids") else ["cpu"]:
            lanes.setdefault((str(row.get("node_id", ""))[:8], gpu), []).append(row)
    start = min((r["trial_start_time"] for r in timed(rows)), default=0.0)
    figure, ax = plt.subplots(figsize=(10, 1 + 0.6 * max(1, len(lanes))))
    for y, (_, lane_rows) in enumerate(sorted(lanes.items())):
        ends: list[float] = []  # the end of each stacked slot, to stack trials that overlap
        for row in lane_rows:
            slot = next((i for i, end in enumerate(ends) if end <= row["trial_start_time"]), len(ends))
            ends[slot : slot + 1] = [row["trial_end_time"]]
            height = 0.8 / max(1, round(1 / float(row.get("gpu_share") or 1)))
            bar = (row["trial_start_time"] - start, row["trial_end_time"] - row["trial_start_time"])
            color = "tab:red" if row.get("status") == "ERROR" else "tab:blue"
            ax.broken_barh([bar], (y - 0.4 + slot * height, height * 0.9), color=color, alpha=0.7)
    names = [f"node {node} " + ("CPUs" if gpu == "cpu" else f"GPU {gpu}") for node, gpu in sorted(lanes)]
    ax.set_yticks(range(len(lanes)), names)
    ax.set_xlabel("seconds since the first trial started")
    ax.set_title(title)
    ax.grid(axis="x", alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
