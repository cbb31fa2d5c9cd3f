#!/usr/bin/env python
"""Distributed hyperparameter search for SoftFiNE (`softfine-search`; examples in its --help): Ray Tune +
Optuna over the paper's grid, one GPU per trial, each an MLflow child run under the search's parent run.
Top to bottom: the command line, the plan and its checks, Ray and the parent run, the phases, the report."""

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
import time
import traceback
from collections.abc import Sequence

from .account import read_account
from .callback import MLflowChildRuns
from .cli import EXCLUDED_TRAIN_FIELDS, PROG, RECORD, WANTED, Parser, build_parser
from .cluster import check_address, check_cluster, cluster_resources, connect_ray, fuse_to_fit, probe_gpus
from .console import short
from .lock import one_driver
from .model import preload_model_code
from .plan import Plan, make_plan
from .record import SearchRecord
from .report import describe_search, finish, planned_ray_trials
from .results import finished, select, trial_rows
from .resume import resume_args
from .runs import Tracker, dataset_inputs, git_version, versions
from .space import FUSED, SearchError, fused_groups, point_of, record_points
from .storage import SearchFiles
from .tracking import check_tracking, credentials, mask_credentials
from .trial import fused_config, softfine_trial
from .tuner import OPTUNA_DB, check_study, make_tuner

log = logging.getLogger("softfine.tune")


class Interrupted(Exception):
    """The search stopped before its trials ended (Ctrl-C): it can be resumed, not summarised."""


def run() -> None:
    """main(), then os._exit: the interpreter's teardown of Ray, torch and pyarrow is seconds for nothing."""
    code = main()
    if "ray" in sys.modules:
        import ray

        if ray.is_initialized():  # a cluster's driver disconnects as it would at exit
            ray.shutdown()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def main(argv: Sequence[str] | None = None) -> int:
    """The command line, then the search; its exit status (an error: one line on stderr)."""
    from softfine.arguments import check_text_arguments
    from softfine.errors import SoftFiNEError

    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    # The summary says where to open the UI; MLflow's own "View run" lines (two per run ended, with a
    # tracking server) would add two lines per point to the console.
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    try:
        check_text_arguments(parser, args, SearchError, WANTED)  # UTF-8, and no empty value read as a default
        return search(args, argv, parser)
    except (SearchError, SoftFiNEError) as err:
        return fail(str(err), args.verbose)
    except (KeyboardInterrupt, Interrupted) as err:
        saved = f"the search is saved: continue it with python {PROG} --resume"
        print(f"{PROG}: interrupted ({err or 'Ctrl-C'}); {saved}", file=sys.stderr, flush=True)
        return 130
    except OSError as err:  # a full disk, a folder without permission: the file and the cause
        where = f"{err.filename}: " if err.filename else ""
        return fail(f"{where}{err.strerror or err} ({type(err).__name__})", args.verbose, code=1)
    except Exception as err:  # noqa: BLE001 - not hidden: its type and message, the traceback with -v
        return fail(f"{type(err).__name__}: {err}", args.verbose, code=1)


def fail(message: str, verbose: bool, code: int = 2) -> int:
    """One line on stderr, the last (the traceback before it with -v); credentials masked."""
    if verbose:
        traceback.print_exc()
    line = " ".join(mask_credentials(message).split()) or "unknown error"
    print(f"{PROG}: error: {short(line, 2000)}", file=sys.stderr, flush=True)
    return code


