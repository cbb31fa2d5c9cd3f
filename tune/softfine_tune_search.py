"""The search driver behind tune/search.py: flags, refusals, Ray Tune + Optuna, MLflow, summary.

    python tune/search.py --dataset weibo                       # the paper's 36-point grid, 1 GPU per trial
    python tune/search.py --dataset resume --sampler tpe --num-samples 12 --scheduler asha
    python tune/search.py --resume                               # continue the last search after a crash

Everything that can be refused is refused before a trial starts: an unknown dataset, missing
data files, an impossible grid value, more GPUs (or CPUs) per trial than any node has, a GPU
that torch cannot see, an MLflow store that does not answer.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import posixpath
import statistics
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Sequence

import softfine_tune_trial
from softfine_tune_space import METRIC, MODE, SearchError, check_grid, grid_from_flags, load_preset, make_searcher
from softfine_tune_trial import SEARCH_KEYS, alphas_key, softfine_trial

log = logging.getLogger("softfine.tune")

REPO = Path(__file__).resolve().parents[1]
DEFAULT_STORAGE = REPO / "ray_results"
RECORD = "softfine_search.json"  # in the Ray experiment directory: how to resume this search
PROG = "tune/search.py"
# Set on the command line of a resumed search; everything else comes from the search's record.
RESUME_OVERRIDES = ("address", "storage_path", "verbose")
EXCLUDED_TRAIN_FIELDS = ("alpha_aug", "alpha_fea", "beta", "gamma", "out", "device")


def _register_trainable_by_value() -> None:
    """Workers on other nodes (and tests) do not have tune/ on their path: the trainable's
    module travels with the pickled function instead of being imported by name."""
    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(softfine_tune_trial)


# ---------------------------------------------------------------------------------------------
# Command line.

def build_parser() -> argparse.ArgumentParser:
    from softfine.cli import add_dataclass_arguments
    from softfine.train import TrainConfig

    parser = argparse.ArgumentParser(
        prog=PROG, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Distributed hyperparameter search for SoftFiNE (Yang et al., ACL 2023): Ray Tune + "
                    "Optuna over the paper's grid of (alpha_aug, alpha_fea) x beta x gamma, one trial per "
                    "GPU, every trial a nested MLflow run under one parent run per search.",
        epilog="examples:\n"
               "  # CPU, tiny encoder, a small subset of Resume (minutes), data from $SOFTFINE_DATA_DIR:\n"
               "  python tune/search.py --dataset resume --model tiny --limit-train 300 --limit-eval 100 \\\n"
               "      --epochs 3 --batch-size 8 --lr 2e-3 --gpus-per-trial 0 --cpus-per-trial 0.5\n"
               "  # the paper's grid on GPUs with bert-base-chinese, logging to a tracking server:\n"
               "  python tune/search.py --dataset weibo --mlflow-uri http://HEAD:5000 --seeds 5\n"
               "  # after a crash of this driver:\n"
               "  python tune/search.py --resume\n")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="show every trial's training log (progress, data notes) as well")

    train = parser.add_argument_group(
        "data and training", "One flag per training setting. The dataset's preset (tune/presets/DATASET.yaml: "
        "the paper's settings) comes first, then these flags; the defaults shown are the trainer's own, used "
        "where the preset says nothing.")
    add_dataclass_arguments(train, TrainConfig, exclude=EXCLUDED_TRAIN_FIELDS)
    train.add_argument("--preset", metavar="YAML", help="a preset file instead of tune/presets/DATASET.yaml")

    grid = parser.add_argument_group("grid", "Values searched; the preset's grid where not given "
                                     "(the paper: 4 alpha pairs x beta 2,3,4 x gamma 1.5,2,2.5 = 36 points).")
    # dest grid_*: not the TrainConfig fields beta and gamma, which each trial sets from the grid
    grid.add_argument("--alphas", nargs="+", metavar="AUG,FEA", dest="grid_alphas",
                      help="(alpha_aug, alpha_fea) pairs, e.g. --alphas 0.1,0.1 0.01,0.005")
    grid.add_argument("--beta", nargs="+", type=float, metavar="B", dest="grid_beta",
                      help="soft-label base values, each > 1")
    grid.add_argument("--gamma", nargs="+", type=float, metavar="G", dest="grid_gamma",
                      help="wrong-component penalty values, each > 0")

    search = parser.add_argument_group("search")
    search.add_argument("--sampler", choices=("grid", "tpe"), default="grid",
                        help="grid: every grid point exactly once (Optuna GridSampler); tpe: a budgeted Optuna "
                             "TPE search over the same values, --num-samples trials (default: grid)")
    search.add_argument("--num-samples", type=int, metavar="K",
                        help="trials of a TPE search (default 12); a grid search runs each point once")
    search.add_argument("--scheduler", choices=("fifo", "asha"), default="fifo",
                        help="asha: stop weak trials early on dev F1 (Ray Tune ASHA) (default: fifo)")
    search.add_argument("--asha-grace-period", type=int, default=1, metavar="N",
                        help="evaluations every trial gets before ASHA may stop it (default: 1)")
    search.add_argument("--asha-reduction-factor", type=int, default=2, metavar="N",
                        help="ASHA keeps the best 1/N at each rung (default: 2)")
    search.add_argument("--seeds", type=int, default=0, metavar="N",
                        help="re-run the selected configuration with N seeds (seed, seed+1, ...) and report the "
                             "mean and standard deviation of dev and test F1 (default: 0, no re-runs)")
    search.add_argument("--search-seed", type=int, default=0, metavar="S", help="seed of the Optuna sampler (default: 0)")

    resources = parser.add_argument_group("resources")
    resources.add_argument("--gpus-per-trial", type=float, default=1.0, metavar="G",
                           help="GPUs per trial (default: 1, one A100 per trial as in the paper); 0 trains on CPU")
    resources.add_argument("--cpus-per-trial", type=float, default=1.0, metavar="C", help="CPUs per trial (default: 1)")
    resources.add_argument("--max-concurrent", type=int, default=0, metavar="N",
                           help="at most N trials at once (default: 0, as many as the cluster's resources allow)")
    resources.add_argument("--address", metavar="ADDR",
                           help="Ray cluster to run on, e.g. HEAD:6379 or auto (default: an existing cluster if one "
                                "is running here or RAY_ADDRESS names one, else a new local one)")
    resources.add_argument("--allow-cpu-fallback", action="store_true",
                           help="when a trial gets a GPU that torch cannot see, train on CPU with a warning instead "
                                "of refusing (for simulated clusters)")

    tracking = parser.add_argument_group("MLflow")
    tracking.add_argument("--mlflow-uri", metavar="URI",
                          help="tracking store: http://HOST:PORT of a tracking server (needed when trials run on "
                               "other nodes), or a local store (default: sqlite:///REPO/mlflow/mlflow.db, the "
                               "embedded store, artifacts in mlflow/artifacts/)")
    tracking.add_argument("--experiment-name", metavar="NAME",
                          help="MLflow experiment (default: softfine-DATASET)")
    tracking.add_argument("--mlflow-timeout", type=float, default=10.0, metavar="S",
                          help="seconds an MLflow request may take before it counts as unanswered (default: 10)")

    faults = parser.add_argument_group("faults and resuming")
    faults.add_argument("--max-failures", type=int, default=1, metavar="K",
                        help="retry a crashed trial up to K times from its last checkpoint, in the same MLflow run "
                             "(default: 1)")
    faults.add_argument("--name", metavar="NAME",
                        help="name of this search: its Ray results folder (default: DATASET-SAMPLER-TIME)")
    faults.add_argument("--storage-path", metavar="DIR",
                        help=f"folder where Ray keeps results and checkpoints; on a multi-node cluster, one that every "
                             f"node shares (e.g. NFS) (default: {DEFAULT_STORAGE})")
    faults.add_argument("--resume", nargs="?", const="latest", metavar="NAME",
                        help="continue a search whose driver stopped (the latest one, or NAME or a results folder): "
                             "finished trials are kept, unfinished ones go on from their checkpoints, in their MLflow "
                             "runs; the search's own flags are reused")
    # Fault injection for the tests: crash a trial's process once, at the first evaluation at or
    # after STEP that follows a reported checkpoint; MARKER is a file that makes it happen once.
    faults.add_argument("--inject-crash", metavar="STEP:MARKER", help=argparse.SUPPRESS)
    return parser


# ---------------------------------------------------------------------------------------------
# The plan: everything decided and checked before Ray starts anything.

@dataclasses.dataclass
class Plan:
    args: argparse.Namespace
    argv: list[str]
    dataset: str
    train: dict  # TrainConfig fields without alpha_aug, alpha_fea, beta, gamma, out, device
    grid: object
    num_samples: int
    preset: dict
    tracking_uri: str
    experiment_name: str
    storage_path: str
    name: str


def make_plan(args: argparse.Namespace, argv: list[str]) -> Plan:
    from softfine.cli import config_from_args
    from softfine.datasets import data_dir, dataset_files, get_spec
    from softfine.errors import SoftFiNEError
    from softfine.train import TrainConfig
    from softfine_tune_tracking import resolve_tracking_uri

    dataset = getattr(args, "dataset", "weibo")
    try:
        get_spec(dataset)
    except SoftFiNEError as err:
        raise SearchError(f"--dataset: {err}") from None
    preset = load_preset(dataset, args.preset)
    base = {**preset["train"], "dataset": dataset}
    try:
        config = config_from_args(TrainConfig, args, base)
    except TypeError as err:
        raise SearchError(f"bad training setting: {err}") from None
    config.data_dir = str(data_dir(config.data_dir).resolve())  # trials run elsewhere: an absolute path
    try:
        dataset_files(dataset, config.data_dir, ("train", "dev"))
    except SoftFiNEError as err:
        raise SearchError(str(err)) from None
    grid = grid_from_flags(preset["grid"], args.grid_alphas, args.grid_beta, args.grid_gamma)
    train = {k: v for k, v in dataclasses.asdict(config).items() if k not in EXCLUDED_TRAIN_FIELDS}
    check_grid(grid, train)

    if args.sampler == "grid":
        if args.num_samples not in (None, len(grid)):
            raise SearchError(f"--num-samples {args.num_samples}: a grid search runs each of its {len(grid)} points "
                              "exactly once; use --sampler tpe for a budgeted search")
        num_samples = len(grid)
    else:
        num_samples = args.num_samples or 12
    checks = [
        (num_samples >= 1, f"--num-samples must be >= 1, got {num_samples}"),
        (args.gpus_per_trial >= 0, f"--gpus-per-trial must be >= 0, got {args.gpus_per_trial}"),
        (args.cpus_per_trial > 0, f"--cpus-per-trial must be > 0, got {args.cpus_per_trial}"),
        (args.max_concurrent >= 0, f"--max-concurrent must be >= 0, got {args.max_concurrent}"),
        (args.max_failures >= 0, f"--max-failures must be >= 0, got {args.max_failures}"),
        (args.seeds >= 0, f"--seeds must be >= 0, got {args.seeds}"),
        (args.asha_grace_period >= 1, f"--asha-grace-period must be >= 1, got {args.asha_grace_period}"),
        (args.asha_reduction_factor >= 2, f"--asha-reduction-factor must be >= 2, got {args.asha_reduction_factor}"),
        (args.mlflow_timeout > 0, f"--mlflow-timeout must be > 0, got {args.mlflow_timeout}"),
    ]
    for ok, message in checks:
        if not ok:
            raise SearchError(message)
    if args.inject_crash:
        step, _, marker = args.inject_crash.partition(":")
        if not step.isdigit() or not marker:
            raise SearchError("--inject-crash takes STEP:MARKER_FILE")
    storage = args.storage_path or str(DEFAULT_STORAGE)
    if "://" in storage:
        raise SearchError(f"--storage-path {storage}: give a folder (on a multi-node cluster, a shared one, e.g. NFS)")
    storage = str(Path(storage).resolve())
    name = args.name or f"{dataset}-{args.sampler}-{datetime.now():%Y%m%d-%H%M%S}"
    return Plan(args=args, argv=list(argv), dataset=dataset, train=train, grid=grid, num_samples=num_samples,
                preset=preset, tracking_uri=resolve_tracking_uri(args.mlflow_uri),
                experiment_name=args.experiment_name or f"softfine-{dataset}", storage_path=storage, name=name)


# ---------------------------------------------------------------------------------------------
# Ray: connect, check the cluster against the requested resources.

def connect_ray(address: str | None) -> bool:
    """Connects (or starts a local instance); True when this call started Ray."""
    import ray

    if ray.is_initialized():
        return False
    ray.init(address=address, log_to_driver=True, configure_logging=True, logging_level=logging.WARNING)
    return True


def cluster_resources() -> dict:
    import ray

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    return {"nodes": len(nodes),
            "gpus": sum(n["Resources"].get("GPU", 0) for n in nodes),
            "cpus": sum(n["Resources"].get("CPU", 0) for n in nodes),
            "max_node_gpus": max((n["Resources"].get("GPU", 0) for n in nodes), default=0),
            "max_node_cpus": max((n["Resources"].get("CPU", 0) for n in nodes), default=0),
            "gpu_nodes": [n["NodeID"] for n in nodes if n["Resources"].get("GPU", 0) >= 1e-9],
            "hosts": sorted({n["NodeManagerAddress"] for n in nodes})}


def check_cluster(args: argparse.Namespace, cluster: dict, tracking_uri: str, storage_path: str) -> None:
    from softfine_tune_tracking import is_remote

    if len(cluster["hosts"]) > 1 and not is_remote(tracking_uri):
        raise SearchError(f"the Ray cluster spans {len(cluster['hosts'])} hosts: trials on the others cannot write to "
                          f"the local MLflow store {tracking_uri}. Pass a tracking server that every node reaches: on "
                          "a cluster from cluster/*.yaml, --mlflow-uri http://127.0.0.1:5000 (the head's server, "
                          "forwarded to every node); elsewhere start mlflow/server.sh --host PRIVATE_IP on one host "
                          "and pass --mlflow-uri http://PRIVATE_IP:5000.")
    if len(cluster["hosts"]) > 1:
        log.warning("the cluster spans %d hosts: --storage-path %s must be a folder that every host shares (e.g. "
                    "NFS), for the checkpoints that --max-failures and --resume use", len(cluster["hosts"]),
                    storage_path)
    if args.gpus_per_trial > cluster["max_node_gpus"]:
        raise SearchError(f"--gpus-per-trial {args.gpus_per_trial:g}: no node of the Ray cluster has that many GPUs "
                          f"(the most on one node: {cluster['max_node_gpus']:g}; {cluster['nodes']} node(s)). "
                          "Use --gpus-per-trial 0 to train on CPU, or connect to a GPU cluster with --address.")
    if args.cpus_per_trial > cluster["max_node_cpus"]:
        raise SearchError(f"--cpus-per-trial {args.cpus_per_trial:g}: no node of the Ray cluster has that many CPUs "
                          f"(the most on one node: {cluster['max_node_cpus']:g}).")


def probe_gpus(args: argparse.Namespace, cluster: dict, timeout: float = 180) -> None:
    """On every GPU node, a task holding the trial's GPUs checks that torch sees them."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    if args.gpus_per_trial <= 0 or args.allow_cpu_fallback:
        return
    probe = ray.remote(softfine_tune_trial.probe_cuda)
    refs = [probe.options(num_gpus=args.gpus_per_trial, num_cpus=0,
                          scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False)).remote()
            for node in cluster["gpu_nodes"]]
    ready, waiting = ray.wait(refs, num_returns=len(refs), timeout=timeout)
    if waiting:
        log.warning("%d GPU node(s) did not answer the CUDA check within %.0f s (GPUs busy?); going on",
                    len(waiting), timeout)
    blind = [r for r in ray.get(ready) if not r["cuda"]]
    if blind:
        lines = "; ".join(f"node {r['node_id'][:12]} ({r['hostname']}): Ray GPU {r['gpu_ids']}, torch "
                          f"{r['torch']} CUDA build {r['cuda_build'] or 'none'}, CUDA_VISIBLE_DEVICES="
                          f"{r['visible']!r}" for r in blind)
        raise SearchError(f"Ray gives trials GPUs that torch cannot see on {len(blind)} node(s): {lines}. Install a "
                          "CUDA build of torch there, use --gpus-per-trial 0 to train on CPU, or "
                          "--allow-cpu-fallback to train on CPU where this happens.")


