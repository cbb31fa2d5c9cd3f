"""Helpers for the tests of tune/ (tests/test_tune_*.py): real Ray, real MLflow, real data.

tune/ is installed as the package `softfine_tune` (pyproject.toml); tune/search.py is its driver.

Servers listen on 127.0.0.1 only and are stopped by the fixtures that start them.
"""

from __future__ import annotations

import atexit
import contextlib
import csv
import functools
import io
import json
import logging
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

REPO = Path(__file__).resolve().parents[1]
TUNE = REPO / "tune"
SEARCH_SCRIPT = TUNE / "search.py"


def shared_data_dir() -> Path:
    """$SOFTFINE_DATA_DIR, else ../shared/data beside the repository; a test fails (never skips)
    when the data is missing."""
    path = Path(os.environ.get("SOFTFINE_DATA_DIR") or REPO.parent / "shared" / "data").resolve()
    needed = [
        path / "weibo" / "weiboNER_2nd_conll.train",
        path / "resume" / "train.char.bmes",
        path / "resume" / "dev.char.bmes",
        path / "resume" / "test.char.bmes",
        path / "fine" / "dev.json",
    ]
    missing = [str(p) for p in needed if not p.is_file()]
    if missing:
        pytest.fail(
            f"test data missing: {', '.join(missing)} (set SOFTFINE_DATA_DIR or put the shared data "
            "in ../shared/data beside the repository)"
        )
    return path


def small_search_flags(data_dir: Path, *extra: str) -> list[str]:
    """A search that takes seconds per trial on CPU: the smallest tiny encoder (1 layer of 64), 24
    Resume sentences, 2 epochs at a learning rate high enough that dev F1 differs between grid
    points (the tiny encoder's other defaults: its own, not the preset's bert-base ones)."""
    return [
        "--dataset",
        "resume",
        "--data-dir",
        str(data_dir),
        "--model",
        "tiny",
        "--tiny-layers",
        "1",
        "--tiny-hidden",
        "64",
        "--limit-train",
        "24",
        "--limit-eval",
        "24",
        "--epochs",
        "2",
        "--batch-size",
        "2",
        "--lr",
        "5e-3",
        "--gpus-per-trial",
        "0",
        *extra,
    ]


def new_store(path: Path) -> str:
    """The URI of a new MLflow SQLite store at `path`, its tables already made: a copy of one store that
    MLflow made once in this test process (making the tables, MLflow's migrations, takes about 2 s of CPU
    a store). Tests of how a search makes a new store give it a path where nothing is."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with (
        contextlib.closing(sqlite3.connect(_store_template())) as made,
        contextlib.closing(sqlite3.connect(path)) as copy,
    ):
        made.backup(copy)
    return f"sqlite:///{path}"


@functools.cache
def _store_template() -> Path:
    from mlflow.tracking import MlflowClient

    folder = Path(tempfile.mkdtemp(prefix="softfine-test-store-"))
    atexit.register(shutil.rmtree, folder, True)
    MlflowClient(tracking_uri=f"sqlite:///{folder / 'mlflow.db'}").search_experiments(max_results=1)
    return folder / "mlflow.db"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


AUTH_INI = """[mlflow]
default_permission = READ
database_uri = sqlite:///{folder}/basic_auth.db
admin_username = admin
admin_password = {password}
authorization_function = mlflow.server.auth:authenticate_request_basic_auth
auth_cache_ttl_seconds = 60
"""


class MlflowServer:
    """`mlflow server` on 127.0.0.1 with a SQLite store in a temporary folder; with `password`,
    MLflow's basic authentication (user admin)."""

    def __init__(self, folder: Path, password: str | None = None):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.password = password
        self.process: subprocess.Popen | None = None

    def start(self, timeout: float = 120) -> MlflowServer:
        env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")},
            "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
        }
        auth = []
        if self.password is not None:
            (self.folder / "basic_auth.ini").write_text(
                AUTH_INI.format(folder=self.folder, password=self.password)
            )
            env.update(
                MLFLOW_AUTH_CONFIG_PATH=str(self.folder / "basic_auth.ini"),
                MLFLOW_FLASK_SERVER_SECRET_KEY="softfine-tests-only",
            )
            auth = ["--app-name", "basic-auth"]
        self.log = open(self.folder / "server.log", "ab")  # noqa: SIM115 - closed by stop()
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "mlflow",
                "server",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--workers",
                "1",
                "--backend-store-uri",
                new_store(self.folder / "mlflow.db"),
                "--artifacts-destination",
                str(self.folder / "artifacts"),
                *auth,
            ],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
            cwd=self.folder,
        )
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"mlflow server exited: {(self.folder / 'server.log').read_text()[-3000:]}"
                )
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as response:
                    if response.status == 200:
                        return self
            except OSError:
                time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"mlflow server did not answer within {timeout} s")

    def pause(self) -> None:
        """The server stops answering: its processes are stopped (SIGSTOP), its port stays open."""
        os.killpg(self.process.pid, signal.SIGSTOP)

    def resume(self) -> None:
        os.killpg(self.process.pid, signal.SIGCONT)

    def stop(self) -> None:
        """Stops the server and the worker processes it started (its own process group)."""
        if self.process is None or self.process.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGCONT)  # a paused server (pause()) must see the TERM
        stop_group(self.process, timeout=20)
        self.log.close()


