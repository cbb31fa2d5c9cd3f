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
import math
import os
import posixpath
import socket
import statistics
import sys
import tempfile
import textwrap
import time
from datetime import datetime
from pathlib import Path
from typing import Sequence

import softfine_tune_trial
from softfine_tune_space import (METRIC, MODE, SCOPES, SearchError, check_grid, grid_from_flags, load_preset,
                                 make_searcher)
from softfine_tune_trial import COUNT_KEYS, alphas_key, mask_credentials, softfine_trial

log = logging.getLogger("softfine.tune")

REPO = Path(__file__).resolve().parents[1]
DEFAULT_STORAGE = REPO / "ray_results"
RECORD = "softfine_search.json"  # in the Ray experiment directory: how to resume this search
PROG = "tune/search.py"
# Set on the command line of a resumed search; everything else comes from the search's record.
RESUME_OVERRIDES = ("address", "storage_path", "verbose", "mlflow_uri")
# TrainConfig fields that are no flags of the search: the grid's (flags of their own, several
# values each), and those set per trial.
EXCLUDED_TRAIN_FIELDS = ("alpha_aug", "alpha_fea", "beta", "gamma", "soft_scope", "out", "device")


def _register_trainable_by_value() -> None:
    """Workers on other nodes (and tests) do not have tune/ on their path: the trainable's
    module travels with the pickled function instead of being imported by name."""
    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(softfine_tune_trial)


# ---------------------------------------------------------------------------------------------
# Command line.

class Parser(argparse.ArgumentParser):
    """argparse, except that the flags of a search record (--resume) that it refuses are an
    error naming the record, not a usage message."""

    record: Path | None = None

    def error(self, message: str):
        if self.record is not None:
            raise SearchError(f"--resume: {self.record}: its flags are refused ({message})")
        super().error(message)