# ---------------------------------------------------------------------------------------------
# Ray Tune.

def trial_dirname(trial) -> str:
    return f"trial_{trial.trial_id}"


def evaluations_per_trial(train: dict) -> int | None:
    """How many times a trial reports (for ASHA's max_t): evaluations plus the final report."""
    if train.get("eval_every"):
        return None
    return int(train["epochs"]) + 1


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
    columns = {"alphas": "α_aug,α_fea", "beta": "β", "gamma": "γ"}
    if phase == "seeds":
        columns = {"seed": "seed"}
    reporter = CLIReporter(parameter_columns=columns,
                           metric_columns={"step": "step", "dev_f1": "dev F1", "best_dev_f1": "best dev F1",
                                           "test_f1": "test F1"},
                           max_report_frequency=30, sort_by_metric=True,
                           max_progress_rows=40)
    if phase == "search":
        searcher = make_searcher(args.sampler, plan.grid, args.search_seed, plan.num_samples)
        scheduler = None
        if args.scheduler == "asha":
            scheduler = ASHAScheduler(time_attr="training_iteration", max_t=evaluations_per_trial(plan.train) or 1000,
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


def max_overlap(rows: list[dict]) -> int:
    """The most trials that ran at the same time (from their start and end times)."""
    events = []
    for r in rows:
        if r.get("trial_start_time") and r.get("trial_end_time"):
            events += [(r["trial_start_time"], 1), (r["trial_end_time"], -1)]
    running = most = 0
    for _, change in sorted(events, key=lambda e: (e[0], e[1])):
        running += change
        most = max(most, running)
    return most


def run_search(args: argparse.Namespace, argv: list[str], parser: argparse.ArgumentParser) -> int:
    from softfine_tune_tracking import check_tracking

    record: dict = {}
    if args.resume:
        storage = args.storage_path or str(DEFAULT_STORAGE)
        folder = find_search(storage, args.resume)
        record = json.loads((folder / RECORD).read_text())
        overrides = {k: getattr(args, k) for k in RESUME_OVERRIDES if getattr(args, k, None)}
        args = parser.parse_args(record["argv"])
        for key, value in overrides.items():
            setattr(args, key, value)
        args.name, args.storage_path = folder.name, str(folder.parent)
        args.resume = None
        argv = record["argv"]
        print(f"{PROG}: resuming search {folder.name} ({folder}), stage: {record.get('stage')}, with its own flags: "
              f"{' '.join(record['argv'])}", flush=True)
        if record.get("stage") == "done":
            print(json.dumps(record.get("summary", {}), indent=1, default=str))
            return 0

    plan = make_plan(args, argv)
    folder = Path(plan.storage_path) / plan.name
    if not record and (folder / RECORD).exists():
        raise SearchError(f"--name {plan.name}: a search of that name exists in {plan.storage_path}; "
                          f"continue it with --resume {plan.name} or choose another name")
    check_tracking(plan.tracking_uri, args.mlflow_timeout)
    started_ray = connect_ray(args.address)
    try:
        _register_trainable_by_value()
        cluster = cluster_resources()
        check_cluster(args, cluster, plan.tracking_uri, plan.storage_path)
        probe_gpus(args, cluster)
        return _search(plan, record, folder, cluster)
    finally:
        if started_ray:
            import ray

            ray.shutdown()


def _search(plan: Plan, record: dict, folder: Path, cluster: dict) -> int:
    from ray import tune
    from softfine_tune_tracking import Tracker, git_version, select, trial_rows, write_json

    args = plan.args
    tracker = Tracker(plan.tracking_uri, args.mlflow_timeout)
    code = record.get("code") or git_version()
    restoring = bool(record)
    if restoring:
        experiment_id, parent_run_id = record["experiment_id"], record["parent_run_id"]
        tracker.attempt("reopen the parent run", lambda: tracker.client.update_run(parent_run_id, status="RUNNING"))
    else:
        experiment_id = tracker.experiment(plan.experiment_name)
        params = {"dataset": plan.dataset, "sampler": args.sampler, "scheduler": args.scheduler,
                  "grid": json.dumps(plan.grid.describe()), "grid_size": len(plan.grid), "num_samples": plan.num_samples,
                  "seeds": args.seeds, "gpus_per_trial": args.gpus_per_trial, "cpus_per_trial": args.cpus_per_trial,
                  "max_concurrent": args.max_concurrent, "max_failures": args.max_failures,
                  "cluster_nodes": cluster["nodes"], "cluster_gpus": cluster["gpus"], "cluster_cpus": cluster["cpus"],
                  "code_version": code["commit"] + ("+dirty" if code["dirty"] == "true" else ""),
                  "preset": plan.preset["path"], "search_name": plan.name,
                  **{f"train.{k}": v for k, v in plan.train.items()}}
        tags = {"mlflow.source.git.commit": code["commit"], "softfine.git_dirty": code["dirty"],
                "mlflow.note.content": f"SoftFiNE {args.sampler} search on {plan.dataset}: "
                                       f"{plan.num_samples} trials; command: {PROG} {' '.join(plan.argv)}"}
        parent_run_id = tracker.start_parent(experiment_id, plan.name, plan.name, params, tags)
        folder.mkdir(parents=True, exist_ok=True)
        record = {"argv": plan.argv, "name": plan.name, "created": time.time(), "mlflow_uri": plan.tracking_uri,
                  "experiment_id": experiment_id, "experiment_name": plan.experiment_name,
                  "parent_run_id": parent_run_id, "code": code, "stage": "search"}
        write_json(folder / RECORD, record)
    print(f"{PROG}: {plan.num_samples} trials ({args.sampler}) on {plan.dataset}, cluster of {cluster['nodes']} node(s) "
          f"with {cluster['cpus']:g} CPUs and {cluster['gpus']:g} GPUs, {args.cpus_per_trial:g} CPU + "
          f"{args.gpus_per_trial:g} GPU per trial; MLflow parent run {parent_run_id} at {plan.tracking_uri}",
          flush=True)

    crash = {}
    if args.inject_crash:
        step, _, marker = args.inject_crash.partition(":")
        crash = {"crash_at_step": int(step), "crash_marker": str(Path(marker).resolve())}
    mlflow_settings = {"uri": plan.tracking_uri, "experiment_id": experiment_id, "parent_run_id": parent_run_id,
                       "timeout": args.mlflow_timeout, "code_version": code, "search": plan.name}
    base_space = {"train": plan.train, "runtime": {"allow_cpu_fallback": args.allow_cpu_fallback,
                                                   "verbose": args.verbose, **crash}}
    trainable = tune.with_resources(softfine_trial, {"cpu": args.cpus_per_trial, "gpu": args.gpus_per_trial})

    started = time.time()
    results = run_phase(plan, "search", {**base_space, "mlflow": {**mlflow_settings, "phase": "search"}},
                        plan.name, trainable, restore=restoring)
    search_seconds = time.time() - started
    children = tracker.attempt("list the child runs", lambda: tracker.children(experiment_id, parent_run_id), {})
    rows = trial_rows(results, children, "search")
    reconcile(tracker, rows, children)
    selected = select(rows)

    seed_rows: list[dict] = []
    if selected is not None and args.seeds:
        record.update(stage="seeds", selected={k: selected[k] for k in SEARCH_KEYS})
        write_json(folder / RECORD, record)
        base_seed = int(plan.train["seed"])
        seeds_space = {**base_space, "mlflow": {**mlflow_settings, "phase": "seeds"},
                       "alphas": alphas_key(selected["alpha_aug"], selected["alpha_fea"]),
                       "beta": selected["beta"], "gamma": selected["gamma"],
                       "seed": tune.grid_search([base_seed + i for i in range(args.seeds)])}
        seed_results = run_phase(plan, "seeds", seeds_space, f"{plan.name}-seeds", trainable,
                                 restore=restoring)
        children = tracker.attempt("list the child runs", lambda: tracker.children(experiment_id, parent_run_id),
                                   children)
        seed_rows = trial_rows(seed_results, children, "seeds")
        reconcile(tracker, seed_rows, children)

    summary = finish(plan, tracker, folder, experiment_id, parent_run_id, rows, seed_rows, selected, search_seconds)
    record.update(stage="done", summary=summary)
    write_json(folder / RECORD, record)
    return 0 if selected is not None else 1


def _mean_std(values: list[float]) -> tuple[float, float]:
    values = [v for v in values if isinstance(v, (int, float))]
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def finish(plan: Plan, tracker, folder: Path, experiment_id: str, parent_run_id: str, rows: list[dict],
           seed_rows: list[dict], selected: dict | None, search_seconds: float) -> dict:
    """The parent run's params, metrics and artifacts; summary.json and trials.csv beside the Ray
    results; the summary on the console, with an account of what MLflow did not get."""
    from softfine_tune_tracking import plot_dev_f1, write_json, write_table

    args = plan.args
    all_rows = rows + seed_rows
    table = write_table(all_rows, folder / "trials.csv")
    plot = plot_dev_f1(rows, folder / "dev_f1_vs_hyperparameters.png",
                       f"SoftFiNE {args.sampler} search on {plan.dataset}: best dev F1 per trial")
    counts = {s: sum(r["status"] == s for r in rows) for s in ("TERMINATED", "STOPPED", "ERROR", "NOT STARTED")}
    summary: dict = {"search": plan.name, "dataset": plan.dataset, "trials": len(rows), **{k.lower().replace(" ", "_"): v
                     for k, v in counts.items()}, "wall_seconds": round(search_seconds, 1),
                     "max_trials_at_once": max_overlap(rows), "mlflow_uri": plan.tracking_uri,
                     "experiment_id": experiment_id, "parent_run_id": parent_run_id, "results": str(folder)}
    metrics = {"trials_finished": counts["TERMINATED"], "trials_failed": counts["ERROR"],
               "trials_stopped_early": counts["STOPPED"], "search_wall_seconds": search_seconds,
               "max_trials_at_once": summary["max_trials_at_once"]}
    if selected is not None:
        summary["selected"] = {k: selected[k] for k in SEARCH_KEYS}
        summary.update(best_dev_f1=selected["best_dev_f1"], best_test_f1=selected.get("test_f1"),
                       selected_trial_id=selected["trial_id"], selected_run_id=selected["mlflow_run_id"])
        tracker.attempt("log the selected hyperparameters", lambda: tracker.client.log_batch(
            parent_run_id, params=_params({**{f"selected_{k}": selected[k] for k in SEARCH_KEYS},
                                           "selected_trial_id": selected["trial_id"],
                                           "selected_run_id": selected["mlflow_run_id"]})))
        metrics["best_dev_f1"] = selected["best_dev_f1"]
        if isinstance(selected.get("test_f1"), (int, float)):
            metrics["best_test_f1"] = selected["test_f1"]
            for key in (k for k in selected if k.startswith("test_") and isinstance(selected[k], (int, float))):
                metrics[f"best_{key}"] = selected[key]
    if seed_rows:
        dev_mean, dev_std = _mean_std([r["best_dev_f1"] for r in seed_rows])
        test_mean, test_std = _mean_std([r.get("test_f1") for r in seed_rows])
        seeds = {"seeds": len(seed_rows), "seeds_dev_f1_mean": dev_mean, "seeds_dev_f1_std": dev_std,
                 "seeds_test_f1_mean": test_mean, "seeds_test_f1_std": test_std}
        summary.update(seeds)
        metrics.update({k: v for k, v in seeds.items() if isinstance(v, (int, float)) and not math.isnan(v)})
    tracker.attempt("log the search metrics", lambda: tracker.client.log_batch(parent_run_id, metrics=_metrics(metrics)))
    tracker.attempt("log the trials table", lambda: tracker.client.log_artifact(parent_run_id, str(table)))
    tracker.attempt("log the dev F1 plot", lambda: tracker.client.log_artifact(parent_run_id, str(plot)))
    if selected is not None and selected.get("checkpoint"):
        summary["model_uri"] = tracker.attempt("log the selected model", lambda: _log_selected_model(
            plan.tracking_uri, parent_run_id, selected["checkpoint"]))
        summary["selected_checkpoint"] = selected["checkpoint"]
    tracker.attempt("close the parent run", lambda: tracker.client.set_terminated(
        parent_run_id, status="FINISHED" if selected is not None else "FAILED"))

    unlogged = [r for r in all_rows if r.get("mlflow_unlogged")]
    summary["mlflow_account"] = {
        "driver_failures": tracker.failures,
        "trials_with_unlogged": [{"trial_id": r["trial_id"], "mlflow_run_id": r["mlflow_run_id"],
                                  "unlogged": r["mlflow_unlogged"], "error": r["mlflow_error"],
                                  "kept_in": r["checkpoint"]} for r in unlogged]}
    write_json(folder / "summary.json", summary)
    print_summary(plan, summary, rows, seed_rows)
    return summary


def _params(values: dict) -> list:
    from mlflow.entities import Param

    return [Param(k, str(v)) for k, v in values.items()]


def _metrics(values: dict) -> list:
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    return [Metric(k, float(v), now, 0) for k, v in values.items() if isinstance(v, (int, float))]


def _log_selected_model(uri: str, parent_run_id: str, checkpoint: str) -> str:
    from ray.tune import Checkpoint
    from softfine_tune_tracking import log_model

    with tempfile.TemporaryDirectory(prefix="softfine-selected-") as tmp:
        local = Checkpoint(checkpoint).to_directory(tmp)
        return log_model(uri, parent_run_id, Path(local) / "best")


def ui_hint(uri: str, experiment_id: str, run_id: str) -> str:
    from softfine_tune_tracking import default_tracking_uri

    # MLflow 3's experiment pages open in GenAI mode; workflowType=machine_learning shows the runs.
    page = f"#/experiments/{experiment_id}/runs/{run_id}?workflowType=machine_learning"
    if uri.startswith(("http://", "https://")):
        return f"open {uri.rstrip('/')}/{page}"
    server = REPO / "mlflow" / "server.sh"
    if uri == default_tracking_uri() and server.is_file():  # the repository's server serves this store
        return f"run `{server.relative_to(REPO)}` (the UI on this store), then open http://127.0.0.1:5000/{page}"
    return (f"run `mlflow ui --backend-store-uri {uri} --host 127.0.0.1 --port 5000`, then open "
            f"http://127.0.0.1:5000/{page}")


def _short(text: str, width: int = 160) -> str:
    return text if len(text) <= width else text[:width - 3] + "..."


def print_summary(plan: Plan, summary: dict, rows: list[dict], seed_rows: list[dict]) -> None:
    def f1(value) -> str:
        return f"{value:.4f}" if isinstance(value, (int, float)) and not math.isnan(value) else "  -   "

    out = []
    out.append(f"\n{'=' * 100}\nSearch {summary['search']} on {plan.dataset}: {summary['trials']} trials "
               f"({summary['terminated']} finished, {summary['stopped']} stopped early, {summary['error']} failed) "
               f"in {summary['wall_seconds']:.0f} s, at most {summary['max_trials_at_once']} at once.")
    ranked = sorted([r for r in rows if isinstance(r.get("best_dev_f1"), (int, float))],
                    key=lambda r: (-r["best_dev_f1"], r["trial"]))
    out.append("Best configurations by dev F1:")
    out.append(f"  {'rank':>4}  {'α_aug':>6} {'α_fea':>6} {'β':>4} {'γ':>4}  {'dev F1':>6}  {'test F1':>7}  "
               f"{'status':<10}  MLflow run")
    for rank, r in enumerate(ranked[:10], 1):
        out.append(f"  {rank:>4}  {r['alpha_aug']:>6g} {r['alpha_fea']:>6g} {r['beta']:>4g} {r['gamma']:>4g}  "
                   f"{f1(r['best_dev_f1'])}  {f1(r.get('test_f1')):>7}  {r['status']:<10}  {r['mlflow_run_id']}")
    failed = [r for r in rows if r["status"] == "ERROR"]
    for r in failed[:10]:
        out.append(f"  failed: trial {r['trial_id']} ({r['alpha_aug']:g}, {r['alpha_fea']:g}, {r['beta']:g}, "
                   f"{r['gamma']:g}): {r['error']}")
    if "selected" in summary:
        s = summary["selected"]
        out.append(f"Selected: alpha_aug={s['alpha_aug']:g} alpha_fea={s['alpha_fea']:g} beta={s['beta']:g} "
                   f"gamma={s['gamma']:g}: dev F1 {f1(summary['best_dev_f1'])}, test F1 {f1(summary['best_test_f1'])}")
        paper = plan.preset.get("paper_selection")
        if paper:
            out.append("  (the paper selected " + ", ".join(f"{k}={paper[k]:g}" for k in SEARCH_KEYS if k in paper)
                       + f" on {plan.dataset})")
    else:
        out.append("No trial produced a dev F1: nothing selected.")
    if seed_rows:
        out.append(f"Selected configuration with {summary['seeds']} seeds: dev F1 {f1(summary['seeds_dev_f1_mean'])} ± "
                   f"{f1(summary['seeds_dev_f1_std'])}, test F1 {f1(summary['seeds_test_f1_mean'])} ± "
                   f"{f1(summary['seeds_test_f1_std'])} (mean ± standard deviation)")
    out.append(f"MLflow: experiment {plan.experiment_name}, parent run {summary['parent_run_id']} at {plan.tracking_uri}")
    out.append(f"  {ui_hint(plan.tracking_uri, summary['experiment_id'], summary['parent_run_id'])}")
    if summary.get("model_uri"):
        out.append(f"  model: mlflow.pyfunc.load_model('runs:/{summary['parent_run_id']}/model')"
                   f".predict(['...'])  ({summary['model_uri']})")
    account = summary["mlflow_account"]
    if account["driver_failures"] or account["trials_with_unlogged"]:
        total = sum(t["unlogged"] for t in account["trials_with_unlogged"])
        out.append(f"MLflow could not record everything: {total} update(s) of "
                   f"{len(account['trials_with_unlogged'])} trial(s) and {len(account['driver_failures'])} update(s) "
                   "of the parent run were not logged:")
        for t in account["trials_with_unlogged"][:20]:
            out.append(f"  trial {t['trial_id']} (run {t['mlflow_run_id'] or 'not created'}): {t['unlogged']} "
                       f"update(s) kept in {t['kept_in']}/mlflow_unlogged.jsonl; {_short(t['error'])}")
        for failure in account["driver_failures"][:20]:
            out.append(f"  parent: {_short(failure)}")
        out.append(f"  The results themselves are complete in {summary['results']} (summary.json, trials.csv).")
    else:
        out.append("MLflow recorded every trial and the parent run.")
    out.append(f"Ray results: {summary['results']}\n{'=' * 100}")
    print("\n".join(out), flush=True)


# ---------------------------------------------------------------------------------------------

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
        print(f"{PROG}: error: {err}", file=sys.stderr, flush=True)
        return 2
    except (KeyboardInterrupt, Interrupted) as err:
        print(f"{PROG}: interrupted ({err or 'Ctrl-C'}); the search is saved: continue it with "
              f"python {PROG} --resume", file=sys.stderr, flush=True)
        return 130