def stop_group(process: subprocess.Popen, timeout: float) -> None:
    """SIGTERM to the process group of `process` (started in a session of its own), SIGKILL if it
    has not ended within `timeout` seconds."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=timeout)


def descendants(pid: int) -> dict[int, str]:
    """The processes below `pid` (children, theirs, ...) with their command lines (the arguments
    joined by spaces; "" for a zombie): tests look for the processes they started there, never among
    every process of the machine. None below a process that has ended."""
    try:
        below = psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return {}
    found: dict[int, str] = {}
    for process in below:
        try:
            found[process.pid] = " ".join(process.cmdline()).strip()
        except psutil.ZombieProcess:  # ended, not yet reaped: still below `pid`
            found[process.pid] = ""
        except psutil.NoSuchProcess:  # ended and reaped while read
            pass
    return found


def run_search(argv: list[str]) -> tuple[int, str]:
    """tune/search.py's main() in this process (on the Ray instance the test started); returns
    the exit status and what it printed (stdout and stderr)."""
    from softfine_tune import search

    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        code = search.main([str(a) for a in argv])
    text = out.getvalue()
    sys.stdout.write(text[-20000:])  # shown by pytest when the test fails
    return code, text


def children(uri: str, experiment_name: str, parent_run_id: str | None = None) -> list:
    """The child runs of an experiment (of one parent if given)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name(experiment_name)
    query = (
        "tags.`softfine.phase` != 'parent'"
        if parent_run_id is None
        else f"tags.`mlflow.parentRunId` = '{parent_run_id}'"
    )
    return client.search_runs([experiment.experiment_id], filter_string=query, max_results=1000)


def parents(uri: str, experiment_name: str) -> list:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name(experiment_name)
    return client.search_runs([experiment.experiment_id], filter_string="tags.`softfine.phase` = 'parent'")


def read_summary(storage: Path, name: str) -> dict:
    import json

    return json.loads((storage / name / "summary.json").read_text())


def read_trials(folder: Path) -> list[dict]:
    """A search's trials.csv, with the trials' start and end times as numbers."""
    with open(folder / "trials.csv", newline="") as f:
        return [
            {
                **r,
                "trial_start_time": float(r["trial_start_time"]),
                "trial_end_time": float(r["trial_end_time"]),
            }
            for r in csv.DictReader(f)
        ]


def slot_seconds(rows: list[dict], held) -> tuple[float, float]:
    """What trials held of their slots (the sum of duration x held(row)) and the span from the
    first start to the last end: a search's busy fraction is held / (capacity x span)."""
    span = max(r["trial_end_time"] for r in rows) - min(r["trial_start_time"] for r in rows)
    return sum((r["trial_end_time"] - r["trial_start_time"]) * held(r) for r in rows), span