def build_parser() -> argparse.ArgumentParser:
    from softfine.cli import add_config_arguments

    # The raw formatter keeps the examples' lines; the descriptions are wrapped here.
    wrap = lambda text: textwrap.fill(text, width=100, break_on_hyphens=False)  # noqa: E731
    parser = Parser(
        prog=PROG, formatter_class=argparse.RawDescriptionHelpFormatter,
        description=wrap("Distributed hyperparameter search for SoftFiNE (Yang et al., ACL 2023): Ray Tune + "
                         "Optuna over the paper's grid of (alpha_aug, alpha_fea) x beta x gamma, one trial per "
                         "GPU, every trial a nested MLflow run under one parent run per search."),
        epilog="examples:\n"
               "  # CPU, tiny encoder, a small subset of Resume (minutes), data from $SOFTFINE_DATA_DIR:\n"
               "  python tune/search.py --dataset resume --model tiny --limit-train 300 --limit-eval 100 \\\n"
               "      --epochs 3 --batch-size 8 --lr 2e-3 --gpus-per-trial 0 --cpus-per-trial 0.5\n"
               "  # the paper's grid on GPUs with bert-base-chinese, logging to a tracking server:\n"
               "  python tune/search.py --dataset weibo --mlflow-uri http://HEAD:5000 --seeds 5\n"
               "  # an ablation: one configuration, 3 seeds, mean and standard deviation:\n"
               "  python tune/search.py --dataset resume --model tiny --alphas 0.01,0.005 --beta 2 --gamma 2 \\\n"
               "      --seeds 3 --no-aug --gpus-per-trial 0\n"
               "  # after a crash of this driver:\n"
               "  python tune/search.py --resume\n")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="show every trial's training log (progress, data notes) as well, and the traceback "
                             "of an error")

    train = parser.add_argument_group(
        "data and training", wrap(
        "One flag per training setting; each is checked (type and range) before anything starts. With a "
        "pretrained encoder (--model NAME), the dataset's preset (tune/presets/DATASET.yaml: the paper's "
        "bert-base settings) comes first, then these flags. With --model tiny, the preset's epochs, batch size, "
        "lr, weight decay, warm-up ratio, dropout and schedule are not used, since they are bert-base "
        "fine-tuning settings: the tiny encoder's own defaults apply (the 'tiny:' values below), and these flags "
        "still override them. The preset's grid applies either way. The defaults shown are the trainer's "
        "own, used where the preset says nothing."))
    add_config_arguments(train, exclude=EXCLUDED_TRAIN_FIELDS)
    train.add_argument("--preset", metavar="YAML", help="a preset file instead of tune/presets/DATASET.yaml "
                       "(sections train:, grid:, paper_selection:)")

    grid = parser.add_argument_group("grid", wrap("Values searched; the preset's grid where not given "
                                     "(the paper: 4 alpha pairs x beta 2,3,4 x gamma 1.5,2,2.5 = 36 points). "
                                     "A grid of one point with --seeds N runs that point with N seeds and "
                                     "nothing else (an ablation)."))
    # dest grid_*: not the TrainConfig fields beta and gamma, which each trial sets from the grid
    grid.add_argument("--alphas", nargs="+", metavar="AUG,FEA", dest="grid_alphas",
                      help="(alpha_aug, alpha_fea) pairs, e.g. --alphas 0.1,0.1 0.01,0.005")
    grid.add_argument("--beta", nargs="+", type=float, metavar="B", dest="grid_beta",
                      help="soft-label base values, each > 1")
    grid.add_argument("--gamma", nargs="+", type=float, metavar="G", dest="grid_gamma",
                      help="wrong-component penalty values, each > 0")
    grid.add_argument("--soft-scope", nargs="+", choices=SCOPES, dest="grid_soft_scope",
                      help="which candidates get a soft score: paper (every entity label, the paper's text) "
                           "and/or related (labels sharing the segment tag or a level with the gold, the "
                           "authors' code); two values make it a searched dimension (default: the preset's, "
                           "paper)")

    search = parser.add_argument_group("search")
    search.add_argument("--sampler", choices=("grid", "tpe"), default="grid",
                        help="grid: every grid point exactly once (Optuna GridSampler); tpe: a budgeted Optuna "
                             "TPE search over the same values, --num-samples trials (default: grid)")
    search.add_argument("--num-samples", type=int, metavar="K",
                        help="trials of a TPE search, >= 1 (default 12); a grid search runs each point once")
    search.add_argument("--scheduler", choices=("fifo", "asha"), default="fifo",
                        help="asha: stop weak trials early on dev F1 (Ray Tune ASHA) (default: fifo)")
    search.add_argument("--asha-grace-period", type=int, default=1, metavar="N",
                        help="evaluations every trial gets before ASHA may stop it (default: 1)")
    search.add_argument("--asha-reduction-factor", type=int, default=2, metavar="N",
                        help="ASHA keeps the best 1/N at each rung (default: 2)")
    search.add_argument("--seeds", type=int, default=0, metavar="N",
                        help="re-run the selected configuration with N seeds (seed, seed+1, ...) and report the "
                             "mean and standard deviation of dev and test F1; with a grid of one point, run "
                             "just that point with N seeds, no search (default: 0, no re-runs)")
    search.add_argument("--search-seed", type=int, default=0, metavar="S",
                        help="seed of the Optuna sampler (default: 0)")

    resources = parser.add_argument_group("resources")
    resources.add_argument("--gpus-per-trial", type=float, default=1.0, metavar="G",
                           help="GPUs per trial (default: 1, one A100 per trial as in the paper); 0 trains on CPU")
    resources.add_argument("--cpus-per-trial", type=float, default=1.0, metavar="C", help="CPUs per trial (default: 1)")
    resources.add_argument("--max-concurrent", type=int, default=0, metavar="N",
                           help="at most N trials at once (default: 0, as many as the cluster's resources allow)")
    resources.add_argument("--address", metavar="ADDR",
                           help="Ray cluster to run on, e.g. HEAD:6379 or auto (default: an existing cluster if one "
                                "is running here or RAY_ADDRESS names one, else a new local one); refused when no "
                                "cluster answers there")
    resources.add_argument("--allow-cpu-fallback", action="store_true",
                           help="when a trial gets a GPU that torch cannot see, train on CPU with a warning instead "
                                "of refusing (for simulated clusters)")

    tracking = parser.add_argument_group("MLflow")
    tracking.add_argument("--mlflow-uri", metavar="URI",
                          help="tracking store: http://HOST:PORT of a tracking server (needed when trials run on "
                               "other nodes; http://USER:PASSWORD@HOST:PORT with basic authentication, or set "
                               "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD: the password is never "
                               "printed or stored), or a local store (default: sqlite:///REPO/mlflow/mlflow.db, "
                               "the embedded store, artifacts in mlflow/artifacts/)")
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
                             "runs; the search's own flags are reused, except --address, --storage-path, -v and "
                             "--mlflow-uri (give it again when it held a password: the record keeps it masked)")
    # Fault injection for the tests: crash a trial's process once, at the first evaluation at or
    # after STEP that follows a reported checkpoint; MARKER is a file that makes it happen once.
    faults.add_argument("--inject-crash", metavar="STEP:MARKER", help=argparse.SUPPRESS)
    return parser


