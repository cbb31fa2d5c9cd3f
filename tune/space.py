"""The search space: the paper's grid (4 (alpha_aug, alpha_fea) pairs x beta x gamma, soft_scope when given
two values), the presets (tune/presets/DATASET.yaml, every value checked naming file and key), a point's
TrainConfig, the Optuna searcher (grid: every point enqueued once; tpe), and --fuse's groups of points."""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from softfine.config import METRIC, SCOPES, SEARCHED

PRESETS = Path(__file__).resolve().parent / "presets"
MODE = "max"  # of METRIC, the best dev F1
# The key of a fused trial's config: the group of grid points it trains (trial.fused_config)
FUSED = "group"
# How the paper writes each searched value: tables, figures, the parent run's description.
SYMBOLS = {"alpha_aug": "α_aug", "alpha_fea": "α_fea", "beta": "β", "gamma": "γ", "soft_scope": "soft scope"}
# The paper's grid (Appendix C): (alpha_aug, alpha_fea) pairs, beta, gamma.
PAPER_GRID = {
    "alphas": [[0.1, 0.1], [0.1, 0.05], [0.01, 0.01], [0.01, 0.005]],
    "beta": [2, 3, 4],
    "gamma": [1.5, 2, 2.5],
}
# TrainConfig fields a preset's train: may not set: the grid's, and those set per trial or by flag.
NOT_IN_TRAIN = {
    **dict.fromkeys(("alpha_aug", "alpha_fea"), "a grid value: put it under grid: alphas"),
    **dict.fromkeys(("beta", "gamma", "soft_scope"), "a grid value: put it under grid:"),
    **dict.fromkeys(("out", "device"), "set per trial"),
    "dataset": "the dataset is chosen with --dataset",
    **dict.fromkeys(("train_file", "validation_file", "test_file"), "the data is chosen by flag"),
}


class SearchError(Exception):
    """A search that must not start; the message says why and what to do."""


# ---------------------------------------------------------------------------------------------
# A grid point and its TrainConfig. Grid samplers need str/int/float values, so an
# (alpha_aug, alpha_fea) pair is the string "aug,fea": the paper searches 4 pairs, not 4 x 4.


def alphas_key(alpha_aug: float, alpha_fea: float) -> str:
    return f"{float(alpha_aug):g},{float(alpha_fea):g}"


def parse_alphas(key: str) -> tuple[float, float]:
    try:
        aug, fea = (float(part) for part in str(key).split(","))
    except ValueError:
        raise ValueError(
            f"an (alpha_aug, alpha_fea) pair is written AUG,FEA (e.g. 0.1,0.05), got {key!r}"
        ) from None
    return aug, fea


def point_values(point: dict) -> dict:
    """The TrainConfig values of a point (and, in the seeds phase, its seed); make_config checks them."""
    aug, fea = parse_alphas(point["alphas"])
    values = {"alpha_aug": aug, "alpha_fea": fea, "beta": point["beta"], "gamma": point["gamma"]}
    for key in ("soft_scope", "seed"):  # soft_scope when searched; seed in the seeds phase
        if point.get(key) is not None:
            values[key] = point[key]
    return values


def trial_config(base, point: dict, **fixed):
    """The search's base config with the point's values and `fixed` ones (out, device), validated again."""
    from softfine.config import make_config

    return make_config({**point_values(point), **fixed}, where=lambda key: f"trial config: {key}", base=base)


def point_name(point: dict) -> str:
    """A run's name, short enough for MLflow's runs table: `0.01,0.005,2,2.5` (α_aug,α_fea,β,γ; `,related`
    when the scope is searched), or `seed 43` in the seeds phase (its point is the parent run's)."""
    values = point_values(point)
    if "seed" in values:
        return f"seed {values['seed']}"
    name = ",".join(f"{float(values[k]):g}" for k in SEARCHED)
    return name + (f",{values['soft_scope']}" if "soft_scope" in values else "")


def point_of(values: dict, keys: Sequence[str]) -> dict:
    """The point of a row of results (for the seeds phase: the selected configuration)."""
    point = {
        "alphas": alphas_key(values["alpha_aug"], values["alpha_fea"]),
        "beta": values["beta"],
        "gamma": values["gamma"],
    }
    return {**point, "soft_scope": values["soft_scope"]} if "soft_scope" in keys else point


def point_key(point: dict) -> str:
    """A point as one string, whatever its values' types: 2 and 2.0 are one value."""
    return json.dumps({k: v if isinstance(v, str) else float(v) for k, v in point.items()}, sort_keys=True)


