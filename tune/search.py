#!/usr/bin/env python
"""Distributed hyperparameter search for SoftFiNE: Ray Tune + Optuna over the paper's grid, one
GPU per trial, every trial an MLflow child run under one parent run per search.

    python tune/search.py --dataset weibo                       # the paper's 36-point grid, 1 GPU per trial
    python tune/search.py --dataset resume --sampler tpe --num-samples 12 --scheduler asha
    python tune/search.py --dataset resume --model tiny --alphas 0.01,0.005 --beta 2 --gamma 2 --seeds 3
    python tune/search.py --resume                               # continue the last search after a crash

(`softfine-search` is the same command.) Everything that can be refused is refused before a trial
starts, most of it before any data is read or Ray starts (plan.py, cluster.py): each refusal is
one line, `tune/search.py: error: ...`, naming the flag, file or key; `-v` adds the traceback.
Once the search's MLflow parent run exists, a failure ends it as FAILED.
"""

from __future__ import annotations

if __name__ == "__main__" and not __package__:  # `python tune/search.py`: the installed package's driver
    from softfine_tune.search import run

    run()

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import sys
import tempfile
import time
from collections.abc import Sequence

from .callback import MLflowChildRuns, read_account
from .cli import EXCLUDED_TRAIN_FIELDS, PROG, RECORD, WANTED, Parser, build_parser
from .cluster import check_address, check_cluster, cluster_resources, connect_ray, fuse_to_fit, probe_gpus
from .plan import Plan, make_plan
from .report import describe_search, finish, planned_ray_trials, short
from .results import finished, select, trial_rows
from .resume import resume_args
from .space import FUSED, SearchError, fused_groups, point_name, point_of, record_points
from .storage import LOCK, RemoteLock, SearchFiles
from .tracking import (
    Tracker,
    check_tracking,
    credentials,
    dataset_inputs,
    git_version,
    mask_credentials,
    preload_model_code,
    versions,
    write_json,
)
from .trial import fused_config, softfine_trial
from .tuner import OPTUNA_DB, check_study, make_tuner

log = logging.getLogger("softfine.tune")


class Interrupted(Exception):
    """The search stopped before its trials ended (Ctrl-C): it can be resumed, not summarised."""


def check_data(plan: Plan, record: dict) -> Plan:
    """Reads the splits every trial trains and scores on, by the trials' rules (softfine.datasets.
    load_corpus: an unreadable sentence is skipped in train and refused in dev and test; --strict;
    the limits), once, before Ray starts: data every trial would fail on is one error naming file
    and line, not N failed trials. The trials get these very sentences through Ray: no worker
    node needs the files. A resumed search's data must be the data it started with."""
    from softfine.datasets import load_corpus, report_unseen

    corpus = load_corpus(plan.base)
    if not corpus.splits["train"]:
        raise SearchError(
            f"{corpus.files['train']['path']}: no usable training sentences (see the warnings above)"
        )
    started = record.get("data_sha256")
    if started and started != corpus.sha256:
        files = ", ".join(f["path"] for f in corpus.files.values())
        raise SearchError(
            f"--resume: the data changed since the search started ({files}: sha256 {corpus.sha256[:16]}, "
            f"was {started[:16]}); put the files back as they were, or start a new search"
        )
    report_unseen(corpus)
    return dataclasses.replace(plan, corpus=corpus)


def check_encoder(base) -> None:
    """The encoder every trial loads, resolved once before Ray starts (its config and tokenizer,
    from the Hub or a folder): a name no trial can load is one error, not N trials' retries."""
    from softfine.errors import SoftFiNEError
    from softfine.model import check_encoder as resolve

    try:
        resolve(base.model)
    except SoftFiNEError as err:
        raise SearchError(str(err)) from None


def prepare_folder(files: SearchFiles) -> None:
    """The search's (working) folder, created and written to once before the MLflow parent run
    exists: a folder that cannot be written is refused before anything is recorded."""
    folder = files.folder
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as err:
        flag = (
            f"--storage-path {folder.parent}" if not files.remote else f"--storage-path {files.storage.uri}"
        )
        what = "the search's folder" if not files.remote else "the search's working folder (XDG_CACHE_HOME)"
        raise SearchError(f"{flag}: cannot write {what} {folder} ({err.strerror or err})") from None


