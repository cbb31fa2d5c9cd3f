"""The plan: every setting of a search decided and checked before Ray starts anything."""

from __future__ import annotations

import dataclasses
import logging
import math
import tempfile
from argparse import Namespace
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path

from softfine.config import TrainConfig
from softfine.datasets import Corpus

from .cli import DEFAULT_STORAGE, EXCLUDED_TRAIN_FIELDS
from .record import SearchRecord
from .space import Grid, SearchError, check_grid, load_preset, parse_alphas, preset_grid
from .storage import Storage
from .tracking import TrackingStore, mask_argv, tracking_store

log = logging.getLogger("softfine.tune")


@dataclasses.dataclass(frozen=True)
class SearchFlags:
    """The search's own flags (cli.py says what each does), checked by check_numbers."""

    sampler: str
    scheduler: str
    seeds: int
    search_seed: int
    asha_grace_period: int
    asha_reduction_factor: int
    gpus_per_trial: float
    cpus_per_trial: float
    max_concurrent: int
    max_failures: int
    mlflow_timeout: float
    address: str | None
    allow_cpu_fallback: bool
    verbose: bool


@dataclasses.dataclass
class Plan:
    flags: SearchFlags
    argv: list[str]  # as it may be stored and shown: credentials masked
    dataset: str  # the data's name (softfine.datasets.dataset_name): MLflow's experiment and model names
    base: TrainConfig  # every trial's config is this one with its grid point (and seed) replaced
    grid: Grid
    # "search": the grid or TPE search (then --seeds re-runs the selection); "seeds": one point, N seeds
    mode: str
    num_samples: int
    fuse: int | str  # the most grid points one trial trains as a fused model (1: none), or "auto"
    preset: dict
    tracking: TrackingStore
    experiment_name: str
    storage_path: str  # what Ray Tune gets: the folder (absolute), or the URI (storage.py)
    name: str
    # the data, read once by the driver (search.check_data) and sent to every trial
    corpus: Corpus | None = None
    storage: Storage | None = None  # --storage-path: where the search's files live (storage.py)

    @property
    def keys(self) -> tuple[str, ...]:
        """The hyperparameters of a grid point (soft_scope among them when it is searched)."""
        return self.grid.keys()


def base_config(preset: dict, flags: dict) -> TrainConfig:
    """The TrainConfig every trial starts from: the preset's train: values, then the flags given. With the
    tiny encoder, its own defaults replace the preset's bert-base fine-tuning settings (flags still win)."""
    from softfine.config import FINE_TUNING, make_config
    from softfine.datasets import data_dir, is_folder

    train = dict(preset["train"])
    if flags.get("model", train.get("model")) == "tiny":
        unused = {k: train.pop(k) for k in list(train) if k in FINE_TUNING}
        if unused:
            log.info(
                "--model tiny: the tiny encoder's own defaults replace the preset's bert-base settings (%s)",
                ", ".join(f"{k}={v}" for k, v in unused.items()),
            )

    def where(key: str) -> str:
        return f"--{key.replace('_', '-')}" if key in flags else f"preset {preset['path']}: key {key!r}"

    config = make_config({**train, **flags}, where)
    # The driver reads the data (trials get its sentences through Ray); its records name absolute paths.
    paths = {"data_dir": str(data_dir(config.data_dir).resolve())}
    for key in ("dataset", "train_file", "validation_file", "test_file"):
        value = getattr(config, key)
        if value is not None and (key != "dataset" or is_folder(value)):
            paths[key] = str(Path(value).expanduser().resolve())
    return make_config(paths, where, base=config)


