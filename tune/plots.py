"""The search's figures for the parent run: dev F1 against each hyperparameter, and Optuna's own
plots of the study (parameter importances, slice, the beta x gamma contour, optimisation history)."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Sequence

from softfine_tune.space import SEARCHED

log = logging.getLogger("softfine.tune")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # Optuna's slice and contour plots draw categorical values (our grid's) as strings that parse
    # as numbers; matplotlib then logs an INFO line per axis that says nothing about the search.
    logging.getLogger("matplotlib.category").setLevel(logging.WARNING)

    return plt


def plot_dev_f1(rows: list[dict], path: Path, title: str, keys: Sequence[str] = SEARCHED) -> Path:
    """Dev F1 of every trial against each hyperparameter (alpha_aug, alpha_fea, beta, gamma, and
    soft_scope when searched): the points, and the mean per value."""
    plt = _pyplot()
    scored = [r for r in rows if isinstance(r.get("best_dev_f1"), (int, float))]
    labels = {"alpha_aug": "α_aug", "alpha_fea": "α_fea", "beta": "β", "gamma": "γ", "soft_scope": "soft scope"}
    figure, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 4), sharey=True)
    for ax, key in zip(axes, keys):
        values = sorted({r[key] for r in scored})
        positions = {v: i for i, v in enumerate(values)}
        xs = [positions[r[key]] + 0.08 * ((n % 5) - 2) for n, r in enumerate(scored)]
        ax.scatter(xs, [r["best_dev_f1"] for r in scored], s=18, alpha=0.6)
        means = [sum(r["best_dev_f1"] for r in scored if r[key] == v) / max(1, sum(r[key] == v for r in scored))
                 for v in values]
        ax.plot(range(len(values)), means, color="black", marker="D", label="mean")
        ax.set_xticks(range(len(values)), [f"{v:g}" if isinstance(v, float) else str(v) for v in values])
        ax.set_xlabel(labels[key])
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("best dev F1")
    axes[0].legend()
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


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
    plots = {"optuna/param_importances.png": lambda: ovm.plot_param_importances(study),
             "optuna/slice.png": lambda: ovm.plot_slice(study),
             "optuna/contour_beta_gamma.png": lambda: ovm.plot_contour(study, params=["beta", "gamma"]),
             "optuna/optimization_history.png": lambda: ovm.plot_optimization_history(study)}
    figures = {}
    for name, plot in plots.items():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # Optuna's matplotlib plots are "experimental"
                axes = plot()
        except Exception as err:  # noqa: BLE001 - a plot the study cannot give is no failure of the search
            log.warning("Optuna: no %s (%s)", name, str(err).splitlines()[0] if str(err) else type(err).__name__)
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
    timed = sorted((r for r in rows if r.get("trial_start_time") and r.get("trial_end_time")),
                   key=lambda r: r["trial_start_time"])
    lanes: dict[tuple, list] = {}
    for row in timed:
        for gpu in str(row.get("gpu_ids") or "").split(",") if row.get("gpu_ids") else ["cpu"]:
            lanes.setdefault((str(row.get("node_id", ""))[:8], gpu), []).append(row)
    start = min((r["trial_start_time"] for r in timed), default=0.0)
    figure, ax = plt.subplots(figsize=(10, 1 + 0.6 * max(1, len(lanes))))
    for y, (lane, lane_rows) in enumerate(sorted(lanes.items())):
        ends: list[float] = []  # the end of each stacked slot, to stack trials that overlap
        for row in lane_rows:
            slot = next((i for i, end in enumerate(ends) if end <= row["trial_start_time"]), len(ends))
            ends[slot:slot + 1] = [row["trial_end_time"]]
            height = 0.8 / max(1, round(1 / float(row.get("gpu_share") or 1)))
            ax.broken_barh([(row["trial_start_time"] - start, row["trial_end_time"] - row["trial_start_time"])],
                           (y - 0.4 + slot * height, height * 0.9),
                           color="tab:red" if row.get("status") == "ERROR" else "tab:blue", alpha=0.7)
    ax.set_yticks(range(len(lanes)), [f"node {node} " + ("CPUs" if gpu == "cpu" else f"GPU {gpu}")
                                      for node, gpu in sorted(lanes)])
    ax.set_xlabel("seconds since the first trial started")
    ax.set_title(title)
    ax.grid(axis="x", alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