# ---------------------------------------------------------------------------------------------
# The plan: everything decided and checked before Ray starts anything.

@dataclasses.dataclass
class Plan:
    args: argparse.Namespace
    argv: list[str]  # as it may be stored and shown: credentials masked
    dataset: str
    base: object  # the TrainConfig every trial starts from (its grid point and seed replace values)
    grid: object
    mode: str  # "search": the grid or TPE search (then --seeds re-runs the selection); "seeds": one point, N seeds
    num_samples: int
    preset: dict
    tracking: object  # softfine_tune_tracking.TrackingStore
    experiment_name: str
    storage_path: str
    name: str

    @property
    def keys(self) -> tuple[str, ...]:
        """The hyperparameters of a grid point (soft_scope among them when it is searched)."""
        return self.grid.keys()


def base_config(dataset: str, preset: dict, flags: dict):
    """The TrainConfig every trial starts from: the preset's train: values, then the flags given.
    The preset's values of the encoder-dependent settings are bert-base fine-tuning settings: with
    the tiny encoder they give way to its own defaults (which flags still override)."""
    from softfine.config import FINE_TUNING, make_config
    from softfine.datasets import data_dir

    train = dict(preset["train"])
    if flags.get("model", train.get("model")) == "tiny":
        unused = {k: train.pop(k) for k in list(train) if k in FINE_TUNING}
        if unused:
            log.info("--model tiny: the tiny encoder's own defaults replace the preset's bert-base settings (%s)",
                     ", ".join(f"{k}={v}" for k, v in unused.items()))
    where = lambda key: (f"--{key.replace('_', '-')}" if key in flags  # noqa: E731
                         else f"preset {preset['path']}: key {key!r}")
    config = make_config({**train, **flags, "dataset": dataset}, where)
    # Trials run in other working directories, on other nodes: an absolute data folder.
    return make_config({"data_dir": str(data_dir(config.data_dir).resolve())}, where, base=config)


def check_numbers(args: argparse.Namespace, num_samples: int, base) -> None:
    """The search's own numeric flags: in range and finite."""
    from softfine.config import make_config

    checks = [
        ("--num-samples", num_samples, num_samples >= 1, ">= 1"),
        ("--gpus-per-trial", args.gpus_per_trial, args.gpus_per_trial >= 0, ">= 0"),
        ("--cpus-per-trial", args.cpus_per_trial, args.cpus_per_trial > 0, "> 0"),
        ("--max-concurrent", args.max_concurrent, args.max_concurrent >= 0, ">= 0"),
        ("--max-failures", args.max_failures, args.max_failures >= 0, ">= 0"),
        ("--seeds", args.seeds, args.seeds >= 0, ">= 0"),
        ("--search-seed", args.search_seed, 0 <= args.search_seed < 2 ** 32, "in [0, 2**32)"),
        ("--asha-grace-period", args.asha_grace_period, args.asha_grace_period >= 1, ">= 1"),
        ("--asha-reduction-factor", args.asha_reduction_factor, args.asha_reduction_factor >= 2, ">= 2"),
        ("--mlflow-timeout", args.mlflow_timeout, args.mlflow_timeout > 0, "> 0"),
    ]
    for flag, value, ok, rule in checks:
        if not ok or not math.isfinite(value):
            raise SearchError(f"{flag} {value:g}: must be {rule} and finite")
    if args.seeds:  # the last seed must be a seed too
        make_config({"seed": base.seed + args.seeds - 1}, lambda key: f"--seed {base.seed} with --seeds {args.seeds}",
                    base=base)
    if args.inject_crash:
        step, _, marker = args.inject_crash.partition(":")
        if not step.isdigit() or not marker:
            raise SearchError("--inject-crash takes STEP:MARKER_FILE")


