"""A search whose state is on S3 (`--storage-path s3://BUCKET/PREFIX`), against a real S3 server
on 127.0.0.1 (the `s3_server` fixture: SeaweedFS, started and stopped by the tests), with the
endpoint and keys in the environment as AWS tools take them:

* everything the search keeps is there: Ray Tune's experiment state and the trials' checkpoints,
  the search's record, its Optuna study, summary.json and trials.csv; no key is in any object
  stored, in MLflow's params and tags, or in what the search printed;
* the head's disk lost: a search whose driver (and the Ray it ran on) is killed mid-search, every
  local folder it used deleted, is resumed by a driver on a fresh Ray with an empty working folder
  and nothing but `--resume NAME --storage-path s3://...`: every point once in MLflow, no step
  logged twice, the selection, each point's scores and the champion as the uninterrupted search
  gave them;
* a storage that cannot be used (no such bucket, wrong keys, no server, keys in the URI) is one
  line naming --storage-path, before Ray starts; a second driver of the search, on another
  machine's disk, is refused by the lock object on S3, and a lock whose holder stopped renewing it
  is taken over.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import tempfile
import uuid
from pathlib import Path

import pytest
from tune_fixtures import (
    children,
    kill_the_driver_when,
    new_store,
    parents,
    point,
    run_search,
    shared_data_dir,
    small_search_flags,
)

from softfine_tune.cli import RECORD

GRID = ("--alphas", "0.1,0.1", "--beta", "2", "3", "--gamma", "2")  # 2 points
# 24 sentences at batch 2: 12 steps, an evaluation (and a checkpoint) every 4 steps; at this rate
# the two points' best dev F1 differ (0 and 0.0217 here), so that the selection is no tie
TRAINING = ("--epochs", "1", "--eval-every", "4", "--lr", "2e-2")


@pytest.fixture
def aws_env(s3_server, monkeypatch, tmp_path):
    """The S3 server's endpoint and keys in this process's environment (and so in the searches and
    Ray instances the test starts); the drivers' working folders under tmp_path (XDG_CACHE_HOME)."""
    for key, value in s3_server.env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return s3_server


def start_ray() -> tuple[str, Path]:
    """A local Ray instance of this test's own, its session files in a folder of their own (the
    head's disk); its address and that folder."""
    import ray

    temp = Path(tempfile.mkdtemp(prefix="sf-ray-"))  # short: Ray's socket paths have a length limit
    ray.init(
        address="local",
        num_cpus=2,
        num_gpus=0,
        include_dashboard=False,
        logging_level="WARNING",
        _temp_dir=str(temp),
    )
    return ray.get_runtime_context().gcs_address, temp


def stored_objects(s3_server, prefix: str) -> dict[str, bytes]:
    """Every object under s3://BUCKET/PREFIX, by key relative to it."""
    from pyarrow.fs import FileSelector

    fs, root = s3_server.fs(), s3_server.uri(prefix)[len("s3://") :]
    found = {}
    for info in fs.get_file_info(FileSelector(root, recursive=True, allow_not_found=True)):
        if info.is_file:
            with fs.open_input_stream(info.path) as stream:
                found[info.path[len(root) + 1 :]] = stream.readall()
    return found


def secrets(s3_server) -> list[bytes]:
    return [s3_server.env["AWS_SECRET_ACCESS_KEY"].encode(), s3_server.env["AWS_ACCESS_KEY_ID"].encode()]


def saved_trials_on(uri: str) -> dict:
    """The trials of the search's last experiment snapshot on S3 (none before the first)."""
    from ray.tune import ExperimentAnalysis

    try:
        return {t.trial_id: t for t in ExperimentAnalysis(uri).trials}
    except Exception:  # noqa: BLE001 - no snapshot yet
        return {}


def lose_the_named_checkpoint(s3_server, trial) -> int | None:
    """The worst moment to be killed at, every time (test_tune_search.py does it on a folder): Ray
    had deleted the checkpoint its last snapshot names (num_to_keep=1) on registering the next one,
    and the driver died before the snapshot that names the next one. The named one's files become
    the next one's (a next one already there may be half-written: the trial was uploading it),
    unless the driver died at that moment by itself. Returns the step the trial goes on from: the
    step of the checkpoint that takes the named one's place (None: a final one)."""
    from pyarrow.fs import FileSelector

    fs, named = s3_server.fs(), trial.checkpoint.path
    following = f"{named.rpartition('_')[0]}_{int(named.rpartition('_')[2]) + 1:06d}"

    def step_of(checkpoint: str) -> int | None:
        if fs.get_file_info(f"{checkpoint}/final.json").is_file:
            return None
        with fs.open_input_stream(f"{checkpoint}/metrics.jsonl") as stream:
            return json.loads(stream.readall().decode().splitlines()[-1])["step"]

    if not any(
        i.is_file for i in fs.get_file_info(FileSelector(named, recursive=True, allow_not_found=True))
    ):
        return step_of(following)  # Ray deleted it itself: the next one takes its place
    step = step_of(named)
    fs.delete_dir_contents(following, missing_dir_ok=True)
    pyarrow_copy(fs, named, following)
    fs.delete_dir(named)
    return step


