"""cluster/local.yaml with two real Ray nodes on one machine that share nothing but the network,
and the worker lost in the middle of a search whose state is on S3.

The head is on 127.0.0.1 and the worker on 127.0.0.2, each a "machine" of its own: an sshd in a
PID and mount namespace of its own (`Sshd` in test_ray_up.py), so that its `ray stop` sees only its
own processes, and with private folders (PRIVATE_NODE_SCRIPT): a tmpfs of its own over /tmp (Ray's
/tmp/ray, the trials' folders, every temporary file), /dev/shm (Ray's object store), /var/tmp and
its home (the repository Ray's launcher syncs there, the search's working folder in ~/.cache, the
head's MLflow store); the worker also has an empty folder where the data files are, so its trials
get their sentences through Ray (the driver reads them and passes them with tune.with_parameters).
What the nodes share is what machines on a network share: the S3 server (`s3_server`, on
127.0.0.1), where the search keeps everything (`--storage-path s3://softfine/PREFIX`: Ray Tune's
state, the trials' checkpoints, the search's record and study), each node's credentials in its
own ~/.aws/credentials and the endpoint in its environment (~/.bashrc), as a machine of a cloud
cluster has them; the tracking server on the head's loopback; the checkout and its virtual
environment, read-only in effect (the code, which `ray up` also syncs into each node's home). Both
nodes are started by Ray's launcher as on any local cluster (`two_node_variant` says what differs
from cluster/local.yaml):

    ray up -y VARIANT.yaml         # SSH to the head: setup, `ray start --head`, mlflow/server.sh; the
                                   # head's autoscaler then sets up the worker over SSH: `ray start --address`
    ray job submit --address http://127.0.0.1:DASHBOARD --working-dir REPO -- python tune/search.py ...

The search has 4 grid points and 1 CPU per trial; each node declares 2 CPUs. As soon as a trial
on the worker has reported an evaluation (and so saved a checkpoint), the test kills the
worker's raylet and the processes below it, its trials' workers among them (SIGKILL, their pids
found among the worker node's processes, which the test started): the node, lost at once as a
preempted machine is. (The raylet alone is not enough: a trial's worker talks to the driver
directly and may finish its last epochs before it notices its raylet is gone.) Then:

* the job succeeds; every grid point has exactly one child run in the head's MLflow, FINISHED,
  and no evaluation step is logged twice in any run's metric history: every run has each
  evaluation once;
* the worker's unfinished trials, and only they, were retried once (--max-failures 1), each from
  the step of its last checkpoint (softfine.resumed_from_step), on the head, the remaining node;
* the worker's unfinished trials went on on the head from their checkpoints on S3, which the
  worker had written there: the head never had them on a disk of its own;
* the trials' node addresses show both nodes: trials.csv's node_ip (where each trial ended) and
  retried_after (where a retried one failed, after which step, and Ray's error), the same on the
  child runs (softfine.node_ip, softfine.retried_after); the printed summary names each retried
  trial and why, summary.json lists the retries (both read from S3), and the parent run counts
  them (trials_retried);
* the tracking server is stopped (`ray exec ... mlflow/server.sh --stop`), `ray down -y` stops
  the head's Ray, and stopping the two sshds ends whatever else ran in the two nodes (`ray down`
  of the local provider only marks the workers terminated).

Which trials run on which node is Ray's choice (Optuna hands Tune one trial at a time, and Tune
reuses a finished trial's actor), so the checks hold for any placement with a trial on the worker.

This test replaced the variant whose nodes shared the storage folder (one disk): a local or shared
--storage-path is covered by the single-node tests (test_tune_search.py, test_search_state.py),
and a second two-node run would cost CI another two minutes.

It needs what test_ray_up.py needs (sshd, rsync, ray[default], root for the namespaces) and the
address 127.0.0.2 (on Linux, all of 127.0.0.0/8 is the loopback interface). Run it alone:
`python -m pytest -q tests/test_two_nodes.py --durations=0`.
"""