def search(args: argparse.Namespace, argv: list[str], parser: Parser) -> int:
    """The plan (a resumed search's from its record) and its checks, then the search on Ray."""
    record = None
    if args.resume:
        args, record, location = resume_args(args, parser)
        argv = record.argv
        print(
            f"{PROG}: resuming search {args.name} ({location}), stage: {record.stage}, with its own flags: "
            f"{' '.join(argv)}",
            flush=True,
        )
        if record.stage == "done":
            print(json.dumps(record.summary or {}, indent=1, default=str))
            return 0
    plan = make_plan(args, argv, record)
    refuse_taken(plan, record)
    plan = check_data(plan, record)
    check_address(plan.flags.address)
    # The credentials are in the driver's environment only while it talks to MLflow, not when it
    # starts Ray's processes (which would inherit them). The trials never talk to MLflow.
    mlflow_env = {**plan.tracking.env, "MLFLOW_TRACKING_URI": plan.tracking.uri}
    with credentials(mlflow_env):
        check_tracking(plan.tracking, plan.flags.mlflow_timeout)
    from softfine.model import check_encoder  # (torch: only once the cheaper checks have passed)

    check_encoder(plan.base.model)  # resolved once: an encoder no trial can load is one error, not N retries
    files = SearchFiles(plan.storage, plan.name)
    with one_driver(files):
        refuse_taken(plan, record, meanwhile=True)  # another driver wrote it since the check above
        if files.remote:  # the working folder: empty for a new search, the search's files for a resumed one
            pulled = files.pull(download=record is not None)
            if record:
                log.info("%s: downloaded %s", files.location, ", ".join(pulled))
        if record:
            check_study(files.folder, f"{files.location}/{OPTUNA_DB}")
        return on_ray(plan, record, files, mlflow_env)


def refuse_taken(plan: Plan, record: SearchRecord | None, meanwhile: bool = False) -> None:
    """A new search's --name must be free in --storage-path (checked again once the driver holds it)."""
    if record is None and plan.storage.exists(plan.name, RECORD):
        what = f"started in {plan.storage_path} meanwhile" if meanwhile else f"exists in {plan.storage_path}"
        then = " once it stops," if meanwhile else ""
        raise SearchError(
            f"--name {plan.name}: a search of that name {what}; continue it with --resume {plan.name}{then} "
            "or choose another name"
        )


def check_data(plan: Plan, record: SearchRecord | None) -> Plan:
    """The splits, read once before Ray starts, sent to the trials; a resumed search's must be unchanged."""
    from softfine.datasets import load_corpus, report_unseen

    corpus = load_corpus(plan.base)
    if not corpus.splits["train"]:
        raise SearchError(
            f"{corpus.files['train']['path']}: no usable training sentences (see the warnings above)"
        )
    started = record and record.data_sha256
    if started and started != corpus.sha256:
        files = ", ".join(f["path"] for f in corpus.files.values())
        raise SearchError(
            f"--resume: the data changed since the search started ({files}: sha256 {corpus.sha256[:16]}, "
            f"was {started[:16]}); put the files back as they were, or start a new search"
        )
    report_unseen(corpus)
    return dataclasses.replace(plan, corpus=corpus)


def on_ray(plan: Plan, record: SearchRecord | None, files: SearchFiles, mlflow_env: dict) -> int:
    """Ray (the cluster given, or a local one) checked, --fuse auto resolved; the parent run, the phases."""
    flags = plan.flags
    started_ray = connect_ray(flags.address)
    try:
        cluster = cluster_resources()
        check_cluster(flags, cluster, plan.storage)
        probe_gpus(flags, cluster)
        if plan.fuse == "auto":  # a resumed search keeps the groups it was started with
            if record and record.fuse:
                size, why = record.fuse, "as when the search started"
            else:
                size, why = fuse_to_fit(flags, plan.base, plan.corpus, len(plan.grid))
            print(f"{PROG}: --fuse auto: {size} point{'s' if size > 1 else ''} per trial ({why})", flush=True)
            plan = dataclasses.replace(plan, fuse=size)
        with credentials(mlflow_env):
            tracker = Tracker(plan.tracking.uri, flags.mlflow_timeout)
            restoring = record is not None
            if restoring:
                reopen = lambda: tracker.client.update_run(record.parent_run_id, status="RUNNING")  # noqa: E731
                tracker.attempt("reopen the parent run", reopen)
            else:
                code = git_version()
                experiment_id = tracker.experiment(plan.experiment_name)
                parent_run_id = open_parent(plan, tracker, experiment_id, cluster, code)
                record = SearchRecord.start(plan, experiment_id, parent_run_id, code)
            with parent_run(tracker, record.parent_run_id):
                record.save(files)
                return run_phases(plan, tracker, record, files, cluster, restoring)
    finally:
        if started_ray:
            import ray

            ray.shutdown()


