"""Ray Tune: the Tuner of a search phase (searcher, scheduler, checkpoints, retries, the MLflow
callback), restored when the search is resumed, with its checkpoints mended first."""

from __future__ import annotations

import fnmatch
import logging
import os
import posixpath
import sqlite3
from pathlib import Path

import pyarrow.fs
from ray import tune
from ray.tune import CheckpointConfig, CLIReporter, ExperimentAnalysis, FailureConfig, RunConfig
from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search import ConcurrencyLimiter

from softfine.errors import first_line

from .cli import PROG
from .console import PointsReporter
from .plan import Plan
from .space import FUSED, METRIC, MODE, SYMBOLS, SearchError, make_searcher
from .storage import is_remote, open_path, read_from
from .tracking import sqlite_tables

log = logging.getLogger("softfine.tune")

OPTUNA_DB = "optuna.db"  # the study, in the search phase's folder


def trial_dirname(trial) -> str:
    return f"trial_{trial.trial_id}"


def _checkpoint_index(name: str) -> int | None:
    prefix, _, number = name.rpartition("_")
    return int(number) if prefix == "checkpoint" and number.isdigit() else None


def experiment_files(path: str, pattern: str) -> tuple[object, list[str]]:
    """(pyarrow file system, sorted paths) of the files named `pattern` in the experiment folder `path`."""
    fs, root = open_path(path)
    infos = fs.get_file_info(pyarrow.fs.FileSelector(root, allow_not_found=True))
    files = [i for i in infos if i.type == pyarrow.fs.FileType.File]
    return fs, sorted(i.path for i in files if fnmatch.fnmatchcase(i.base_name, pattern))


def mend_callback_state(path: str) -> list[str]:
    """Drops a callback state that a killed driver left cut short (a pickle ends with its STOP opcode ".")."""
    # By hand: Ray copies the state to the storage non-atomically, and its restore fails on a cut file.
    notes = []
    fs, states = experiment_files(path, "callback-states-*.pkl")
    for state in states:
        if not read_from(fs, state).endswith(b"."):
            fs.delete_file(state)
            notes.append(
                f"{posixpath.basename(state)} was cut short (the driver stopped while it was written): the "
                "trials' MLflow runs are found again by their trial-id tags"
            )
    return notes


def mend_checkpoints(path: str) -> list[str]:
    """A stopped search's checkpoints made to agree with its last snapshot (returns notes): a deleted
    one it names is replaced by the oldest newer one; newer ones go (Ray would write into them)."""
    # By hand: Tune deletes a checkpoint before its snapshot names the next, and restores with no fallback.
    notes = []
    for trial in ExperimentAnalysis(path).trials:
        if trial.status == "TERMINATED":
            continue
        fs, trial_dir = trial.storage.storage_filesystem, trial.storage.trial_fs_path
        named = trial.checkpoint.path if trial.checkpoint else None
        known = _checkpoint_index(posixpath.basename(named)) if named else -1
        if known is None:
            continue
        # A checkpoint is there when it holds files: on S3 a deleted one may still be listed, empty.
        found = {
            _checkpoint_index(info.base_name): info.path
            for info in fs.get_file_info(pyarrow.fs.FileSelector(trial_dir, allow_not_found=True))
            if info.type == pyarrow.fs.FileType.Directory and holds_files(fs, info.path)
        }
        newer = sorted(i for i in found if i is not None and i > known)
        if named and known not in found and newer:
            # copy_files makes no folder for a source's top-level files (a half-written checkpoint's)
            fs.create_dir(named, recursive=True)
            # use_threads=False: pyarrow's threaded uploads to S3 are not safe (Ray's own copies do the same)
            pyarrow.fs.copy_files(
                found[newer[0]], named, source_filesystem=fs, destination_filesystem=fs, use_threads=False
            )
            notes.append(
                f"trial {trial.trial_id}: {posixpath.basename(named)}, named by the last snapshot, was "
                f"deleted by Ray; it goes on from {posixpath.basename(found[newer[0]])} in its place"
            )
        for index in newer:
            fs.delete_dir(found[index])
    return notes