from __future__ import annotations

import contextlib
import copy
import csv
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import time
import uuid
from pathlib import Path

import pytest
import test_ray_up
import yaml
from test_ray_up import (
    LOCAL_YAML,
    RAY,
    Sshd,
    answers,
    free_ports,
    head_only_variant,
    jobs_api_answers,
    mlflow_health,
    ray_cli_env,
    run,
    ssh_control_dir,
    tail,
    tear_down,
)
from tune_fixtures import REPO, children, descendants, parents, shared_data_dir, small_search_flags

WORKER_IP = "127.0.0.2"
NODE_CPUS = 2  # each node declares 2 CPUs, whatever the machine has: 2 trials of 1 CPU per node
EXPERIMENT = "softfine-two-nodes"
SEARCH_NAME = "two-nodes"
GRID = ("--alphas", "0.1,0.1", "0.01,0.005", "--beta", "2", "3", "--gamma", "2")  # 4 points
EPOCHS = 6  # an evaluation and a checkpoint per epoch: the worker dies with most of them to go

# A node's own folders: Sshd starts `sh -c NODE_SCRIPT node TMP_RAY SSH_CONFIG SSHD...` as the first
# process of the node's namespaces (test_ray_up.Sshd.start); this script, in its place, gives the node
# a tmpfs of its own over every folder Ray, the trials and the search write (and hides
# $SOFTFINE_NODE_HIDE's folders behind empty ones). The node's sshd folder (its configuration, keys and
# log) is bound back where it was: sshd reads it again for every connection.
PRIVATE_NODE_SCRIPT = """set -e
folder=$(dirname "$1")
mount -t tmpfs softfine-keep /mnt
mkdir /mnt/node
mount --bind "$folder" /mnt/node
for private in /tmp /dev/shm /var/tmp; do mount -t tmpfs softfine-node "$private"; done
mkdir -p "$folder" /tmp/ray "$SOFTFINE_NODE_HOME"
mount --bind /mnt/node "$folder"
mount -t tmpfs softfine-home "$SOFTFINE_NODE_HOME"
for hidden in $SOFTFINE_NODE_HIDE; do mount -t tmpfs -o ro softfine-nothing "$hidden"; done
if [ -n "$2" ]; then mount --bind "$2" /etc/ssh/ssh_config; fi
shift 2
exec "$@"
"""


def start_private(node: Sshd, monkeypatch, hide: tuple[Path, ...] = ()) -> Sshd:
    """Starts the node with its own folders (PRIVATE_NODE_SCRIPT); `hide`: folders it sees empty."""
    with monkeypatch.context() as patch:
        patch.setattr(test_ray_up, "NODE_SCRIPT", PRIVATE_NODE_SCRIPT)
        patch.setenv("SOFTFINE_NODE_HOME", str(node.home))
        patch.setenv("SOFTFINE_NODE_HIDE", " ".join(map(str, hide)))
        return node.start()


def inside(node: Sshd, path: Path | str) -> Path:
    """`path` as the node sees it (its mount namespace, through its first process's /proc/PID/root)."""
    return Path(f"/proc/{node.process.pid}/root") / Path(path).relative_to("/")


def tmpfs_mounts(node: Sshd) -> set[str]:
    """The mount points of the node's tmpfs file systems (/proc/PID/mountinfo)."""
    lines = Path(f"/proc/{node.process.pid}/mountinfo").read_text().splitlines()
    return {line.split()[4] for line in lines if " - tmpfs " in line}


