"""Presets, the grid, and the Optuna searchers of the search.

A preset (tune/presets/DATASET.yaml) holds the paper's training settings for a dataset and the
SoftFiNE grid; flags override any of its values. The grid's (alpha_aug, alpha_fea) pairs are one
categorical dimension ("aug,fea"), beta and gamma two more: 4 x 3 x 3 = 36 points.

`--sampler grid` uses Optuna's GridSampler through Ray Tune's OptunaSearch, with one guard:
GridSampler hands out points by trial number, or at random among the points no trial holds yet,
and may re-evaluate a point when more trials are in flight than points are left (see optuna
issues #2039, #4627, #5489). `ExclusiveGridSampler` gives every new trial the first point that
no trial of the study holds, whatever their state, and refuses a 37th trial instead of
repeating one; Ray Tune asks for exactly one trial per point (num_samples = grid size). It also
leaves out GridSampler's `study.stop()`, which only works inside `study.optimize` (Ray Tune uses
ask-and-tell) and is not needed: Ray Tune decides when the search ends.
"""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from optuna.samplers import GridSampler
from softfine_tune_trial import alphas_key, parse_alphas

PRESETS = Path(__file__).resolve().parent / "presets"
METRIC, MODE = "best_dev_f1", "max"


class SearchError(Exception):
    """A search that must not start; the message says why and what to do."""


@dataclass
class Grid:
    alphas: list[tuple[float, float]]
    beta: list[float]
    gamma: list[float]

    def space(self) -> dict[str, list]:
        """The grid as GridSampler takes it (str/int/float values only)."""
        return {"alphas": [alphas_key(*pair) for pair in self.alphas], "beta": list(self.beta),
                "gamma": list(self.gamma)}

    def optuna_space(self) -> dict:
        from optuna.distributions import CategoricalDistribution

        return {name: CategoricalDistribution(values) for name, values in self.space().items()}

    def points(self) -> list[dict]:
        space = self.space()
        return [dict(zip(space, values)) for values in itertools.product(*space.values())]

    def __len__(self) -> int:
        return len(self.alphas) * len(self.beta) * len(self.gamma)

    def describe(self) -> dict:
        return {"alphas": [list(p) for p in self.alphas], "beta": self.beta, "gamma": self.gamma}


def preset_path(dataset: str) -> Path:
    return PRESETS / f"{dataset}.yaml"


def load_preset(dataset: str, path: str | Path | None = None) -> dict:
    """{"train": {...}, "grid": Grid, "paper_selection": {...} | None} from a preset file; a
    dataset without a preset gets the trainer's defaults and the paper's grid."""
    import yaml
    from softfine.train import TrainConfig

    path = Path(path) if path else preset_path(dataset)
    if not path.is_file():
        if path != preset_path(dataset):
            raise SearchError(f"--preset {path}: no such file")
        values = yaml.safe_load((PRESETS / "weibo.yaml").read_text(encoding="utf-8"))
        values = {"train": {}, "grid": values["grid"]}
    else:
        try:
            values = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as err:
            raise SearchError(f"preset {path}: not valid YAML ({err})") from None
    unknown = set(values) - {"train", "grid", "paper_selection"}
    if unknown:
        raise SearchError(f"preset {path}: unknown section(s) {', '.join(sorted(unknown))} "
                          "(expected train, grid, paper_selection)")
    train = {k.replace("-", "_"): v for k, v in (values.get("train") or {}).items()}
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    bad = sorted(set(train) - fields) + sorted(set(train) & {"alpha_aug", "alpha_fea", "beta", "gamma"})
    if bad:
        raise SearchError(f"preset {path}: train: option(s) {', '.join(bad)} are not training settings "
                          "(alpha_aug, alpha_fea, beta and gamma belong in grid:)")
    grid = values.get("grid") or {}
    try:
        parsed = Grid([tuple(float(x) for x in pair) for pair in grid["alphas"]],
                      [float(b) for b in grid["beta"]], [float(g) for g in grid["gamma"]])
    except (KeyError, TypeError, ValueError) as err:
        raise SearchError(f"preset {path}: grid needs alphas (a list of [alpha_aug, alpha_fea] pairs), "
                          f"beta and gamma (lists of numbers): {err}") from None
    if any(len(pair) != 2 for pair in parsed.alphas):
        raise SearchError(f"preset {path}: every grid alphas entry is a pair [alpha_aug, alpha_fea]")
    return {"train": train, "grid": parsed, "paper_selection": values.get("paper_selection"), "path": str(path)}