def check_numbers(args: Namespace, num_samples: int, base) -> None:
    """The search's own numeric flags: in range and finite."""
    from softfine.config import make_config

    checks = [
        ("--num-samples", num_samples, num_samples >= 1, ">= 1"),
        ("--gpus-per-trial", args.gpus_per_trial, args.gpus_per_trial >= 0, ">= 0"),
        ("--cpus-per-trial", args.cpus_per_trial, args.cpus_per_trial > 0, "> 0"),
        ("--max-concurrent", args.max_concurrent, args.max_concurrent >= 0, ">= 0"),
        ("--max-failures", args.max_failures, args.max_failures >= 0, ">= 0"),
        ("--seeds", args.seeds, args.seeds >= 0, ">= 0"),
        ("--search-seed", args.search_seed, 0 <= args.search_seed < 2**32, "in [0, 2**32)"),
        ("--asha-grace-period", args.asha_grace_period, args.asha_grace_period >= 1, ">= 1"),
        ("--asha-reduction-factor", args.asha_reduction_factor, args.asha_reduction_factor >= 2, ">= 2"),
        ("--mlflow-timeout", args.mlflow_timeout, args.mlflow_timeout > 0, "> 0"),
    ]
    for flag, value, ok, rule in checks:
        if not ok or not math.isfinite(value):
            raise SearchError(f"{flag} {value:g}: must be {rule} and finite")
    if args.seeds:  # the last seed must be a seed too
        last = {"seed": base.seed + args.seeds - 1}
        make_config(last, lambda key: f"--seed {base.seed} with --seeds {args.seeds}", base=base)


def search_mode(args: Namespace, grid) -> tuple[str, int]:
    """("seeds", N) for one grid point with --seeds N (that point once per seed), else ("search", trials)."""
    seeds, samples, tpe, asha = args.seeds, args.num_samples, args.sampler == "tpe", args.scheduler == "asha"
    if len(grid) == 1 and seeds > 0:
        for refused, flag, why in (
            (tpe, "--sampler tpe", "there is nothing to sample"),
            (samples is not None, f"--num-samples {samples}", f"it runs {seeds} trials, one per seed"),
            (asha, "--scheduler asha", "no seed may be stopped early"),
        ):
            if refused:
                raise SearchError(
                    f"{flag}: the grid has one point, which --seeds {seeds} runs with {seeds} seeds ({why}); "
                    f"leave {flag.split()[0]} out"
                )
        return "seeds", seeds
    if tpe:
        return "search", 12 if samples is None else samples
    if samples not in (None, len(grid)):
        raise SearchError(
            f"--num-samples {samples}: a grid search runs each of its {len(grid)} points exactly once; "
            "use --sampler tpe for a budgeted search"
        )
    return "search", len(grid)


def fuse_size(args: Namespace, mode: str) -> int | str:
    """--fuse: K >= 1 (1: one point per trial) or auto; only where every grid point is trained to the end in a
    trial of its own choosing (the grid sampler, no early stopping)."""
    text, tpe, asha = str(args.fuse).strip(), args.sampler == "tpe", args.scheduler == "asha"
    try:
        size = text if text == "auto" else int(text)
    except ValueError:
        raise SearchError(
            f"--fuse {args.fuse!r}: give the most grid points per trial (>= 1), or auto"
        ) from None
    if size != "auto" and size < 1:
        raise SearchError(f"--fuse {size}: must be >= 1 (1: one point per trial), or auto")
    for refused, flag, why in (
        (
            mode == "seeds",
            f"--seeds {args.seeds} on one point",
            "its runs differ in seed, fused members may not",
        ),
        (tpe, "--sampler tpe", "TPE picks each point from the results before it"),
        (asha, "--scheduler asha", "ASHA stops points one by one; a group trains them in one trial"),
    ):
        if refused and size != 1:
            raise SearchError(f"--fuse {text}: not with {flag} ({why}); leave --fuse out")
    return size


def settings(args: Namespace) -> tuple[dict, TrainConfig, Grid]:
    """The preset (a built-in dataset's, or --preset), the base TrainConfig and the grid, all checked."""
    from softfine.arguments import given_values
    from softfine.config import make_config
    from softfine.datasets import is_folder

    flags = given_values(args, EXCLUDED_TRAIN_FIELDS)
    dataset = make_config(flags).dataset  # weibo unless a dataset or files are given; its name checked
    preset = load_preset(dataset if dataset is not None and not is_folder(dataset) else None, args.preset)
    base = base_config(preset, flags)
    grid = grid_from_flags(preset["grid"], args)
    if len(grid.soft_scope) == 1:  # not searched: every trial's
        base = make_config({"soft_scope": grid.soft_scope[0]}, lambda key: grid.origin[key], base=base)
    check_grid(grid, base)
    return preset, base, grid


