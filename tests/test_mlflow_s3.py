"""mlflow/server.sh with its artifacts in S3 (issue #27): a real S3 server (SeaweedFS's `weed mini` on
127.0.0.1, tests/s3_server.py) and a real tracking server started by server.sh with
`--artifacts-destination s3://BUCKET/PREFIX`.

Only the tracking server's environment holds the AWS variables (endpoint, keys, region), the way AWS
tools take them. A client process without any AWS variable, and with a home folder of its own (no
~/.aws), logs a run with an artifact and a small model through the server and reads both back: the
artifacts travel as mlflow-artifacts:/ URIs, and the objects are in the bucket under the prefix. The
credentials are in no MLflow param or tag, in no file the server writes (its store, its log, its
working directory), and not on its command line. The S3 check of server.sh refuses a destination it
cannot list, in one line that holds no secret.
"""

from __future__ import annotations

import json
import subprocess
import sys
import uuid

import psutil
import pytest
from test_mlflow_server import SERVER, Server, server_env
from tune_fixtures import free_port, processes_mentioning

from mlflow import MlflowClient

# The client's part, run in its own process: a run with a param, an artifact and a pyfunc model,
# then both read back through the server. It prints what the test checks.
CLIENT = r"""
import json, os, sys
from pathlib import Path

import mlflow
import mlflow.pyfunc
from mlflow import MlflowClient

assert not [k for k in os.environ if k.startswith("AWS_")], "the client must have no AWS variable"
uri, workdir = sys.argv[1], Path(sys.argv[2])
mlflow.set_tracking_uri(uri)


class Reverse(mlflow.pyfunc.PythonModel):
    def predict(self, context, model_input):
        return [text[::-1] for text in model_input]


experiment_id = mlflow.create_experiment("softfine-s3-artifacts")
notes = workdir / "notes.txt"
notes.write_text("soft labels: 1 / beta^(miss + gamma * wrong)\n", encoding="utf-8")
with mlflow.start_run(experiment_id=experiment_id, run_name="0.01,0.005,2,2.5") as run:
    mlflow.log_param("alpha_aug", "0.01")
    mlflow.log_artifact(str(notes), artifact_path="reports")
    model = mlflow.pyfunc.log_model(name="model", python_model=Reverse(), pip_requirements=[])
run_id = run.info.run_id
client = MlflowClient()
back = client.download_artifacts(run_id, "reports/notes.txt", str(workdir / "back"))
loaded = mlflow.pyfunc.load_model(model.model_uri)
print(json.dumps({
    "experiment_id": experiment_id, "run_id": run_id, "model_id": model.model_id,
    "artifact_uri": client.get_run(run_id).info.artifact_uri,
    "model_artifact_location": client.get_logged_model(model.model_id).artifact_location,
    "notes_back": Path(back).read_text(encoding="utf-8"),
    "prediction": list(loaded.predict(["高勇"])),
}))
"""


def without_aws(env: dict) -> dict:
    return {k: v for k, v in env.items() if not k.startswith("AWS_")}


