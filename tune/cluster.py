"""Ray: connect (refusing an address where no cluster answers), check the cluster against the
resources a trial asks for, and a trial's placement (node, GPUs, device)."""

from __future__ import annotations

import dataclasses
import logging
import os
import socket
from typing import TYPE_CHECKING

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from softfine.errors import DeviceError

from .space import SearchError

if TYPE_CHECKING:
    from .plan import SearchFlags

log = logging.getLogger("softfine.tune")

# The client's half of an HTTP/2 connection preface and an empty SETTINGS frame: a gRPC server
# (Ray's GCS, or a Ray Client server) answers with a SETTINGS frame of its own (type 4).
HTTP2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"


def probe_gcs(host: str, port: int, timeout: float) -> str | None:
    """None when a gRPC server answers at host:port; else what happened instead."""
    # By hand: Ray has no public probe (ray.init waits minutes); gRPC's channel_ready_future only times out.
    try:
        with socket.create_connection((host, port), timeout=timeout) as conn:
            if os.environ.get("RAY_USE_TLS", "0").lower() in ("1", "true"):
                return None  # TLS first: a TCP connection is all this can check
            conn.settimeout(timeout)
            conn.sendall(HTTP2_PREFACE)
            head = conn.recv(9)
    except TimeoutError:
        return f"no answer within {timeout:g} s"
    except OSError as err:
        return err.strerror or str(err) or type(err).__name__
    if len(head) < 4 or head[3] != 0x04:
        return "a server answers, but not Ray's: no gRPC"
    return None


def check_address(address: str | None, timeout: float = 10) -> None:
    """Refuses a Ray address where no cluster answers, before ray.init waits minutes for it (None and
    auto as ray.init takes them: RAY_ADDRESS, a cluster started here, or (None) a new instance)."""
    if ray.is_initialized():
        return
    given = address or os.environ.get("RAY_ADDRESS")
    source = "--address" if address else "RAY_ADDRESS"
    if given and given.startswith("ray://"):  # Ray Client
        target = given[len("ray://") :]
    else:
        # Private: ray.init's own resolution of auto, RAY_ADDRESS and a cluster started here; none is public.
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
        raise SearchError(
            f"{source} {given or address}: no Ray cluster answers {where} ({why}); start one (ray "
            "start --head) or check the address, or leave --address out for a local instance"
        )


def connect_ray(address: str | None) -> bool:
    """Connects (or starts a local instance); True when this call started Ray."""
    if ray.is_initialized():
        return False
    # A Ray instance of the search's own needs no dashboard: nothing uses it, and it takes CPU.
    own = {"include_dashboard": False} if address in (None, "local") else {}
    try:
        ray.init(address=address, log_to_driver=True, logging_level=logging.WARNING, **own)
    except ConnectionError as err:  # e.g. auto, and no cluster is running
        raise SearchError(f"--address {address}: {err}") from None
    return True


def cluster_resources() -> dict:
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    gpus, cpus = ([n["Resources"].get(kind, 0) for n in nodes] for kind in ("GPU", "CPU"))
    return {
        "nodes": len(nodes),
        "gpus": sum(gpus),
        "cpus": sum(cpus),
        "max_node_gpus": max(gpus, default=0),
        "max_node_cpus": max(cpus, default=0),
        "gpu_nodes": [n["NodeID"] for n, g in zip(nodes, gpus) if g >= 1e-9],
        "hosts": sorted({n["NodeManagerAddress"] for n in nodes}),
    }


def check_cluster(flags: SearchFlags, cluster: dict, storage) -> None:
    """The trials' resources against the cluster's nodes; a local --storage-path on several hosts."""
    if len(cluster["hosts"]) > 1 and not storage.remote:
        log.warning(
            "the cluster spans %d hosts: --storage-path %s must be a folder that every host shares (e.g. "
            "NFS), or cloud storage (s3://BUCKET/PREFIX), for the checkpoints that --max-failures and "
            "--resume use",
            len(cluster["hosts"]),
            storage,
        )
    if flags.gpus_per_trial > cluster["max_node_gpus"]:
        raise SearchError(
            f"--gpus-per-trial {flags.gpus_per_trial:g}: no node of the Ray cluster has that many GPUs "
            f"(the most on one node: {cluster['max_node_gpus']:g}; {cluster['nodes']} node(s)). "
            "Use --gpus-per-trial 0 to train on CPU, or connect to a GPU cluster with --address."
        )
    if flags.cpus_per_trial > cluster["max_node_cpus"]:
        raise SearchError(
            f"--cpus-per-trial {flags.cpus_per_trial:g}: no node of the Ray cluster has that many CPUs "
            f"(the most on one node: {cluster['max_node_cpus']:g})."
        )