def grid_from_flags(grid: Grid, args: Namespace) -> Grid:
    """The preset's grid with the dimensions given by flag (--alphas, --beta, ...) replaced."""
    given = {key: getattr(args, f"grid_{key}") for key in ("alphas", "beta", "gamma", "soft_scope")}
    try:
        pairs = [parse_alphas(a) for a in given["alphas"]] if given["alphas"] else grid.alphas
    except ValueError as err:
        raise SearchError(f"--alphas: {err}") from None
    values = {key: given[key] or getattr(grid, key) for key in ("beta", "gamma", "soft_scope")}
    origin = {
        key: (f"--{key.replace('_', '-')}" if value else grid.origin.get(key, f"the grid's {key}"))
        for key, value in given.items()
    }
    return Grid(pairs, **values, origin=origin)


def results_folder(args: Namespace, dataset: str) -> tuple[Storage, str]:
    """--storage-path, checked, not created (a remote URI that answers, with credentials that may write
    there; else the nearest folder that exists must take a file), and the search's name."""
    storage = Storage(args.storage_path or str(DEFAULT_STORAGE))
    if storage.remote:
        storage.check()
    else:
        given = existing = storage.local
        while not existing.exists() and existing != existing.parent:
            existing = existing.parent
        if not existing.is_dir():
            raise SearchError(f"--storage-path {given}: {existing} is not a folder")
        try:
            with tempfile.TemporaryFile(dir=existing):
                pass
        except OSError as err:
            raise SearchError(
                f"--storage-path {given}: cannot write in {existing} ({err.strerror or err})"
            ) from None
    name = args.name or f"{dataset}-{args.sampler}-{datetime.now():%Y%m%d-%H%M%S}"
    if not name or "/" in name or name in (".", ".."):
        raise SearchError(f"--name {name!r}: give a folder name (no '/')")
    return storage, name


def recorded(record: SearchRecord) -> tuple[dict, TrainConfig, Grid]:
    """The preset, base TrainConfig and grid a search started with, from its record (a resume
    reads no preset again: one changed meanwhile would change the search under its trials)."""
    from softfine.config import make_config

    base = make_config(record.base, lambda key: f"--resume: the search record's setting {key!r}")
    grid = preset_grid(record.grid, Path("(the search record)"))
    check_grid(grid, base)
    preset = dict(train={}, grid=grid, paper_selection=record.paper_selection, path=record.preset or "")
    return preset, base, grid


def make_plan(args: Namespace, argv: list[str], record: SearchRecord | Mapping | None = None) -> Plan:
    """Everything the search needs, checked in order: the settings (flags and preset, or a resumed search's
    record), the search's own flags, the results folder, the tracking URI, that the data files are there."""
    from softfine.datasets import data_source, dataset_name

    record = SearchRecord.of(record) if isinstance(record, Mapping) else record
    # a record written before the settings were recorded: they are read again
    preset, base, grid = recorded(record) if record and record.base is not None else settings(args)
    dataset = dataset_name(base)
    mode, num_samples = search_mode(args, grid)
    check_numbers(args, num_samples, base)
    fuse = fuse_size(args, mode)
    storage, name = results_folder(args, dataset)
    if args.experiment_name is not None and not args.experiment_name.strip():
        raise SearchError("--experiment-name: give a name")
    tracking = tracking_store(args.mlflow_uri)
    data_source(base)  # the first look at the data: its files are there (the driver reads them, check_data)
    return Plan(
        flags=SearchFlags(**{f.name: getattr(args, f.name) for f in dataclasses.fields(SearchFlags)}),
        argv=mask_argv(argv),
        dataset=dataset,
        base=base,
        grid=grid,
        mode=mode,
        num_samples=num_samples,
        fuse=fuse,
        preset=preset,
        tracking=tracking,
        experiment_name=args.experiment_name or f"softfine-{dataset}",
        storage_path=storage.ray_path,
        name=name,
        storage=storage,
    )
