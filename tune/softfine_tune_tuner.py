"""Ray Tune: the Tuner of a search phase, and resuming a stopped search (its record, its checkpoints)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import posixpath
from pathlib import Path

from softfine_tune_childrun import mask_credentials
from softfine_tune_cli import DEFAULT_STORAGE, PROG, RECORD, RESUME_OVERRIDES, Parser
from softfine_tune_plan import Plan
from softfine_tune_space import METRIC, MODE, SearchError, make_searcher

log = logging.getLogger("softfine.tune")


# ---------------------------------------------------------------------------------------------
# Ray Tune.

def trial_dirname(trial) -> str:
    return f"trial_{trial.trial_id}"


def evaluations_per_trial(config) -> int | None:
    """How many times a trial reports (for ASHA's max_t): evaluations plus the final report."""
    if config.eval_every:
        return None
    return config.epochs + 1


def _checkpoint_index(name: str) -> int | None:
    prefix, _, number = name.rpartition("_")
    return int(number) if prefix == "checkpoint" and number.isdigit() else None


def mend_checkpoints(path: str) -> list[str]:
    """Makes a stopped search's checkpoints agree with its last experiment snapshot; returns notes.

    With num_to_keep=1, Ray Tune deletes a trial's checkpoint as soon as it registers the next one,
    and saves the snapshot that names the new one only afterwards. A driver killed in between leaves
    a snapshot naming a deleted checkpoint, and the restored trial fails ("does not exist on storage
    anymore"). A deletion only follows the registration of a newer, complete checkpoint, so the
    oldest newer one takes the missing one's place. Checkpoints newer than the snapshot's are unknown
    to Ray, which would write the trial's next ones into them (a merge, stale files and all): they go.
    """
    import pyarrow.fs
    from ray.tune import ExperimentAnalysis

    notes = []
    for trial in ExperimentAnalysis(path).trials:
        if trial.status == "TERMINATED":
            continue
        fs, trial_dir = trial.storage.storage_filesystem, trial.storage.trial_fs_path
        named = trial.checkpoint.path if trial.checkpoint else None
        known = _checkpoint_index(posixpath.basename(named)) if named else -1
        if known is None:
            continue
        found = {_checkpoint_index(info.base_name): info.path
                 for info in fs.get_file_info(pyarrow.fs.FileSelector(trial_dir, allow_not_found=True))
                 if info.type == pyarrow.fs.FileType.Directory}
        newer = sorted(i for i in found if i is not None and i > known)
        if named and known not in found and newer:
            pyarrow.fs.copy_files(found[newer[0]], named, source_filesystem=fs, destination_filesystem=fs)
            notes.append(f"trial {trial.trial_id}: {posixpath.basename(named)}, named by the last snapshot, was "
                         f"deleted by Ray; it goes on from {posixpath.basename(found[newer[0]])} in its place")
        for index in newer:
            fs.delete_dir(found[index])
    return notes


def progress_columns(grid, phase: str) -> dict:
    """The trial config's columns in Ray Tune's progress table: the grid's dimensions, or the seed."""
    if phase == "seeds":
        return {"seed": "seed"}
    names = {"alphas": "α_aug,α_fea", "beta": "β", "gamma": "γ", "soft_scope": "soft scope"}
    return {key: names[key] for key in grid.space()}


def make_tuner(plan: Plan, phase: str, param_space: dict, name: str, trainable, restore: bool):
    from ray import tune
    from ray.tune import CheckpointConfig, CLIReporter, FailureConfig, RunConfig
    from ray.tune.schedulers import ASHAScheduler

    args = plan.args
    path = f"{plan.storage_path.rstrip('/')}/{name}"
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # the classic table, with the columns below
    # Every evaluation checkpoints (num_to_keep=1 forces an experiment snapshot each time): that
    # is what --max-failures and --resume need, not a bottleneck worth a warning per trial.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    if restore and tune.Tuner.can_restore(path):
        log.warning("resuming %s from %s", phase, path)
        for note in mend_checkpoints(path):
            print(f"{PROG}: {note}", flush=True)
        return tune.Tuner.restore(path, trainable=trainable, resume_unfinished=True, resume_errored=True)
    reporter = CLIReporter(parameter_columns=progress_columns(plan.grid, phase),
                           metric_columns={"step": "step", "dev_f1": "dev F1", "best_dev_f1": "best dev F1",
                                           "test_f1": "test F1"},
                           max_report_frequency=30, sort_by_metric=True,
                           max_progress_rows=40)
    if phase == "search":
        searcher = make_searcher(args.sampler, plan.grid, args.search_seed, plan.num_samples)
        scheduler = None
        if args.scheduler == "asha":
            scheduler = ASHAScheduler(time_attr="training_iteration", max_t=evaluations_per_trial(plan.base) or 1000,
                                      grace_period=args.asha_grace_period,
                                      reduction_factor=args.asha_reduction_factor)
        tune_config = tune.TuneConfig(metric=METRIC, mode=MODE, search_alg=searcher, scheduler=scheduler,
                                      num_samples=plan.num_samples, max_concurrent_trials=args.max_concurrent or None,
                                      reuse_actors=True, trial_dirname_creator=trial_dirname)
    else:
        tune_config = tune.TuneConfig(metric=METRIC, mode=MODE, num_samples=1,
                                      max_concurrent_trials=args.max_concurrent or None, reuse_actors=True,
                                      trial_dirname_creator=trial_dirname)
    run_config = RunConfig(name=name, storage_path=plan.storage_path,
                           failure_config=FailureConfig(max_failures=args.max_failures),
                           checkpoint_config=CheckpointConfig(num_to_keep=1),
                           progress_reporter=reporter, verbose=1)
    return tune.Tuner(trainable, param_space=param_space, tune_config=tune_config, run_config=run_config)


# ---------------------------------------------------------------------------------------------
# The search.

def find_search(storage_path: str, which: str) -> Path:
    """The results folder of the search to resume: NAME or a path, or the latest with a record."""
    if which != "latest":
        for candidate in (Path(which), Path(storage_path) / which):
            if (candidate / RECORD).is_file():
                return candidate.resolve()
        raise SearchError(f"--resume {which}: no search record ({RECORD}) there or in {storage_path}")
    records = sorted(Path(storage_path).glob(f"*/{RECORD}"), key=lambda p: p.stat().st_mtime)
    if not records:
        raise SearchError(f"--resume: no search to resume in {storage_path} (pass --storage-path, or NAME)")
    return records[-1].parent


RECORD_KEYS = {"argv": list, "name": str, "mlflow_uri": str, "experiment_id": str, "parent_run_id": str,
               "stage": str}


def read_record(path: Path) -> dict:
    """A search record, checked: a damaged one is an error naming the file, not a traceback."""
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise SearchError(f"--resume: {path}: cannot read it ({err.strerror or err})") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise SearchError(f"--resume: {path}: not a search record (damaged: {err})") from None
    if not isinstance(record, dict):
        raise SearchError(f"--resume: {path}: not a search record (a JSON {type(record).__name__}, not an object)")
    for key, kind in RECORD_KEYS.items():
        strings = key != "argv" or all(isinstance(a, str) for a in record.get(key) or [])
        if not isinstance(record.get(key), kind) or not strings:
            raise SearchError(f"--resume: {path}: not a search record (key {key!r}: missing or not a "
                              f"{'list of strings' if kind is list else 'string'})")
    if record["stage"] not in ("search", "seeds", "done"):
        raise SearchError(f"--resume: {path}: not a search record (key 'stage': {record['stage']!r})")
    return record


def resume_args(args: argparse.Namespace, parser: Parser) -> tuple[argparse.Namespace, list[str], dict, Path]:
    """The flags of the search to resume (its record's), with those of RESUME_OVERRIDES given now."""
    from softfine_tune_tracking import without_credentials

    storage = args.storage_path or str(DEFAULT_STORAGE)
    folder = find_search(storage, args.resume)
    record = read_record(folder / RECORD)
    overrides = {k: getattr(args, k) for k in RESUME_OVERRIDES if getattr(args, k, None)}
    parser.record = folder / RECORD
    try:
        resumed = parser.parse_args(record["argv"])
    finally:
        parser.record = None
    resumed.mlflow_uri = record["mlflow_uri"]  # resolved when the search started (the argv's may be relative)
    given = overrides.get("mlflow_uri")
    if given and without_credentials(given) != without_credentials(record["mlflow_uri"]):
        raise SearchError(f"--mlflow-uri {mask_credentials(given)}: this search logs to {record['mlflow_uri']}; "
                          "resume it with that store")
    for key, value in overrides.items():
        setattr(resumed, key, value)
    resumed.name, resumed.storage_path, resumed.resume = folder.name, str(folder.parent), None
    return resumed, record["argv"], record, folder
