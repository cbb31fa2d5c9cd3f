"""The search driver behind tune/search.py: flags, refusals, Ray Tune + Optuna, MLflow, summary.

    python tune/search.py --dataset weibo                       # the paper's 36-point grid, 1 GPU per trial
    python tune/search.py --dataset resume --sampler tpe --num-samples 12 --scheduler asha
    python tune/search.py --dataset resume --model tiny --alphas 0.01,0.005 --beta 2 --gamma 2 --seeds 3
    python tune/search.py --resume                               # continue the last search after a crash

Everything that can be refused is refused before a trial starts, most of it before any data is
read or Ray starts: every training setting of the flags and the preset (a TrainConfig, typed and
validated), an impossible grid value, an unknown dataset, missing data files, a results folder
that cannot be written, a Ray address where no cluster answers, more GPUs (or CPUs) per trial
than any node has, a GPU that torch cannot see, an MLflow store that does not answer. Each
refusal is one line, `tune/search.py: error: ...`, naming the flag, file or key; `-v` adds the
traceback. Once the search's MLflow parent run exists, a failure ends it as FAILED.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import tempfile
import time
from pathlib import Path
from typing import Sequence

import softfine_tune_childrun
import softfine_tune_trial
from softfine_tune_childrun import mask_credentials
from softfine_tune_cli import EXCLUDED_TRAIN_FIELDS, PROG, RECORD, Parser, build_parser
from softfine_tune_cluster import (
    check_address,
    check_cluster,
    cluster_resources,
    connect_ray,
    probe_gpus,
)
from softfine_tune_plan import Plan, make_plan
from softfine_tune_report import _short, finish, finished
from softfine_tune_space import SearchError
from softfine_tune_trial import alphas_key, softfine_trial
from softfine_tune_tuner import make_tuner, resume_args

log = logging.getLogger("softfine.tune")


def _register_trainable_by_value() -> None:
    """Workers on other nodes (and tests) do not have tune/ on their path: the trainable's
    modules travel with the pickled function instead of being imported by name."""
    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(softfine_tune_trial)
    cloudpickle.register_pickle_by_value(softfine_tune_childrun)


class Interrupted(Exception):
    """The search stopped before its trials ended (Ctrl-C): it can be resumed, not summarised."""


def run_phase(plan: Plan, phase: str, param_space: dict, name: str, trainable, restore: bool) -> list:
    tuner = make_tuner(plan, phase, param_space, name, trainable, restore)
    started = time.time()
    results = tuner.fit()
    log.info("%s phase: %d trials in %.0f s", phase, len(results), time.time() - started)
    # Ray Tune returns normally after SIGINT, having saved the unfinished trials for a restore:
    # the saved experiment state tells (the trials in memory are all stopped by then).
    from ray.tune import ExperimentAnalysis

    saved = ExperimentAnalysis(results.experiment_path).trials
    unfinished = [t for t in saved if t.status not in ("TERMINATED", "ERROR")]
    expected = plan.num_samples if phase == "search" else plan.args.seeds
    if unfinished or len(saved) < expected:
        raise Interrupted(f"{len(unfinished) + expected - len(saved)} trial(s) of the {phase} did not end")
    return [results[i] for i in range(len(results))]


def reconcile(tracker, rows: list[dict], children: dict) -> None:
    """Child runs that their trial could not close (stopped by ASHA, killed, out of retries)."""
    for row in rows:
        run = children.get(row["trial_id"])
        if run is None or run.info.status != "RUNNING":
            continue
        status = {"ERROR": "FAILED", "STOPPED": "KILLED", "TERMINATED": "FINISHED"}.get(row["status"], "KILLED")
        if row["status"] == "STOPPED":
            tracker.attempt(f"tag run {run.info.run_id} as stopped early",
                            lambda r=run: tracker.client.set_tag(r.info.run_id, "softfine.stopped_early", "true"))
        tracker.attempt(f"close run {run.info.run_id}",
                        lambda r=run, s=status: tracker.client.set_terminated(r.info.run_id, status=s))


def prepare_folder(folder: Path) -> None:
    """The search's results folder, created and written to once before the MLflow parent run
    exists: a folder that cannot be written is refused before anything is recorded."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as err:
        raise SearchError(f"--storage-path {folder.parent}: cannot write the search's folder {folder} "
                          f"({err.strerror or err})") from None


