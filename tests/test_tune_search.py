"""tune/search.py end to end on one local Ray instance (shared by the tests of this module), the
tiny encoder and a few Resume sentences: the full 36-point grid, TPE with seeds, ASHA, a crashed
trial retried in its MLflow run, a killed driver resumed, a tracking server that stops, the soft
scope as a grid dimension, one configuration over seeds (an ablation), a failure after the parent
run was created, a tracking server with a password."""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from tune_fixtures import (
    SEARCH_SCRIPT,
    MlflowServer,
    children,
    kill_the_driver_when,
    new_store,
    parents,
    point,
    read_summary,
    read_trials,
    run_crashing_search,
    run_search,
    saved_trials,
    saved_trials_so_far,
    shared_data_dir,
    slot_seconds,
    small_search_flags,
)

from softfine_tune.space import alphas_key

PAPER_POINTS = {
    (alphas_key(a, f), b, g)
    for a, f in [(0.1, 0.1), (0.1, 0.05), (0.01, 0.01), (0.01, 0.005)]
    for b in (2.0, 3.0, 4.0)
    for g in (1.5, 2.0, 2.5)
}


def check_selection(uri: str, parent, kids: list) -> None:
    """The parent's selected params are those of the child with the best dev F1, and its metrics
    say what that child's F1s were computed on."""
    best = max(k.data.metrics["best_dev_f1"] for k in kids)
    tied = [k for k in kids if k.data.metrics["best_dev_f1"] == best]
    params, metrics = parent.data.params, parent.data.metrics
    chosen = next(k for k in kids if k.info.run_id == params["selected_run_id"])
    assert chosen in tied
    for key in ("alpha_aug", "alpha_fea", "beta", "gamma"):
        assert float(params[f"selected_{key}"]) == float(chosen.data.params[key])
    assert metrics["best_dev_f1"] == pytest.approx(best)
    assert metrics["best_test_f1"] == pytest.approx(chosen.data.metrics["test_f1"])
    for key in ("dev_sentences", "dev_gold_entities", "test_sentences", "test_gold_entities"):
        assert metrics[f"best_{key}"] == chosen.data.metrics[key] > 0, key