def search_mode(args: argparse.Namespace, grid) -> tuple[str, int]:
    """("seeds", N) for one grid point with --seeds N: that point once per seed, nothing else;
    ("search", trials) otherwise."""
    if len(grid) == 1 and args.seeds > 0:
        for refused, flag, why in ((args.sampler == "tpe", "--sampler tpe", "there is nothing to sample"),
                                   (args.num_samples is not None, f"--num-samples {args.num_samples}",
                                    f"it runs {args.seeds} trials, one per seed"),
                                   (args.scheduler == "asha", "--scheduler asha", "no seed may be stopped early")):
            if refused:
                raise SearchError(f"{flag}: the grid has one point, which --seeds {args.seeds} runs with "
                                  f"{args.seeds} seeds ({why}); leave {flag.split()[0]} out")
        return "seeds", args.seeds
    if args.sampler == "grid":
        if args.num_samples not in (None, len(grid)):
            raise SearchError(f"--num-samples {args.num_samples}: a grid search runs each of its {len(grid)} points "
                              "exactly once; use --sampler tpe for a budgeted search")
        return "search", len(grid)
    return "search", 12 if args.num_samples is None else args.num_samples


def check_storage(storage: Path) -> None:
    """Refuses a results folder that cannot be written, without creating anything: the nearest
    folder that exists must take a file."""
    existing = storage
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise SearchError(f"--storage-path {storage}: {existing} is not a folder")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as err:
        raise SearchError(f"--storage-path {storage}: cannot write in {existing} ({err.strerror or err})") from None


def settings(args: argparse.Namespace, dataset: str) -> tuple[dict, object, object]:
    """The preset, the base TrainConfig and the grid, every value checked."""
    from softfine.cli import given_values
    from softfine.config import make_config

    preset = load_preset(dataset, args.preset)
    base = base_config(dataset, preset, given_values(args, EXCLUDED_TRAIN_FIELDS))
    grid = grid_from_flags(preset["grid"], args.grid_alphas, args.grid_beta, args.grid_gamma, args.grid_soft_scope)
    if len(grid.soft_scope) == 1:  # not searched: every trial's
        base = make_config({"soft_scope": grid.soft_scope[0]}, lambda key: grid.origin[key], base=base)
    check_grid(grid, base)
    return preset, base, grid


def results_folder(args: argparse.Namespace, dataset: str) -> tuple[Path, str]:
    """--storage-path (checked, not created) and the search's name."""
    storage = args.storage_path or str(DEFAULT_STORAGE)
    if "://" in storage:
        raise SearchError(f"--storage-path {storage}: give a folder (on a multi-node cluster, a shared one, e.g. NFS)")
    storage = Path(storage).resolve()
    check_storage(storage)
    name = args.name or f"{dataset}-{args.sampler}-{datetime.now():%Y%m%d-%H%M%S}"
    if not name or "/" in name or name in (".", ".."):
        raise SearchError(f"--name {name!r}: give a folder name (no '/')")
    return storage, name