def run_tags(code: dict) -> dict:
    """Where a run's code came from, as MLflow's UI shows it (Source, Git commit)."""
    # Not mlflow's resolve_tags: it names sys.argv[0] (pytest, an entry point), reads .git (none in Ray jobs)
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
        **{k: getattr(plan, k) for k in ("dataset", "mode", "num_samples", "fuse")},
        **{k: getattr(flags, k) for k in ("sampler", "scheduler", "seeds", "max_concurrent", "max_failures")},
        **{k: getattr(flags, k) for k in ("gpus_per_trial", "cpus_per_trial")},
        "grid": json.dumps(plan.grid.describe()),
        "grid_size": len(plan.grid),
        **{f"cluster_{k}": cluster[k] for k in ("nodes", "gpus", "cpus")},
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
    what = describe_search(plan, plan.num_samples, planned_ray_trials(plan))  # the selection goes first
    note = f"SoftFiNE {what}. Command: `{PROG} {' '.join(plan.argv)}`"
    run_id = tracker.start_parent(
        experiment_id, plan.name, plan.name, params, {**run_tags(code), "mlflow.note.content": note}
    )
    inputs = dataset_inputs(plan.corpus)
    tracker.attempt("log the datasets", lambda: tracker.client.log_inputs(run_id, datasets=inputs))
    return run_id


@contextlib.contextmanager
def parent_run(tracker: Tracker, run_id: str):
    """Never RUNNING forever: KILLED by Ctrl-C (--resume continues it), or FAILED with the error on it."""
    try:
        yield
    except BaseException as err:
        status = "KILLED" if isinstance(err, (KeyboardInterrupt, Interrupted)) else "FAILED"
        if status == "FAILED":
            error = mask_credentials(f"{type(err).__name__}: {err}")[:4000]
            tag = lambda: tracker.client.set_tag(run_id, "softfine.error", error)  # noqa: E731
            tracker.attempt("record the error on the parent run", tag)
        end = lambda: tracker.client.set_terminated(run_id, status=status)  # noqa: E731
        tracker.attempt(f"end the parent run ({status})", end)
        raise