def provision(node: Sshd, s3_server) -> None:
    """What a machine of a cloud cluster has: its credentials in ~/.aws/credentials (a profile, as AWS
    tools take it), its region in ~/.aws/config and the endpoint in its environment (~/.bashrc, which
    Ray's launcher sources before each command: `ray start` and so every Ray process of the node)."""
    env = s3_server.env
    aws = inside(node, node.home / ".aws")
    aws.mkdir(mode=0o700)
    (aws / "credentials").write_text(
        f"[default]\naws_access_key_id = {env['AWS_ACCESS_KEY_ID']}\n"
        f"aws_secret_access_key = {env['AWS_SECRET_ACCESS_KEY']}\n"
    )
    (aws / "credentials").chmod(0o600)
    (aws / "config").write_text(f"[default]\nregion = {env['AWS_REGION']}\n")
    inside(node, node.home / ".bashrc").write_text(f"export AWS_ENDPOINT_URL={env['AWS_ENDPOINT_URL']}\n")


def two_node_variant(
    base: dict, *, sshd: Sshd, ports: dict[str, int], worker_agent_port: int, name: str
) -> dict:
    """The head-only variant of cluster/local.yaml (test_ray_up.head_only_variant) with one
    worker, WORKER_IP. Beyond it:

    * provider.worker_ips: [WORKER_IP]; min_workers = max_workers = 1;
    * `ray start` on both nodes: --num-cpus=2 (so that the grid's 4 trials split 2 and 2 on any
      machine); on the worker: --node-ip-address=WORKER_IP (without it Ray registers the worker
      under the machine's address, as it does the head: two nodes of one address, which the
      autoscaler cannot tell apart), its own dashboard agent port, and workers on ports the OS
      chooses (--min-worker-port=0 --max-worker-port=0) instead of the head's range: both nodes
      share the machine's ports."""
    config = head_only_variant(base, sshd=sshd, ports=ports, name=name)
    config["provider"]["worker_ips"] = [WORKER_IP]
    config["min_workers"] = config["max_workers"] = 1

    def extend(commands: list[str], flags: str) -> list[str]:
        started = [c for c in commands if "ray start" in c]
        assert len(started) == 1, commands
        return [c + flags if c in started else c for c in commands]

    config["head_start_ray_commands"] = extend(config["head_start_ray_commands"], f" --num-cpus={NODE_CPUS}")
    config["worker_start_ray_commands"] = extend(
        config["worker_start_ray_commands"],
        f" --num-cpus={NODE_CPUS} --node-ip-address={WORKER_IP} "
        f"--dashboard-agent-listen-port={worker_agent_port}"
        " --min-worker-port=0 --max-worker-port=0",
    )
    return config


def test_two_node_variant_differs_from_the_head_only_one_where_it_says(tmp_path):
    """The variant the next test runs, checked without SSH: Ray's launcher bootstrap accepts it,
    with one worker, and it adds to test_ray_up's head-only variant what two_node_variant lists."""
    from ray.autoscaler._private.commands import _bootstrap_config

    base = yaml.safe_load(LOCAL_YAML.read_text())
    ports = dict(zip(("gcs", "dashboard", "client", "agent", "mlflow"), free_ports(5)))
    sshd = Sshd(tmp_path / "sshd", tmp_path / "home", free_ports(1)[0])
    head_only = head_only_variant(base, sshd=sshd, ports=ports, name="softfine-two-nodes-check")
    variant = two_node_variant(
        base, sshd=sshd, ports=ports, worker_agent_port=1234, name="softfine-two-nodes-check"
    )
    changed = {k for k in set(head_only) | set(variant) if head_only.get(k) != variant.get(k)}
    assert changed == {
        "provider",
        "min_workers",
        "max_workers",
        "head_start_ray_commands",
        "worker_start_ray_commands",
    }
    assert (
        variant["provider"]["worker_ips"] == [WORKER_IP]
        and variant["min_workers"] == variant["max_workers"] == 1
    )
    for key, added in (
        ("head_start_ray_commands", [f"--num-cpus={NODE_CPUS}"]),
        (
            "worker_start_ray_commands",
            [
                f"--num-cpus={NODE_CPUS}",
                f"--node-ip-address={WORKER_IP}",
                "--dashboard-agent-listen-port=1234",
                "--min-worker-port=0",
                "--max-worker-port=0",
            ],
        ),
    ):
        for before, after in zip(head_only[key], variant[key], strict=True):
            assert after == before or after == " ".join([before, *added]), (before, after)
    resolved = _bootstrap_config(copy.deepcopy(variant), no_config_cache=True)
    (node_type,) = resolved["available_node_types"].values()
    assert node_type["min_workers"] == node_type["max_workers"] == 1


