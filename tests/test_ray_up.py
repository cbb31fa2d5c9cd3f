"""cluster/local.yaml on this machine: its nodes, the variant of the file they run, and the Ray
commands of cluster/README.md. tests/test_two_nodes.py runs a cluster of two with them: `ray up`
over SSH, a search submitted as a Ray job, its runs in the MLflow server on the head, a node lost,
`ray down`.

A node (`Sshd`) is OpenSSH's sshd as the current user on a loopback address (a free port, a
throwaway host key, a throwaway client key authorised in a temporary folder), the first process of
a PID and mount namespace of its own: the `ray stop` that local.yaml's start commands and `ray
down` run in it stops that node's Ray, never another Ray process of the user's, and its /tmp/ray
is its own. Its HOME (sshd's `SetEnv HOME=...`) is a temporary folder, so ~/softfine-tune,
~/softfine-venv, ~/softfine-mlflow and ~/.bashrc of a node never touch the real home.
`head_only_variant` writes the variant of cluster/local.yaml with this machine as its head: it
differs from the file only in addresses, ports and SSH settings (the function says exactly what),
plus setup commands that link this checkout's virtual environment instead of pip-installing from
PyPI. As in cluster/README.md:

    RAY_UP_enable_autoscaler_v2=0 ray up -y VARIANT.yaml   # SSH + rsync to the head, setup,
                                                           # `ray start --head`, mlflow/server.sh
    ray job submit --address http://127.0.0.1:DASHBOARD --working-dir REPO -- python tune/search.py ...
    ray exec VARIANT.yaml '~/softfine-tune/mlflow/server.sh --stop --store ~/softfine-mlflow'
    ray down -y VARIANT.yaml                               # `ray stop` on the head, over SSH

Needs OpenSSH's server and rsync (Ray's launcher copies files with it), `apt-get install -y
openssh-server rsync`, Ray's full dashboard in this venv (the Jobs API that `ray job submit`
uses), `pip install "ray[default]"`, as local.yaml installs on a head, and root (the namespaces);
.ci/run installs all three and runs as root. Without them the tests are skipped, except in CI (CI
set), where they fail; an sshd that is installed but does not start or let the test in is always
a failure.
"""

from __future__ import annotations

import contextlib
import copy
import getpass
import hashlib
import os
import pwd
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml
from tune_fixtures import REPO, descendants, stop_group

LOCAL_YAML = REPO / "cluster" / "local.yaml"
VENV = Path(sys.prefix)  # this checkout's virtual environment: the head's ~/softfine-venv
RAY = str(Path(sys.executable).with_name("ray"))
SSHD = shutil.which("sshd") or "/usr/sbin/sshd"
UNSHARE = shutil.which("unshare") or "/usr/bin/unshare"
DEFAULT_PORTS = ("6379", "8265", "10001", "52365", "5000")  # GCS, dashboard, client, agent, MLflow
# `ray up` as cluster/README.md runs it: with Ray's autoscaler v1 on the head. Ray 2.60's `ray up`
# starts v2 by default, which never sets up the workers of the local provider (tests/test_two_nodes.py:
# it logs "Adding 1 node(s)" every 5 s and launches none; v1 records the head in the provider's state
# on the head first, v2 does not).
RAY_UP_ENV = {"RAY_UP_enable_autoscaler_v2": "0"}

# ssh's ProxyCommand: stdin/stdout <-> a TCP connection. Ray's local provider has no SSH port
# setting (auth: ssh_user, ssh_private_key, ssh_proxy_command), so this carries the connection to
# sshd's port. Ray hands the option to rsync's --rsh too, which splits it on spaces and knows no
# backslashes: the command is plain words (checked in `Sshd.start`).
PROXY = """\
import os, socket, sys, threading
conn = socket.create_connection((sys.argv[1], int(sys.argv[2])))
def upstream():
    while data := os.read(0, 1 << 16):
        conn.sendall(data)
    conn.shutdown(socket.SHUT_WR)
threading.Thread(target=upstream, daemon=True).start()
while data := conn.recv(1 << 16):
    view = memoryview(data)
    while view:
        view = view[os.write(1, view):]
"""


# A node's namespace, set up before sshd replaces the shell as its first process: /tmp/ray is the
# node's own folder ($1), /etc/ssh/ssh_config the node's ($2, if given).
NODE_SCRIPT = """set -e
mkdir -p /tmp/ray
mount --bind "$1" /tmp/ray
if [ -n "$2" ]; then mount --bind "$2" /etc/ssh/ssh_config; fi
shift 2
exec "$@"
"""