def holds_files(fs, path: str) -> bool:
    selector = pyarrow.fs.FileSelector(path, recursive=True, allow_not_found=True)
    return any(info.type == pyarrow.fs.FileType.File for info in fs.get_file_info(selector))


def check_study(folder, shown: str | None = None) -> None:
    """Refuses a resume whose optuna.db is no Optuna database (`shown`: where a working copy's is kept)."""
    study = folder / OPTUNA_DB
    if not study.is_file():
        return
    try:
        tables = sqlite_tables(study)
    except sqlite3.DatabaseError as err:
        tables = {f"({err})"}
    if "studies" not in tables:
        raise SearchError(
            f"--resume: {shown or study}: the search's Optuna study is damaged (not an Optuna database: "
            f"{', '.join(sorted(tables)) or 'no tables'}); restore it from a copy, or start the search "
            "again under another --name (its finished points are in MLflow)"
        )


def damaged_state(path: str, err: BaseException) -> str:
    """One line for a search whose Ray Tune state cannot be read back: the file, why, what to do."""
    kind = "a JSON file" if isinstance(err, ValueError) else "its files"
    try:
        states = experiment_files(path, "experiment_state-*.json")[1]
    except OSError:
        states = []
    where = f"{path}/{posixpath.basename(states[-1])}" if states and isinstance(err, ValueError) else path
    return (
        f"--resume: {where}: Ray Tune's saved state of this search is damaged ({kind}: {first_line(err)}); "
        "it cannot go on from there. Its finished points are in MLflow; start the search "
        "again under another --name (or restore the folder from a copy)"
    )


def progress_columns(grid, phase: str, fused: bool = False) -> dict:
    """The trial config's columns in Ray Tune's progress table: the grid's dimensions, seed or points."""
    if phase == "seeds":
        return {"seed": "seed"}
    if fused:
        return {"group/name": "points"}
    names = {**SYMBOLS, "alphas": f"{SYMBOLS['alpha_aug']},{SYMBOLS['alpha_fea']}"}
    return {key: names[key] for key in grid.space()}


def phase_points(plan: Plan, phase: str, param_space: dict) -> int:
    """How many grid points a phase trains."""
    if phase == "seeds":
        return plan.flags.seeds
    if FUSED in param_space:
        return sum(len(group["points"]) for group in param_space[FUSED]["grid_search"])
    return plan.num_samples


def make_reporter(plan: Plan, phase: str, param_space: dict):
    """The phase's console: a line per point (console.py); with -v, Ray Tune's table and its warnings."""
    if not plan.flags.verbose:
        for name in ("ray.tune.utils.util", "ray.tune.execution.experiment_state"):
            logging.getLogger(name).setLevel(logging.ERROR)
        return PointsReporter(phase, phase_points(plan, phase, param_space), plan.base.epochs)
    return CLIReporter(
        parameter_columns=progress_columns(plan.grid, phase, FUSED in param_space),
        metric_columns={"step": "step", "dev_f1": "dev F1", METRIC: "best dev F1", "test_f1": "test F1"},
        max_report_frequency=30,
        sort_by_metric=True,
        max_progress_rows=40,
    )