def pyarrow_copy(fs, source: str, destination: str) -> None:
    from pyarrow.fs import copy_files

    copy_files(source, destination, source_filesystem=fs, destination_filesystem=fs, use_threads=False)


def test_a_search_on_s3_keeps_everything_there_and_resumes_on_an_empty_disk(aws_env, tmp_path, monkeypatch):
    import ray
    from mlflow.tracking import MlflowClient

    s3 = aws_env
    prefix = f"searches-{uuid.uuid4().hex[:8]}"
    storage = s3.uri(prefix)
    uri = new_store(tmp_path / "tracking" / "mlflow.db")  # the tracking server: it outlives the head
    client = MlflowClient(tracking_uri=uri)
    flags = [
        *small_search_flags(shared_data_dir(), *GRID, *TRAINING),
        "--mlflow-uri",
        uri,
        "--storage-path",
        storage,
    ]
    address, head_disk = start_ray()
    try:
        # 1. An uninterrupted search: everything it keeps is on S3.
        code, output = run_search([*flags, "--name", "whole", "--experiment-name", "whole"])
        assert code == 0, output[-3000:]
        stored = stored_objects(s3, prefix)
        names = set(stored)
        for name in (
            RECORD,
            "optuna.db",
            "summary.json",
            "trials.csv",
            "mlflow_runs.search.json",
            "tuner.pkl",
        ):
            assert f"whole/{name}" in names, sorted(names)
        assert any(n.startswith("whole/experiment_state-") for n in names)
        record = json.loads(stored[f"whole/{RECORD}"])
        summary = json.loads(stored["whole/summary.json"])
        assert record["stage"] == "done" and summary["results"] == f"{storage}/whole"
        assert summary["selected_checkpoint"].startswith(f"{storage}/whole/trial_")  # a URI, loaded from S3
        assert summary["model_uri"] and summary["registered_model"].startswith("softfine-resume@champion")
        (parent,) = parents(uri, "whole")
        kids = children(uri, "whole", parent.info.run_id)
        assert len(kids) == 2 and all(k.info.status == "FINISHED" for k in kids)
        for kid in kids:  # each trial's final checkpoint is on S3, and its run says where
            checkpoint = kid.data.tags["softfine.checkpoint"]
            assert checkpoint.startswith(f"{storage}/whole/trial_"), checkpoint
            assert f"{checkpoint[len(storage) + 1 :]}/best/model.safetensors" in names
        with open(tmp_path / "study.db", "wb") as f:  # the study on S3 is the whole study
            f.write(stored["whole/optuna.db"])
        import optuna

        study = optuna.load_study(study_name="whole", storage=f"sqlite:///{tmp_path / 'study.db'}")
        assert len([t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]) == 2
        expected = {point(k): k.data.metrics["best_dev_f1"] for k in kids}
        assert len(set(expected.values())) == 2, expected  # a selection that is no tie-break
        selected = point(next(k for k in kids if k.info.run_id == parent.data.params["selected_run_id"]))

        # 2. The same search, its driver killed once a point has ended and the other has a checkpoint
        # in Ray's last snapshot (on S3: what a resume starts from).
        def one_ended_and_the_next_checkpointed() -> bool:
            saved = saved_trials_on(f"{storage}/cut")
            ended = [t for t in saved.values() if t.status == "TERMINATED"]
            return bool(ended) and any(t.status != "TERMINATED" and t.checkpoint for t in saved.values())

        driver_dir = tmp_path / "driver"
        driver_dir.mkdir()
        kill_the_driver_when(
            [*flags, "--name", "cut", "--experiment-name", "cut", "--max-concurrent", "1"],
            address,
            driver_dir,
            one_ended_and_the_next_checkpointed,
        )
        killed = parents(uri, "cut")[0]
        # Ray's last snapshot, what a resume starts from (the driver may have gone on a little between
        # the check and the kill): a trial it has ended, and one that goes on from a checkpoint.
        at_kill = saved_trials_on(f"{storage}/cut")
        ended = {t for t, trial in at_kill.items() if trial.status == "TERMINATED"}
        going = {t: trial for t, trial in at_kill.items() if trial.status != "TERMINATED"}
        assert len(ended) == 1 and len(going) == 1 and all(t.checkpoint for t in going.values()), at_kill
        (interrupted,) = going.values()
        goes_on_from = lose_the_named_checkpoint(s3, interrupted)
        finished_before = {
            k.info.run_id: k.info.end_time
            for k in children(uri, "cut", killed.info.run_id)
            if k.data.tags["softfine.trial_id"] in ended
        }
        # ended in MLflow too
        assert len(finished_before) == 1 and all(finished_before.values()), finished_before
        # The head's disk is lost: its Ray, Ray's session files, the driver's working folder.
        ray.shutdown()
        working = tmp_path / "cache" / "softfine" / "searches" / "s3" / "softfine" / prefix / "cut"
        assert (working / RECORD).is_file()  # where the killed driver worked
        for folder in (head_disk, tmp_path / "cache", driver_dir):
            shutil.rmtree(folder)
        # A fresh head: a new Ray, an empty working folder elsewhere.
        monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "fresh-head"))
        address, head_disk = start_ray()
        code, output = run_search(["--resume", "cut", "--storage-path", storage])
        assert code == 0, output[-3000:]
        assert f"resuming search cut ({storage}/cut)" in output
        # mended on S3
        assert f"trial {interrupted.trial_id}: checkpoint_" in output and "deleted by Ray" in output
        (parent,) = parents(uri, "cut")  # the same parent run
        assert parent.info.run_id == killed.info.run_id and parent.info.status == "FINISHED"
        kids = children(uri, "cut", parent.info.run_id)
        assert sorted(point(k) for k in kids) == sorted(expected)  # every point, once
        assert all(k.info.status == "FINISHED" for k in kids)
        for kid in kids:
            steps = [m.step for m in client.get_metric_history(kid.info.run_id, "dev_f1")]
            assert sorted(steps) == [4, 8, 12], steps  # every evaluation, none twice
            if kid.info.run_id in finished_before:  # not trained again
                assert kid.info.end_time == finished_before[kid.info.run_id]
                assert kid.data.tags["softfine.attempt"] == "1"
            else:  # went on in its run, from the checkpoint that took the lost one's place on S3
                assert int(kid.data.tags["softfine.attempt"]) >= 2
                resumed = kid.data.tags.get("softfine.resumed_from_step")
                assert (int(resumed) if resumed else None) == goes_on_from, (resumed, goes_on_from)
        # As the uninterrupted search: each point's scores, the selection, the champion.
        assert {point(k): k.data.metrics["best_dev_f1"] for k in kids} == expected
        chosen = next(k for k in kids if k.info.run_id == parent.data.params["selected_run_id"])
        assert point(chosen) == selected
        champion = client.get_model_version_by_alias("softfine-resume", "champion")
        assert champion.run_id == parent.info.run_id
        summary = json.loads(stored_objects(s3, f"{prefix}/cut")["summary.json"])
        assert summary["selected_checkpoint"].startswith(f"{storage}/cut/trial_") and not summary.get(
            "model_error"
        )
        fresh = tmp_path / "fresh-head" / "softfine" / "searches" / "s3" / "softfine" / prefix / "cut"
        assert (fresh / RECORD).is_file()  # the new head's working folder
    finally:
        ray.shutdown()
        shutil.rmtree(head_disk, ignore_errors=True)

    # 3. No key anywhere: the objects stored, MLflow's params and tags, what the searches printed.
    everything = stored_objects(s3, prefix)
    assert ".softfine_search.lock" not in {Path(k).name for k in everything}  # released at the end
    for secret in secrets(s3):
        assert secret.decode() not in output
        for key, data in everything.items():
            assert secret not in data, key
        for run in (
            parents(uri, "whole") + parents(uri, "cut") + children(uri, "whole") + children(uri, "cut")
        ):
            assert secret.decode() not in json.dumps([run.data.params, run.data.tags]), run.info.run_id