def loopback_alias_answers(address: str) -> bool:
    """Whether this machine accepts connections on `address` (127.0.0.2: Linux's loopback)."""
    with socket.socket() as listener:
        try:
            listener.bind((address, 0))
        except OSError:
            return False
        listener.listen(1)
        try:
            with socket.create_connection(listener.getsockname(), timeout=2):
                return True
        except OSError:
            return False


def alive_nodes(dashboard: int, count: int, timeout: float) -> list:
    """The cluster's ALIVE nodes once there are `count` (Ray's state API, through the dashboard);
    what there is after `timeout` otherwise."""
    from ray.util.state import list_nodes

    deadline, nodes = time.time() + timeout, []
    while time.time() < deadline:
        try:
            nodes = list_nodes(
                address=f"http://127.0.0.1:{dashboard}",
                filters=[("state", "=", "ALIVE")],
                raise_on_missing_output=False,
            )
        except Exception:  # noqa: BLE001 - the dashboard may not answer yet
            nodes = []
        if len(nodes) >= count:
            break
        time.sleep(3)
    return nodes


def read_s3(s3_server, key: str) -> bytes:
    with s3_server.fs().open_input_stream(key) as stream:
        return stream.readall()


def worker_results(s3_server, experiment: str) -> dict[str, list[dict]]:
    """Each trial's results so far that came from the worker (Tune's result.json per trial, written
    by the driver as it takes them and uploaded to S3 with each of its snapshots), by trial id."""
    from pyarrow.fs import FileSelector, FileType

    fs, found = s3_server.fs(), {}
    trials = [
        i.path
        for i in fs.get_file_info(FileSelector(experiment, allow_not_found=True))
        if i.type == FileType.Directory and i.base_name.startswith("trial_")
    ]
    for trial in trials:
        try:
            text = read_s3(s3_server, f"{trial}/result.json").decode()
        except FileNotFoundError:
            continue
        lines = [
            json.loads(line) for line in text.splitlines(keepends=True) if line.endswith("\n")
        ]  # whole lines
        results = [r for r in lines if r.get("node_ip") == WORKER_IP]
        if results:
            found[trial.rpartition("/trial_")[2]] = results
    return found


def kill_the_worker_mid_trial(
    s3_server, experiment: str, worker: Sshd, job: subprocess.Popen, killed: dict, timeout: float = 300
) -> None:
    """Once a trial on the worker has reported an evaluation (and so saved a checkpoint) and not
    finished, SIGKILL to the worker's raylet (the one process named raylet among the worker node's)
    and to every process below it; records the raylet's pid and the last step of each unfinished
    worker trial in `killed`."""
    deadline = time.time() + timeout
    while time.time() < deadline and job.poll() is None:
        running = {
            t: rs
            for t, rs in worker_results(s3_server, experiment).items()
            if not any(r.get("final") for r in rs)
        }
        if running:
            raylets = [
                pid
                for pid, command in worker.processes().items()
                if command.split(" ")[0].endswith("/raylet")
            ]
            if len(raylets) != 1:
                killed["error"] = f"not one raylet among the worker's processes: {worker.processes()}"
                return
            for pid in [raylets[0], *descendants(raylets[0])]:  # listed before any is killed
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            killed.update(pid=raylets[0], steps={t: rs[-1]["step"] for t, rs in running.items()})
            return
        time.sleep(0.2)
    killed["error"] = (
        f"no trial on the worker reported an evaluation before it finished, within {timeout:g} s "
        f"(the search ended: {job.poll() is not None})"
    )