@dataclass
class Grid:
    alphas: list[tuple[float, float]]
    beta: list[float]
    gamma: list[float]
    soft_scope: list[str] = field(default_factory=lambda: ["paper"])
    # Where each dimension's values come from ("--beta", "preset FILE: grid: beta"), for errors.
    origin: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:  # a value given twice is one value: its points are searched once
        for key in ("alphas", "beta", "gamma", "soft_scope"):
            setattr(self, key, list(dict.fromkeys(getattr(self, key))))

    def keys(self) -> tuple[str, ...]:
        """The hyperparameters a point sets: the paper's four, and soft_scope when it is searched
        (one value is no dimension: it is part of the base config)."""
        return SEARCHED + (("soft_scope",) if len(self.soft_scope) > 1 else ())

    def space(self) -> dict[str, list]:
        """The grid as GridSampler takes it (str/int/float values only)."""
        space = {
            "alphas": [alphas_key(*pair) for pair in self.alphas],
            "beta": list(self.beta),
            "gamma": list(self.gamma),
        }
        if len(self.soft_scope) > 1:
            space["soft_scope"] = list(self.soft_scope)
        return space

    def optuna_space(self) -> dict:
        from optuna.distributions import CategoricalDistribution

        return {name: CategoricalDistribution(values) for name, values in self.space().items()}

    def points(self) -> list[dict]:
        space = self.space()
        return [dict(zip(space, values)) for values in itertools.product(*space.values())]

    def __len__(self) -> int:
        return math.prod(len(values) for values in self.space().values())

    def describe(self) -> dict:
        return {
            "alphas": [list(p) for p in self.alphas],
            "beta": self.beta,
            "gamma": self.gamma,
            "soft_scope": self.soft_scope,
        }


def load_preset(dataset: str | None, path: str | Path | None = None) -> dict:
    """{"train": {...}, "grid": Grid, "paper_selection": {...} | None, "path": str}, every value checked;
    a dataset without a preset (`dataset` None) gets the trainer's defaults and the paper's grid."""
    from softfine.config import read_yaml

    explicit = path is not None
    if not explicit and dataset is None:
        return {
            "train": {},
            "grid": preset_grid(PAPER_GRID, Path("-")),
            "paper_selection": None,
            "path": "none (the trainer's defaults)",
        }
    path = Path(path) if explicit else PRESETS / f"{dataset}.yaml"
    values = read_yaml(path, "--preset" if explicit else "preset") if explicit or path.is_file() else {}
    where = f"preset {path}"
    unknown = sorted(map(str, set(values) - {"train", "grid", "paper_selection"}))
    if unknown:
        raise SearchError(f"{where}: unknown section {unknown[0]!r} (expected train, grid, paper_selection)")
    return {
        "train": preset_train(values.get("train") or {}, path),
        "grid": preset_grid(values.get("grid", PAPER_GRID), path),
        "paper_selection": paper_selection(values.get("paper_selection"), path),
        "path": str(path),
    }


def preset_train(train, path: Path) -> dict:
    """The train: section's values, each checked as a TrainConfig field as written (flags override later)."""
    from softfine.config import config_values, make_config

    if not isinstance(train, dict):
        raise SearchError(
            f"preset {path}: train: expected a mapping of option: value, got {type(train).__name__}"
        )
    values = config_values(train, path, "preset")
    for key in values:
        if key in NOT_IN_TRAIN:
            raise SearchError(f"preset {path}: key {key!r}: not a train: setting ({NOT_IN_TRAIN[key]})")
    make_config(values, where=lambda key: f"preset {path}: key {key!r}")
    return values


def _numbers(values, where: str) -> list[float]:
    """A YAML list of numbers (ints or floats, finite; a quoted number or a boolean is refused)."""
    if not isinstance(values, list) or not values:
        raise SearchError(f"{where}: expected a non-empty list of numbers, got {values!r}")
    for value in values:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise SearchError(f"{where}: expected a list of numbers, got {value!r} ({type(value).__name__})")
    return [float(v) for v in values]


def preset_grid(grid, path: Path) -> Grid:
    where = f"preset {path}: grid"
    if not isinstance(grid, dict):
        raise SearchError(f"{where}: expected a mapping with alphas, beta and gamma, got {grid!r}")
    unknown = sorted(map(str, set(grid) - {"alphas", "beta", "gamma", "soft_scope"}))
    missing = [k for k in ("alphas", "beta", "gamma") if k not in grid]
    if unknown or missing:
        problem = f"unknown key {unknown[0]!r}" if unknown else f"key {missing[0]!r} is missing"
        raise SearchError(f"{where}: {problem} (expected alphas, beta, gamma and optionally soft_scope)")
    pairs = grid["alphas"]
    if not (isinstance(pairs, list) and pairs and all(isinstance(p, list) and len(p) == 2 for p in pairs)):
        raise SearchError(f"{where}: alphas: expected a list of [alpha_aug, alpha_fea] pairs, got {pairs!r}")
    alphas = [tuple(_numbers(pair, f"{where}: alphas")) for pair in pairs]
    scopes = grid.get("soft_scope", ["paper"])
    if not isinstance(scopes, list) or not scopes or any(s not in SCOPES for s in scopes):
        raise SearchError(f"{where}: soft_scope: expected a list of {' and '.join(SCOPES)}, got {scopes!r}")
    beta, gamma = (_numbers(grid[key], f"{where}: {key}") for key in ("beta", "gamma"))
    origin = {key: f"{where}: {key}" for key in ("alphas", "beta", "gamma", "soft_scope")}
    return Grid(alphas, beta, gamma, scopes, origin)