def run_search(args: argparse.Namespace, argv: list[str], parser: Parser) -> int:
    from softfine_tune_tracking import check_tracking, credentials

    record: dict = {}
    if args.resume:
        args, argv, record, folder = resume_args(args, parser)
        print(f"{PROG}: resuming search {folder.name} ({folder}), stage: {record['stage']}, with its own flags: "
              f"{' '.join(argv)}", flush=True)
        if record["stage"] == "done":
            print(json.dumps(record.get("summary", {}), indent=1, default=str))
            return 0

    plan = make_plan(args, argv)
    folder = Path(plan.storage_path) / plan.name
    if not record and (folder / RECORD).exists():
        raise SearchError(f"--name {plan.name}: a search of that name exists in {plan.storage_path}; "
                          f"continue it with --resume {plan.name} or choose another name")
    check_address(args.address)
    # The credentials are in the driver's environment only while it talks to MLflow (not when it
    # starts Ray's processes, which would inherit them); the trials get theirs from _search.
    with credentials(plan.tracking.env):
        check_tracking(plan.tracking, args.mlflow_timeout)
    started_ray = connect_ray(args.address)
    try:
        _register_trainable_by_value()
        cluster = cluster_resources()
        check_cluster(args, cluster, plan.tracking, plan.storage_path)
        probe_gpus(args, cluster)
        prepare_folder(folder)
        with credentials(plan.tracking.env):
            return _search(plan, record, folder, cluster)
    finally:
        if started_ray:
            import ray

            ray.shutdown()


def _search(plan: Plan, record: dict, folder: Path, cluster: dict) -> int:
    from softfine_tune_tracking import Tracker, git_version, write_json

    tracker = Tracker(plan.tracking.uri, plan.args.mlflow_timeout)
    code = record.get("code") or git_version()
    restoring = bool(record)
    if restoring:
        experiment_id, parent_run_id = record["experiment_id"], record["parent_run_id"]
        tracker.attempt("reopen the parent run", lambda: tracker.client.update_run(parent_run_id, status="RUNNING"))
    else:
        experiment_id = tracker.experiment(plan.experiment_name)
        parent_run_id = open_parent(plan, tracker, experiment_id, cluster, code)
    try:
        if not restoring:
            record = {"argv": plan.argv, "name": plan.name, "created": time.time(),
                      "mlflow_uri": plan.tracking.display, "experiment_id": experiment_id,
                      "experiment_name": plan.experiment_name, "parent_run_id": parent_run_id, "code": code,
                      "mode": plan.mode, "stage": "seeds" if plan.mode == "seeds" else "search"}
            write_json(folder / RECORD, record)
        return run_trials(plan, tracker, record, folder, cluster, experiment_id, parent_run_id, code, restoring)
    except BaseException as err:
        # Never RUNNING forever: a search stopped by Ctrl-C (which --resume continues) is KILLED,
        # a failed one FAILED, with the error on the run.
        status = "KILLED" if isinstance(err, (KeyboardInterrupt, Interrupted)) else "FAILED"
        error = mask_credentials(f"{type(err).__name__}: {err}")[:4000]
        if status == "FAILED":
            tracker.attempt("record the error on the parent run", lambda: tracker.client.set_tag(
                parent_run_id, "softfine.error", error))
        tracker.attempt(f"end the parent run ({status})",
                        lambda: tracker.client.set_terminated(parent_run_id, status=status))
        raise


def open_parent(plan: Plan, tracker, experiment_id: str, cluster: dict, code: dict) -> str:
    """The search's MLflow parent run: what the search is (params), its command (the note)."""
    args = plan.args
    params = {"dataset": plan.dataset, "mode": plan.mode, "sampler": args.sampler, "scheduler": args.scheduler,
              "grid": json.dumps(plan.grid.describe()), "grid_size": len(plan.grid), "num_samples": plan.num_samples,
              "seeds": args.seeds, "gpus_per_trial": args.gpus_per_trial, "cpus_per_trial": args.cpus_per_trial,
              "max_concurrent": args.max_concurrent, "max_failures": args.max_failures,
              "cluster_nodes": cluster["nodes"], "cluster_gpus": cluster["gpus"], "cluster_cpus": cluster["cpus"],
              "code_version": code["commit"] + ("+dirty" if code["dirty"] == "true" else ""),
              "preset": plan.preset["path"], "search_name": plan.name, "mlflow_uri": plan.tracking.display,
              **{f"train.{k}": v for k, v in dataclasses.asdict(plan.base).items()
                 if k not in EXCLUDED_TRAIN_FIELDS or (k == "soft_scope" and "soft_scope" not in plan.keys)}}
    what = (f"{plan.num_samples} seeds of one configuration" if plan.mode == "seeds"
            else f"{args.sampler} search, {plan.num_samples} trials")
    tags = {"mlflow.source.git.commit": code["commit"], "softfine.git_dirty": code["dirty"],
            "mlflow.note.content": f"SoftFiNE {what} on {plan.dataset}; command: {PROG} {' '.join(plan.argv)}"}
    return tracker.start_parent(experiment_id, plan.name, plan.name, params, tags)