def refused(argv: list, *fragments: str) -> str:
    import ray

    code, output = run_search([str(a) for a in argv])
    last = output.strip().splitlines()[-1]
    assert code == 2 and "Traceback" not in output, output[-3000:]
    assert last.startswith(("tune/search.py: error: --storage-path ", "tune/search.py: error: --name")), last
    for fragment in fragments:
        assert fragment in last, f"{fragment!r} not in {last!r}"
    assert not ray.is_initialized()  # before Ray starts
    return output


def test_a_storage_that_cannot_be_used_is_one_line_before_ray_starts(aws_env, tmp_path, monkeypatch):
    s3 = aws_env
    flags = small_search_flags(shared_data_dir(), *GRID, "--mlflow-uri", f"sqlite:///{tmp_path / 'm.db'}")
    refused(
        [*flags, "--storage-path", "s3://no-such-bucket-here/p"],
        "--storage-path s3://no-such-bucket-here/p: bucket 'no-such-bucket-here' does not exist",
        f"({s3.endpoint})",
        "AWS_ENDPOINT_URL",
    )
    assert s3.fs().get_file_info("no-such-bucket-here").type.name == "NotFound"  # nothing created
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-key-" + uuid.uuid4().hex)
    output = refused(
        [*flags, "--storage-path", s3.uri("p")],
        f"--storage-path {s3.uri('p')}: cannot reach it or write there",
        "ACCESS_DENIED",
        "AWS_ACCESS_KEY_ID",
    )
    assert os.environ["AWS_SECRET_ACCESS_KEY"] not in output
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3.env["AWS_SECRET_ACCESS_KEY"])
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{closed}")
    refused(
        [*flags, "--storage-path", s3.uri("p")],
        "cannot reach it or write there",
        "NETWORK_CONNECTION",
        f"endpoint http://127.0.0.1:{closed}",
    )
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3.endpoint)
    refused(
        ["--resume", "x", "--storage-path", "s3://no-such-bucket-here/p"],
        "bucket 'no-such-bucket-here' does not exist",
    )
    output = refused(
        [*flags, "--storage-path", "s3://AKIAEXAMPLE:wJalrXUtnFEMI@softfine/p"],
        "--storage-path s3://...@softfine/p: no credentials in the URI",
    )
    assert "wJalrXUtnFEMI" not in output and "AKIAEXAMPLE" not in output
    refused(
        [*flags, "--storage-path", f"{s3.uri('p')}?endpoint_override=elsewhere"],
        "give the bucket and prefix alone (s3://BUCKET/PREFIX)",
        "AWS_ENDPOINT_URL",
    )
    assert not (tmp_path / "cache").exists()  # no working folder either