def test_full_grid_runs_each_point_once_in_36_child_runs(ray_local, mlflow_server, tmp_path):
    from mlflow.tracking import MlflowClient

    import mlflow

    data = shared_data_dir()
    started = time.time()
    code, output = run_search(
        small_search_flags(
            data,
            "--cpus-per-trial",
            "0.5",
            "--mlflow-uri",
            mlflow_server.uri,
            "--experiment-name",
            "grid36",
            "--storage-path",
            tmp_path,
            "--name",
            "grid36",
        )
    )
    assert code == 0
    print(f"36-point grid: {time.time() - started:.0f} s")
    (parent,) = parents(mlflow_server.uri, "grid36")
    kids = children(mlflow_server.uri, "grid36", parent.info.run_id)
    assert len(kids) == 36
    assert {point(k) for k in kids} == PAPER_POINTS  # each of the 36 points exactly once
    assert all(k.info.status == "FINISHED" for k in kids)
    summary = read_summary(tmp_path, "grid36")
    assert summary["terminated"] == 36 and summary["max_trials_at_once"] >= 3  # many trials in flight
    assert summary["best_dev_sentences"] == summary["best_test_sentences"] == 24
    assert summary["best_dev_gold_entities"] > 0 and summary["best_test_gold_entities"] > 0
    assert (
        f"test F1 {summary['best_test_f1']:.4f} on 24 sentences, {summary['best_test_gold_entities']} gold "
        "entities"
    ) in output

    client = MlflowClient(tracking_uri=mlflow_server.uri)
    kid = kids[0]
    for key in (
        "train_loss",
        "train_loss_soft",
        "train_loss_aug",
        "train_loss_fea",
        "dev_precision",
        "dev_recall",
        "dev_f1",
        "best_dev_f1",
        "test_precision",
        "test_recall",
        "test_f1",
        "dev_sentences",
        "dev_gold_entities",
        "test_sentences",
        "test_gold_entities",
    ):
        assert key in kid.data.metrics, key
    assert kid.data.metrics["dev_sentences"] == kid.data.metrics["test_sentences"] == 24  # --limit-eval 24
    for key in (
        "alpha_aug",
        "alpha_fea",
        "beta",
        "gamma",
        "soft_scope",
        "lr",
        "batch_size",
        "epochs",
        "dropout",
        "weight_decay",
        "warmup_ratio",
        "schedule",
        "seed",
        "model",
        "limit_train",
        "tiny_layers",
    ):
        assert key in kid.data.params, key
    assert kid.data.params["soft_scope"] == "paper" and kid.data.params["tiny_hidden"] == "64"
    tags = kid.data.tags
    assert len(tags["mlflow.source.git.commit"]) == 40 and len(tags["softfine.data_sha256"]) == 64
    assert tags["mlflow.source.name"] == "tune/search.py" and kid.data.params["seed"] == "42"
    assert tags["softfine.device"] == "cpu" and tags["softfine.hostname"]
    for package in ("torch", "transformers", "ray", "optuna", "mlflow"):
        assert tags[f"softfine.version.{package}"], package
    resolved = client.download_artifacts(kid.info.run_id, "config.json", str(tmp_path / "dl"))
    assert json.loads(Path(resolved).read_text())["train_config"]["beta"] == float(kid.data.params["beta"])
    # A run says what it is: named by its point, its data splits as dataset inputs.
    assert {k.info.run_name for k in kids} == {f"{key},{b:g},{g:g}" for key, b, g in PAPER_POINTS}
    inputs = client.get_run(kid.info.run_id).inputs.dataset_inputs
    assert {i.dataset.name for i in inputs} == {"resume-train", "resume-dev", "resume-test"}
    assert {t.value for i in inputs for t in i.tags if t.key == "mlflow.data.context"} == {
        "train",
        "dev",
        "test",
    }

    check_selection(mlflow_server.uri, parent, kids)
    assert parent.data.params["dataset"] == "resume" and parent.data.params["sampler"] == "grid"
    assert parent.data.params["cluster_nodes"] == "1" and len(parent.data.params["code_version"]) >= 40
    assert json.loads(parent.data.params["grid"])["beta"] == [2.0, 3.0, 4.0]
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"trials.csv", "dev_f1_vs_hyperparameters.png", "optuna", "occupancy_timeline.png"} <= artifacts
    # A CPU search's occupancy: its trial slots are Ray's 2 CPUs (ray_local) at 0.5 CPU per trial.
    busy = parent.data.metrics["cpu_busy_fraction"]
    held, span = slot_seconds(read_trials(tmp_path / "grid36"), lambda r: 0.5)
    assert 0 < busy <= 1 and busy == pytest.approx(held / (2 * span))
    assert busy == pytest.approx(summary["cpu_busy_fraction"])
    assert summary["trial_slots"] == "cpu" and "gpu_busy_fraction" not in parent.data.metrics
    assert f"the CPUs were busy {busy:.0%} of the time while trials remained" in output
    optuna_files = {a.path for a in client.list_artifacts(parent.info.run_id, "optuna")}
    assert {
        f"optuna/{name}"
        for name in (
            "param_importances.png",
            "slice.png",
            "contour_beta_gamma.png",
            "optimization_history.png",
            "trials.json",
        )
    } <= optuna_files
    import optuna

    study = optuna.load_study(study_name="grid36", storage=f"sqlite:///{tmp_path / 'grid36' / 'optuna.db'}")
    assert len(study.trials) == 36 and study.best_value == pytest.approx(parent.data.metrics["best_dev_f1"])
    # The selected model, registered with the alias champion.
    champion = client.get_model_version_by_alias("softfine-resume", "champion")
    assert champion.run_id == parent.info.run_id and summary["registered_model"].startswith(
        "softfine-resume@champion"
    )
    table = Path(
        client.download_artifacts(parent.info.run_id, "trials.csv", str(tmp_path / "dl"))
    ).read_text()
    assert len(table.strip().splitlines()) == 1 + 36
    png = Path(
        client.download_artifacts(parent.info.run_id, "dev_f1_vs_hyperparameters.png", str(tmp_path / "dl"))
    )
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    mlflow.set_tracking_uri(mlflow_server.uri)
    model = mlflow.pyfunc.load_model(f"runs:/{parent.info.run_id}/model")
    texts = ["高勇：男，中国国籍，无境外居留权。", "1985年毕业于北京大学。"]
    entities = model.predict(texts)
    assert len(entities) == 2
    for text, found in zip(texts, entities):
        for entity in found:
            assert set(entity) == {"text", "category", "levels", "start", "end"}
            assert text[entity["start"] : entity["end"] + 1] == entity["text"]
    assert "search: 36/36 points finished in" in output and "== Status ==" not in output  # not Ray's table
    assert (
        "Best configurations by dev F1" in output and "mlflow ui" not in output
    )  # a server: its URL instead
    assert f"{mlflow_server.uri}/#/experiments/" in output


