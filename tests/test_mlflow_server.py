"""mlflow/server.sh: real tracking servers on 127.0.0.1 with their stores in temporary folders.

* a foreground server, written to and read back over HTTP with MlflowClient, with an mlflow server
  option it does not know passed through, and its store private to its owner;
* a --daemon with --auth: 401 without credentials, 200 with the admin's, then --stop;
* stale pid files of server.sh that name an unrelated process: never killed;
* a table of bad inputs, each refused with one line on stderr;
* the mlflow/ folder never shadowing the library.
"""

from __future__ import annotations

import base64
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import NamedTuple

import psutil
import pytest
from tune_fixtures import free_port, processes_mentioning

import mlflow
from mlflow import MlflowClient

REPO = Path(__file__).resolve().parents[1]
SERVER = REPO / "mlflow" / "server.sh"
ADMIN_PASSWORD = "softfine-admin-0123"  # MLflow asks for at least 12 characters
SECRET_KEY = "softfine-test-secret-key"
SEARCH_API = "/api/2.0/mlflow/experiments/search?max_results=5"


def server_env(**extra: str) -> dict:
    env = {
        k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_") and k != "SOFTFINE_MLFLOW_STORE"
    }
    return {**env, "PYTHON": sys.executable, **extra}


def auth_env(**extra: str) -> dict:
    return server_env(
        MLFLOW_FLASK_SERVER_SECRET_KEY=SECRET_KEY, MLFLOW_AUTH_ADMIN_PASSWORD=ADMIN_PASSWORD, **extra
    )