def make_plan(args: argparse.Namespace, argv: list[str]) -> Plan:
    """Everything the search needs, checked in this order: the settings (flags and preset), the
    search's own flags, the results folder, the tracking URI; then that the data files are there."""
    from softfine.datasets import dataset_files, get_spec
    from softfine.errors import SoftFiNEError
    from softfine_tune_tracking import mask_argv, tracking_store

    dataset = getattr(args, "dataset", "weibo")
    try:
        get_spec(dataset)
    except SoftFiNEError as err:
        raise SearchError(f"--dataset: {err}") from None
    preset, base, grid = settings(args, dataset)
    mode, num_samples = search_mode(args, grid)
    check_numbers(args, num_samples, base)
    storage, name = results_folder(args, dataset)
    if args.experiment_name is not None and not args.experiment_name.strip():
        raise SearchError("--experiment-name: give a name")
    tracking = tracking_store(args.mlflow_uri)
    try:  # the first look at the data: its files are there (the trials read them)
        dataset_files(dataset, base.data_dir, ("train", "dev"))
    except SoftFiNEError as err:
        raise SearchError(str(err)) from None
    return Plan(args=args, argv=mask_argv(argv), dataset=dataset, base=base, grid=grid, mode=mode,
                num_samples=num_samples, preset=preset, tracking=tracking,
                experiment_name=args.experiment_name or f"softfine-{dataset}", storage_path=str(storage), name=name)


# ---------------------------------------------------------------------------------------------
# Ray: connect, check the cluster against the requested resources.

# The client's half of an HTTP/2 connection preface and an empty SETTINGS frame: a gRPC server
# (Ray's GCS, or a Ray Client server) answers with a SETTINGS frame of its own (type 4).
HTTP2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"


