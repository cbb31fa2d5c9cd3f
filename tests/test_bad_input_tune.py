"""Bad input to tune/search.py, table-driven: flags, presets, search records, results folders, Ray
addresses, tracking URIs. Each case must end with one line, `tune/search.py: error: ...`, naming
the flag, file or key; a non-zero exit; no traceback.

Nearly every refusal comes before Ray starts (and before anything is written: the results folder
and the MLflow store are under tmp_path). The few that need a running Ray instance are in
`test_refused_once_ray_runs` (deselect them with `-k "not once_ray_runs"`).

Where each case runs:

* in this process, `softfine_tune.search.main(argv)` (what `python tune/search.py` and
  `softfine-search` call), its stdout and stderr captured: most of the table, and the data files
  every trial would fail on. Each such case runs isolated (`in_process`): the environment a
  subprocess would get (MLFLOW_* and RAY_ADDRESS removed, RAY_TMPDIR under tmp_path), the
  repository as the working directory, the root logger's handlers (main's logging.basicConfig)
  and every environment variable put back after, and Ray neither running before nor started by
  the case. Seconds of imports per case (Ray, MLflow, torch) are paid once.
* as a user runs it, `python tune/search.py ...` from the repository root, a process of its own
  (`run_refused`): the cases that depend on the process itself. Text that is not UTF-8 (the
  `*-not-utf8` cases: the shell's bytes, decoded by the interpreter as it starts, reach main as
  lone surrogates); an argparse error (`sampler-unknown`: argparse's SystemExit leaves the script's
  entry point, `run()`, before its os._exit, and ends the interpreter); the refusals once Ray runs
  (a local Ray instance started and stopped: `test_refused_once_ray_runs`); and `-v` (the traceback
  before the line).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from tune_fixtures import REPO, SEARCH_SCRIPT, free_port, shared_data_dir

BASE = ["--dataset", "resume", "--data-dir", "{data}", "--model", "tiny"]
PRESET = "{tmp}/preset.yaml"


def case(
    id: str,
    argv: list[str],
    names: str,
    *,
    preset: str | None = None,
    record=None,
    base: bool = True,
    process: bool = False,
    marks=(),
):
    """One bad input: `argv` (after BASE unless base=False; {data}, {tmp}, {port}, {http_port},
    {preset} filled in), a preset file's text, a search record to resume (text, or an object
    written as JSON), and what the error line must name. process=True: `python tune/search.py`
    in a process of its own (the module's docstring says which and why), else main() in this one."""
    return pytest.param(argv, names, preset, record, base, process, id=id, marks=marks)


GOOD_RECORD = {
    "argv": ["--dataset", "resume"],
    "name": "s1",
    "mlflow_uri": "sqlite:///{tmp}/m.db",
    "experiment_id": "1",
    "parent_run_id": "0" * 32,
    "stage": "search",
}

CASES = [
    # --- flags of the search ---------------------------------------------------------------------
    case("tpe-num-samples-zero", ["--sampler", "tpe", "--num-samples", "0"], "--num-samples 0: must be >= 1"),
    case(
        "tpe-num-samples-negative",
        ["--sampler", "tpe", "--num-samples", "-3"],
        "--num-samples -3: must be >= 1",
    ),
    case("grid-num-samples-not-the-grid", ["--num-samples", "5"], "--num-samples 5: a grid search runs each"),
    case("cpus-per-trial-zero", ["--cpus-per-trial", "0"], "--cpus-per-trial 0: must be > 0"),
    case(
        "gpus-per-trial-infinite",
        ["--gpus-per-trial", "inf"],
        "--gpus-per-trial inf: must be >= 0 and finite",
    ),
    case("gpus-per-trial-negative", ["--gpus-per-trial", "-1"], "--gpus-per-trial -1: must be >= 0"),
    case("max-concurrent-negative", ["--max-concurrent", "-1"], "--max-concurrent -1"),
    case("max-failures-negative", ["--max-failures", "-2"], "--max-failures -2"),
    case("seeds-negative", ["--seeds", "-1"], "--seeds -1"),
    case("mlflow-timeout-zero", ["--mlflow-timeout", "0"], "--mlflow-timeout 0"),
    case("asha-reduction-factor-one", ["--asha-reduction-factor", "1"], "--asha-reduction-factor 1"),
    case(
        "seeds-of-one-point-with-tpe",
        ["--alphas", "0.1,0.1", "--beta", "2", "--gamma", "2", "--seeds", "2", "--sampler", "tpe"],
        "--sampler tpe: the grid has one point",
    ),
    case(
        "seeds-past-the-last-seed",
        ["--seed", "4294967295", "--seeds", "2"],
        "--seed 4294967295 with --seeds 2: Input should be less than 4294967296",
    ),
    case("name-with-a-slash", ["--name", "a/b"], "--name 'a/b'"),
    case("sampler-unknown", ["--sampler", "random"], "argument --sampler: invalid choice", process=True),
    # --- training settings on the command line (TrainConfig, strict) -----------------------------
    case(
        "max-grad-norm-negative", ["--max-grad-norm", "-1"], "--max-grad-norm: Input should be greater than 0"
    ),
    case("lr-infinite", ["--lr", "inf"], "--lr: Input should be a finite number"),
    case("lr-not-a-number", ["--lr", "nan"], "--lr: Input should be a finite number"),
    case("epochs-fractional", ["--epochs", "1.5"], "argument --epochs: invalid int value: '1.5'"),
    case("epochs-zero", ["--epochs", "0"], "--epochs: Input should be greater than or equal to 1"),
    case("dropout-one", ["--dropout", "1"], "--dropout: Input should be less than 1"),
    case(
        "tiny-hidden-not-a-multiple-of-64",
        ["--tiny-hidden", "100"],
        "--tiny-hidden: Input should be a multiple of 64",
    ),
    case("schedule-unknown", ["--schedule", "steps"], "argument --schedule: invalid choice: 'steps'"),
    case("seed-negative", ["--seed", "-1"], "--seed: Input should be greater than or equal to 0"),
    case(
        "limit-train-zero",
        ["--limit-train", "0"],
        "--limit-train: Input should be greater than or equal to 1",
    ),
    case(
        "max-length-too-short",
        ["--max-length", "4"],
        "--max-length: Input should be greater than or equal to 8",
    ),
    case("dataset-unknown", ["--dataset", "nosuch"], "--dataset: unknown dataset 'nosuch'"),
    case("data-missing", ["--data-dir", "{tmp}/nodata"], "{tmp}/nodata/resume/train.char.bmes"),
    # --- the grid on the command line --------------------------------------------------------------
    case("beta-not-above-one", ["--beta", "1", "2"], "--beta: Input should be greater than 1 (got 1.0"),
    case("gamma-not-a-number", ["--gamma", "nan"], "--gamma: Input should be a finite number"),
    case(
        "alphas-not-a-pair",
        ["--alphas", "0.1"],
        "--alphas: an (alpha_aug, alpha_fea) pair is written AUG,FEA",
    ),
    case("alphas-negative", ["--alphas=0.1,-0.1"], "--alphas: Input should be greater than or equal to 0"),
    case("soft-scope-unknown", ["--soft-scope", "all"], "argument --soft-scope: invalid choice: 'all'"),
    # --- a preset file -----------------------------------------------------------------------------
    case("preset-missing", ["--preset", "{tmp}/none.yaml"], "--preset {tmp}/none.yaml: cannot read it"),
    case("preset-not-yaml", ["--preset", PRESET], f"preset {PRESET}, line", preset="train: [1, 2\n"),
    case("preset-a-list", ["--preset", PRESET], f"preset {PRESET}: expected a mapping", preset="- 1\n- 2\n"),
    case(
        "preset-unknown-section",
        ["--preset", PRESET],
        f"preset {PRESET}: unknown section 'trian'",
        preset="trian: {}\n",
    ),
    case(
        "preset-fractional-epochs",
        ["--preset", PRESET],
        f"preset {PRESET}: key 'epochs'",
        preset="train:\n  epochs: 12.5\n",
    ),
    case(
        "preset-quoted-boolean",
        ["--preset", PRESET],
        f"preset {PRESET}: key 'soft': Input should be a valid boolean",
        preset='train:\n  soft: "false"\n',
    ),
    case(
        "preset-quoted-number",
        ["--preset", PRESET],
        f"preset {PRESET}: key 'lr'",
        preset="train:\n  lr: '1e-3'\n",
    ),
    case(
        "preset-infinite",
        ["--preset", PRESET],
        f"preset {PRESET}: key 'lr': inf is not a finite number",
        preset="train:\n  lr: .inf\n",
    ),
    case(
        "preset-negative-max-grad-norm",
        ["--preset", PRESET],
        f"preset {PRESET}: key 'max_grad_norm'",
        preset="train:\n  max-grad-norm: -1\n",
    ),
    case(
        "preset-null",
        ["--preset", PRESET],
        f"preset {PRESET}: key 'dropout' is null",
        preset="train:\n  dropout:\n",
    ),
    case(
        "preset-unknown-key",
        ["--preset", PRESET],
        f"preset {PRESET}: key 'lrate': unknown option",
        preset="train:\n  lrate: 0.1\n",
    ),
    case(
        "preset-grid-value-in-train",
        ["--preset", PRESET],
        f"preset {PRESET}: key 'beta': not a train: setting",
        preset="train:\n  beta: 2\n",
    ),
    case(
        "preset-grid-quoted-number",
        ["--preset", PRESET],
        f"preset {PRESET}: grid: beta: expected a list of numbers",
        preset="grid:\n  alphas: [[0.1, 0.1]]\n  beta: ['2']\n  gamma: [2]\n",
    ),
    case(
        "preset-grid-boolean",
        ["--preset", PRESET],
        f"preset {PRESET}: grid: gamma: expected a list of numbers",
        preset="grid:\n  alphas: [[0.1, 0.1]]\n  beta: [2]\n  gamma: [true]\n",
    ),
    case(
        "preset-grid-impossible-beta",
        ["--preset", PRESET],
        f"preset {PRESET}: grid: beta: Input should be greater",
        preset="grid:\n  alphas: [[0.1, 0.1]]\n  beta: [0.5]\n  gamma: [2]\n",
    ),
    case(
        "preset-grid-not-pairs",
        ["--preset", PRESET],
        f"preset {PRESET}: grid: alphas: expected a list of",
        preset="grid:\n  alphas: [[0.1]]\n  beta: [2]\n  gamma: [2]\n",
    ),
    case(
        "preset-grid-missing-gamma",
        ["--preset", PRESET],
        f"preset {PRESET}: grid: key 'gamma' is missing",
        preset="grid:\n  alphas: [[0.1, 0.1]]\n  beta: [2]\n",
    ),
    case(
        "preset-paper-selection-not-a-number",
        ["--preset", PRESET],
        f"preset {PRESET}: paper_selection: beta",
        preset="grid:\n  alphas: [[0.1, 0.1]]\n  beta: [2]\n  gamma: [2]\npaper_selection: {beta: four}\n",
    ),
    # --- --resume and its search record ----------------------------------------------------------
    case("resume-nothing-there", ["--resume"], "--resume: no search to resume in {tmp}/ray", base=False),
    case("resume-unknown-name", ["--resume", "nosuch"], "--resume nosuch: no search record", base=False),
    case(
        "resume-record-damaged",
        ["--resume", "s1"],
        "--resume: {tmp}/ray/s1/softfine_search.json: not a search record (damaged",
        record='{"argv": ["--dataset"',
        base=False,
    ),
    case(
        "resume-record-a-list",
        ["--resume", "s1"],
        "{tmp}/ray/s1/softfine_search.json: not a search record",
        record=[],
        base=False,
    ),
    case(
        "resume-record-without-argv",
        ["--resume", "s1"],
        "softfine_search.json: not a search record (key 'argv'",
        record={k: v for k, v in GOOD_RECORD.items() if k != "argv"},
        base=False,
    ),
    case(
        "resume-record-bad-flags",
        ["--resume", "s1"],
        "softfine_search.json: its flags are refused",
        record={**GOOD_RECORD, "argv": ["--epochs", "many"]},
        base=False,
    ),
    case(
        "resume-another-store",
        ["--resume", "s1", "--mlflow-uri", "sqlite:///{tmp}/other.db"],
        "--mlflow-uri sqlite:///{tmp}/other.db: this search logs to",
        record=GOOD_RECORD,
        base=False,
    ),
    case(
        "resume-masked-password",
        ["--resume", "s1"],
        "--mlflow-uri http://alice:***@127.0.0.1:{port}: the password is masked",
        record={**GOOD_RECORD, "argv": BASE, "mlflow_uri": "http://alice:***@127.0.0.1:{port}"},
        base=False,
    ),
    # --- the results folder ----------------------------------------------------------------------
    case(
        "storage-under-a-file",
        ["--storage-path", "{tmp}/file/ray"],
        "--storage-path {tmp}/file/ray: {tmp}/file is not a folder",
    ),
    case(
        "storage-not-writable",
        ["--storage-path", "/sys/softfine-search"],
        "--storage-path /sys/softfine-search: cannot write in /sys",
    ),
    case(
        "storage-url-with-keys",
        ["--storage-path", "s3://AKIAEXAMPLE:s3cret@bucket/ray"],
        "--storage-path s3://...@bucket/ray: no credentials in the URI",
    ),
    # --- the Ray address -------------------------------------------------------------------------
    case(
        "address-nothing-listening",
        ["--address", "127.0.0.1:{port}"],
        "--address 127.0.0.1:{port}: no Ray cluster answers there (Connection refused)",
    ),
    case(
        "address-not-ray",
        ["--address", "127.0.0.1:{http_port}"],
        "--address 127.0.0.1:{http_port}: no Ray cluster answers there (a server answers, but not Ray's",
    ),
    case("address-malformed", ["--address", "headnode"], "--address headnode"),
    # --- the tracking store ------------------------------------------------------------------------
    case(
        "mlflow-nothing-listening-with-password",
        ["--mlflow-uri", "http://alice:s3cret@127.0.0.1:{port}"],
        "--mlflow-uri: the MLflow tracking store http://alice:***@127.0.0.1:{port} does not answer "
        "(connection "
        "refused",
    ),
    case(
        "mlflow-unknown-scheme",
        ["--mlflow-uri", "bogus://store"],
        "--mlflow-uri: the MLflow tracking store bogus://store cannot be used",
    ),
    case(
        "mlflow-sqlite-not-writable",
        ["--mlflow-uri", "sqlite:////sys/softfine/m.db"],
        "--mlflow-uri sqlite:////sys/softfine/m.db: cannot create /sys/softfine",
    ),
    case(
        "mlflow-masked-password",
        ["--mlflow-uri", "http://alice:***@127.0.0.1:{port}"],
        "--mlflow-uri http://alice:***@127.0.0.1:{port}: the password is masked",
    ),
    # --- an empty value is never "the default" ------------------------------------------------------
    case("mlflow-uri-empty", ["--mlflow-uri", ""], "--mlflow-uri '': empty; give a tracking URI"),
    case("address-empty", ["--address", ""], "--address '': empty; give HOST:PORT, auto or local"),
    case(
        "storage-path-empty",
        ["--storage-path", ""],
        "--storage-path '': empty; give a folder or leave the flag out",
    ),
    case("name-empty", ["--name", ""], "--name '': empty"),
    case("preset-empty", ["--preset", ""], "--preset '': empty; give a YAML file"),
    case("experiment-name-empty", ["--experiment-name", ""], "--experiment-name '': empty"),
    case(
        "data-dir-empty", ["--data-dir", ""], "--data-dir '': empty; give a directory or leave the flag out"
    ),
    case("model-empty", ["--model", ""], "--model '': empty"),
    case("resume-empty", ["--resume", ""], "--resume '': empty", base=False),
    case(
        "preset-empty-string",
        ["--preset", PRESET],
        f"preset {PRESET}: key 'label_separator' is '' (empty)",
        preset="train:\n  label_separator: ''\n",
    ),
    # --- text that is not UTF-8 (the shell's bytes reach Python as lone surrogates) -------------
    case(
        "dataset-not-utf8",
        ["--dataset", "\udcff"],
        r"--dataset '\xff': not valid UTF-8 (byte 0xff at character 1)",
        process=True,
    ),
    case(
        "data-dir-not-utf8",
        ["--data-dir", "{tmp}/\udcff"],
        r"--data-dir '{tmp}/\xff': not valid UTF-8",
        process=True,
    ),
    case(
        "mlflow-uri-not-utf8",
        ["--mlflow-uri", "http://h\udce9:5000"],
        r"--mlflow-uri 'http://h\xe9:5000': not valid",
        process=True,
    ),
    case(
        "alphas-not-utf8",
        ["--alphas", "0.1,0.1", "0.1,\udcff"],
        r"--alphas '0.1,\xff': not valid UTF-8",
        process=True,
    ),
    case("name-not-utf8", ["--name", "s\udcff"], r"--name 's\xff': not valid UTF-8", process=True),
    # --- a YAML key written twice ----------------------------------------------------------------
    case(
        "preset-key-twice",
        ["--preset", PRESET],
        f"preset {PRESET}: key 'epochs' is written twice (lines 2 and 4)",
        preset="train:\n  epochs: 3\n  lr: 1.0e-3\n  epochs: 5\n",
    ),
    case(
        "preset-section-twice",
        ["--preset", PRESET],
        f"preset {PRESET}: key 'train' is written twice (lines 1 and 3)",
        preset="train:\n  epochs: 3\ntrain:\n  lr: 1.0e-3\n",
    ),
]


@pytest.fixture(scope="module")
def http_port():
    """A server on 127.0.0.1 that answers like a web server, not like Ray."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    server.settimeout(0.2)
    stop = threading.Event()

    def serve():
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except OSError:
                continue
            with conn:
                conn.sendall(b"HTTP/1.0 400 Bad Request\r\n\r\n")

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield server.getsockname()[1]
    stop.set()
    thread.join(timeout=5)
    server.close()


def search_env() -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "RAY_ADDRESS"))}
    return {**env, "RAY_USAGE_STATS_ENABLED": "0", "SOFTFINE_DATA_DIR": str(shared_data_dir())}


def check_refusal(code: int, stdout: str, stderr: str, names: str, fill: dict, started: float) -> str:
    """The refusal: a non-zero exit status, the one last line naming the input, no traceback."""
    lines = stderr.strip().splitlines()
    assert code != 0, stdout[-3000:] + stderr[-3000:]
    assert lines and lines[-1].startswith("tune/search.py: error: "), stderr[-3000:]
    assert names.format(**fill) in lines[-1], (names.format(**fill), lines[-1])
    assert "Traceback" not in stderr, stderr[-3000:]
    print(f"{time.time() - started:.1f} s: {lines[-1]}")
    return stdout + stderr


def run_refused(
    argv: list[str], names: str, tmp_path: Path, fill: dict, timeout: float = 120, env: dict | None = None
) -> str:
    """Runs tune/search.py as a user does, a process of its own, and checks the refusal."""
    started = time.time()
    done = subprocess.run(
        [sys.executable, str(SEARCH_SCRIPT.relative_to(REPO)), *argv],
        cwd=REPO,
        env={**search_env(), **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    return check_refusal(done.returncode, done.stdout, done.stderr, names, fill, started)


@pytest.fixture
def in_process(monkeypatch):
    """Runs search.main(argv) in this process, isolated as a process of its own would be, and checks
    the refusal; returns what it printed. The environment is search_env()'s (and `env`'s), the
    working directory the repository; main's logging.basicConfig writes to the captured stderr, and
    the root logger's handlers and level, and every environment variable, are put back after. Ray
    must not run before the case, nor after it (none of these refusals starts it)."""
    import ray

    from softfine_tune import search

    def run_main(argv: list[str], names: str, fill: dict, env: dict | None = None) -> str:
        assert not ray.is_initialized(), "a Ray instance runs in this process (left by another test)"
        for key in [k for k in os.environ if k.startswith(("MLFLOW_", "RAY_ADDRESS"))]:
            monkeypatch.delenv(key)
        for key, value in {**search_env(), **(env or {})}.items():
            monkeypatch.setenv(key, value)
        monkeypatch.chdir(REPO)
        saved_env = dict(os.environ)
        root = logging.getLogger()
        handlers, level = root.handlers[:], root.level
        root.handlers[:] = []  # so that main's logging.basicConfig writes to the stderr captured here
        stdout, stderr = io.StringIO(), io.StringIO()
        started = time.time()
        try:
            with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
                try:
                    code = search.main(argv)
                except SystemExit as exit:  # argparse's own errors (the script's run() lets them end it)
                    code = exit.code
        finally:
            for handler in root.handlers:
                if handler not in handlers:
                    handler.close()
            root.handlers[:] = handlers
            root.setLevel(level)
            for key in set(os.environ) - set(saved_env):
                del os.environ[key]
            os.environ.update(saved_env)
        assert not ray.is_initialized(), "the case started Ray in this process"
        return check_refusal(code, stdout.getvalue(), stderr.getvalue(), names, fill, started)

    return run_main


def prepare(tmp_path: Path, preset: str | None, record, http_port: int) -> dict:
    fill = {
        "tmp": str(tmp_path),
        "data": str(shared_data_dir()),
        "port": str(free_port()),
        "http_port": str(http_port),
    }
    fill["preset"] = PRESET.format(**fill)
    (tmp_path / "file").write_text("not a folder")
    if preset is not None:
        Path(fill["preset"]).write_text(preset)
    if record is not None:
        folder = tmp_path / "ray" / "s1"
        folder.mkdir(parents=True)
        text = record if isinstance(record, str) else json.dumps(record)
        for key, value in fill.items():
            text = text.replace(f"{{{key}}}", value)
        (folder / "softfine_search.json").write_text(text)
    return fill


@pytest.mark.parametrize("argv, names, preset, record, base, process", CASES)
def test_refused_with_one_line_naming_the_input(
    argv, names, preset, record, base, process, tmp_path, http_port, in_process
):
    fill = prepare(tmp_path, preset, record, http_port)
    # Nothing is written to the repository: results and store under tmp_path, unless the case
    # gives its own (a resumed search takes its store from its record).
    defaults = {
        "--storage-path": f"{tmp_path}/ray",
        "--mlflow-uri": f"sqlite:///{tmp_path}/m.db" if base else None,
    }
    given = {a.split("=")[0] for a in argv}
    full = [a.format(**fill) for a in (BASE if base else []) + argv]
    full += [x for flag, value in defaults.items() if value and flag not in given for x in (flag, value)]
    # Ray writes its sessions under $RAY_TMPDIR as it starts: every refusal comes before that
    env = {"RAY_TMPDIR": str(tmp_path / "raytmp")}
    if process:
        output = run_refused(full, names, tmp_path, fill, env=env)
    else:
        output = in_process(full, names, fill, env=env)
    assert not (tmp_path / "raytmp").exists()
    assert "s3cret" not in output  # a password is never printed
    prepared = {tmp_path / "ray" / "s1" / "softfine_search.json"}  # a resumed search's record, from prepare()
    written = {p for p in (tmp_path / "ray").rglob("*") if p.is_file()} - prepared
    assert not written  # where the search writes its results (--storage-path): nothing


RAY_CASES = [
    # more than any machine has, whatever this one has
    pytest.param(
        ["--gpus-per-trial", "4096"],
        "--gpus-per-trial 4096: no node of the Ray cluster has that many GPUs",
        id="gpus-per-trial-more-than-any-node",
    ),
    pytest.param(
        ["--gpus-per-trial", "0", "--cpus-per-trial", "100000"],
        "--cpus-per-trial 100000: no node of the Ray cluster has that many CPUs",
        id="cpus-per-trial-more-than-any-node",
    ),
]


@pytest.mark.parametrize("argv, names", RAY_CASES)
def test_refused_once_ray_runs(argv, names, tmp_path, http_port):
    """Refusals that need the cluster's resources: a local Ray instance starts (and stops)."""
    fill = prepare(tmp_path, None, None, http_port)
    full = [a.format(**fill) for a in BASE + argv] + [
        "--address",
        "local",
        "--storage-path",
        f"{tmp_path}/ray",
        "--mlflow-uri",
        f"sqlite:///{tmp_path}/m.db",
    ]
    run_refused(full, names, tmp_path, fill, timeout=300)
    assert not (tmp_path / "ray").exists()  # refused before the results folder was made