def probe_gpus(flags: SearchFlags, cluster: dict, timeout: float = 180) -> None:
    """On every GPU node, a task holding the trial's GPUs checks that torch sees them."""
    if flags.gpus_per_trial <= 0 or flags.allow_cpu_fallback:
        return
    probe = ray.remote(probe_cuda)
    on = [NodeAffinitySchedulingStrategy(node, soft=False) for node in cluster["gpu_nodes"]]
    refs = [
        probe.options(num_gpus=flags.gpus_per_trial, num_cpus=0, scheduling_strategy=s).remote() for s in on
    ]
    ready, waiting = ray.wait(refs, num_returns=len(refs), timeout=timeout)
    if waiting:
        log.warning(
            "%d GPU node(s) did not answer the CUDA check in %.0f s (busy?); going on", len(waiting), timeout
        )
    blind = [r for r in ray.get(ready) if not r["cuda"]]
    if blind:
        lines = "; ".join(
            f"node {r['node_id'][:12]} ({r['hostname']}): Ray GPU {r['gpu_ids']}, torch "
            f"{r['torch']} CUDA build {r['cuda_build'] or 'none'}, CUDA_VISIBLE_DEVICES="
            f"{r['visible']!r}"
            for r in blind
        )
        raise SearchError(
            f"Ray gives trials GPUs that torch cannot see on {len(blind)} node(s): {lines}. Install a "
            "CUDA build of torch there, use --gpus-per-trial 0 to train on CPU, or "
            "--allow-cpu-fallback to train on CPU where this happens."
        )


def fuse_to_fit(flags: SearchFlags, base, corpus, points: int, timeout: float = 600) -> tuple[int, str]:
    """--fuse auto: (K, why): the members whose step (measured in a trial's GPU share) fits 90 % of it."""
    if flags.gpus_per_trial <= 0:
        return 1, "a CPU search: one point per trial (fused groups do not pay on CPUs)"
    measure = ray.remote(measure_members).options(
        num_gpus=flags.gpus_per_trial, num_cpus=flags.cpus_per_trial
    )
    try:
        found = ray.get(measure.remote(base, corpus, flags.gpus_per_trial), timeout=timeout)
    except ray.exceptions.GetTimeoutError:
        raise SearchError(
            f"--fuse auto: no GPU measured a step within {timeout:.0f} s (GPUs busy?); give --fuse K"
        ) from None
    except ray.exceptions.RayTaskError as err:  # the task's own exception: its cause
        why = f"{type(err.cause).__name__}: {err.cause}"
        raise SearchError(f"--fuse auto: measuring a step's memory failed: {why}; give --fuse K") from None
    from softfine.memory import members_that_fit

    gib = 2**30
    return members_that_fit(found["budget"], found, points), (
        f"one member's step peaks at {found['one'] / gib:.2f} GiB, each more adds "
        f"{found['each_more'] / gib:.2f} GiB, of {found['budget'] / gib:.1f} GiB usable on "
        f"{found['gpu']}"
    )


def measure_members(base, corpus, share: float) -> dict:
    """A Ray task holding a trial's GPUs: member_memory on `base`, and 90 % of its share (at most free)."""
    import torch

    from softfine.memory import member_memory

    free, total = torch.cuda.mem_get_info()
    budget = int(0.9 * min(free, total * min(share, 1.0)))
    return {
        **member_memory(dataclasses.replace(base, device="cuda"), corpus),
        "budget": budget,
        "gpu": torch.cuda.get_device_name(),
    }


def probe_cuda() -> dict:
    """Run as a Ray task holding a trial's GPUs: does torch see them on this node?"""
    import torch

    return {
        "node_id": ray.get_runtime_context().get_node_id(),
        "hostname": socket.gethostname(),
        "gpu_ids": ray.get_gpu_ids(),
        "cuda": torch.cuda.is_available(),
        "torch": torch.__version__,
        "cuda_build": torch.version.cuda,
        "visible": os.environ.get("CUDA_VISIBLE_DEVICES"),
    }


def choose_device(allow_cpu_fallback: bool) -> tuple[str, str]:
    """cuda when Ray gave this trial a GPU, cpu otherwise. A GPU that torch cannot see is a
    DeviceError naming the node, unless `allow_cpu_fallback` (then: cpu, and a warning)."""
    import torch

    gpu_ids = ray.get_gpu_ids()
    if not gpu_ids:
        return "cpu", ""
    if torch.cuda.is_available():
        return "cuda", ""
    message = (
        f"Ray gave this trial GPU {', '.join(map(str, gpu_ids))} on node "
        f"{ray.get_runtime_context().get_node_id()} ({socket.gethostname()}), but torch "
        f"{torch.__version__} (CUDA build: {torch.version.cuda or 'none'}) sees no CUDA device "
        f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r}). Install a CUDA build "
        f"of torch on that node, or run the search with --gpus-per-trial 0 to train on CPU."
    )
    if allow_cpu_fallback:
        log.warning("%s Training on CPU instead (--allow-cpu-fallback).", message)
        return "cpu", message
    raise DeviceError(message)


def placement(allow_cpu_fallback: bool) -> dict:
    """The trial's node, host, GPUs (Ray's ids), its share of them and its device, for its results;
    a fraction of a GPU caps its memory, so trials packed on one GPU cannot starve each other."""
    import torch

    device, note = choose_device(allow_cpu_fallback)
    share = float(ray.get_runtime_context().get_assigned_resources().get("GPU", 0.0))
    if device == "cuda" and 0 < share < 1:
        torch.cuda.set_per_process_memory_fraction(share, 0)
    return {
        "node_id": ray.get_runtime_context().get_node_id(),
        "hostname": socket.gethostname(),
        "gpu_ids": ",".join(map(str, ray.get_gpu_ids())),
        "gpu_share": share,
        "device": device,
        "device_note": note,
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES", ""),
    }
