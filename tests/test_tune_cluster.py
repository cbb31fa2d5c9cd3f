"""tune/search.py on a simulated multi-node cluster (ray.cluster_utils.Cluster: a head without
resources and three nodes that declare one GPU each), logging over HTTP to one tracking server.

The nodes' GPUs are ones that torch cannot see, on any machine: each node's CUDA_VISIBLE_DEVICES
is -1, so Ray's GPU id there is -1 and a trial given it sees no CUDA device (on a machine with real
GPUs too). The search refuses such GPUs unless told to train on CPU where that happens
(--allow-cpu-fallback), and a trial that meets one says so."""

from __future__ import annotations

import json
from collections import defaultdict

import pytest
from mlflow.tracking import MlflowClient
from tune_fixtures import (
    children,
    parents,
    read_trials,
    run_search,
    shared_data_dir,
    slot_seconds,
    small_search_flags,
)

from softfine_tune.cluster import choose_device
from softfine_tune.results import max_overlap

WORKERS = 3
HIDDEN_GPU = "-1"  # each node's one GPU: an id that CUDA_VISIBLE_DEVICES hides from torch


@pytest.fixture(scope="module")
def gpu_cluster():
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(
        initialize_head=True, head_node_args={"num_cpus": 0, "num_gpus": 0, "include_dashboard": False}
    )
    nodes = [
        cluster.add_node(num_cpus=1, num_gpus=1, env_vars={"CUDA_VISIBLE_DEVICES": HIDDEN_GPU})
        for _ in range(WORKERS)
    ]
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, logging_level="WARNING")
    yield [node.node_id for node in nodes]
    ray.shutdown()
    cluster.shutdown()


def test_trials_spread_over_every_node_never_more_than_its_gpus(gpu_cluster, mlflow_server, tmp_path):
    # 6 points on 3 nodes with one GPU each: trials land on every node, one at a time per node.
    code, output = run_search(
        small_search_flags(
            shared_data_dir(),
            "--alphas",
            "0.1,0.1",
            "0.01,0.01",
            "--beta",
            "2",
            "3",
            "4",
            "--gamma",
            "2",
            "--gpus-per-trial",
            "1",
            "--cpus-per-trial",
            "1",
            "--allow-cpu-fallback",
            "--mlflow-uri",
            mlflow_server.uri,
            "--experiment-name",
            "cluster",
            "--storage-path",
            tmp_path,
            "--name",
            "cluster",
        )
    )
    assert code == 0
    rows = read_trials(tmp_path / "cluster")
    assert len(rows) == 6 and all(r["status"] == "TERMINATED" for r in rows)
    by_node = defaultdict(list)
    for row in rows:
        by_node[row["node_id"]].append(row)
    assert set(by_node) == set(gpu_cluster)  # every node ran trials (the head, without GPUs, none)
    for node, node_rows in by_node.items():
        assert max_overlap(node_rows) <= 1, node  # never more trials at once than the node's 1 GPU
    assert max_overlap(rows) >= 2  # nodes ran trials at the same time
    (parent,) = parents(mlflow_server.uri, "cluster")
    assert (
        parent.data.params["cluster_nodes"] == str(WORKERS + 1)
        and parent.data.params["cluster_gpus"] == "3.0"
    )
    kids = children(mlflow_server.uri, "cluster", parent.info.run_id)
    assert len(kids) == 6
    for kid in kids:  # every trial logged over HTTP from its node, and says where it ran and on what
        assert kid.data.tags["softfine.node_id"] in gpu_cluster
        assert kid.data.tags["softfine.gpu_ids"] == HIDDEN_GPU and kid.data.tags["softfine.device"] == "cpu"
        assert (
            "torch" in kid.data.tags["softfine.device_note"]
            and "sees no CUDA device" in kid.data.tags["softfine.device_note"]
        )
    # Occupancy: computed from where the trials really ran, logged as a figure and a metric.
    summary = json.loads((tmp_path / "cluster" / "summary.json").read_text())
    held, span = slot_seconds(rows, lambda r: 1)  # one whole GPU each
    # a GPU search's slots: GPUs
    assert summary["trial_slots"] == "gpu" and "cpu_busy_fraction" not in summary
    assert summary["gpu_busy_fraction"] == pytest.approx(held / (WORKERS * span))
    assert 0 < summary["gpu_busy_fraction"] <= 1
    assert parent.data.metrics["gpu_busy_fraction"] == pytest.approx(summary["gpu_busy_fraction"])
    assert f"the GPUs were busy {summary['gpu_busy_fraction']:.0%} of the time" in output
    artifacts = {
        a.path for a in MlflowClient(tracking_uri=mlflow_server.uri).list_artifacts(parent.info.run_id)
    }
    assert "occupancy_timeline.png" in artifacts