def test_one_driver_per_search_on_s3_whatever_machine_it_runs_on(aws_env, tmp_path, monkeypatch):
    from softfine_tune.lock import RemoteLock, one_driver
    from softfine_tune.space import SearchError
    from softfine_tune.storage import SearchFiles, Storage

    s3 = aws_env
    storage = Storage(s3.uri(f"locks-{uuid.uuid4().hex[:8]}"))
    first = RemoteLock(storage, "twice")
    first.acquire()  # what the first driver holds while it runs
    try:
        # A second driver on another machine's disk (its own working folder: the local lock is free)
        monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "other-machine"))
        with pytest.raises(SearchError) as refusal, one_driver(SearchFiles(storage, "twice")):
            pass
        assert str(refusal.value).startswith(
            f"--name twice: the search in {storage.uri}/twice is running in process "
            f"{os.getpid()} on {socket.gethostname()}; wait for it to end"
        )
    finally:
        first.release()
    assert not storage.exists("twice", ".softfine_search.lock")
    assert not (tmp_path / "other-machine").exists()  # the refused driver left nothing
    # A holder on another host that stops renewing its lock (its machine lost): taken over once its
    # lease has run out, and the old holder's release leaves the new holder's lock alone.
    monkeypatch.setattr(RemoteLock, "LEASE", 3.0)
    lost = RemoteLock(storage, "lost")
    lost.holder["host"] = "a-machine-that-is-gone"
    lost.acquire()
    lost._stop.set()  # it renews no more
    taker = RemoteLock(storage, "lost")
    taker.acquire()  # waits for the lease to run out
    try:
        holder = json.loads(storage.read_bytes("lost", ".softfine_search.lock"))
        assert holder["driver"] == taker.holder["driver"]
        lost.release()
        assert (
            json.loads(storage.read_bytes("lost", ".softfine_search.lock"))["driver"]
            == taker.holder["driver"]
        )
    finally:
        taker.release()
    assert not storage.exists("lost", ".softfine_search.lock")