def kill_the_trial_once(folder: Path, killed: dict) -> None:
    """Kills the trial's process (SIGKILL, as a crash would) once it has reported a checkpoint:
    the pid comes from the trial's first result (Ray Tune records it with every result), and is
    one of this test's own processes (Ray started by ray_local)."""
    deadline = time.time() + 240
    while time.time() < deadline and not killed:
        for results in folder.glob("trial_*/result.json"):
            lines = results.read_text().splitlines()
            if lines and list(results.parent.glob("checkpoint_*")):
                first = json.loads(lines[0])
                assert first["pid"] in descendants(os.getpid()), first["pid"]
                os.kill(first["pid"], signal.SIGKILL)
                killed.update(pid=first["pid"], step=first["step"])
                return
        time.sleep(0.05)


def run_crashing_search(tmp_path: Path, *grid: str) -> tuple[int, str, dict]:
    """A search of the grid `grid` (flags, named "crash") whose trial process is SIGKILLed once it
    has reported its first checkpoint (kill_the_trial_once), with one retry. 24 sentences at batch 4:
    6 steps an epoch, 2 epochs, evaluations at steps 2, 4, ..., 12. Returns (exit status, output,
    what was killed)."""
    import threading

    killed: dict = {}
    watcher = threading.Thread(target=kill_the_trial_once, args=(tmp_path / "ray" / "crash", killed))
    watcher.start()
    code, output = run_search(
        small_search_flags(
            shared_data_dir(),
            *grid,
            "--epochs",
            "2",
            "--eval-every",
            "2",
            "--batch-size",
            "4",
            "--max-failures",
            "1",
            "--mlflow-uri",
            new_store(tmp_path / "mlflow.db"),
            "--experiment-name",
            "crash",
            "--storage-path",
            tmp_path / "ray",
            "--name",
            "crash",
        )
    )
    watcher.join()
    return code, output, killed


def saved_trials(experiment: Path) -> dict:
    """The trials of the search's last experiment snapshot, by trial id."""
    from ray.tune import ExperimentAnalysis

    return {t.trial_id: t for t in ExperimentAnalysis(str(experiment)).trials}


def saved_trials_so_far(experiment: Path) -> dict:
    """saved_trials while the driver runs: none before its first snapshot or while one is written."""
    # Polled twice a second: Ray's warning for each trial that has not reported yet ("Failed to fetch
    # metrics") filled a failing test's captured log (CI, 16ffa29); the trials are wanted, not metrics.
    quiet = logging.getLogger("ray.tune.analysis.experiment_analysis")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # setLevel, not .level: it clears the loggers' cached decisions
    try:
        return saved_trials(experiment)
    except Exception:  # noqa: BLE001 - a snapshot being written
        return {}
    finally:
        quiet.setLevel(level)


def trial_processes() -> list[int]:
    """Process ids of the Ray workers running a trial (title ray::ImplicitFunc...) among this
    test's own processes (ray_local's Ray is a child of this process)."""
    return [
        pid for pid, cmdline in descendants(os.getpid()).items() if cmdline.startswith("ray::ImplicitFunc")
    ]


def kill_the_driver_when(flags: list, address: str, tmp_path: Path, ready, timeout: float = 300) -> None:
    """Runs `tune/search.py FLAGS --address ADDRESS` as a process of its own (its output in
    tmp_path/driver.log), SIGKILLs it once `ready()` holds (checked every half second), and waits
    until Ray has ended the trial it was running (a minute at most; in under a second here)."""
    log = open(tmp_path / "driver.log", "w")  # noqa: SIM115 - closed once the driver is killed
    driver = subprocess.Popen(
        [sys.executable, str(SEARCH_SCRIPT), *map(str, flags), "--address", address],
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=tmp_path,
    )
    deadline = time.time() + timeout
    try:
        while time.time() < deadline:
            time.sleep(0.5)
            assert driver.poll() is None, (tmp_path / "driver.log").read_text()[-5000:]
            if ready():
                break
        else:
            pytest.fail("the search did not get far enough: " + (tmp_path / "driver.log").read_text()[-5000:])
    finally:
        driver.send_signal(signal.SIGKILL)
        driver.wait(timeout=60)
        log.close()
    deadline = time.time() + 60
    while trial_processes() and time.time() < deadline:
        time.sleep(0.25)
    assert not trial_processes(), "the trial's worker outlived its driver by a minute"