@pytest.fixture(scope="module")
def s3_tracking(s3_server, tmp_path_factory):
    """server.sh in the foreground, its artifacts in the test S3 server under a prefix of its own."""
    base = tmp_path_factory.mktemp("mlflow-s3")
    store, cwd = base / "store", base / "cwd"
    cwd.mkdir()
    prefix = f"mlflow-test-{uuid.uuid4().hex[:8]}/artifacts"
    destination = s3_server.uri(prefix)
    env = {**without_aws(server_env(MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")), **s3_server.env}
    server = Server(store, cwd, "--artifacts-destination", destination, env=env)
    try:
        yield server, destination, prefix, cwd
    finally:
        server.stop()


def test_client_without_aws_credentials_logs_artifacts_and_a_model_into_s3(s3_tracking, s3_server, tmp_path):
    server, destination, prefix, cwd = s3_tracking
    home = tmp_path / "home"
    home.mkdir()
    env = {**without_aws(server_env()), "HOME": str(home), "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2"}
    client = subprocess.run(
        [sys.executable, "-c", CLIENT, server.uri, str(tmp_path)],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert client.returncode == 0, client.stderr[-3000:]
    result = json.loads(client.stdout.strip().splitlines()[-1])
    assert result["notes_back"] == "soft labels: 1 / beta^(miss + gamma * wrong)\n"
    assert result["prediction"] == ["勇高"]
    # The client saw only the server's proxy URIs, never the bucket.
    assert result["artifact_uri"].startswith("mlflow-artifacts:/")
    assert result["model_artifact_location"].startswith("mlflow-artifacts:/")

    # The objects are in the bucket, under the prefix; nothing went to a local artifacts folder.
    from pyarrow.fs import FileSelector, FileType

    fs = s3_server.fs()
    root = destination[len("s3://") :]
    keys = {
        info.path[len(root) + 1 :]
        for info in fs.get_file_info(FileSelector(root, recursive=True))
        if info.type == FileType.File
    }
    notes_key = f"{result['experiment_id']}/{result['run_id']}/artifacts/reports/notes.txt"
    assert notes_key in keys, sorted(keys)
    with fs.open_input_stream(f"{root}/{notes_key}") as stream:
        assert stream.read().decode("utf-8") == result["notes_back"]
    model_files = {k.rsplit("/", 1)[-1] for k in keys if f"/{result['model_id']}/" in k}
    assert {"MLmodel", "python_model.pkl"} <= model_files, sorted(keys)
    assert not (server.store / "artifacts").exists()
    assert f"artifacts in {destination}" in server.log.read_text()  # server.sh's start-up line

    # The credentials are nowhere in MLflow: params and tags of the run, the experiment, the model.
    secrets = [s3_server.env["AWS_SECRET_ACCESS_KEY"], s3_server.env["AWS_ACCESS_KEY_ID"]]
    tracking = MlflowClient(tracking_uri=server.uri)
    run = tracking.get_run(result["run_id"])
    experiment = tracking.get_experiment(result["experiment_id"])
    model = tracking.get_logged_model(result["model_id"])
    recorded = [
        run.data.params,
        run.data.tags,
        experiment.tags,
        model.params,
        model.tags,
        {"artifact_uri": run.info.artifact_uri, "location": experiment.artifact_location},
    ]
    assert run.data.params == {"alpha_aug": "0.01"}
    for mapping in recorded:
        for key, value in mapping.items():
            for secret in secrets:
                assert secret not in f"{key}={value}", (key, value)

    # ... nor in any file the server wrote (its store: the SQLite database; its log; its working
    # directory), nor on its command line (the pid file of --daemon records that).
    written = [p for p in server.store.rglob("*") if p.is_file()] + [server.log]
    assert server.store / "mlflow.db" in written
    for path in written:
        data = path.read_bytes()
        for secret in secrets:
            assert secret.encode() not in data, path
    assert not list(cwd.iterdir())
    cmdline = " ".join(psutil.Process(server.proc.pid).cmdline())
    assert not [s for s in secrets if s in cmdline]


BAD_S3 = {
    # no keys, no profile, no ~/.aws, no instance role (the metadata service is not asked)
    "no-credentials": (
        {"AWS_ACCESS_KEY_ID": None, "AWS_SECRET_ACCESS_KEY": None, "AWS_EC2_METADATA_DISABLED": "true"},
        "no AWS credentials for this server",
    ),
    # keys the S3 server does not accept: refused when listing, and the secret is not repeated
    "wrong-secret": (
        {"AWS_SECRET_ACCESS_KEY": "not-the-secret-4f1c"},
        "S3 refused to list it (SignatureDoesNotMatch",
    ),
}


@pytest.mark.parametrize("case", BAD_S3, ids=BAD_S3.keys())
def test_s3_destination_it_cannot_list_is_refused_in_one_line(case, s3_server, tmp_path, adopting_orphans):
    changes, message = BAD_S3[case]
    env = {**without_aws(server_env()), **s3_server.env, "HOME": str(tmp_path)}
    for key, value in changes.items():
        env.pop(key) if value is None else env.update({key: value})
    store, destination = tmp_path / "store", s3_server.uri("refused")
    result = subprocess.run(
        [
            str(SERVER),
            "--store",
            str(store),
            "--daemon",
            "--port",
            str(free_port()),
            "--artifacts-destination",
            destination,
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    lines = result.stderr.splitlines()
    assert result.returncode != 0
    assert len(lines) == 1 and lines[0].startswith(
        f"mlflow/server.sh: --artifacts-destination {destination}: "
    ), result.stderr
    assert message in lines[0], lines[0]
    for secret in ("not-the-secret-4f1c", s3_server.env["AWS_SECRET_ACCESS_KEY"]):
        assert secret not in result.stdout + result.stderr
    assert not processes_mentioning(str(store)) and not (store / "server.pid").exists()  # nothing started
    assert not (store / "artifacts").exists()