def test_two_nodes_by_ray_up_and_a_search_that_loses_the_worker(tmp_path, s3_server, monkeypatch):
    from test_ray_up import needed_tools

    needed_tools()
    if not loopback_alias_answers(WORKER_IP):
        pytest.fail(
            f"this machine does not answer on {WORKER_IP} (Linux routes all of 127.0.0.0/8 to the loopback)"
        )
    data = shared_data_dir()
    head_port, worker_port, worker_agent, *rest = free_ports(8)
    ports = dict(zip(("gcs", "dashboard", "client", "agent", "mlflow"), rest))
    name = f"softfine-two-nodes-test-{uuid.uuid4().hex[:8]}"
    # The head's updater reaches the worker with `ssh -i ~/ray_bootstrap_key.pem WORKER_IP`, no
    # proxy (Ray drops ssh_proxy_command from the head's config): the head's ssh_config gives the
    # worker's sshd port, and the key's path (ssh reads ~ as the user's home in the password
    # database, not as the head's HOME).
    head_home = tmp_path / "head-home"
    head = Sshd(
        tmp_path / "head",
        head_home,
        head_port,
        ssh_config=(
            f"Host {WORKER_IP}\n    Port {worker_port}\n    IdentityFile "
            f"{head_home / 'ray_bootstrap_key.pem'}\n"
        ),
    )
    worker = Sshd(
        tmp_path / "worker",
        tmp_path / "worker-home",
        worker_port,
        address=WORKER_IP,
        key=tmp_path / "head" / "client_key",
    )
    nodes = [head]
    try:
        start_private(head, monkeypatch)
        nodes.append(start_private(worker, monkeypatch, hide=(data,)))
        for node in nodes:
            provision(node, s3_server)
            assert {"/tmp", "/dev/shm", "/var/tmp", str(node.home)} <= tmpfs_mounts(node), tmpfs_mounts(node)
        assert str(data) in tmpfs_mounts(worker) and not list(
            inside(worker, data).iterdir()
        )  # no data files there
        assert (inside(head, data) / "resume" / "train.char.bmes").is_file()
        config = two_node_variant(
            yaml.safe_load(LOCAL_YAML.read_text()),
            sshd=head,
            ports=ports,
            worker_agent_port=worker_agent,
            name=name,
        )
        config_path = tmp_path / "local-two-nodes.yaml"
        config_path.write_text(yaml.safe_dump(config, sort_keys=False))
        try:
            run_search_and_lose_the_worker(tmp_path, config_path, ports, head, worker, data, s3_server)
        finally:
            down = tear_down(config_path, name, tmp_path)
        assert down.returncode == 0, tail(down.stdout)
        deadline = time.time() + 30
        while answers(ports["gcs"]) and time.time() < deadline:
            time.sleep(0.5)
        assert not answers(ports["gcs"]) and not answers(ports["dashboard"]), (
            "the head's Ray runs after ray down"
        )
        assert not answers(ports["mlflow"]), "MLflow runs after `server.sh --stop`"
    finally:
        for node in reversed(nodes):
            node.stop()  # and with it every process of the node's namespace
            assert node.process.poll() is not None and not node.processes()
        shutil.rmtree(ssh_control_dir(name), ignore_errors=True)
        with contextlib.suppress(OSError):
            ssh_control_dir(name).parent.rmdir()


