"""mlflow/server.sh: a real tracking server on 127.0.0.1 with its stores in a temporary folder,
written to and read back over HTTP with MlflowClient; its errors; its daemon mode behind the
port forwarder the cluster configs use; and the mlflow/ folder never shadowing the library."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import mlflow
import pytest
from mlflow import MlflowClient

REPO = Path(__file__).resolve().parents[1]
SERVER = REPO / "mlflow" / "server.sh"
FORWARDER = REPO / "cluster" / "forward_port.py"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_") and k != "SOFTFINE_MLFLOW_STORE"}
    return {**env, "PYTHON": sys.executable, **extra}


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


class Server:
    """`mlflow/server.sh --port PORT --store DIR` in the foreground, in its own process group,
    started from an unrelated working directory."""

    def __init__(self, store: Path, cwd: Path):
        self.store, self.port = store, free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.log = store.parent / f"{store.name}.log"
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen([str(SERVER), "--port", str(self.port), "--store", str(store)], cwd=cwd,
                                         env=server_env(), stdout=out, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        try:
            wait_health(self.uri, self.proc)
        except AssertionError:
            self.stop()
            raise AssertionError(self.log.read_text()[-3000:])

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    base = tmp_path_factory.mktemp("mlflow-server")
    elsewhere = base / "cwd"
    elsewhere.mkdir()
    srv = Server(base / "store", cwd=elsewhere)
    yield srv
    srv.stop()
    assert srv.proc.returncode is not None
    assert not list(elsewhere.iterdir())  # nothing written to the working directory


@pytest.fixture(autouse=True)
def quick_http(monkeypatch):
    # MLflow's client retries failed requests for minutes by default.
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")


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


def test_logs_a_run_and_reads_it_back(server, tmp_path):
    experiment_id, run_id = log_and_read_back(server.uri, tmp_path, "server-roundtrip")
    # Served artifacts: the client sees mlflow-artifacts:/ URIs, the files land in STORE/artifacts.
    experiment = MlflowClient(tracking_uri=server.uri).get_experiment(experiment_id)
    assert experiment.artifact_location.startswith("mlflow-artifacts:/")
    assert list((server.store / "artifacts").rglob("server-roundtrip-notes.txt"))
    assert (server.store / "mlflow.db").is_file()


def test_second_start_on_a_busy_port_fails_clearly(server, tmp_path):
    started = time.monotonic()
    result = subprocess.run([str(SERVER), "--port", str(server.port), "--store", str(tmp_path / "other")],
                            cwd=tmp_path, env=server_env(), capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert result.stderr.strip() == (f"mlflow/server.sh: port {server.port} on 127.0.0.1 is already in use "
                                     "(another server? choose one with --port)")
    assert time.monotonic() - started < 20  # refused before starting MLflow
    wait_health(server.uri)  # the running server is untouched


@pytest.mark.parametrize("env,message", [
    ({}, "mlflow/server.sh: --prod needs MLFLOW_BACKEND_STORE_URI"),
    ({"MLFLOW_BACKEND_STORE_URI": "sqlite:///x.db"}, "mlflow/server.sh: --prod: MLFLOW_BACKEND_STORE_URI must be a postgresql:// URI"),
])
def test_prod_mode_needs_a_postgresql_uri_from_the_environment(tmp_path, env, message):
    result = subprocess.run([str(SERVER), "--prod", "--port", str(free_port()), "--store", str(tmp_path)],
                            env=server_env(**env), capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert result.stderr.startswith(message), result.stderr


def test_bad_arguments_and_help(tmp_path):
    bad = subprocess.run([str(SERVER), "--port", "99999"], env=server_env(), capture_output=True, text=True, timeout=30)
    assert bad.returncode == 1 and bad.stderr.strip() == "mlflow/server.sh: --port must be 1..65535, got '99999'"
    unknown = subprocess.run([str(SERVER), "--frobnicate"], env=server_env(), capture_output=True, text=True, timeout=30)
    assert unknown.returncode == 1 and "unknown option '--frobnicate'" in unknown.stderr
    shown = subprocess.run([str(SERVER), "--help"], cwd=tmp_path, env=server_env(), capture_output=True, text=True,
                           timeout=30)
    assert shown.returncode == 0
    for option in ("--port", "--store", "--prod", "--auth", "--daemon", "--stop", "MLFLOW_BACKEND_STORE_URI"):
        assert option in shown.stdout


def test_daemon_behind_the_cluster_forwarder(tmp_path):
    """What the cluster configs run on the head: server.sh --daemon on 127.0.0.1, a forwarder in
    front of it (here 127.0.0.1 -> 127.0.0.1), a client that only knows the forwarder."""
    store, port, front = tmp_path / "store", free_port(), free_port()
    pidfile = tmp_path / "fw.pid"
    started = subprocess.run([str(SERVER), "--daemon", "--port", str(port), "--store", str(store)], cwd=tmp_path,
                             env=server_env(), capture_output=True, text=True, timeout=150)
    try:
        assert started.returncode == 0, started.stderr
        assert "running in the background" in started.stderr and (store / "server.pid").is_file()
        fw = subprocess.run([sys.executable, str(FORWARDER), "--daemon", "--listen", f"127.0.0.1:{front}",
                             "--to", f"127.0.0.1:{port}", "--pidfile", str(pidfile)],
                            capture_output=True, text=True, timeout=60)
        assert fw.returncode == 0, fw.stderr
        experiment_id, run_id = log_and_read_back(f"http://127.0.0.1:{front}", tmp_path, "through-forwarder")
        assert MlflowClient(tracking_uri=f"http://127.0.0.1:{port}").get_run(run_id).data.params["alpha_aug"] == "0.01"
    finally:
        subprocess.run([sys.executable, str(FORWARDER), "--stop", "--pidfile", str(pidfile)], timeout=60)
        stopped = subprocess.run([str(SERVER), "--stop", "--store", str(store)], env=server_env(),
                                 capture_output=True, text=True, timeout=60)
    assert stopped.returncode == 0 and "stopped the server" in stopped.stdout
    assert not (store / "server.pid").exists()
    with socket.socket() as s:  # nothing listens on the server's port any more
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", port))


def test_mlflow_folder_never_shadows_the_library():
    assert not list((REPO / "mlflow").rglob("__init__.py"))
    assert Path(mlflow.__file__).resolve().parent != (REPO / "mlflow").resolve()
    # From the repo root, where ./mlflow is on sys.path first, the library still wins.
    probe = subprocess.run([sys.executable, "-c", "import mlflow; print(mlflow.__file__); print(mlflow.__version__); "
                            "from mlflow import MlflowClient"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert probe.returncode == 0, probe.stderr
    path, version = probe.stdout.split()
    assert not Path(path).resolve().is_relative_to(REPO / "mlflow") and version == mlflow.__version__