def run_phases(
    plan: Plan, tracker: Tracker, record: SearchRecord, files: SearchFiles, cluster: dict, restoring: bool
) -> int:
    """The search, then (--seeds) its selection with N seeds, or one point's seeds only; the report."""
    from ray import tune

    flags = plan.flags
    print(
        f"{PROG}: {describe_search(plan, plan.num_samples, planned_ray_trials(plan))}; cluster of "
        f"{cluster['nodes']} node(s) with {cluster['cpus']:g} CPUs and {cluster['gpus']:g} GPUs, "
        f"{flags.cpus_per_trial:g} CPU + {flags.gpus_per_trial:g} GPU per trial; MLflow parent run "
        f"{record.parent_run_id} at {plan.tracking.display}",
        flush=True,
    )
    preload_model_code()  # while the trials run: the model's check at the end needs torch and transformers
    started = time.time()

    def phase(name: str, points: dict, seeds: bool = False) -> list[dict]:
        if seeds:  # one point, once per seed
            points = {**points, "seed": tune.grid_search([plan.base.seed + i for i in range(flags.seeds)])}
        return run_phase(plan, "seeds" if seeds else "search", points, name, record, files, restoring)

    rows, seed_rows, selected = [], [], None
    if plan.mode == "seeds":
        seed_rows = phase(plan.name, plan.grid.points()[0], seeds=True)
        selected = select(finished(seed_rows))  # the seed whose model the parent run gets
    else:
        groups = {}
        if plan.fuse != 1:  # a grid search over the groups; else Optuna hands out the points
            points = fused_groups(plan.grid.points(), plan.fuse, plan.base)
            groups = {FUSED: tune.grid_search([fused_config(g) for g in points])}
        rows = phase(plan.name, groups)
        selected = select(rows)
        if selected is not None and flags.seeds:
            record.to_seeds({k: selected[k] for k in plan.keys}, files)
            seed_rows = phase(f"{plan.name}-seeds", point_of(selected, plan.keys), seeds=True)
    summary = finish(plan, tracker, record, files, cluster, rows, seed_rows, selected, time.time() - started)
    if summary.get("model_error"):
        print(f"{PROG}: error: {summary['model_error']}", file=sys.stderr, flush=True)
    # Complete: every point ended (trained to the end, or stopped early by ASHA), with a usable model.
    unfinished = [r for r in rows + seed_rows if r["status"] not in ("TERMINATED", "STOPPED")]
    return 0 if selected is not None and not unfinished and not summary.get("model_error") else 1


def run_phase(
    plan: Plan, phase: str, points: dict, name: str, record: SearchRecord, files: SearchFiles, restoring: bool
) -> list[dict]:
    """One Tuner.fit: the search over the grid, or one point over seeds; its rows."""
    from ray import tune
    from ray.tune import ExperimentAnalysis

    flags = plan.flags
    fallback, verbose = flags.allow_cpu_fallback, bool(flags.verbose)
    trainable = tune.with_parameters(
        softfine_trial, base=plan.base, corpus=plan.corpus, allow_cpu_fallback=fallback, verbose=verbose
    )
    trainable = tune.with_resources(trainable, {"cpu": flags.cpus_per_trial, "gpu": flags.gpus_per_trial})
    callback = MLflowChildRuns(
        str(files.folder),
        record.experiment_id,
        record.parent_run_id,
        plan.name,
        phase,
        plan.base,
        run_tags(record.code),
        dataset_inputs(plan.corpus),
        flags.mlflow_timeout,
    )
    tuner = make_tuner(plan, phase, points, name, trainable, restoring, callback, files.folder)
    started = time.time()
    MLflowChildRuns.search_files = files  # where a restored callback (made by an earlier driver) writes too
    try:
        results = tuner.fit()
    finally:  # not left to the next search in this process (a test's callback, say)
        MLflowChildRuns.search_files = None
    log.info("%s phase: %d trials in %.0f s", phase, len(results), time.time() - started)
    # Ray Tune returns normally after SIGINT, having saved the unfinished trials for a restore:
    # the saved experiment state tells (the trials in memory are all stopped by then).
    saved = ExperimentAnalysis(f"{plan.storage_path.rstrip('/')}/{name}").trials  # a path or a URI
    unfinished = [t for t in saved if t.status not in ("TERMINATED", "ERROR")]
    expected = {"search": plan.num_samples, "seeds": flags.seeds}[phase]
    if FUSED in points:  # --fuse: one trial per group
        expected = len(points[FUSED]["grid_search"])
    if unfinished or len(saved) < expected:
        raise Interrupted(f"{len(unfinished) + expected - len(saved)} trial(s) of the {phase} did not end")
    runs, _, _ = read_account(files.folder, phase)
    rows = trial_rows([results[i] for i in range(len(results))], runs, phase, plan.base, plan.grid)
    if FUSED in points:  # the study gets every point, as the grid sampler's trials would have
        record_points(f"sqlite:///{files.folder / OPTUNA_DB}", plan.name, plan.grid, rows)
        files.push(OPTUNA_DB)
    return rows


if __name__ == "__main__":
    run()