def test_tpe_search_then_seeds_on_the_embedded_store(ray_local, tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow' / 'mlflow.db'}"
    code, output = run_search(
        small_search_flags(
            shared_data_dir(),
            "--sampler",
            "tpe",
            "--num-samples",
            "4",
            "--seeds",
            "2",
            "--cpus-per-trial",
            "1",  # 2 trial actors to start, not 4: each imports torch and transformers
            "--mlflow-uri",
            uri,
            "--experiment-name",
            "tpe",
            "--storage-path",
            tmp_path / "ray",
            "--name",
            "tpe",
        )
    )
    assert code == 0
    (parent,) = parents(uri, "tpe")
    kids = children(uri, "tpe", parent.info.run_id)
    search = [k for k in kids if k.data.tags["softfine.phase"] == "search"]
    seeds = [k for k in kids if k.data.tags["softfine.phase"] == "seeds"]
    assert len(search) == 4 and len(seeds) == 2
    assert all(point(k) in PAPER_POINTS for k in search)
    check_selection(uri, parent, search)
    assert sorted(k.data.params["seed"] for k in seeds) == ["42", "43"]
    assert all(
        point(k) == point(next(s for s in search if s.info.run_id == parent.data.params["selected_run_id"]))
        for k in seeds
    )
    metrics = parent.data.metrics
    values = [k.data.metrics["best_dev_f1"] for k in seeds]
    assert metrics["seeds_dev_f1_mean"] == pytest.approx(sum(values) / 2)
    assert (
        "seeds_dev_f1_std" in metrics and "seeds_test_f1_mean" in metrics and "seeds_test_f1_std" in metrics
    )
    assert metrics["seeds_dev_sentences"] == metrics["seeds_test_sentences"] == 24
    assert metrics["seeds_dev_gold_entities"] > 0 and metrics["seeds_test_gold_entities"] > 0
    assert "(mean ± standard deviation)" in output
    assert f"mlflow ui --backend-store-uri {uri}" in output
    from mlflow.tracking import MlflowClient

    experiment = MlflowClient(tracking_uri=uri).get_experiment_by_name("tpe")
    assert experiment.artifact_location == (tmp_path / "mlflow" / "artifacts").as_uri()  # beside the store


def test_asha_search_stops_weak_trials_and_logs_them(ray_local, tmp_path):
    # One trial at a time: each one meets ASHA's rungs (epochs 1, 2, 4) after the trials before it,
    # in the grid's order, so which trials stop does not hang on which one reached a rung first.
    uri = new_store(tmp_path / "mlflow.db")
    code, output = run_search(
        small_search_flags(
            shared_data_dir(),
            "--scheduler",
            "asha",
            "--alphas",
            "0.1,0.1",
            "0.01,0.01",
            "--beta",
            "2",
            "3",
            "--gamma",
            "2",
            "--epochs",
            "4",
            "--max-concurrent",
            "1",
            "--mlflow-uri",
            uri,
            "--experiment-name",
            "asha",
            "--storage-path",
            tmp_path / "ray",
            "--name",
            "asha",
        )
    )
    assert code == 0
    (parent,) = parents(uri, "asha")
    kids = children(uri, "asha", parent.info.run_id)
    assert len(kids) == 4 and {k.info.status for k in kids} <= {"FINISHED", "KILLED"}
    summary = read_summary(tmp_path / "ray", "asha")
    assert summary["terminated"] + summary["stopped"] == 4 and summary["error"] == 0
    assert summary["stopped"] >= 1 and parent.data.metrics["trials_stopped_early"] == summary["stopped"]
    for kid in kids:
        stopped = kid.info.status == "KILLED"
        assert (kid.data.tags.get("softfine.stopped_early") == "true") == stopped
        assert ("test_f1" in kid.data.metrics) != stopped
    print(f"ASHA: {summary['stopped']} of 4 trials stopped early")
    check_selection(uri, parent, [k for k in kids if k.info.status == "FINISHED"] or kids)
    assert parent.data.params["scheduler"] == "asha"


def test_a_crashed_trial_goes_on_from_its_checkpoint_in_the_same_run(ray_local, tmp_path):
    uri = new_store(tmp_path / "mlflow.db")
    # Evaluations at steps 2, 4, 6, 8, 10, 12; the trial's process is killed once it has reported
    # its first checkpoint.
    code, output, killed = run_crashing_search(tmp_path, "--alphas", "0.1,0.1", "--beta", "2", "--gamma", "2")
    assert code == 0 and killed, output[-3000:]  # it did crash, once
    (parent,) = parents(uri, "crash")
    (kid,) = children(uri, "crash", parent.info.run_id)  # one run: the retry went on in it
    assert kid.info.status == "FINISHED"
    assert kid.data.tags["softfine.attempt"] == "2" and int(kid.data.tags["softfine.resumed_from_step"]) >= 2
    assert kid.data.tags["softfine.retried_after"]  # what Ray said of the crash
    from mlflow.tracking import MlflowClient

    history = MlflowClient(tracking_uri=uri).get_metric_history(kid.info.run_id, "dev_f1")
    assert {m.step for m in history} == {2, 4, 6, 8, 10, 12}  # from its checkpoint on, to the end
    assert "test_f1" in kid.data.metrics
    summary = read_summary(tmp_path / "ray", "crash")
    assert summary["terminated"] == 1 and summary["error"] == 0


def trial_id(run) -> str:
    return run.data.tags["softfine.trial_id"]


def lose_the_named_checkpoint(trial) -> None:
    """What Ray leaves when its driver dies after deleting a trial's checkpoint (num_to_keep=1) for
    the next one and before saving the snapshot that names the next one: the next one complete, the
    named one gone. A next one already on disk may be half-written (the driver died while the trial
    uploaded it), which Ray never deletes a checkpoint for, so the named one's files take its place."""
    named = Path(trial.checkpoint.path)
    if not named.exists():  # the driver died in that window by itself
        return
    newer = named.with_name(f"checkpoint_{int(named.name.split('_')[1]) + 1:06d}")
    shutil.rmtree(newer, ignore_errors=True)
    named.rename(newer)


def check_mend_on_a_copy(experiment: Path, trial, copy: Path) -> None:
    """mend_checkpoints on a copy of the killed search, with a half-written checkpoint added after
    the newest: the oldest newer one takes the named one's place, and every newer one goes."""
    from softfine_tune.tuner import mend_checkpoints

    shutil.copytree(experiment, copy / experiment.name)
    trial_dir = copy / experiment.name / Path(trial.path).name
    named = trial_dir / Path(trial.checkpoint.path).name
    newest = max(int(p.name.split("_")[1]) for p in trial_dir.glob("checkpoint_*"))
    half_written = trial_dir / f"checkpoint_{newest + 1:06d}"
    half_written.mkdir()
    (half_written / "final.json").write_text("{")
    notes = mend_checkpoints(str(copy / experiment.name))
    assert len(notes) == 1 and trial.trial_id in notes[0] and "deleted by Ray" in notes[0]
    assert (named / "metrics.jsonl").is_file()
    assert [p.name for p in trial_dir.glob("checkpoint_*")] == [named.name]
    assert mend_checkpoints(str(copy / experiment.name)) == []  # nothing left to mend
    # The newer ones as a trial going on without its driver may leave them: just made, empty, and the
    # next half-written, with files at its top only. That one takes the named one's place.
    again = copy.with_name(f"{copy.name}-empty") / experiment.name
    shutil.copytree(experiment, again)
    for checkpoint in (again / trial_dir.name).glob("checkpoint_*"):
        shutil.rmtree(checkpoint)
        checkpoint.mkdir()
    (again / trial_dir.name / half_written.name).mkdir()
    (again / trial_dir.name / half_written.name / "final.json").write_text("{")
    assert len(mend_checkpoints(str(again))) == 1
    assert (again / trial_dir.name / named.name / "final.json").read_text() == "{"


def test_a_killed_driver_resumes_without_rerunning_or_duplicating(ray_local, mlflow_server, tmp_path):
    from mlflow.tracking import MlflowClient

    storage = tmp_path / "ray"
    flags = small_search_flags(
        shared_data_dir(),
        "--alphas",
        "0.1,0.1",
        "--beta",
        "2",
        "3",
        "--gamma",
        "1.5",
        "2",
        "--epochs",
        "3",
        "--eval-every",
        "4",
        "--max-concurrent",
        "1",
        "--mlflow-uri",
        mlflow_server.uri,
        "--experiment-name",
        "killed",
        "--storage-path",
        storage,
        "--name",
        "killed",
    )
    client = MlflowClient(tracking_uri=mlflow_server.uri)
    finished_before: dict = {}

    def one_ended_and_the_next_checkpointed() -> bool:  # in MLflow and in Ray's last snapshot
        if client.get_experiment_by_name("killed") is None:
            return False
        kids = children(mlflow_server.uri, "killed")
        done = [k for k in kids if k.info.status == "FINISHED"]
        going = [k for k in kids if k.info.status == "RUNNING" and "dev_f1" in k.data.metrics]
        saved = saved_trials_so_far(storage / "killed")  # Ray's view: what a resume starts from
        ended = [k for k in done if getattr(saved.get(trial_id(k)), "status", "") == "TERMINATED"]
        checkpointed = [k for k in going if getattr(saved.get(trial_id(k)), "checkpoint", None)]
        if done and len(ended) == len(done) and checkpointed:
            finished_before.update({k.info.run_id: k.info.end_time for k in done})
            return True
        return False

    kill_the_driver_when(flags, ray_local, tmp_path, one_ended_and_the_next_checkpointed)
    # The worst moment to be killed at, every time. The driver is gone: its last snapshot must read,
    # and name the trial that was going on with its checkpoint (it had evaluations left to make).
    going_on = [
        t for t in saved_trials(storage / "killed").values() if t.status != "TERMINATED" and t.checkpoint
    ]
    assert len(going_on) == 1, going_on  # --max-concurrent 1
    (interrupted,) = going_on
    lose_the_named_checkpoint(interrupted)
    check_mend_on_a_copy(storage / "killed", interrupted, tmp_path / "copy")

    code, output = run_search(["--resume", "killed", "--storage-path", storage])
    assert code == 0
    assert "resuming search killed" in output
    assert f"trial {interrupted.trial_id}: checkpoint_" in output and "deleted by Ray" in output
    (parent,) = parents(mlflow_server.uri, "killed")  # the same parent, not a second one
    kids = children(mlflow_server.uri, "killed", parent.info.run_id)
    assert len(kids) == 4 and len({point(k) for k in kids}) == 4  # no duplicate runs, no repeated points
    assert all(k.info.status == "FINISHED" for k in kids)
    by_id = {k.info.run_id: k for k in kids}
    for run_id, end_time in finished_before.items():  # finished trials were not run again
        assert by_id[run_id].info.end_time == end_time
        assert by_id[run_id].data.tags["softfine.attempt"] == "1"
    (went_on,) = [k for k in kids if trial_id(k) == interrupted.trial_id]  # it went on in its run
    assert int(went_on.data.tags["softfine.attempt"]) >= 2
    check_selection(mlflow_server.uri, parent, kids)
    assert parent.info.status == "FINISHED"
    # The command ends with os._exit: what it printed into a pipe (block-buffered) must still arrive.
    done = subprocess.run(
        [sys.executable, str(SEARCH_SCRIPT), "--resume", "killed", "--storage-path", str(storage)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    printed = json.loads(done.stdout[done.stdout.index("{") :])
    assert printed == json.loads((storage / "killed" / "summary.json").read_text())


def test_a_tracking_server_that_stops_answering_does_not_stop_the_trials(ray_local, mlflow_server, tmp_path):
    from mlflow.tracking import MlflowClient

    server = mlflow_server
    result: dict = {}
    flags = small_search_flags(
        shared_data_dir(),
        "--alphas",
        "0.1,0.1",
        "--beta",
        "2",
        "3",
        "--gamma",
        "2",
        "--epochs",
        "8",
        "--limit-train",
        "40",
        "--mlflow-uri",
        server.uri,
        "--mlflow-timeout",
        "2",
        "--experiment-name",
        "outage",
        "--storage-path",
        tmp_path / "ray",
        "--name",
        "outage",
    )
    thread = threading.Thread(target=lambda: result.update(zip(("code", "output"), run_search(flags))))
    thread.start()
    try:
        client = MlflowClient(tracking_uri=server.uri)
        deadline = time.time() + 240
        while time.time() < deadline:
            time.sleep(0.3)
            if client.get_experiment_by_name("outage") and any(
                "dev_f1" in k.data.metrics for k in children(server.uri, "outage")
            ):
                break
        else:
            pytest.fail("no trial logged an evaluation")
        # the server stops answering (it hangs: connections open, no replies) while trials train
        server.pause()
        thread.join(timeout=400)
    finally:
        server.resume()
    assert not thread.is_alive()
    assert result["code"] == 0
    summary = read_summary(tmp_path / "ray", "outage")
    assert summary["terminated"] == 2 and summary["error"] == 0  # both trials trained to the end
    assert isinstance(summary["best_test_f1"], float)
    account = summary["mlflow_account"]
    assert account["driver_failures"]  # the parent's results could not be logged ...
    assert account["trials_with_unlogged"]  # ... nor the end of the trials' runs, kept beside the results
    queued = (tmp_path / "ray" / "outage" / "mlflow_unlogged.search.jsonl").read_text().splitlines()
    assert len(queued) == account["unlogged_updates"] > 0
    assert {json.loads(op)["trial_id"] for op in queued} == set(account["trials_with_unlogged"])
    assert "MLflow could not record everything" in result["output"]
    assert "were not logged" in result["output"]


def test_refuses_more_gpus_per_trial_than_any_node_has(ray_local, tmp_path):
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
    assert (
        "--gpus-per-trial 1: no node of the Ray cluster has that many GPUs (the most on one node: 0" in output
    )
    assert not (tmp_path / "ray").exists()


def test_the_soft_scope_as_a_grid_dimension(ray_local, tmp_path):
    uri = new_store(tmp_path / "mlflow.db")
    code, output = run_search(
        small_search_flags(
            shared_data_dir(),
            "--alphas",
            "0.1,0.1",
            "--beta",
            "2",
            "--gamma",
            "2",
            "--soft-scope",
            "paper",
            "related",
            "--cpus-per-trial",
            "0.5",
            "--mlflow-uri",
            uri,
            "--experiment-name",
            "scope",
            "--storage-path",
            tmp_path / "ray",
            "--name",
            "scope",
        )
    )
    assert code == 0
    (parent,) = parents(uri, "scope")
    kids = children(uri, "scope", parent.info.run_id)
    assert sorted(k.data.params["soft_scope"] for k in kids) == ["paper", "related"]
    chosen = next(k for k in kids if k.info.run_id == parent.data.params["selected_run_id"])
    assert parent.data.params["selected_soft_scope"] == chosen.data.params["soft_scope"]
    assert json.loads(parent.data.params["grid"])["soft_scope"] == ["paper", "related"]
    header = (tmp_path / "ray" / "scope" / "trials.csv").read_text().splitlines()[0].split(",")
    assert "soft_scope" in header
    assert "  scope  " in output and "  related  " in output and "  paper  " in output  # the summary's table
    assert read_summary(tmp_path / "ray", "scope")["selected"]["soft_scope"] in ("paper", "related")


def test_one_configuration_over_seeds_is_an_ablation(ray_local, tmp_path):
    """One grid point with --seeds 3: three trials with seeds 42, 43, 44 and nothing else (no
    search phase), their mean and standard deviation with what the F1s were computed on."""
    uri = new_store(tmp_path / "mlflow.db")
    code, output = run_search(
        small_search_flags(
            shared_data_dir(),
            "--alphas",
            "0.01,0.005",
            "--beta",
            "2",
            "--gamma",
            "2",
            "--seeds",
            "3",
            "--no-soft",
            "--soft-scope",
            "related",
            "--cpus-per-trial",
            "1",  # 2 trial actors to start, not 3: each imports torch and transformers
            "--mlflow-uri",
            uri,
            "--experiment-name",
            "ablation",
            "--storage-path",
            tmp_path / "ray",
            "--name",
            "ablation",
        )
    )
    assert code == 0
    (parent,) = parents(uri, "ablation")
    kids = children(uri, "ablation", parent.info.run_id)
    assert len(kids) == 3 and {k.data.tags["softfine.phase"] for k in kids} == {"seeds"}  # no search trial
    assert sorted(k.data.params["seed"] for k in kids) == ["42", "43", "44"]
    assert {(point(k), k.data.params["soft"], k.data.params["soft_scope"]) for k in kids} == {
        ((alphas_key(0.01, 0.005), 2.0, 2.0), "False", "related")
    }
    assert all(k.info.status == "FINISHED" for k in kids) and parent.info.status == "FINISHED"
    metrics, params = parent.data.metrics, parent.data.params
    dev = [k.data.metrics["best_dev_f1"] for k in kids]
    test = [k.data.metrics["test_f1"] for k in kids]
    assert metrics["seeds_dev_f1_mean"] == pytest.approx(statistics.fmean(dev))
    assert metrics["seeds_dev_f1_std"] == pytest.approx(statistics.stdev(dev))
    assert metrics["seeds_test_f1_mean"] == pytest.approx(statistics.fmean(test))
    assert metrics["seeds_test_f1_std"] == pytest.approx(statistics.stdev(test))
    assert metrics["seeds_dev_sentences"] == metrics["seeds_test_sentences"] == 24
    assert metrics["seeds_dev_gold_entities"] == kids[0].data.metrics["dev_gold_entities"]
    assert metrics["seeds_test_gold_entities"] == kids[0].data.metrics["test_gold_entities"]
    assert params["mode"] == "seeds" and params["selected_beta"] == "2.0" and params["train.soft"] == "False"
    summary = read_summary(tmp_path / "ray", "ablation")
    assert (
        summary["mode"] == "seeds" and summary["seed_values"] == [42, 43, 44] and not summary["soft_labels"]
    )
    assert summary["seeds_test_f1_mean"] == pytest.approx(statistics.fmean(test))
    assert "test_f1" not in [k for k in summary if k.startswith("best_")]  # no cherry-picked best seed
    line = next(x for x in output.splitlines() if x.startswith("The configuration with 3 seeds"))
    assert (
        f"test F1 {summary['seeds_test_f1_mean']:.4f} ± {summary['seeds_test_f1_std']:.4f} on 24 sentences"
        in line
    )
    assert "soft labels off (--no-soft)" in output and "seeds 42, 43, 44" in output


def test_a_failure_after_the_parent_run_was_created_ends_it_failed(ray_local, tmp_path, monkeypatch):
    from softfine_tune import search

    def broken(*args, **kwargs):
        raise RuntimeError("the search broke\nin two lines")

    monkeypatch.setattr(search, "run_phase", broken)
    uri = new_store(tmp_path / "mlflow.db")
    code, output = run_search(
        small_search_flags(
            shared_data_dir(),
            "--alphas",
            "0.1,0.1",
            "--beta",
            "2",
            "--gamma",
            "2",
            "--mlflow-uri",
            uri,
            "--experiment-name",
            "broken",
            "--storage-path",
            tmp_path / "ray",
            "--name",
            "broken",
        )
    )
    assert code == 1
    assert (
        output.strip().splitlines()[-1]
        == "tune/search.py: error: RuntimeError: the search broke in two lines"
    )
    assert "Traceback" not in output
    (parent,) = parents(uri, "broken")
    assert parent.info.status == "FAILED" and "the search broke" in parent.data.tags["softfine.error"]


def test_a_password_in_the_tracking_uri_is_used_by_the_driver_and_stored_nowhere(ray_local, tmp_path):
    from mlflow.tracking import MlflowClient

    password = "s3cret-Pw-" + os.urandom(4).hex()
    server = MlflowServer(tmp_path / "server", password=password).start()
    try:
        uri = f"http://admin:{password}@127.0.0.1:{server.port}"
        code, output = run_search(
            small_search_flags(
                shared_data_dir(),
                "--alphas",
                "0.1,0.1",
                "--beta",
                "2",
                "--gamma",
                "2",
                "--epochs",
                "1",
                "--mlflow-uri",
                uri,
                "--experiment-name",
                "auth",
                "--storage-path",
                tmp_path / "ray",
                "--name",
                "auth",
            )
        )
        assert code == 0
        assert password not in output and f"http://admin:***@127.0.0.1:{server.port}" in output
        assert "MLFLOW_TRACKING_PASSWORD" not in os.environ  # the driver's environment put back
        os.environ.update(MLFLOW_TRACKING_USERNAME="admin", MLFLOW_TRACKING_PASSWORD=password)
        try:
            (parent,) = parents(server.uri, "auth")
            (kid,) = children(server.uri, "auth", parent.info.run_id)  # the driver authenticated
            assert kid.info.status == "FINISHED" and "test_f1" in kid.data.metrics
            client = MlflowClient(tracking_uri=server.uri)
            config = Path(
                client.download_artifacts(kid.info.run_id, "config.json", str(tmp_path / "dl"))
            ).read_text()
            stored = [json.dumps(r.data.params) + json.dumps(r.data.tags) for r in (parent, kid)] + [config]
        finally:
            for key in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
                os.environ.pop(key, None)
        assert f"http://admin:***@127.0.0.1:{server.port}" in parent.data.params["mlflow_uri"]
        assert all(password not in text for text in stored)
        # Nor anywhere in the results folder: Ray's trial configs, the record, the summary.
        for path in (tmp_path / "ray").rglob("*"):
            if path.is_file() and path.stat().st_size < 50_000_000:
                assert password.encode() not in path.read_bytes(), path
        summary = read_summary(tmp_path / "ray", "auth")
        assert summary["mlflow_uri"] == f"http://admin:***@127.0.0.1:{server.port}"
        assert (
            summary["model_uri"] and not summary["mlflow_account"]["driver_failures"]
        )  # the driver authenticated
    finally:
        server.stop()