def first_sentences(path: Path, n: int) -> str:
    return "\n\n".join(path.read_text(encoding="utf-8").split("\n\n")[:n]) + "\n\n"


@pytest.mark.parametrize(
    "split, content, names",
    [
        pytest.param(
            "dev", "中 O\n国\n", "dev.char.bmes:2: malformed line '国'", id="dev-sentence-unreadable"
        ),
        pytest.param(
            "test", "中 B-NAME\n国 X-NAME\n", "test.char.bmes:2: tag 'X-NAME'", id="test-sentence-unreadable"
        ),
        pytest.param(
            "train", "中\n\n国\n", "train.char.bmes: no usable training sentences", id="no-train-sentence"
        ),
    ],
)
def test_data_every_trial_would_fail_on_is_refused_before_ray_starts(
    tmp_path, split, content, names, in_process
):
    """Trials skip an unreadable training sentence and refuse an unreadable dev or test one: the
    search reads the splits by the same rules before Ray starts, one line naming file and line."""
    data = tmp_path / "data" / "resume"
    data.mkdir(parents=True)
    for name in ("train", "dev", "test"):
        source = shared_data_dir() / "resume" / f"{name}.char.bmes"
        (data / f"{name}.char.bmes").write_text(
            content if name == split else first_sentences(source, 30), encoding="utf-8"
        )
    argv = [
        "--dataset",
        "resume",
        "--data-dir",
        str(tmp_path / "data"),
        "--model",
        "tiny",
        "--gpus-per-trial",
        "0",
        "--address",
        "local",
        "--storage-path",
        f"{tmp_path}/ray",
        "--mlflow-uri",
        f"sqlite:///{tmp_path}/m.db",
    ]
    output = in_process(argv, f"{data}/{names}", {})
    # no Ray instance started, no results folder
    assert "Ray" not in output and not (tmp_path / "ray").exists()
    assert not (tmp_path / "m.db").exists()  # nor the MLflow store touched


def test_verbose_shows_the_traceback_before_the_one_line(tmp_path):
    argv = [a.format(data=shared_data_dir()) for a in BASE] + [
        "-v",
        "--lr",
        "inf",
        "--storage-path",
        f"{tmp_path}/ray",
        "--mlflow-uri",
        f"sqlite:///{tmp_path}/m.db",
    ]
    done = subprocess.run(
        [sys.executable, str(SEARCH_SCRIPT.relative_to(REPO)), *argv],
        cwd=REPO,
        env=search_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and "Traceback" in done.stderr
    assert lines[-1].startswith("tune/search.py: error: --lr: Input should be a finite number")