def needed_tools() -> None:
    """sshd, rsync, Ray's full dashboard, and namespaces for the nodes (root and util-linux's
    unshare): skipped where absent, but a failure in CI (.ci/run installs them, as root)."""
    tools = (
        ("sshd", SSHD, "apt-get install -y openssh-server"),
        ("rsync", shutil.which("rsync"), "apt-get install -y rsync"),
        ("unshare", UNSHARE, "apt-get install -y util-linux"),
    )
    missing = [
        f"{name} is not installed ({how})"
        for name, path, how in tools
        if not path or not os.access(path, os.X_OK)
    ]
    if os.geteuid() != 0:  # a PID and mount namespace per node (Sshd) takes CAP_SYS_ADMIN
        missing.append("the nodes' namespaces (unshare --pid --mount) need root")
    try:  # what `ray job submit` talks to: the dashboard's Jobs API, absent from the minimal dashboard
        import ray.dashboard.optional_deps  # noqa: F401
    except ImportError as err:
        missing.append(
            f"Ray's full dashboard is not installed ({err}; pip install 'ray[default]', as "
            "cluster/local.yaml does on the head)"
        )
    if missing:
        if os.environ.get("CI"):
            pytest.fail(f"{'; '.join(missing)}: .ci/run installs them")
        pytest.skip("; ".join(missing))


def ray_client_installed() -> bool:
    """Whether Ray Client's dependencies are installed (the head's venv is this one): then `ray
    start --head` starts a client server, on 10001 unless told otherwise."""
    from ray._private.utils import get_ray_client_dependency_error

    return get_ray_client_dependency_error() is None