def test_a_fraction_of_a_gpu_per_trial_packs_trials_on_each_gpu(gpu_cluster, mlflow_server, tmp_path):
    # 6 points, half a GPU each, on 3 nodes with one GPU: two trials share each GPU, never three.
    # 8 epochs: trials long enough to overlap on a loaded machine, where their workers start seconds apart
    # (seen: 2-epoch trials that never met in a CI-like run).
    code, output = run_search(
        small_search_flags(
            shared_data_dir(),
            "--alphas",
            "0.1,0.1",
            "0.01,0.01",
            "--beta",
            "2",
            "3",
            "4",
            "--gamma",
            "2",
            "--epochs",
            "8",
            "--gpus-per-trial",
            "0.5",
            "--cpus-per-trial",
            "0.5",
            "--allow-cpu-fallback",
            "--mlflow-uri",
            mlflow_server.uri,
            "--experiment-name",
            "packed",
            "--storage-path",
            tmp_path,
            "--name",
            "packed",
        )
    )
    assert code == 0
    rows = read_trials(tmp_path / "packed")
    assert len(rows) == 6 and all(r["status"] == "TERMINATED" for r in rows)
    by_gpu = defaultdict(list)
    for row in rows:
        assert row["gpu_ids"] == HIDDEN_GPU and float(row["gpu_share"]) == 0.5
        by_gpu[row["node_id"], row["gpu_ids"]].append(row)
    assert max(max_overlap(lane) for lane in by_gpu.values()) == 2  # trials shared a GPU ...
    assert all(max_overlap(lane) <= 2 for lane in by_gpu.values())  # ... never more than 1 / 0.5 of them
    (parent,) = parents(mlflow_server.uri, "packed")
    # the device is the GPU Ray assigned
    for kid in children(mlflow_server.uri, "packed", parent.info.run_id):
        assert (
            kid.data.tags["softfine.cuda_visible_devices"] == kid.data.tags["softfine.gpu_ids"] == HIDDEN_GPU
        )
        assert kid.data.tags["softfine.gpu_share"] == "0.5"


def test_refuses_gpus_that_torch_cannot_see(gpu_cluster, tmp_path):
    code, output = run_search(
        small_search_flags(
            shared_data_dir(),
            "--gpus-per-trial",
            "1",
            "--mlflow-uri",
            f"sqlite:///{tmp_path / 'm.db'}",
            "--storage-path",
            tmp_path / "ray",
        )
    )
    assert code == 2
    assert f"Ray gives trials GPUs that torch cannot see on {WORKERS} node(s)" in output
    assert "--gpus-per-trial 0" in output and "--allow-cpu-fallback" in output
    assert not (tmp_path / "ray").exists()  # refused before any trial


def test_refuses_more_gpus_per_trial_than_a_node_has(gpu_cluster, tmp_path):
    code, output = run_search(
        small_search_flags(
            shared_data_dir(),
            "--gpus-per-trial",
            "2",
            "--mlflow-uri",
            f"sqlite:///{tmp_path / 'm.db'}",
            "--storage-path",
            tmp_path / "ray",
        )
    )
    assert code == 2
    assert (
        "--gpus-per-trial 2: no node of the Ray cluster has that many GPUs (the most on one node: 1" in output
    )


def test_a_trial_given_a_gpu_torch_cannot_see_says_so(gpu_cluster):
    import ray

    def attempt(fallback: bool):
        from softfine.errors import DeviceError

        try:
            return choose_device(fallback)
        except DeviceError as err:
            return "DeviceError", str(err)

    remote = ray.remote(num_gpus=1, num_cpus=0)(attempt)
    kind, message = ray.get(remote.remote(False))
    assert kind == "DeviceError"
    assert f"Ray gave this trial GPU {HIDDEN_GPU} on node" in message and "sees no CUDA device" in message
    assert "--gpus-per-trial 0" in message
    device, note = ray.get(remote.remote(True))
    assert device == "cpu" and "sees no CUDA device" in note