def make_tuner(
    plan: Plan, phase: str, param_space: dict, name: str, trainable, restore: bool, callback, folder: Path
):
    """The phase's Tuner, restored when it was started before; `folder` holds the search's Optuna study."""
    from .in_place import StudyInPlace

    path = f"{plan.storage_path.rstrip('/')}/{name}"  # a folder, or a URI (storage.py)
    # On a remote storage, every experiment snapshot of Ray's holds a copy of the study, consistent
    # with the searcher state beside it (StudyInPlace.save_to_dir).
    StudyInPlace.snapshot_study = folder / OPTUNA_DB if is_remote(plan.storage_path) else None
    quiet_ray_defaults()
    if restore and tune.Tuner.can_restore(path):
        return restored_tuner(plan, phase, param_space, name, trainable, folder, path)
    run_config = RunConfig(
        name=name,
        storage_path=plan.storage_path,
        failure_config=FailureConfig(max_failures=plan.flags.max_failures),
        checkpoint_config=CheckpointConfig(num_to_keep=1),
        progress_reporter=make_reporter(plan, phase, param_space),
        verbose=1,
        callbacks=[callback, JsonLoggerCallback(), CSVLoggerCallback()],
    )
    tune_config = search_config(plan, phase, param_space, folder)
    return tune.Tuner(trainable, param_space=param_space, tune_config=tune_config, run_config=run_config)


def quiet_ray_defaults() -> None:
    """Ray Tune's settings for a search (a user's own environment wins)."""
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # the classic table, with the columns below
    # Every evaluation checkpoints, and so snapshots the experiment: what --max-failures and --resume need.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    # Tune's own JSON and CSV results, not its TensorBoard files: MLflow has the metrics, and
    # tensorboardX imports torch in the driver.
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")


def restored_tuner(plan: Plan, phase: str, param_space: dict, name: str, trainable, folder: Path, path: str):
    """The phase's Tuner from its saved state, mended first; the searcher's study this folder's."""
    from .in_place import StudyInPlace, TrialsInPlace, storage_opened_at

    log.warning("resuming %s from %s", phase, path)
    try:
        for note in mend_callback_state(path) + mend_checkpoints(path):
            print(f"{PROG}: {note}", flush=True)
        if phase != "search" or FUSED in param_space:  # no searcher: Ray's grid search
            return tune.Tuner.restore(path, trainable=trainable, resume_unfinished=True, resume_errored=True)
        # The searcher's study: this folder's, from the moment the Tuner's pickle is read back.
        StudyInPlace.resumed_study = folder / OPTUNA_DB
        TrialsInPlace.resumed_at = (plan.storage_path, name)
        with storage_opened_at(f"sqlite:///{folder / OPTUNA_DB}"):
            return tune.Tuner.restore(path, trainable=trainable, resume_unfinished=True, resume_errored=True)
    except Exception as err:  # noqa: BLE001 - JSON, pickle or file errors of Ray's files: the state is damaged
        raise SearchError(damaged_state(path, err)) from None


def search_config(plan: Plan, phase: str, param_space: dict, folder: Path):
    """Optuna's searcher (and ASHA) for the search phase; Ray Tune's grid search for seeds, fused groups."""
    from .in_place import TrialsInPlace

    flags = plan.flags
    common = dict(metric=METRIC, mode=MODE, reuse_actors=True, trial_dirname_creator=trial_dirname)
    if phase != "search" or FUSED in param_space:
        return tune.TuneConfig(num_samples=1, max_concurrent_trials=flags.max_concurrent or None, **common)
    study = f"sqlite:///{folder / OPTUNA_DB}"
    searcher = make_searcher(flags.sampler, plan.grid, flags.search_seed, plan.num_samples, study, plan.name)
    scheduler = None
    if flags.scheduler == "asha":
        reports = 1000 if plan.base.eval_every else plan.base.epochs + 1  # an evaluation per epoch, the final
        scheduler = ASHAScheduler(
            time_attr="training_iteration",
            max_t=reports,
            grace_period=flags.asha_grace_period,
            reduction_factor=flags.asha_reduction_factor,
        )
    if flags.max_concurrent:  # Ray's own wrapping, done here: the generator around it is ours
        searcher = ConcurrencyLimiter(searcher, max_concurrent=flags.max_concurrent)
    return tune.TuneConfig(
        search_alg=TrialsInPlace(searcher), scheduler=scheduler, num_samples=plan.num_samples, **common
    )