def grid_from_flags(grid: Grid, alphas: Sequence[str] | None, beta: Sequence[float] | None,
                    gamma: Sequence[float] | None) -> Grid:
    try:
        pairs = [parse_alphas(a) for a in alphas] if alphas else grid.alphas
    except ValueError as err:
        raise SearchError(f"--alphas: {err}") from None
    return Grid(list(dict.fromkeys(pairs)), list(dict.fromkeys(beta or grid.beta)),
                list(dict.fromkeys(gamma or grid.gamma)))


def check_grid(grid: Grid, train: dict) -> None:
    """Every point of the grid must make a valid TrainConfig: an impossible value (beta <= 1,
    gamma <= 0, a negative alpha) is refused before any trial starts."""
    from softfine.errors import ConfigError
    from softfine.train import TrainConfig

    if not len(grid):
        raise SearchError("the grid is empty: --alphas, --beta and --gamma each need at least one value")
    for values in itertools.product(grid.alphas, grid.beta, grid.gamma):
        (aug, fea), beta, gamma = values
        try:
            TrainConfig(**{**train, "alpha_aug": aug, "alpha_fea": fea, "beta": beta, "gamma": gamma}).validate()
        except ConfigError as err:
            raise SearchError(f"impossible grid value (alpha_aug={aug:g}, alpha_fea={fea:g}, beta={beta:g}, "
                              f"gamma={gamma:g}): {err}") from None


# ---------------------------------------------------------------------------------------------

class ExclusiveGridSampler(GridSampler):
    """Optuna's GridSampler that never gives a point to two trials (see the module docstring)."""

    def before_trial(self, study, trial) -> None:
        if "grid_id" in trial.system_attrs or "fixed_params" in trial.system_attrs:
            return
        taken = {t.system_attrs["grid_id"] for t in study.get_trials(deepcopy=False)
                 if t.number != trial.number and "grid_id" in t.system_attrs
                 and self._same_search_space(t.system_attrs["search_space"])}
        free = [i for i in range(len(self._all_grids)) if i not in taken]
        if not free:
            raise RuntimeError(f"all {len(self._all_grids)} grid points are taken: a further trial would "
                               "repeat one (the search asked for more trials than the grid has)")
        study._storage.set_trial_system_attr(trial._trial_id, "search_space", self._search_space)
        study._storage.set_trial_system_attr(trial._trial_id, "grid_id", free[0])

    def after_trial(self, study, trial, state, values) -> None:
        pass  # no study.stop(): Ray Tune asks for exactly one trial per point


def make_searcher(sampler: str, grid: Grid, seed: int, num_samples: int):
    """Ray Tune's OptunaSearch over the grid's values with Optuna's grid or TPE sampler."""
    import optuna
    from ray.tune.search.optuna import OptunaSearch

    if sampler == "grid":
        ot_sampler = ExclusiveGridSampler(grid.space(), seed=seed)
    elif sampler == "tpe":
        # constant_liar: trials in flight count as provisional results, so concurrent trials are
        # not all sent to the same region of the space.
        ot_sampler = optuna.samplers.TPESampler(seed=seed, constant_liar=True,
                                                n_startup_trials=max(2, min(10, num_samples // 3)))
    else:
        raise SearchError(f"--sampler must be grid or tpe, got {sampler!r}")
    return OptunaSearch(space=grid.optuna_space(), metric=METRIC, mode=MODE, sampler=ot_sampler)