def wait_health(url: str, proc: subprocess.Popen | None = None, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise AssertionError(f"{url}/health did not answer within {timeout}s")


def http_status(url: str, user: str | None = None, password: str | None = None) -> int:
    request = urllib.request.Request(url)
    if user is not None:
        token = base64.b64encode(f"{user}:{password}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    try:
        with urllib.request.urlopen(request, timeout=60) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def proc_identity(pid: int) -> tuple[str, str]:
    """(start time, command line) as the pid files record them: the command line's arguments each
    followed by a space, newlines as spaces."""
    # The start time in clock ticks since boot, field 22 of /proc/PID/stat, as server.sh reads it:
    # psutil gives it only as seconds since the epoch, through a boot time that moves with the clock.
    start = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[19]
    return start, "".join(f"{arg} " for arg in psutil.Process(pid).cmdline()).replace("\n", " ")


def assert_port_free(port: int) -> None:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", port))


def assert_private(store: Path) -> None:
    """The store folder 0700, nothing below it readable or writable by group or others."""
    assert store.stat().st_mode & 0o777 == 0o700, oct(store.stat().st_mode)
    loose = {
        str(p.relative_to(store)): oct(p.stat().st_mode & 0o777)
        for p in store.rglob("*")
        if p.stat().st_mode & 0o077
    }
    assert not loose, loose


def running(processes: list[psutil.Process]) -> list[psutil.Process]:
    """Those of `processes` still running (one that ended but is not yet reaped, a zombie, is gone)."""
    alive = []
    for process in processes:
        with contextlib.suppress(psutil.NoSuchProcess):
            if process.is_running() and process.status() != psutil.STATUS_ZOMBIE:
                alive.append(process)
    return alive


@pytest.fixture
def sleeper():
    """An unrelated process that stale pid files will name. It blocks the signals a stop sends
    first (TERM, INT, HUP), so that one sent to it stays pending, and names those pending for each
    line it reads (signals_sent_to)."""
    code = (
        "import signal, sys; signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT, "
        "signal.SIGHUP}); print('ready', flush=True); "
        "[print(*sorted(s.name for s in signal.sigpending()), flush=True) for _ in sys.stdin]"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout.readline() == "ready\n"
    yield proc
    proc.kill()
    proc.wait()
    proc.stdin.close()
    proc.stdout.close()


def signals_sent_to(sleeper: subprocess.Popen) -> list[str]:
    """The signals pending for the sleeper, by name, as it reports them (none: none was sent)."""
    assert psutil.Process(sleeper.pid).status() != psutil.STATUS_STOPPED  # it can answer
    sleeper.stdin.write("?\n")
    sleeper.stdin.flush()
    return sleeper.stdout.readline().split()


@pytest.fixture(autouse=True)
def quick_http(monkeypatch):
    # MLflow's client retries failed requests for minutes by default.
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "60")


# ---------------------------------------------------------------------------------------------
# A foreground server.


class Server:
    """`mlflow/server.sh --port PORT --store DIR ARGS` in the foreground, in its own process group,
    started from an unrelated working directory."""

    def __init__(self, store: Path, cwd: Path, *args: str, env: dict | None = None):
        self.store, self.port = store, free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.log = store.parent / f"{store.name}.log"
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(
                [str(SERVER), "--port", str(self.port), "--store", str(store), *args],
                cwd=cwd,
                env=env or server_env(),
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        try:
            wait_health(self.uri, self.proc)
        except AssertionError:
            self.stop()
            raise AssertionError(self.log.read_text()[-3000:]) from None

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


@pytest.fixture(scope="class")
def server(tmp_path_factory):
    base = tmp_path_factory.mktemp("mlflow-server")
    elsewhere = base / "cwd"
    elsewhere.mkdir()
    store = base / "store"
    store.mkdir(mode=0o755)  # an existing, world-readable store folder: made private on start
    store.chmod(0o755)
    # --x-frame-options is an mlflow server option that server.sh does not know: passed through.
    # MLflow's GenAI job runners (seven more processes, each importing mlflow) are of no use here
    # and slow a 2-core machine down; the daemon below keeps them.
    srv = Server(
        store,
        elsewhere,
        "--x-frame-options",
        "DENY",
        env=server_env(MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false"),
    )
    yield srv
    srv.stop()
    assert srv.proc.returncode is not None
    assert not list(elsewhere.iterdir())  # nothing written to the working directory


def log_and_read_back(uri: str, tmp_path: Path, name: str) -> tuple[str, str]:
    client = MlflowClient(tracking_uri=uri)
    experiment_id = client.create_experiment(name)
    run = client.create_run(experiment_id, run_name="trial-0")
    run_id = run.info.run_id
    client.log_param(run_id, "alpha_aug", "0.01")
    client.log_metric(run_id, "dev_f1", 0.625, step=1)
    client.log_metric(run_id, "dev_f1", 0.75, step=2)
    notes = tmp_path / f"{name}-notes.txt"
    notes.write_text("soft labels: 1 / beta^(miss + gamma * wrong)\n", encoding="utf-8")
    client.log_artifact(run_id, str(notes), artifact_path="reports")
    client.set_terminated(run_id)

    back = MlflowClient(tracking_uri=uri).get_run(run_id)
    assert back.data.params == {"alpha_aug": "0.01"}
    assert back.data.metrics == {"dev_f1": 0.75}
    history = client.get_metric_history(run_id, "dev_f1")
    assert [(m.step, m.value) for m in history] == [(1, 0.625), (2, 0.75)]
    assert back.info.status == "FINISHED"
    assert [a.path for a in client.list_artifacts(run_id, "reports")] == [f"reports/{notes.name}"]
    local = client.download_artifacts(run_id, f"reports/{notes.name}", str(tmp_path / f"{name}-down"))
    assert Path(local).read_text(encoding="utf-8") == notes.read_text(encoding="utf-8")
    return experiment_id, run_id


class TestForegroundServer:
    """One server for these tests, stopped after them (a second one would compete for the CPU)."""

    def test_logs_a_run_and_reads_it_back(self, server, tmp_path):
        experiment_id, run_id = log_and_read_back(server.uri, tmp_path, "server-roundtrip")
        # Served artifacts: the client sees mlflow-artifacts:/ URIs, the files land in STORE/artifacts.
        experiment = MlflowClient(tracking_uri=server.uri).get_experiment(experiment_id)
        assert experiment.artifact_location.startswith("mlflow-artifacts:/")
        assert list((server.store / "artifacts").rglob("server-roundtrip-notes.txt"))
        assert (server.store / "mlflow.db").is_file()

    def test_store_is_readable_by_its_owner_only(self, server, tmp_path):
        log_and_read_back(server.uri, tmp_path, "private-store")  # an artifact and its folders too
        assert list((server.store / "artifacts").rglob("private-store-notes.txt"))
        assert_private(server.store)

    def test_unknown_options_reach_mlflow_server(self, server):
        # server.sh execs mlflow server in the foreground: the process it started is the server itself.
        argv = psutil.Process(server.proc.pid).cmdline()
        assert argv[argv.index("--x-frame-options") + 1] == "DENY"
        with urllib.request.urlopen(f"{server.uri}/health", timeout=10) as r:
            assert r.headers["X-Frame-Options"] == "DENY"  # MLflow's default is SAMEORIGIN

    def test_second_start_on_a_busy_port_fails_clearly(self, server, tmp_path, adopting_orphans):
        result = subprocess.run(
            [str(SERVER), "--port", str(server.port), "--store", str(tmp_path / "other")],
            cwd=tmp_path,
            env=server_env(),
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode != 0
        assert result.stderr.strip() == (
            f"mlflow/server.sh: port {server.port} on 127.0.0.1 is already in use "
            "(another server? choose one with --port)"
        )
        # Refused before starting MLflow: no server of that store, and no store database, which
        # MLflow creates as it starts.
        assert not processes_mentioning(str(tmp_path / "other"))
        assert not (tmp_path / "other" / "mlflow.db").exists()
        wait_health(server.uri)  # the running server is untouched


def test_help_lists_the_scripts_own_options(tmp_path):
    shown = subprocess.run(
        [str(SERVER), "--help"], cwd=tmp_path, env=server_env(), capture_output=True, text=True, timeout=30
    )
    assert shown.returncode == 0 and not shown.stderr
    for option in (
        "--store",
        "--prod",
        "--auth",
        "--daemon",
        "--stop",
        "--timeout",
        "MLFLOW_BACKEND_STORE_URI",
        "MLFLOW_FLASK_SERVER_SECRET_KEY",
        "mlflow server --help",
        "MLFLOW_ARTIFACTS_DESTINATION",
        "--artifacts-destination s3://",
        "AWS_ENDPOINT_URL",
    ):
        assert option in shown.stdout, option


# ---------------------------------------------------------------------------------------------
# A daemon with basic authentication.


class Daemon(NamedTuple):
    store: Path
    port: int
    uri: str
    started: subprocess.CompletedProcess
    sleeper: subprocess.Popen


@pytest.fixture(scope="class")
def auth_daemon(tmp_path_factory):
    base = tmp_path_factory.mktemp("mlflow-auth")
    store, port = base / "store", free_port()
    store.mkdir()
    # A pid file left by an older server.sh (pid only) whose pid now belongs to an unrelated process:
    # --daemon must neither kill nor keep it.
    sleeper = subprocess.Popen(["sleep", "300"])
    (store / "server.pid").write_text(f"{sleeper.pid}\n")
    started = subprocess.run(
        [str(SERVER), "--daemon", "--auth", "--port", str(port), "--store", str(store)],
        cwd=base,
        env=auth_env(),
        capture_output=True,
        text=True,
        timeout=200,
    )
    try:
        assert started.returncode == 0, started.stderr
        yield Daemon(store, port, f"http://127.0.0.1:{port}", started, sleeper)
    finally:
        if (store / "server.pid").exists():  # a test failed before the stop test
            subprocess.run([str(SERVER), "--stop", "--store", str(store)], env=server_env(), timeout=60)
        sleeper.kill()
        sleeper.wait()


class TestAuthDaemon:
    """One daemon for these tests; the last one stops it (pytest runs them in the order written)."""

    def test_auth_refuses_anonymous_requests_and_admits_the_admin(self, auth_daemon):
        assert http_status(auth_daemon.uri + SEARCH_API) == 401
        assert http_status(auth_daemon.uri + SEARCH_API, "admin", "not-the-password") == 401
        assert http_status(auth_daemon.uri + SEARCH_API, "admin", ADMIN_PASSWORD) == 200
        assert http_status(auth_daemon.uri + "/health") == 200  # what --daemon waits for

    def test_daemon_start_spares_the_process_a_stale_pid_file_names(self, auth_daemon):
        assert auth_daemon.sleeper.poll() is None
        assert f"removed the stale {auth_daemon.store / 'server.pid'}" in auth_daemon.started.stderr
        assert "running in the background" in auth_daemon.started.stderr
        # The new pid file names the server: pid, start time, command line.
        pid, start, cmdline = (auth_daemon.store / "server.pid").read_text().split("\n")[:3]
        assert (start, cmdline) == proc_identity(int(pid)) and " -m mlflow server " in cmdline

    def test_daemon_store_is_readable_by_its_owner_only(self, auth_daemon):
        for name in ("mlflow.db", "basic_auth.db", "basic_auth.ini", "server.log", "server.pid"):
            assert (auth_daemon.store / name).is_file(), name
        assert_private(auth_daemon.store)

    def test_stop_stops_the_daemon_it_started(self, auth_daemon):
        """The last test of the class: the daemon is gone afterwards."""
        pid = int((auth_daemon.store / "server.pid").read_text().split("\n")[0])
        # The daemon and what it started (uvicorn, MLflow's job runners: its process group).
        daemon = psutil.Process(pid)
        tree = [daemon, *daemon.children(recursive=True)]
        stopped = subprocess.run(
            [str(SERVER), "--stop", "--store", str(auth_daemon.store)],
            env=server_env(),
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert stopped.returncode == 0, stopped.stderr
        assert (
            stopped.stdout.strip()
            == f"mlflow/server.sh: stopped the server of {auth_daemon.store} (pid {pid})"
        )
        assert not (auth_daemon.store / "server.pid").exists()
        assert not running(tree), running(tree)
        assert_port_free(auth_daemon.port)
        assert auth_daemon.sleeper.poll() is None


# ---------------------------------------------------------------------------------------------
# Stale pid files never stop a stranger.

STALE_PID_FILES = {
    "pid-only": lambda pid, start, cmdline: f"{pid}\n",
    "pid-reused": lambda pid, start, cmdline: f"{pid}\n{int(start) - 1}\n{cmdline}\n",
    "another-command": lambda pid, start, cmdline: f"{pid}\n{start}\n/usr/bin/python3 -m mlflow server \n",
}


@pytest.mark.parametrize("kind", STALE_PID_FILES)
def test_stop_spares_the_process_a_stale_pid_file_names(kind, sleeper, tmp_path):
    pidfile = tmp_path / "server.pid"
    pidfile.write_text(STALE_PID_FILES[kind](sleeper.pid, *proc_identity(sleeper.pid)))
    result = subprocess.run(
        [str(SERVER), "--stop", "--store", str(tmp_path)],
        env=server_env(),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 1
    assert result.stderr.startswith(f"mlflow/server.sh: --stop: {pidfile} is stale (")
    assert result.stderr.strip().endswith("removed it, stopped nothing") and result.stderr.count("\n") == 1
    assert not pidfile.exists()
    assert sleeper.poll() is None and signals_sent_to(sleeper) == []  # not signalled, let alone killed


# ---------------------------------------------------------------------------------------------
# Bad input: one line on stderr, naming the flag or file, and a non-zero exit.


class Bad(NamedTuple):
    args: list[str]
    names: list[str]  # what the one line must mention; {store} {port} are filled in
    env: dict = {}
    setup: str | None = None  # "stale-pid", "busy-port", "store-is-file", "python-without-mlflow"


BAD_INPUT = {
    # this script's own options
    "timeout-not-a-number": Bad(["--timeout", "soon"], ["--timeout", "'soon'"]),
    "timeout-zero": Bad(["--timeout=0"], ["--timeout"]),
    "store-missing-value": Bad(["--store"], ["--store needs a value"]),
    "store-is-a-file": Bad([], ["--store {store}", "not a folder"], setup="store-is-file"),
    "stop-without-daemon": Bad(["--stop"], ["--stop", "no server of {store}"]),
    "stop-with-stale-pid-file": Bad(["--stop"], ["--stop", "{store}/server.pid is stale"], setup="stale-pid"),
    "stop-and-daemon": Bad(["--stop", "--daemon"], ["--stop and --daemon"]),
    "stop-with-a-server-option": Bad(["--stop", "--port", "5000"], ["--stop takes only --store", "--port"]),
    # the environment of --prod and --auth
    "prod-without-backend-uri": Bad(["--prod"], ["--prod", "MLFLOW_BACKEND_STORE_URI"]),
    "prod-with-sqlite-uri": Bad(
        ["--prod"],
        ["--prod", "MLFLOW_BACKEND_STORE_URI must be a postgresql://"],
        env={"MLFLOW_BACKEND_STORE_URI": "sqlite:///x.db"},
    ),
    "auth-without-secret-key": Bad(["--auth"], ["--auth", "MLFLOW_FLASK_SERVER_SECRET_KEY"]),
    "auth-first-start-without-admin-password": Bad(
        ["--auth"],
        ["--auth", "MLFLOW_AUTH_ADMIN_PASSWORD"],
        env={"MLFLOW_FLASK_SERVER_SECRET_KEY": SECRET_KEY},
    ),
    "auth-config-path-missing": Bad(
        ["--auth"],
        ["--auth", "MLFLOW_AUTH_CONFIG_PATH", "/nonexistent/auth.ini"],
        env={
            "MLFLOW_FLASK_SERVER_SECRET_KEY": SECRET_KEY,
            "MLFLOW_AUTH_CONFIG_PATH": "/nonexistent/auth.ini",
        },
    ),
    "python-missing": Bad([], ["/nonexistent/python3", "$PYTHON"], env={"PYTHON": "/nonexistent/python3"}),
    "python-without-mlflow": Bad([], ["mlflow is not installed", "$PYTHON"], setup="python-without-mlflow"),
    # mlflow server's own options, checked by mlflow server's parser, the address by this script
    "host-0.0.0.0-without-auth": Bad(["--host", "0.0.0.0"], ["--host 0.0.0.0", "--auth"]),
    "port-missing-value": Bad(["--port"], ["--port", "requires an argument"]),
    "port-out-of-range": Bad(["--port", "99999"], ["--port must be 1..65535, got '99999'"]),
    "unknown-option": Bad(["--frobnicate"], ["--frobnicate"]),
    "daemon-port-in-use": Bad(
        ["--daemon", "--port", "{port}"], ["port {port}", "already in use", "--port"], setup="busy-port"
    ),
    "daemon-health-timeout": Bad(
        ["--daemon", "--timeout", "1", "--port", "{port}"], ["--timeout 1", "/health", "{store}/server.log"]
    ),
}


@pytest.mark.parametrize("case", BAD_INPUT.values(), ids=BAD_INPUT.keys())
def test_bad_input_is_refused_in_one_line(case, tmp_path, sleeper, adopting_orphans):
    store, port = tmp_path / "store", free_port()
    env = server_env(**case.env)
    busy = None
    if case.setup == "store-is-file":
        store.write_text("not a folder\n")
    elif case.setup == "stale-pid":
        store.mkdir()
        (store / "server.pid").write_text(f"{sleeper.pid}\n")
    elif case.setup == "busy-port":
        busy = socket.socket()
        busy.bind(("127.0.0.1", port))
        busy.listen()
    elif case.setup == "python-without-mlflow":  # this interpreter without its site-packages
        wrapper = tmp_path / "python-bare"
        wrapper.write_text(f'#!/bin/sh\nexec "{sys.executable}" -S "$@"\n')
        wrapper.chmod(0o755)
        env["PYTHON"] = str(wrapper)
    fill = {"store": store, "port": port}
    args = [a.format(**fill) for a in case.args]
    try:
        result = subprocess.run(
            [str(SERVER), "--store", str(store), *args],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
    finally:
        if busy is not None:
            busy.close()
    assert result.returncode != 0
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("mlflow/server.sh: "), result.stderr
    for name in case.names:
        assert name.format(**fill) in lines[0], (name, lines[0])
    assert "Traceback" not in result.stdout + result.stderr
    # Nothing was left running, and nothing else was touched.
    assert not processes_mentioning(str(store))
    assert not (store / "server.pid").exists()
    assert sleeper.poll() is None


def test_mlflow_folder_never_shadows_the_library():
    assert not list((REPO / "mlflow").rglob("__init__.py"))
    assert Path(mlflow.__file__).resolve().parent != (REPO / "mlflow").resolve()
    # From the repo root, where ./mlflow is on sys.path first, the library still wins.
    probe = subprocess.run(
        [
            sys.executable,
            "-c",
            "import mlflow; print(mlflow.__file__); print(mlflow.__version__); "
            "from mlflow import MlflowClient",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert probe.returncode == 0, probe.stderr
    path, version = probe.stdout.split()
    assert not Path(path).resolve().is_relative_to(REPO / "mlflow") and version == mlflow.__version__
