"""mlflow/server.sh: option values of `mlflow server` that its parser takes as any text, and the
server would trip over only once running (or never), are refused before anything starts, in one
line naming the option. (The script's other bad input: test_mlflow_server.py.)"""

from __future__ import annotations

import subprocess

import pytest
from test_mlflow_server import SERVER, server_env
from tune_fixtures import free_port, processes_mentioning

CASES = {
    "workers-zero": (["--workers", "0"], "--workers must be a whole number of at least 1, got '0'"),
    "workers-not-a-number": (
        ["--workers", "many"],
        "--workers must be a whole number of at least 1, got 'many'",
    ),
    "backend-store-unknown-scheme": (
        ["--backend-store-uri", "bogus://u:s3cret@db/x"],
        "--backend-store-uri bogus://u:***@db/x: not a store MLflow can use",
    ),
    "registry-store-unknown-scheme": (
        ["--registry-store-uri", "nope://x"],
        "--registry-store-uri nope://x: not a store MLflow can use",
    ),
    "backend-store-empty": (
        ["--backend-store-uri", ""],
        "--backend-store-uri '': empty; give a value or leave the option out",
    ),
    "artifacts-destination-empty": (["--artifacts-destination", ""], "--artifacts-destination '': empty"),
    "host-empty": (["--host", ""], "--host '': empty"),
    "uvicorn-opts-empty": (["--uvicorn-opts", ""], "--uvicorn-opts '': empty"),
    "x-frame-options-unknown": (
        ["--x-frame-options", "ALLOWALL"],
        "--x-frame-options must be SAMEORIGIN, DENY or NONE, got 'ALLOWALL'",
    ),
}


@pytest.mark.parametrize("args, names", CASES.values(), ids=CASES.keys())
def test_a_value_mlflow_server_would_trip_over_is_refused(args, names, tmp_path, adopting_orphans):
    store = tmp_path / "store"
    result = subprocess.run(
        [str(SERVER), "--store", str(store), "--daemon", "--port", str(free_port()), *args],
        cwd=tmp_path,
        env=server_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    lines = result.stderr.splitlines()
    assert result.returncode != 0
    assert len(lines) == 1 and lines[0].startswith("mlflow/server.sh: "), result.stderr
    assert names in lines[0], (names, lines[0])
    assert "s3cret" not in result.stdout + result.stderr
    assert not processes_mentioning(str(store)) and not (store / "server.pid").exists()  # nothing started