def paper_selection(selection, path: Path) -> dict | None:
    """What the paper selected, shown beside the search's selection: numbers for SEARCHED."""
    if selection is None:
        return None
    where = f"preset {path}: paper_selection"
    if not isinstance(selection, dict):
        raise SearchError(
            f"{where}: expected a mapping like {{alpha_aug: 0.1, alpha_fea: 0.1, beta: 4, gamma: 2}}"
        )
    for key, value in selection.items():
        if key not in SEARCHED:
            raise SearchError(f"{where}: unknown key {key!r} (expected {', '.join(SEARCHED)})")
        _numbers([value], f"{where}: {key}")
    return selection


def check_grid(grid: Grid, base) -> None:
    """Every point must make a valid TrainConfig from `base`: an impossible value (beta <= 1, inf) is refused
    before any trial starts, naming where it came from."""
    from softfine.config import make_config

    if not len(grid):
        raise SearchError("the grid is empty: --alphas, --beta and --gamma each need at least one value")
    dimension = {"alpha_aug": "alphas", "alpha_fea": "alphas"}  # the other fields are their dimension's name
    for point in grid.points():
        make_config(
            point_values(point), where=lambda key: grid.origin.get(dimension.get(key, key), key), base=base
        )


def make_searcher(sampler: str, grid: Grid, seed: int, num_samples: int, storage: str, study_name: str):
    """Ray Tune's OptunaSearch over the grid's values, its study in `storage` (an Optuna storage URL). Grid:
    every point enqueued, which Optuna hands to exactly one trial however many are in flight; TPE: sampled."""
    import optuna

    from .in_place import StudyInPlace

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    points = None
    if sampler == "grid":
        # GridSampler only names the study's design: every trial takes an enqueued point.
        ot_sampler = optuna.samplers.GridSampler(grid.space(), seed=seed)
        points = grid.points()
    elif sampler == "tpe":
        # constant_liar: trials in flight count as provisional results, so concurrent trials are
        # not all sent to the same region of the space.
        ot_sampler = optuna.samplers.TPESampler(
            seed=seed, constant_liar=True, n_startup_trials=max(2, min(10, num_samples // 3))
        )
    else:
        raise SearchError(f"--sampler must be grid or tpe, got {sampler!r}")
    return StudyInPlace(
        space=grid.optuna_space(),
        metric=METRIC,
        mode=MODE,
        sampler=ot_sampler,
        points_to_evaluate=points,
        study_name=study_name,
        storage=optuna.storages.RDBStorage(storage),
    )


# ---------------------------------------------------------------------------------------------
# --fuse: the grid's points in groups, each one trial; the study still gets every point.


def fused_groups(points: list[dict], size: int, base) -> list[list[dict]]:
    """The points in groups of at most `size`, as even as can be (36 points, --fuse 10: four of 9), in grid
    order; points that skip the augmented sentences never share a group with others (their steps differ)."""
    from softfine.fused import uses_augmentation

    augmented = [uses_augmentation(trial_config(base, p)) for p in points]
    groups = []
    for kind in (True, False):
        same = [p for p, uses in zip(points, augmented) if uses is kind]
        count = math.ceil(len(same) / size)
        start = 0
        for number in range(count):
            length = len(same) // count + (number < len(same) % count)
            groups.append(same[start : start + length])
            start += length
    return groups


def record_points(storage: str, study_name: str, grid: Grid, rows: list[dict]) -> int:
    """A fused search's points in its Optuna study, as the grid sampler's trials would be (FAIL without a
    dev F1; Ray trial and MLflow run as user attributes), each once (a resumed search); how many added."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(
        study_name=study_name,
        storage=optuna.storages.RDBStorage(storage),
        direction="maximize",
        load_if_exists=True,
    )

    held = {point_key(t.params) for t in study.get_trials(deepcopy=False)}
    distributions = grid.optuna_space()
    added = 0
    for row in rows:
        params = point_of(row, grid.keys())
        if point_key(params) in held:
            continue
        value = row.get(METRIC)
        scored = isinstance(value, (int, float)) and not math.isnan(value)
        study.add_trial(
            optuna.trial.create_trial(
                params=params,
                distributions=distributions,
                value=float(value) if scored else None,
                state=optuna.trial.TrialState.COMPLETE if scored else optuna.trial.TrialState.FAIL,
                user_attrs={"ray_trial_id": row["trial_id"], "mlflow_run_id": row["mlflow_run_id"]},
            )
        )
        added += 1
    return added