def run_trials(plan: Plan, tracker, record: dict, folder: Path, cluster: dict, experiment_id: str,
               parent_run_id: str, code: dict, restoring: bool) -> int:
    """The phases of the search: the grid or TPE search, then (--seeds) the selection with N
    seeds; or, for one grid point with --seeds, only the seeds. Then the summary."""
    from ray import tune
    from softfine_tune_tracking import select, trial_rows, write_json

    args = plan.args
    what = (f"{plan.num_samples} seeds of one configuration" if plan.mode == "seeds"
            else f"{plan.num_samples} trials ({args.sampler})")
    print(f"{PROG}: {what} on {plan.dataset}, cluster of {cluster['nodes']} node(s) "
          f"with {cluster['cpus']:g} CPUs and {cluster['gpus']:g} GPUs, {args.cpus_per_trial:g} CPU + "
          f"{args.gpus_per_trial:g} GPU per trial; MLflow parent run {parent_run_id} at {plan.tracking.display}",
          flush=True)
    crash = {}
    if args.inject_crash:
        step, _, marker = args.inject_crash.partition(":")
        crash = {"crash_at_step": int(step), "crash_marker": str(Path(marker).resolve())}
    # The trial config is plain data that Ray writes to disk: the URI as shown, no credentials.
    # Those travel in memory (with_parameters), with the URI the trials use.
    mlflow_settings = {"uri": plan.tracking.display, "experiment_id": experiment_id, "parent_run_id": parent_run_id,
                       "timeout": args.mlflow_timeout, "code_version": code, "search": plan.name}
    base_space = {"train": dataclasses.asdict(plan.base), "runtime": {"allow_cpu_fallback": args.allow_cpu_fallback,
                                                                      "verbose": args.verbose, **crash}}
    secrets = {"uri": plan.tracking.uri, "env": plan.tracking.env}
    trainable = tune.with_resources(tune.with_parameters(softfine_trial, secrets=secrets),
                                    {"cpu": args.cpus_per_trial, "gpu": args.gpus_per_trial})

    def list_children(known: dict) -> dict:
        return tracker.attempt("list the child runs", lambda: tracker.children(experiment_id, parent_run_id), known)

    def run_seeds(point: dict, name: str) -> list[dict]:
        space = {**base_space, "mlflow": {**mlflow_settings, "phase": "seeds"}, **point,
                 "seed": tune.grid_search([plan.base.seed + i for i in range(args.seeds)])}
        results = run_phase(plan, "seeds", space, name, trainable, restore=restoring)
        children = list_children({})
        seed_rows = trial_rows(results, children, "seeds")
        reconcile(tracker, seed_rows, children)
        return seed_rows

    started = time.time()
    rows: list[dict] = []
    seed_rows: list[dict] = []
    if plan.mode == "seeds":
        seed_rows = run_seeds(plan.grid.points()[0], plan.name)
        selected = select(finished(seed_rows))  # the seed whose model the parent run gets
    else:
        results = run_phase(plan, "search", {**base_space, "mlflow": {**mlflow_settings, "phase": "search"}},
                            plan.name, trainable, restore=restoring)
        children = list_children({})
        rows = trial_rows(results, children, "search")
        reconcile(tracker, rows, children)
        selected = select(rows)
        if selected is not None and args.seeds:
            record.update(stage="seeds", selected={k: selected[k] for k in plan.keys})
            write_json(folder / RECORD, record)
            point = {"alphas": alphas_key(selected["alpha_aug"], selected["alpha_fea"]), "beta": selected["beta"],
                     "gamma": selected["gamma"], **({"soft_scope": selected["soft_scope"]}
                                                    if "soft_scope" in plan.keys else {})}
            seed_rows = run_seeds(point, f"{plan.name}-seeds")
    summary = finish(plan, tracker, folder, experiment_id, parent_run_id, rows, seed_rows, selected,
                     time.time() - started)
    record.update(stage="done", summary=summary)
    write_json(folder / RECORD, record)
    # An ablation is complete only with every seed; a search, with a selection.
    complete = len(finished(seed_rows)) == len(seed_rows) if plan.mode == "seeds" else True
    return 0 if selected is not None and complete else 1


# ---------------------------------------------------------------------------------------------

def fail(message: str, verbose: bool, code: int = 2) -> int:
    """One line on stderr, the last (the traceback before it with -v); credentials masked."""
    if verbose:
        import traceback

        traceback.print_exc()
    line = " ".join(mask_credentials(message).split()) or "unknown error"
    print(f"{PROG}: error: {_short(line, 2000)}", file=sys.stderr, flush=True)
    return code


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    from softfine.errors import SoftFiNEError

    try:
        return run_search(args, argv, parser)
    except (SearchError, SoftFiNEError) as err:
        return fail(str(err), args.verbose)
    except (KeyboardInterrupt, Interrupted) as err:
        print(f"{PROG}: interrupted ({err or 'Ctrl-C'}); the search is saved: continue it with "
              f"python {PROG} --resume", file=sys.stderr, flush=True)
        return 130
    except OSError as err:  # a full disk, a folder without permission: the file and the cause
        where = f"{err.filename}: " if err.filename else ""
        return fail(f"{where}{err.strerror or err} ({type(err).__name__})", args.verbose, code=1)
    except Exception as err:  # noqa: BLE001 - not hidden: its type and message, the traceback with -v
        return fail(f"{type(err).__name__}: {err}", args.verbose, code=1)