@contextlib.contextmanager
def one_driver(files: SearchFiles):
    """An exclusive lock on the search while the block runs: flock on a file of its (working)
    folder, which the kernel releases when the process ends, however it ends; on S3 also the lock
    object beside the search's files (storage.RemoteLock: drivers on other machines). A second
    driver on the same --storage-path and --name is refused, naming the first's process."""
    import fcntl

    folder = files.folder
    made = [
        f for f in (folder, *folder.parents) if not f.exists()
    ]  # to remove again if nothing else is written
    prepare_folder(files)
    fd = os.open(folder / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    remote = None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            raise SearchError(
                f"--name {files.name}: the search in {files.location} is running in process {holder}; "
                "wait for it to end (or stop it), or give another --name"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        if RemoteLock.available(files.storage):
            remote = RemoteLock(files.storage, files.name)
            remote.acquire()
        elif files.remote:
            log.warning(
                "%s: one driver per search is checked on this machine only (storage.RemoteLock needs S3 and "
                "a boto3 whose botocore knows S3's conditional writes, late 2024 on): run the "
                "search's driver "
                "on one machine at a time",
                files.location,
            )
        yield
    finally:
        if remote is not None:
            remote.release()
        os.close(fd)
        if made and [p.name for p in folder.iterdir()] == [LOCK]:  # refused before it began: leave nothing
            (folder / LOCK).unlink()
            for empty in made:
                empty.rmdir()


def run_search(args: argparse.Namespace, argv: list[str], parser: Parser) -> int:
    record: dict = {}
    if args.resume:
        args, argv, record, location = resume_args(args, parser)
        print(
            f"{PROG}: resuming search {args.name} ({location}), stage: {record['stage']}, with its "
            "own flags: "
            f"{' '.join(argv)}",
            flush=True,
        )
        if record["stage"] == "done":
            print(json.dumps(record.get("summary", {}), indent=1, default=str))
            return 0

    plan = make_plan(args, argv, record or None)
    files = SearchFiles(plan.storage, plan.name)
    if not record and plan.storage.exists(plan.name, RECORD):
        raise SearchError(
            f"--name {plan.name}: a search of that name exists in {plan.storage_path}; "
            f"continue it with --resume {plan.name} or choose another name"
        )
    plan = check_data(plan, record)
    check_address(plan.flags.address)
    # The credentials are in the driver's environment only while it talks to MLflow, not when it
    # starts Ray's processes (which would inherit them). The trials never talk to MLflow.
    mlflow_env = {**plan.tracking.env, "MLFLOW_TRACKING_URI": plan.tracking.uri}
    with credentials(mlflow_env):
        check_tracking(plan.tracking, plan.flags.mlflow_timeout)
    check_encoder(plan.base)
    with one_driver(files):
        if not record and plan.storage.exists(
            plan.name, RECORD
        ):  # another driver wrote it since the check above
            raise SearchError(
                f"--name {plan.name}: a search of that name started in {plan.storage_path} meanwhile; "
                f"continue it with --resume {plan.name} once it stops, or choose another name"
            )
        if files.remote:  # the working folder: empty for a new search, the search's files for a resumed one
            pulled = files.pull(download=bool(record))
            if record:
                log.info("%s: downloaded %s", files.location, ", ".join(pulled))
        if record:
            check_study(files.folder, f"{files.location}/{OPTUNA_DB}")
        return run_on_ray(plan, record, files, mlflow_env)


def run_on_ray(plan: Plan, record: dict, files: SearchFiles, mlflow_env: dict) -> int:
    """Ray (the cluster given, or a local one), its resources checked; then the search."""
    flags = plan.flags
    started_ray = connect_ray(flags.address)
    try:
        cluster = cluster_resources()
        check_cluster(flags, cluster, plan.storage)
        probe_gpus(flags, cluster)
        if plan.fuse == "auto":  # a resumed search keeps the groups it was started with
            size, why = (
                (record["fuse"], "as when the search started")
                if record.get("fuse")
                else fuse_to_fit(flags, plan.base, plan.corpus, len(plan.grid))
            )
            print(f"{PROG}: --fuse auto: {size} point{'s' if size > 1 else ''} per trial ({why})", flush=True)
            plan = dataclasses.replace(plan, fuse=size)
        with credentials(mlflow_env):
            return search(plan, record, files, cluster)
    finally:
        if started_ray:
            import ray

            ray.shutdown()


def search(plan: Plan, record: dict, files: SearchFiles, cluster: dict) -> int:
    """The parent run, the phases, the summary; a failure ends the parent run."""
    tracker = Tracker(plan.tracking.uri, plan.flags.mlflow_timeout)
    restoring = bool(record)
    if restoring:
        parent_run_id = record["parent_run_id"]
        tracker.attempt(
            "reopen the parent run", lambda: tracker.client.update_run(parent_run_id, status="RUNNING")
        )
    else:
        code = git_version()
        experiment_id = tracker.experiment(plan.experiment_name)
        parent_run_id = open_parent(plan, tracker, experiment_id, cluster, code)
        record = {
            "argv": plan.argv,
            "name": plan.name,
            "created": time.time(),
            "mlflow_uri": plan.tracking.display,
            "experiment_id": experiment_id,
            "experiment_name": plan.experiment_name,
            "fuse": plan.fuse,
            "parent_run_id": parent_run_id,
            "code": code,
            "mode": plan.mode,
            "stage": "seeds" if plan.mode == "seeds" else "search",
            **recorded_settings(plan),
        }
    try:
        write_json(files.folder / RECORD, record)
        files.push(RECORD)
        return run_phases(plan, tracker, record, files, cluster, restoring)
    except BaseException as err:
        # Never RUNNING forever: a search stopped by Ctrl-C (which --resume continues) is KILLED,
        # a failed one FAILED, with the error on the run.
        status = "KILLED" if isinstance(err, (KeyboardInterrupt, Interrupted)) else "FAILED"
        if status == "FAILED":
            error = mask_credentials(f"{type(err).__name__}: {err}")[:4000]
            tracker.attempt(
                "record the error on the parent run",
                lambda: tracker.client.set_tag(parent_run_id, "softfine.error", error),
            )
        tracker.attempt(
            f"end the parent run ({status})",
            lambda: tracker.client.set_terminated(parent_run_id, status=status),
        )
        raise


def recorded_settings(plan: Plan) -> dict:
    """What a resume must not read again (a preset or data changed meanwhile would change the
    search under its trials): the resolved grid and training settings, the data's checksum."""
    return {
        "grid": plan.grid.describe(),
        "base": dataclasses.asdict(plan.base),
        "preset": plan.preset["path"],
        "paper_selection": plan.preset.get("paper_selection"),
        "data_sha256": plan.corpus.sha256,
    }


def run_tags(code: dict) -> dict:
    """Where a run's code came from, as MLflow's UI shows it (Source, Git commit)."""
    return {
        "mlflow.source.name": PROG,
        "mlflow.source.type": "LOCAL",
        "mlflow.source.git.commit": code["commit"],
        "softfine.git_dirty": code["dirty"],
        **{f"softfine.version.{k}": v for k, v in versions().items()},
    }


def open_parent(plan: Plan, tracker: Tracker, experiment_id: str, cluster: dict, code: dict) -> str:
    """The search's MLflow parent run: what the search is (params), its command (the note), its data."""
    flags = plan.flags
    params = {
        "dataset": plan.dataset,
        "mode": plan.mode,
        "sampler": flags.sampler,
        "scheduler": flags.scheduler,
        "grid": json.dumps(plan.grid.describe()),
        "grid_size": len(plan.grid),
        "num_samples": plan.num_samples,
        "seeds": flags.seeds,
        "gpus_per_trial": flags.gpus_per_trial,
        "cpus_per_trial": flags.cpus_per_trial,
        "max_concurrent": flags.max_concurrent,
        "max_failures": flags.max_failures,
        "fuse": plan.fuse,
        "cluster_nodes": cluster["nodes"],
        "cluster_gpus": cluster["gpus"],
        "cluster_cpus": cluster["cpus"],
        "code_version": code["commit"] + ("+dirty" if code["dirty"] == "true" else ""),
        "preset": plan.preset["path"],
        "search_name": plan.name,
        "mlflow_uri": plan.tracking.display,
        **{
            f"train.{k}": v
            for k, v in dataclasses.asdict(plan.base).items()
            if k not in EXCLUDED_TRAIN_FIELDS or (k == "soft_scope" and "soft_scope" not in plan.keys)
        },
    }
    what = describe_search(
        plan, plan.num_samples, planned_ray_trials(plan)
    )  # the selection goes first at the end
    tags = {
        **run_tags(code),
        "mlflow.note.content": f"SoftFiNE {what}. Command: `{PROG} {' '.join(plan.argv)}`",
    }
    run_id = tracker.start_parent(experiment_id, plan.name, plan.name, params, tags)
    tracker.attempt(
        "log the datasets", lambda: tracker.client.log_inputs(run_id, datasets=dataset_inputs(plan.corpus))
    )
    return run_id


def run_phase(
    plan: Plan, phase: str, points, name: str, record: dict, files: SearchFiles, restoring: bool
) -> list[dict]:
    """One Tuner.fit: the search over the grid, or one point over seeds; its rows."""
    from ray import tune
    from ray.tune import ExperimentAnalysis

    flags = plan.flags
    trainable = tune.with_resources(
        tune.with_parameters(
            softfine_trial,
            base=plan.base,
            corpus=plan.corpus,
            allow_cpu_fallback=flags.allow_cpu_fallback,
            verbose=bool(flags.verbose),
        ),
        {"cpu": flags.cpus_per_trial, "gpu": flags.gpus_per_trial},
    )
    callback = MLflowChildRuns(
        str(files.folder),
        record["experiment_id"],
        record["parent_run_id"],
        plan.name,
        phase,
        plan.base,
        run_tags(record["code"]),
        dataset_inputs(plan.corpus),
        flags.mlflow_timeout,
    )
    MLflowChildRuns.search_files = files  # where a restored callback (made by an earlier driver) writes too
    tuner = make_tuner(plan, phase, points, name, trainable, restoring, callback, files.folder)
    started = time.time()
    results = tuner.fit()
    log.info("%s phase: %d trials in %.0f s", phase, len(results), time.time() - started)
    # Ray Tune returns normally after SIGINT, having saved the unfinished trials for a restore:
    # the saved experiment state tells (the trials in memory are all stopped by then).
    saved = ExperimentAnalysis(f"{plan.storage_path.rstrip('/')}/{name}").trials  # a path or a URI
    unfinished = [t for t in saved if t.status not in ("TERMINATED", "ERROR")]
    expected = (
        len(points[FUSED]["grid_search"])
        if FUSED in points  # --fuse: one trial per group
        else plan.num_samples
        if phase == "search"
        else flags.seeds
    )
    if unfinished or len(saved) < expected:
        raise Interrupted(f"{len(unfinished) + expected - len(saved)} trial(s) of the {phase} did not end")
    runs, _, _ = read_account(files.folder, phase)
    rows = trial_rows([results[i] for i in range(len(results))], runs, phase, plan.base)
    if FUSED in points:  # the study gets every point, as the grid sampler's trials would have
        record_points(f"sqlite:///{files.folder / OPTUNA_DB}", plan.name, plan.grid, rows)
        files.push(OPTUNA_DB)
    return rows


def run_phases(
    plan: Plan, tracker: Tracker, record: dict, files: SearchFiles, cluster: dict, restoring: bool
) -> int:
    """The grid or TPE search, then (--seeds) the selection with N seeds; or, for one grid point
    with --seeds, only the seeds. Then the summary; the exit status."""
    flags = plan.flags
    what = describe_search(plan, plan.num_samples, planned_ray_trials(plan))
    print(
        f"{PROG}: {what}; cluster of {cluster['nodes']} node(s) "
        f"with {cluster['cpus']:g} CPUs and {cluster['gpus']:g} GPUs, {flags.cpus_per_trial:g} CPU + "
        f"{flags.gpus_per_trial:g} GPU per trial; MLflow parent run {record['parent_run_id']} at "
        f"{plan.tracking.display}",
        flush=True,
    )
    preload_model_code()  # while the trials run: the model's check at the end needs torch and transformers
    started = time.time()
    rows, seed_rows, selected = run_trials(plan, record, files, restoring)
    summary = summarise(
        plan, tracker, record, files, cluster, rows, seed_rows, selected, time.time() - started
    )
    if summary.get("model_error"):
        print(f"{PROG}: error: {summary['model_error']}", file=sys.stderr, flush=True)
    # Complete: every point ended (trained to the end, or stopped early by ASHA), with a usable model.
    unfinished = [r for r in rows + seed_rows if r["status"] not in ("TERMINATED", "STOPPED")]
    return 0 if selected is not None and not unfinished and not summary.get("model_error") else 1


def run_trials(
    plan: Plan, record: dict, files: SearchFiles, restoring: bool
) -> tuple[list, list, dict | None]:
    """The phases' trials: (the search's rows, the seeds' rows, the selected row)."""
    from ray import tune

    def seeds(point: dict, name: str) -> list[dict]:
        space = {**point, "seed": tune.grid_search([plan.base.seed + i for i in range(plan.flags.seeds)])}
        return run_phase(plan, "seeds", space, name, record, files, restoring)

    if plan.mode == "seeds":
        seed_rows = seeds(plan.grid.points()[0], plan.name)
        return [], seed_rows, select(finished(seed_rows))  # the seed whose model the parent run gets
    groups = {}
    if plan.fuse != 1:  # a grid search over the groups; else Optuna hands out the points
        points = fused_groups(plan.grid.points(), plan.fuse, plan.base)
        groups = {FUSED: tune.grid_search([fused_config(g) for g in points])}
    rows = run_phase(plan, "search", groups, plan.name, record, files, restoring)
    selected, seed_rows = select(rows), []
    if selected is not None and plan.flags.seeds:
        record.update(stage="seeds", selected={k: selected[k] for k in plan.keys})
        write_json(files.folder / RECORD, record)
        files.push(RECORD)
        seed_rows = seeds(point_of(selected, plan.keys), f"{plan.name}-seeds")
    return rows, seed_rows, selected


def summarise(
    plan: Plan,
    tracker: Tracker,
    record: dict,
    files: SearchFiles,
    cluster: dict,
    rows: list[dict],
    seed_rows: list[dict],
    selected: dict | None,
    seconds: float,
) -> dict:
    """The report (report.finish), the trials started again from scratch, the record "done"."""
    unlogged = [op for phase in ("search", "seeds") for op in read_account(files.folder, phase)[1]]
    summary = finish(
        plan,
        tracker,
        files.folder,
        record["experiment_id"],
        record["parent_run_id"],
        rows,
        seed_rows,
        selected,
        seconds,
        unlogged,
        cluster,
        files.location,
    )
    restarted = [r for r in rows + seed_rows if r.get("restarted")]
    if restarted:  # trials whose damaged checkpoint was not resumed from (trial.py)
        summary["restarted"] = [{"trial_id": r["trial_id"], "why": r["restarted"]} for r in restarted]
        write_json(files.folder / "summary.json", summary)
    files.push()  # the summary, trials.csv and the figures (the record last: "done" once they are there)
    record.update(stage="done", summary=summary)
    write_json(files.folder / RECORD, record)
    files.push(RECORD)
    for row in restarted:
        print(
            f"{PROG}: trial {row['trial_id']} ({point_name(point_of(row, plan.keys))}): {row['restarted']}",
            flush=True,
        )
    return summary


# ---------------------------------------------------------------------------------------------


def fail(message: str, verbose: bool, code: int = 2) -> int:
    """One line on stderr, the last (the traceback before it with -v); credentials masked."""
    if verbose:
        import traceback

        traceback.print_exc()
    line = " ".join(mask_credentials(message).split()) or "unknown error"
    print(f"{PROG}: error: {short(line, 2000)}", file=sys.stderr, flush=True)
    return code


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    from softfine.arguments import check_text_arguments
    from softfine.errors import SoftFiNEError

    try:
        check_text_arguments(
            parser, args, SearchError, WANTED
        )  # UTF-8, and no empty value read as "the default"
        return run_search(args, argv, parser)
    except (SearchError, SoftFiNEError) as err:
        return fail(str(err), args.verbose)
    except (KeyboardInterrupt, Interrupted) as err:
        print(
            f"{PROG}: interrupted ({err or 'Ctrl-C'}); the search is saved: continue it with "
            f"python {PROG} --resume",
            file=sys.stderr,
            flush=True,
        )
        return 130
    except OSError as err:  # a full disk, a folder without permission: the file and the cause
        where = f"{err.filename}: " if err.filename else ""
        return fail(f"{where}{err.strerror or err} ({type(err).__name__})", args.verbose, code=1)
    except Exception as err:  # noqa: BLE001 - not hidden: its type and message, the traceback with -v
        return fail(f"{type(err).__name__}: {err}", args.verbose, code=1)


def run() -> None:
    """The command (`softfine-search`, `python tune/search.py`): main(), then an exit that skips
    the interpreter's teardown of Ray, torch and pyarrow, seconds that do nothing for a search
    whose results are on disk and whose runs are closed (benchmarks/search_overhead.py)."""
    code = main()
    if "ray" in sys.modules:
        import ray

        if ray.is_initialized():  # a cluster's driver disconnects as it would at exit
            ray.shutdown()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    run()