def probe_gcs(host: str, port: int, timeout: float) -> str | None:
    """None when a gRPC server answers at host:port; else what happened instead."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as conn:
            if os.environ.get("RAY_USE_TLS", "0").lower() in ("1", "true"):
                return None  # TLS first: a TCP connection is all this can check
            conn.settimeout(timeout)
            conn.sendall(HTTP2_PREFACE)
            head = conn.recv(9)
    except socket.timeout:
        return f"no answer within {timeout:g} s"
    except OSError as err:
        return err.strerror or str(err) or type(err).__name__
    if len(head) < 4 or head[3] != 0x04:
        return "a server answers, but not Ray's: no gRPC"
    return None


def check_address(address: str | None, timeout: float = 10) -> None:
    """Refuses a Ray address where no cluster answers, before ray.init, which would wait for it
    for minutes. None: RAY_ADDRESS, a cluster started here, or a new local instance (ray.init's
    own rules); auto: RAY_ADDRESS or a cluster started here, else an error."""
    import ray

    if ray.is_initialized():
        return
    given = address or os.environ.get("RAY_ADDRESS")
    source = "--address" if address else "RAY_ADDRESS"
    if given and given.startswith("ray://"):  # Ray Client
        target = given[len("ray://"):]
    else:
        from ray._private.services import canonicalize_bootstrap_address

        try:
            found = canonicalize_bootstrap_address(address)  # auto, RAY_ADDRESS, a cluster started here
        except (ConnectionError, ValueError) as err:
            raise SearchError(f"{source} {given}: {err}") from None
        if found is None:
            return  # a new local instance
        # An address given is probed as written (ray.init may resolve 127.0.0.1 to this node's IP).
        target = given if given not in (None, "auto") else found
    host, _, port = target.rpartition(":")
    if not host or not port.isdigit():
        raise SearchError(f"{source} {given}: expected HOST:PORT (e.g. 10.0.0.1:6379), auto or local")
    why = probe_gcs(host.strip("[]"), int(port), timeout)
    if why:
        where = "there" if target == given else f"at {target}"
        raise SearchError(f"{source} {given or address}: no Ray cluster answers {where} ({why}); start one (ray "
                          "start --head) or check the address, or leave --address out for a local instance")


def connect_ray(address: str | None) -> bool:
    """Connects (or starts a local instance); True when this call started Ray."""
    import ray

    if ray.is_initialized():
        return False
    try:
        ray.init(address=address, log_to_driver=True, configure_logging=True, logging_level=logging.WARNING)
    except ConnectionError as err:  # e.g. auto, and no cluster is running
        raise SearchError(f"--address {address}: {err}") from None
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


def check_cluster(args: argparse.Namespace, cluster: dict, tracking, storage_path: str) -> None:
    from softfine_tune_tracking import is_remote

    if len(cluster["hosts"]) > 1 and not is_remote(tracking.uri):
        raise SearchError(f"the Ray cluster spans {len(cluster['hosts'])} hosts: trials on the others cannot write to "
                          f"the local MLflow store {tracking.display}. Pass a tracking server that every node reaches: "
                          "on a cluster from cluster/*.yaml, --mlflow-uri http://127.0.0.1:5000 (the head's server, "
                          "forwarded to every node); elsewhere start mlflow/server.sh --auth --host PRIVATE_IP on one "
                          "host, set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD, and pass --mlflow-uri "
                          "http://PRIVATE_IP:5000.")
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


def _mean_std(values: list[float]) -> tuple[float, float]:
    values = [v for v in values if isinstance(v, (int, float)) and not math.isnan(v)]
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def _first(rows: list[dict], key: str):
    return next((r[key] for r in rows if isinstance(r.get(key), (int, float))), None)


def finished(rows: list[dict]) -> list[dict]:
    return [r for r in rows if r["status"] == "TERMINATED"]


def seed_stats(rows: list[dict]) -> dict:
    """Mean and standard deviation of dev and test F1 over the seeds' runs that finished (a seed
    that failed or stopped has no final result), and what the F1s were computed on (the same dev
    and test sentences for every seed)."""
    done = finished(rows)
    dev_mean, dev_std = _mean_std([r["best_dev_f1"] for r in done])
    test_mean, test_std = _mean_std([r.get("test_f1") for r in done])
    return {"seeds": len(rows), "seed_values": sorted(r["seed"] for r in rows), "seeds_finished": len(done),
            "seeds_dev_f1_mean": dev_mean, "seeds_dev_f1_std": dev_std,
            "seeds_test_f1_mean": test_mean, "seeds_test_f1_std": test_std,
            **{f"seeds_{key}": _first(done, key) for key in COUNT_KEYS}}



def finish(plan: Plan, tracker, folder: Path, experiment_id: str, parent_run_id: str, rows: list[dict],
           seed_rows: list[dict], selected: dict | None, seconds: float) -> dict:
    """The parent run's params, metrics and artifacts; summary.json and trials.csv beside the Ray
    results; the summary on the console, with an account of what MLflow did not get."""
    from softfine_tune_tracking import plot_dev_f1, write_json, write_table

    args = plan.args
    all_rows = rows + seed_rows
    counted = rows if plan.mode == "search" else seed_rows
    table = write_table(all_rows, folder / "trials.csv")
    plot = None
    if plan.mode == "search":
        plot = plot_dev_f1(rows, folder / "dev_f1_vs_hyperparameters.png",
                           f"SoftFiNE {args.sampler} search on {plan.dataset}: best dev F1 per trial", plan.keys)
    counts = {s: sum(r["status"] == s for r in counted) for s in ("TERMINATED", "STOPPED", "ERROR", "NOT STARTED")}
    summary: dict = {"search": plan.name, "mode": plan.mode, "dataset": plan.dataset, "trials": len(counted),
                     **{k.lower().replace(" ", "_"): v for k, v in counts.items()}, "wall_seconds": round(seconds, 1),
                     "max_trials_at_once": max_overlap(counted), "soft_labels": plan.base.soft,
                     "augmentation": plan.base.aug, "soft_scope": plan.grid.soft_scope,
                     "mlflow_uri": plan.tracking.display, "experiment_id": experiment_id,
                     "parent_run_id": parent_run_id, "results": str(folder)}
    metrics = {"trials_finished": counts["TERMINATED"], "trials_failed": counts["ERROR"],
               "trials_stopped_early": counts["STOPPED"], "search_wall_seconds": seconds,
               "max_trials_at_once": summary["max_trials_at_once"]}
    params: dict = {}
    if selected is not None:
        summary["selected"] = {k: selected[k] for k in plan.keys}
        params.update({f"selected_{k}": selected[k] for k in plan.keys})
        if plan.mode == "search":
            best = {"best_dev_f1": selected["best_dev_f1"], "best_test_f1": selected.get("test_f1"),
                    **{f"best_{key}": selected.get(key) for key in COUNT_KEYS}}
            summary.update(best, selected_trial_id=selected["trial_id"], selected_run_id=selected["mlflow_run_id"])
            params.update(selected_trial_id=selected["trial_id"], selected_run_id=selected["mlflow_run_id"])
            metrics.update({f"best_{k}": v for k, v in selected.items() if k.startswith("test_")})
            metrics.update(best)
        else:  # one configuration: its model is the seed with the best dev F1
            summary.update(model_seed=selected["seed"], model_run_id=selected["mlflow_run_id"])
            params.update(model_seed=selected["seed"], model_run_id=selected["mlflow_run_id"])
    if seed_rows:
        stats = seed_stats(seed_rows)
        summary.update(stats)
        metrics.update({k: v for k, v in stats.items() if k not in ("seeds", "seed_values")})
        metrics["seeds"] = stats["seeds"]
    metrics = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
               and not math.isnan(v)}
    if params:
        tracker.attempt("log the selected hyperparameters", lambda: tracker.client.log_batch(
            parent_run_id, params=_params(params)))
    tracker.attempt("log the search metrics",
                    lambda: tracker.client.log_batch(parent_run_id, metrics=_metrics(metrics)))
    tracker.attempt("log the trials table", lambda: tracker.client.log_artifact(parent_run_id, str(table)))
    if plot is not None:
        tracker.attempt("log the dev F1 plot", lambda: tracker.client.log_artifact(parent_run_id, str(plot)))
    if selected is not None and selected.get("checkpoint"):
        summary["model_uri"] = tracker.attempt("log the selected model", lambda: _log_selected_model(
            plan.tracking.uri, parent_run_id, selected["checkpoint"]))
        summary["selected_checkpoint"] = selected["checkpoint"]
    complete = selected is not None and (plan.mode == "search" or summary["seeds_finished"] == summary["seeds"])
    tracker.attempt("close the parent run", lambda: tracker.client.set_terminated(
        parent_run_id, status="FINISHED" if complete else "FAILED"))

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


def ui_hint(store, experiment_id: str, run_id: str) -> str:
    from softfine_tune_tracking import default_tracking_uri, is_remote

    # MLflow 3's experiment pages open in GenAI mode; workflowType=machine_learning shows the runs.
    page = f"#/experiments/{experiment_id}/runs/{run_id}?workflowType=machine_learning"
    if is_remote(store.uri):  # the server's address without credentials (the browser asks for them)
        return f"open {store.uri.rstrip('/')}/{page}"
    server = REPO / "mlflow" / "server.sh"
    if store.uri == default_tracking_uri() and server.is_file():  # the repository's server serves this store
        return f"run `{server.relative_to(REPO)}` (the UI on this store), then open http://127.0.0.1:5000/{page}"
    return (f"run `mlflow ui --backend-store-uri {store.display} --host 127.0.0.1 --port 5000`, then open "
            f"http://127.0.0.1:5000/{page}")


def _short(text: str, width: int = 160) -> str:
    return text if len(text) <= width else text[:width - 3] + "..."


def _value(value) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _on(summary: dict, prefix: str, split: str) -> str:
    """"on N sentences, M gold entities" of a split, where known."""
    sentences, entities = summary.get(f"{prefix}{split}_sentences"), summary.get(f"{prefix}{split}_gold_entities")
    if sentences is None:
        return ""
    return f" on {sentences:g} sentences, {entities:g} gold entities"


def print_summary(plan: Plan, summary: dict, rows: list[dict], seed_rows: list[dict]) -> None:
    def f1(value) -> str:
        return f"{value:.4f}" if isinstance(value, (int, float)) and not math.isnan(value) else "  -   "

    keys = plan.keys
    scope = "soft_scope" in keys
    out = []
    kind = "Seeds" if plan.mode == "seeds" else "Search"
    out.append(f"\n{'=' * 100}\n{kind} {summary['search']} on {plan.dataset}: {summary['trials']} trials "
               f"({summary['terminated']} finished, {summary['stopped']} stopped early, {summary['error']} failed) "
               f"in {summary['wall_seconds']:.0f} s, at most {summary['max_trials_at_once']} at once.")
    if plan.mode == "search":
        ranked = sorted([r for r in rows if isinstance(r.get("best_dev_f1"), (int, float))],
                        key=lambda r: (-r["best_dev_f1"], r["trial"]))
        out.append("Best configurations by dev F1:")
        out.append(f"  {'rank':>4}  {'α_aug':>6} {'α_fea':>6} {'β':>4} {'γ':>4}  " + ("scope    " if scope else "")
                   + f"{'dev F1':>6}  {'test F1':>7}  {'status':<10}  MLflow run")
        for rank, r in enumerate(ranked[:10], 1):
            out.append(f"  {rank:>4}  {r['alpha_aug']:>6g} {r['alpha_fea']:>6g} {r['beta']:>4g} {r['gamma']:>4g}  "
                       + (f"{r['soft_scope']:<7}  " if scope else "")
                       + f"{f1(r['best_dev_f1'])}  {f1(r.get('test_f1')):>7}  {r['status']:<10}  {r['mlflow_run_id']}")
    for r in [r for r in rows + seed_rows if r["status"] == "ERROR"][:10]:
        out.append(f"  failed: trial {r['trial_id']} (" + ", ".join(_value(r[k]) for k in keys)
                   + f", seed {r['seed']}): {r['error']}")
    setting = (f"soft labels {'on' if plan.base.soft else 'off (--no-soft)'}, augmentation "
               f"{'on' if plan.base.aug else 'off (--no-aug)'}"
               + ("" if scope else f", soft scope {plan.base.soft_scope}"))
    point = " ".join(f"{k}={_value(v)}" for k, v in summary.get("selected", {}).items())
    if plan.mode == "seeds":
        out.append(f"Configuration: {point or ' '.join(f'{k}={_value(v)}' for k, v in plan.grid.points()[0].items())}"
                   f" ({setting}), seeds {', '.join(map(str, summary['seed_values']))}.")
    elif "selected" in summary:
        out.append(f"Selected: {point} ({setting}): dev F1 {f1(summary['best_dev_f1'])}{_on(summary, 'best_', 'dev')}, "
                   f"test F1 {f1(summary['best_test_f1'])}{_on(summary, 'best_', 'test')}")
        paper = plan.preset.get("paper_selection")
        if paper:
            out.append("  (the paper selected " + ", ".join(f"{k}={paper[k]:g}" for k in keys if k in paper)
                       + f" on {plan.dataset})")
    else:
        out.append("No trial produced a dev F1: nothing selected.")
    if seed_rows:
        which = "The configuration" if plan.mode == "seeds" else "Selected configuration"
        failed = summary["seeds"] - summary["seeds_finished"]
        left_out = f" ({failed} did not finish: left out of the mean)" if failed else ""
        dev, test = (f"{f1(summary[f'seeds_{split}_f1_mean'])} ± {f1(summary[f'seeds_{split}_f1_std'])}"
                     f"{_on(summary, 'seeds_', split)}" for split in ("dev", "test"))
        out.append(f"{which} with {summary['seeds']} seeds{left_out}: dev F1 {dev}; test F1 {test} "
                   "(mean ± standard deviation)")
    out.append(f"MLflow: experiment {plan.experiment_name}, parent run {summary['parent_run_id']} at "
               f"{plan.tracking.display}")
    out.append(f"  {ui_hint(plan.tracking, summary['experiment_id'], summary['parent_run_id'])}")
    if summary.get("model_uri"):
        which = f" (seed {summary['model_seed']}, the best dev F1 of the seeds)" if plan.mode == "seeds" else ""
        out.append(f"  model{which}: mlflow.pyfunc.load_model('runs:/{summary['parent_run_id']}/model')"
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