def point(run) -> tuple:
    """A child run's grid point, from its params: ((α_aug, α_fea) as the grid keys it, β, γ)."""
    from softfine_tune.space import alphas_key

    p = run.data.params
    return (alphas_key(float(p["alpha_aug"]), float(p["alpha_fea"])), float(p["beta"]), float(p["gamma"]))


def processes_mentioning(text: str) -> list[str]:
    """This test's processes whose command line holds `text` (with adopting_orphans: daemons too)."""
    return [f"{pid}: {cmdline}" for pid, cmdline in descendants(os.getpid()).items() if text in cmdline]


# The README's search on 3 points, browsed in the MLflow UI (test_mlflow_ui.py) and read as a console
# (test_console.py): made once, by conftest's session fixture `ui_search`.
UI_EXPERIMENT = "softfine-ui"
UI_SEARCH_NAME = "ui-search"
UI_GRID = [(0.1, 0.1), (0.01, 0.005), (0.01, 0.01)]  # (alpha_aug, alpha_fea), all with beta 2, gamma 2


@contextlib.contextmanager
def server_sh(store: Path) -> Iterator[str]:
    """mlflow/server.sh --daemon with its stores in `store`, on a free loopback port; yields its URI."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env["PYTHON"] = sys.executable
    script, port = str(REPO / "mlflow" / "server.sh"), free_port()
    started = subprocess.run(
        [script, "--daemon", "--port", str(port), "--store", str(store)],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert started.returncode == 0, f"mlflow/server.sh failed: {started.stderr[-2000:]}"
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        subprocess.run([script, "--stop", "--store", str(store)], env=env, capture_output=True, timeout=60)


@contextlib.contextmanager
def ui_search(folder: Path) -> Iterator[dict]:
    """mlflow/server.sh on a free loopback port, and the README's search on the 3 points of UI_GRID
    logging to it over HTTP, run as a person runs it; what it printed and how long it took."""
    data = shared_data_dir()
    with server_sh(folder / "store") as uri:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "RAY_ADDRESS"))}
        alphas = [f"{aug:g},{fea:g}" for aug, fea in UI_GRID]
        command = [
            sys.executable,
            str(SEARCH_SCRIPT),
            *small_search_flags(data),
            "--alphas",
            *alphas,
            "--beta",
            "2",
            "--gamma",
            "2",
            "--cpus-per-trial",
            "1",  # 2 trial actors to start, not 3: each imports torch and transformers
            "--address",
            "local",
            "--mlflow-uri",
            uri,
            "--experiment-name",
            UI_EXPERIMENT,
            "--storage-path",
            str(folder / "ray"),
            "--name",
            UI_SEARCH_NAME,
        ]
        started = time.time()
        done = subprocess.run(
            command,
            env={**env, "RAY_USAGE_STATS_ENABLED": "0"},
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=900,
        )
        assert done.returncode == 0, done.stdout[-5000:] + done.stderr[-5000:]
        (parent,) = parents(uri, UI_EXPERIMENT)
        kids = children(uri, UI_EXPERIMENT, parent.info.run_id)
        assert len(kids) == 3
        yield {
            "uri": uri,
            "experiment_id": parent.info.experiment_id,
            "parent": parent,
            "kids": kids,
            "children": {k.info.run_name: k.info.run_id for k in kids},
            "output": done.stdout,
            "lines": (done.stdout + done.stderr).splitlines(),
            "seconds": time.time() - started,
        }