def free_ports(n: int) -> list[int]:
    """n distinct free ports on 127.0.0.1 (all held open until all are chosen)."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(n)]
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]


def answers(port: int, timeout: float = 2) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=timeout):
        return True
    return False


def tail(text: str | bytes, n: int = 6000) -> str:
    if isinstance(text, bytes):
        text = text.decode(errors="replace")
    return text[-n:]


class Sshd:
    """A node: OpenSSH's sshd as the current user on address:port, in the foreground (-D), for one
    client key (its own, or `key` shared with another node); sessions get HOME=home.

    sshd is the first process of a PID and mount namespace of its own (`unshare`), as if it were
    a machine of its own: what runs in its sessions sees only the node's processes (so the `ray
    stop` of cluster/local.yaml's commands and of `ray down` stops this node's Ray and nothing else
    of the user's), has /tmp/ray in `folder`/tmp-ray (Ray's sessions, per node as on separate
    machines) and, with `ssh_config`, that text as /etc/ssh/ssh_config (how the head reaches a
    worker's sshd port). Stopping it ends every process started in it: the kernel kills a PID
    namespace's processes when its first one exits."""

    def __init__(
        self,
        folder: Path,
        home: Path,
        port: int,
        address: str = "127.0.0.1",
        key: Path | None = None,
        ssh_config: str | None = None,
    ):
        self.folder, self.home, self.port, self.address = folder, home, port, address
        self.user = pwd.getpwuid(os.getuid()).pw_name
        self.key = key or folder / "client_key"
        self.ssh_config = ssh_config
        self.proxy = folder / "ssh_proxy.py"
        self.log_path = folder / "sshd.log"
        self.tmp_ray = folder / "tmp-ray"  # the node's /tmp/ray
        self.process: subprocess.Popen | None = None

    def start(self, timeout: float = 30) -> Sshd:
        self.folder.mkdir(parents=True)
        self.home.mkdir(parents=True)
        self.tmp_ray.mkdir()
        for key in ("host_key", "client_key") if self.key == self.folder / "client_key" else ("host_key",):
            subprocess.run(
                [
                    "ssh-keygen",
                    "-q",
                    "-t",
                    "ed25519",
                    "-N",
                    "",
                    "-C",
                    f"softfine-test-{key}",
                    "-f",
                    str(self.folder / key),
                ],
                check=True,
                capture_output=True,
            )
        authorized = self.folder / "authorized_keys"
        authorized.write_text(self.key.with_suffix(".pub").read_text())
        authorized.chmod(0o600)
        self.proxy.write_text(PROXY)
        if re.search(r"[\s'\"\\]", f"{sys.executable}{self.proxy}"):
            pytest.fail(
                f"the ProxyCommand must be plain words for rsync's --rsh (no spaces, quotes or backslashes): "
                f"{self.proxy_command()}"
            )
        config = self.folder / "sshd_config"
        config.write_text(
            "\n".join(
                [
                    f"ListenAddress {self.address}:{self.port}",
                    f"HostKey {self.folder / 'host_key'}",
                    f"PidFile {self.folder / 'sshd.pid'}",
                    f"AuthorizedKeysFile {authorized}",
                    f"AllowUsers {self.user}",
                    "StrictModes no",  # the temporary folders are not checked like a home's ~/.ssh
                    "UsePAM no",
                    "PubkeyAuthentication yes",
                    "PasswordAuthentication no",
                    "KbdInteractiveAuthentication no",
                    "PermitRootLogin prohibit-password",  # keys only, where the current user is root
                    "X11Forwarding no",
                    "PrintMotd no",
                    "MaxStartups 50",
                    "MaxSessions 50",
                    "LogLevel VERBOSE",
                    # The head's home: a temporary folder, not the user's. SetEnv overrides sshd's HOME.
                    f"SetEnv HOME={self.home} RAY_USAGE_STATS_ENABLED=0",
                    "",
                ]
            )
        )
        if os.geteuid() == 0 and not Path("/run/sshd").is_dir():
            # sshd started as root wants its privilege separation folder, which Debian's ssh
            # service creates when it starts (and apt-get install, in a container, does not).
            Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
        checked = subprocess.run([SSHD, "-t", "-f", str(config)], check=False, capture_output=True, text=True)
        if checked.returncode != 0:
            pytest.fail(f"sshd refuses the test's configuration: {checked.stderr.strip()}")
        ssh_config = ""
        if self.ssh_config is not None:
            ssh_config = str(self.folder / "ssh_config")
            Path(ssh_config).write_text(self.ssh_config)
        self.log = open(self.log_path, "ab")  # noqa: SIM115 - sshd writes to it until stop() closes it
        # An absolute path: sshd re-executes itself for every connection. --kill-child: the
        # namespace (sshd first) goes with unshare; the mounts stay inside it (private propagation).
        self.process = subprocess.Popen(
            [
                UNSHARE,
                "--pid",
                "--fork",
                "--kill-child",
                "--mount-proc",
                "--",
                "sh",
                "-c",
                NODE_SCRIPT,
                "node",
                str(self.tmp_ray),
                ssh_config,
                SSHD,
                "-D",
                "-e",
                "-f",
                str(config),
            ],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        listening = f"Server listening on {self.address} port {self.port}"
        deadline = time.time() + timeout
        while listening not in self.log_path.read_text(errors="replace"):
            if self.process.poll() is not None:
                self.fail(f"sshd exited with status {self.process.returncode}")
            if time.time() > deadline:
                self.fail(f"sshd did not listen on {self.address}:{self.port} within {timeout} s")
            time.sleep(0.2)
        # In, with the client key, the way Ray connects; the session's HOME is the test's, and it
        # sees only the node's processes (sshd, the session's shell and ps: never 4 or more).
        try:
            login = subprocess.run(
                [
                    "ssh",
                    *self.options(),
                    "-o",
                    "ConnectTimeout=30",
                    f"{self.user}@{self.address}",
                    "echo $HOME; ps -e -o pid= | wc -l",
                ],
                check=False,
                capture_output=True,
                text=True,
                timeout=60,
            )
        except subprocess.TimeoutExpired:
            self.fail("ssh to the test's sshd did not finish within 60 s")
        home, _, processes = login.stdout.strip().partition("\n")
        if login.returncode != 0 or home != str(self.home):
            self.fail(
                f"ssh to the test's sshd failed (status {login.returncode}, printed {login.stdout!r}): "
                f"{login.stderr.strip()}"
            )
        if not processes.strip().isdigit() or int(processes) > 8:
            self.fail(
                f"the node's sessions see {processes.strip()!r} processes: not a PID namespace of its own"
            )
        return self

    def processes(self) -> dict[int, str]:
        """The node's processes (pid as this test sees them: command line)."""
        return descendants(self.process.pid) if self.process is not None else {}

    def proxy_command(self) -> str:
        return f"{sys.executable} {self.proxy} %h {self.port}"

    def options(self) -> list[str]:
        return [
            "-i",
            str(self.key),
            "-o",
            "IdentitiesOnly=yes",
            "-o",
            "BatchMode=yes",
            "-o",
            "StrictHostKeyChecking=no",
            "-o",
            f"UserKnownHostsFile={os.devnull}",
            "-o",
            f"ProxyCommand={self.proxy_command()}",
        ]

    def fail(self, message: str) -> None:
        self.stop()
        pytest.fail(f"{message}; sshd's log:\n{tail(self.log_path.read_bytes())}")

    def stop(self) -> None:
        """Stops the node: unshare and sshd (their process group), and with them every process of
        the node's namespace (the SSH sessions, and whatever Ray or MLflow left running)."""
        if self.process is None:
            return
        stop_group(self.process, timeout=10)
        self.log.close()


def head_only_variant(base: dict, *, sshd: Sshd, ports: dict[str, int], name: str) -> dict:
    """cluster/local.yaml with this machine as its only node. What changes:

    * cluster_name (unique: Ray keeps a local cluster's state in /tmp/ray/cluster-NAME.state);
    * provider: head_ip 127.0.0.1, no worker_ips; min_workers = max_workers = 0;
    * auth: the current user, the throwaway key, and a ProxyCommand to sshd's port;
    * setup_commands: ~/softfine-venv is a link to this checkout's venv; the `pip install` lines,
      which would download from PyPI (and reinstall this project into that venv), are left out;
    * ports: Ray's GCS, dashboard, dashboard agent, client server (where ray[client] is installed)
      and MLflow on free ports instead of 6379, 8265, 52365, 10001 and 5000; `ray start --head` also gets
      --node-ip-address=127.0.0.1 (which Ray 2.60 replaces with the machine's own address: it never
      registers a node as loopback; SSH, the dashboard and MLflow stay on 127.0.0.1).

    Everything else (file_mounts, rsync filters, the other commands, mlflow/server.sh and its
    options) is the file's own."""
    config = copy.deepcopy(base)
    config["cluster_name"] = name
    config["provider"].update(head_ip="127.0.0.1", worker_ips=[])
    config["min_workers"] = config["max_workers"] = 0
    config["auth"] = {
        "ssh_user": sshd.user,
        "ssh_private_key": str(sshd.key),
        "ssh_proxy_command": sshd.proxy_command(),
    }

    pip = [c for c in config["setup_commands"] if "pip install" in c]
    assert pip, "cluster/local.yaml no longer pip-installs in setup_commands: update head_only_variant"
    config["setup_commands"] = [f"ln -sfn {shlex.quote(str(VENV))} ~/softfine-venv"] + [
        c for c in config["setup_commands"] if "pip install" not in c
    ]

    def relocate(command: str) -> str:
        for old, new in (
            (r"--port=6379\b", f"--port={ports['gcs']}"),
            (r"\$RAY_HEAD_IP:6379\b", f"$RAY_HEAD_IP:{ports['gcs']}"),
            (r"--port 5000\b", f"--port {ports['mlflow']}"),
        ):
            command = re.sub(old, new, command)
        if "ray start --head" in command:
            command += (
                f" --node-ip-address=127.0.0.1 --dashboard-port={ports['dashboard']}"
                f" --dashboard-agent-listen-port={ports['agent']}"
            )
            # `ray start` refuses the port without ray[client] (and then starts none)
            if ray_client_installed():
                command += f" --ray-client-server-port={ports['client']}"
        return command

    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        config[key] = [relocate(c) for c in config[key]]
    head = config["head_start_ray_commands"]
    assert len([c for c in head if "ray start --head" in c and f"--port={ports['gcs']}" in c]) == 1, head
    assert len([c for c in head if "mlflow/server.sh" in c and f"--port {ports['mlflow']}" in c]) == 1, head
    commands = [
        c
        for k in ("setup_commands", "head_start_ray_commands", "worker_start_ray_commands")
        for c in config[k]
    ]
    left = [c for c in commands for p in DEFAULT_PORTS if re.search(rf"(?<![\d]){p}(?![\d])", c)]
    assert not left, f"a default port left in the variant (update head_only_variant): {left}"
    return config


def ray_cli_env() -> dict[str, str]:
    """The environment of the test's Ray commands: no MLflow or Ray address of the user's, and the
    v1 autoscaler on the head (RAY_UP_ENV)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "RAY_ADDRESS"))}
    env.update(RAY_USAGE_STATS_ENABLED="0", PYTHONUNBUFFERED="1", **RAY_UP_ENV)
    return env


def run(command: list[str], *, timeout: float, log: Path, cwd: Path = REPO) -> subprocess.CompletedProcess:
    """Runs a Ray CLI command from the repository root; its output (stdout and stderr) also goes to
    `log`, and a timeout is a test failure that shows it."""
    env = ray_cli_env()
    started = time.time()
    try:
        done = subprocess.run(
            command,
            check=False,
            cwd=cwd,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired as err:
        log.write_text(
            err.output.decode(errors="replace") if isinstance(err.output, bytes) else err.output or ""
        )
        pytest.fail(
            f"`{' '.join(command[:3])} ...` did not finish within {timeout:g} s: {tail(log.read_text())}"
        )
    log.write_text(done.stdout)
    print(f"{' '.join(command[:3])}: status {done.returncode} in {time.time() - started:.0f} s (log: {log})")
    return done


def ssh_control_dir(cluster_name: str) -> Path:
    """Where Ray's SSH command runner keeps the ControlMaster sockets of a cluster."""
    from ray.autoscaler._private.command_runner import HASH_MAX_LENGTH

    user, cluster = (
        hashlib.sha256(text.encode()).hexdigest()[:HASH_MAX_LENGTH]
        for text in (getpass.getuser(), cluster_name)
    )
    return Path(f"/tmp/ray_ssh_{user}/{cluster}")


def jobs_api_answers(port: int, timeout: float = 60) -> bool:
    """Waits for the dashboard's Jobs API (`ray start` returns before the dashboard serves)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        with (
            contextlib.suppress(OSError),
            urllib.request.urlopen(f"http://127.0.0.1:{port}/api/version", timeout=5) as r,
        ):
            if r.status == 200:
                return True
        time.sleep(1)
    return False


def mlflow_health(port: int) -> bool:
    with (
        contextlib.suppress(OSError),
        urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as r,
    ):
        return r.status == 200
    return False


STOP_MLFLOW = "~/softfine-tune/mlflow/server.sh --stop --store ~/softfine-mlflow"  # as cluster/README.md does


def tear_down(config_path: Path, name: str, folder: Path) -> subprocess.CompletedProcess:
    """What cluster/README.md does at the end: the tracking server that head_start_ray_commands
    started stopped on the head (`ray exec`: Ray does not stop it), then `ray down -y`; then the
    local provider's record of the cluster. Never raises: every step runs."""
    with contextlib.suppress(Exception, pytest.fail.Exception):
        run([RAY, "exec", str(config_path), STOP_MLFLOW], timeout=120, log=folder / "stop-mlflow.log")
    try:
        down = run([RAY, "down", "-y", str(config_path)], timeout=120, log=folder / "down.log")
    except (Exception, pytest.fail.Exception) as err:  # reported by the assertion on its status
        down = subprocess.CompletedProcess(["ray", "down"], returncode=-1, stdout=f"ray down: {err!r}")
    for suffix in ("state", "lock"):
        with contextlib.suppress(OSError):
            Path(f"/tmp/ray/cluster-{name}.{suffix}").unlink()
    return down


def test_head_only_variant_differs_from_local_yaml_only_where_it_says(tmp_path):
    """The variant the next test runs, checked without SSH: Ray's launcher bootstrap accepts it,
    and it differs from cluster/local.yaml in the keys head_only_variant lists and nowhere else."""
    from ray.autoscaler._private.commands import _bootstrap_config

    base = yaml.safe_load(LOCAL_YAML.read_text())
    ports = dict(zip(("gcs", "dashboard", "client", "agent", "mlflow"), free_ports(5)))
    sshd = Sshd(tmp_path / "sshd", tmp_path / "home", free_ports(1)[0])
    variant = head_only_variant(base, sshd=sshd, ports=ports, name="softfine-local-test-check")
    changed = {k for k in set(base) | set(variant) if base.get(k) != variant.get(k)}
    assert changed == {
        "cluster_name",
        "provider",
        "auth",
        "min_workers",
        "max_workers",
        "setup_commands",
        "head_start_ray_commands",
        "worker_start_ray_commands",
    }
    assert variant["provider"] == {"type": "local", "head_ip": "127.0.0.1", "worker_ips": []}
    assert variant["file_mounts"] == {"~/softfine-tune": "."} and variant["rsync_filter"] == [".gitignore"]
    assert not [c for c in variant["setup_commands"] if "pip" in c]

    # The head commands are local.yaml's, word for word, apart from ports and addresses.
    def words(commands):
        return [re.sub(r"\d+", "N", c).split() for c in commands]

    head, variant_head = words(base["head_start_ray_commands"]), words(variant["head_start_ray_commands"])
    assert len(head) == len(variant_head)
    for original, changed_command in zip(head, variant_head):
        added = changed_command[len(original) :]
        assert changed_command[: len(original)] == original
        assert all(
            w.startswith(
                (
                    "--node-ip-address=",
                    "--dashboard-port=",
                    "--ray-client-server-port=",
                    "--dashboard-agent-listen-port=",
                )
            )
            for w in added
        ), added
    resolved = _bootstrap_config(copy.deepcopy(variant), no_config_cache=True)
    (node_type,) = resolved["available_node_types"].values()
    assert node_type["min_workers"] == node_type["max_workers"] == 0
    assert resolved["auth"]["ssh_proxy_command"].endswith(f" %h {sshd.port}")