def run_search_and_lose_the_worker(
    tmp_path: Path, config_path: Path, ports: dict, head: Sshd, worker: Sshd, data: Path, s3_server
) -> None:
    up = run([RAY, "up", "-y", "--no-config-cache", str(config_path)], timeout=240, log=tmp_path / "up.log")
    assert up.returncode == 0, tail(up.stdout)
    # The head as local.yaml sets it up: the repository synced to ~/softfine-tune (without
    # .gitignore'd files), Ray's GCS and dashboard and MLflow on the variant's ports.
    synced = inside(head, head.home / "softfine-tune")
    assert (synced / "tune" / "search.py").is_file()
    assert not (synced / ".venv").exists() and not (synced / ".git").exists()
    assert not (head.home / "softfine-tune").exists()  # in the head's own home, not on the test's disk
    assert answers(ports["gcs"]), tail(up.stdout)
    assert jobs_api_answers(ports["dashboard"]) and mlflow_health(ports["mlflow"]), tail(up.stdout)
    # The head's autoscaler sets the worker up over SSH (its log: the head's monitor.*).
    nodes = alive_nodes(ports["dashboard"], 2, timeout=240)
    # (session_latest links to /tmp/ray/..., the head's own view of its folder)
    monitor = "\n".join(
        tail(p.read_bytes(), 3000) for p in inside(head, "/tmp/ray").glob("session_2*/logs/monitor.*")
    )
    assert len(nodes) == 2, f"{len(nodes)} node(s) alive; the head's autoscaler:\n{monitor}"
    addresses = {n.node_ip: n for n in nodes}
    assert WORKER_IP in addresses and len(addresses) == 2, addresses  # two nodes, two addresses
    (head_ip,) = set(addresses) - {WORKER_IP}
    assert addresses[head_ip].is_head_node and not addresses[WORKER_IP].is_head_node
    assert (
        inside(worker, worker.home / "softfine-tune") / "tune" / "search.py"
    ).is_file()  # by the head's updater

    uri = f"http://127.0.0.1:{ports['mlflow']}"
    storage = s3_server.uri(f"two-nodes-{uuid.uuid4().hex[:8]}")
    experiment = f"{storage[len('s3://') :]}/{SEARCH_NAME}"
    commit = subprocess.run(
        ["git", "rev-parse", "HEAD"], check=False, cwd=REPO, capture_output=True, text=True
    ).stdout.strip()
    flags = small_search_flags(
        data,
        *GRID,
        "--epochs",
        str(EPOCHS),
        "--cpus-per-trial",
        "1",
        "--max-failures",
        "1",
        "--address",
        "auto",
        "--mlflow-uri",
        uri,
        "--experiment-name",
        EXPERIMENT,
        "--storage-path",
        str(storage),
        "--name",
        SEARCH_NAME,
    )
    env = ray_cli_env()
    job_log = tmp_path / "job.log"
    with open(job_log, "w") as log:
        job = subprocess.Popen(
            [
                RAY,
                "job",
                "submit",
                "--address",
                f"http://127.0.0.1:{ports['dashboard']}",
                "--working-dir",
                str(REPO),
                "--runtime-env-json",
                json.dumps({"env_vars": {"SOFTFINE_GIT_COMMIT": commit or "unknown"}}),
                "--",
                "python",
                "tune/search.py",
                *flags,
            ],
            cwd=REPO,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        killed: dict = {}
        try:
            kill_the_worker_mid_trial(s3_server, experiment, worker, job, killed)
            job.wait(timeout=300)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the search did not end within 300 s: {tail(job_log.read_text())}")
        finally:
            if job.poll() is None:
                os.killpg(job.pid, signal.SIGKILL)  # the CLI only: `ray down` ends the job
    output = job_log.read_text()
    assert "error" not in killed, f"{killed['error']}: {tail(output)}"
    print(f"killed the worker's raylet (pid {killed['pid']}) after steps {killed['steps']}")
    assert job.returncode == 0 and "succeeded" in output, tail(output)
    check_the_search(uri, s3_server, experiment, output, killed, head_ip)
    assert (
        inside(head, head.home / "softfine-mlflow") / "mlflow.db"
    ).is_file()  # the store `ray up`'s server made
    # The search's working folder is the head's own (~/.cache), the data never was on the worker.
    assert (
        inside(head, head.home / ".cache" / "softfine" / "searches" / "s3") / experiment / "summary.json"
    ).is_file()
    assert not list(inside(worker, data).iterdir())


def check_the_search(uri: str, s3_server, experiment: str, output: str, killed: dict, head_ip: str) -> None:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    (parent,) = parents(uri, EXPERIMENT)
    assert parent.info.status == "FINISHED", parent.info
    kids = children(uri, EXPERIMENT, parent.info.run_id)
    points = [(k.data.params["alpha_aug"], k.data.params["alpha_fea"], k.data.params["beta"]) for k in kids]
    assert len(kids) == 4 and len(set(points)) == 4, points  # every grid point, once
    assert all(k.info.status == "FINISHED" for k in kids), [(k.info.run_name, k.info.status) for k in kids]
    for kid in kids:  # every final checkpoint on S3, the retried trials' too
        assert kid.data.tags["softfine.checkpoint"].startswith(f"s3://{experiment}/trial_"), kid.data.tags
    by_trial = {k.data.tags["softfine.trial_id"]: k for k in kids}
    steps = {}
    for trial_id, kid in by_trial.items():
        history = [m.step for m in client.get_metric_history(kid.info.run_id, "dev_f1")]
        assert len(history) == len(set(history)) == EPOCHS, (trial_id, history)  # no step logged twice
        steps[trial_id] = sorted(history)
    assert len({tuple(s) for s in steps.values()}) == 1, steps  # every trial: every evaluation, once

    rows = {
        r["trial_id"]: r
        for r in csv.DictReader(
            io.StringIO(read_s3(s3_server, f"{experiment}/trials.csv").decode("utf-8"), newline="")
        )
    }
    summary = json.loads(read_s3(s3_server, f"{experiment}/summary.json"))
    retried = {r["trial_id"]: r for r in summary["retries"]}
    # The trials the worker ran when it died were retried, once each (and so was a trial it had just
    # started, if any: the per-trial checks below say it failed there before its first evaluation).
    assert set(killed["steps"]) <= set(retried) and len(summary["retries"]) == len(retried), (killed, retried)
    assert (
        parent.data.metrics["trials_retried"] == len(retried) and parent.data.metrics["trials_finished"] == 4
    )
    for trial_id, kid in by_trial.items():
        tags, row = kid.data.tags, rows[trial_id]
        assert tags["softfine.node_ip"] == row["node_ip"], (tags, row)  # where the trial ended
        if trial_id not in retried:
            assert tags["softfine.attempt"] == "1" and not row["retried_after"], (tags, row)
            continue
        retry = retried[trial_id]
        assert tags["softfine.attempt"] == "2" and row["node_ip"] == head_ip, (
            tags,
            row,
        )  # the remaining node
        assert "actor" in retry["error"].lower(), (
            retry
        )  # Ray's error: the trial's actor died or cannot be reached
        if retry["step"] is None:  # started on the worker, killed before its first evaluation
            assert retry["node_ip"] in ("", WORKER_IP) and "softfine.resumed_from_step" not in tags, (
                retry,
                tags,
            )
            described = (
                f"failed on {WORKER_IP} before its first evaluation: "
                if retry["node_ip"]
                else "failed before its first evaluation: "
            )
        else:  # failed on the worker after its last evaluation there, went on from that checkpoint
            assert retry["node_ip"] == WORKER_IP and retry["step"] >= killed["steps"].get(trial_id, 0), retry
            # From its last registered checkpoint: the failed attempt's last report may have reached the
            # driver while its checkpoint did not become the one to restore (MLflow logs that step once).
            assert (
                killed["steps"].get(trial_id, 0) <= int(tags["softfine.resumed_from_step"]) <= retry["step"]
            ), (tags, retry)
            described = f"failed on {WORKER_IP} after step {retry['step']}: "
        assert tags["softfine.retried_after"].startswith(described) and row["retried_after"].startswith(
            described
        )
        line = next(
            (x for x in output.splitlines() if f"retried from its last checkpoint: trial {trial_id}" in x), ""
        )
        assert described in line, tail(output)  # the printed summary says which trial, where and why
    # Trials ran on both nodes: where they ended, and where the retried ones failed.
    where = {r["node_ip"] for r in rows.values()} | {r["node_ip"] for r in retried.values() if r["node_ip"]}
    assert where == {head_ip, WORKER_IP}, where
