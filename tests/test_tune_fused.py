"""tune/search.py --fuse K on one local Ray instance, the tiny encoder and a few Resume sentences:
the grid as fused groups (each group one Ray trial, each point its own MLflow run, Optuna trial and
checkpoint), the same results as one point per trial, a crashed group retried from its checkpoint,
a killed driver resumed, and the refusals; the grouping and the memory arithmetic of --fuse auto."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from tune_fixtures import (
    children,
    kill_the_driver_when,
    new_store,
    parents,
    point,
    read_summary,
    read_trials,
    run_crashing_search,
    run_search,
    saved_trials_so_far,
    shared_data_dir,
    small_search_flags,
)

from softfine_tune.space import PAPER_GRID, Grid, fused_groups, record_points


def histories(uri: str, runs: list, key: str = "dev_f1") -> dict:
    """Each run's metric history as [(step, value)], by point, in step order."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    return {
        point(r): sorted((m.step, m.value) for m in client.get_metric_history(r.info.run_id, key))
        for r in runs
    }


def test_the_grid_as_fused_groups_gives_every_point_its_run_study_trial_and_checkpoint(ray_local, tmp_path):
    from mlflow.tracking import MlflowClient

    uri = new_store(tmp_path / "mlflow.db")
    alphas = PAPER_GRID["alphas"][1:3]  # 2 x 3 x 2 = 12 points (tests/test_tune_search.py runs all 36 alone)
    code, output = run_search(
        small_search_flags(
            shared_data_dir(),
            "--alphas",
            *(f"{a:g},{f:g}" for a, f in alphas),
            "--gamma",
            "2",
            "2.5",
            "--fuse",
            "6",
            "--cpus-per-trial",
            "0.5",
            "--mlflow-uri",
            uri,
            "--experiment-name",
            "fused",
            "--storage-path",
            tmp_path / "ray",
            "--name",
            "fused",
        )
    )
    assert code == 0
    ended = [line for line in output.splitlines() if re.match(r"  \[\d+/12\] [\d.,]+: dev F1 \d", line)]
    assert (
        len(ended) == 12 and "search: 12/12 points finished in" in output
    )  # a line per point, not per trial
    assert (
        "12 points in 2 fused trials of at most 6 points (12 finished, 0 stopped early, 0 failed)" in output
    )
    (parent,) = parents(uri, "fused")
    kids = children(uri, "fused", parent.info.run_id)
    assert len(kids) == 12 and len({point(k) for k in kids}) == 12  # every point once, in its own run
    assert {k.info.run_name for k in kids} == {
        f"{a:g},{f:g},{b:g},{g:g}" for a, f in alphas for b in PAPER_GRID["beta"] for g in (2, 2.5)
    }
    assert all(k.info.status == "FINISHED" for k in kids)
    trials = {k.data.tags["softfine.trial_id"] for k in kids}
    assert len(trials) == 2
    for trial in trials:  # each group's members, numbered 0..5
        assert sorted(
            int(k.data.tags["softfine.fused_member"])
            for k in kids
            if k.data.tags["softfine.trial_id"] == trial
        ) == list(range(6))
    client = MlflowClient(tracking_uri=uri)
    for kid in kids:
        metrics = kid.data.metrics
        for key in (
            "train_loss",
            "dev_f1",
            "best_dev_f1",
            "test_f1",
            "dev_sentences",
            "test_sentences",
            "dev_gold_entities",
            "test_gold_entities",
        ):
            assert key in metrics, key
        assert metrics["dev_sentences"] == metrics["test_sentences"] == 24
        checkpoint = Path(kid.data.tags["softfine.checkpoint"])  # the point's own best checkpoint
        assert (checkpoint / "best" / "model.safetensors").is_file() and (
            checkpoint / "best" / "labels.json"
        ).is_file()
        assert json.loads((checkpoint / "test_metrics.json").read_text())["f1"] == pytest.approx(
            metrics["test_f1"]
        )
        assert {a.path for a in client.list_artifacts(kid.info.run_id)} == {
            "config.json",
            "test_metrics.json",
        }
    steps = histories(uri, kids)
    assert all([s for s, _ in h] == [12, 24] for h in steps.values())  # each evaluation once

    # The study records every point with its dev F1; the parent selects as before.
    import optuna

    study = optuna.load_study(
        study_name="fused", storage=f"sqlite:///{tmp_path / 'ray' / 'fused' / 'optuna.db'}"
    )
    by_run = {k.info.run_id: k for k in kids}
    assert len(study.trials) == 12
    for trial in study.trials:
        kid = by_run[trial.user_attrs["mlflow_run_id"]]
        assert trial.value == pytest.approx(kid.data.metrics["best_dev_f1"])
        assert (trial.params["alphas"], trial.params["beta"], trial.params["gamma"]) == point(kid)
    best = max(k.data.metrics["best_dev_f1"] for k in kids)
    chosen = by_run[parent.data.params["selected_run_id"]]
    assert chosen.data.metrics["best_dev_f1"] == best == pytest.approx(study.best_value)
    assert parent.data.params["fuse"] == "6"
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"trials.csv", "dev_f1_vs_hyperparameters.png", "optuna", "occupancy_timeline.png"} <= artifacts
    assert client.get_model_version_by_alias("softfine-resume", "champion").run_id == parent.info.run_id
    summary = read_summary(tmp_path / "ray", "fused")
    assert Path(summary["selected_checkpoint"]) == Path(
        chosen.data.tags["softfine.checkpoint"]
    )  # the model's
    assert summary["trials"] == summary["terminated"] == 12 and summary["ray_trials"] == 2
    assert summary["fuse"] == 6 and summary["max_trials_at_once"] <= 2
    # Occupancy counts a group's slot once: 2 trials at 0.5 CPU each on 2 CPUs.
    rows = read_trials(tmp_path / "ray" / "fused")
    assert len(rows) == 12
    groups = {r["trial_id"]: r for r in rows}
    span = max(r["trial_end_time"] for r in groups.values()) - min(
        r["trial_start_time"] for r in groups.values()
    )
    held = sum((r["trial_end_time"] - r["trial_start_time"]) * 0.5 for r in groups.values())
    assert summary["cpu_busy_fraction"] == pytest.approx(held / (2 * span))


def test_a_fused_group_scores_each_point_as_its_own_trial_does(ray_local, tmp_path):
    """Three points as one fused trial and as three trials: the same dev F1 at every evaluation,
    the same test F1 (the library's exactness, through Ray, the checkpoints and MLflow)."""
    uri = new_store(tmp_path / "mlflow.db")
    grid = [
        "--alphas",
        "0.1,0.1",
        "0.01,0.005",
        "--beta",
        "2",
        "4",
        "--gamma",
        "2",
        "--cpus-per-trial",
        "0.5",
        "--mlflow-uri",
        uri,
        "--storage-path",
        tmp_path / "ray",
        "--dropout",
        "0",
    ]
    found = {}
    for name, fuse in (("alone", "1"), ("together", "4")):
        code, _ = run_search(
            small_search_flags(
                shared_data_dir(), *grid, "--fuse", fuse, "--experiment-name", name, "--name", name
            )
        )
        assert code == 0
        (parent,) = parents(uri, name)
        kids = children(uri, name, parent.info.run_id)
        found[name] = (histories(uri, kids), {point(k): k.data.metrics["test_f1"] for k in kids})
    assert len(found["alone"][0]) == 4
    for key, history in found["alone"][0].items():
        assert [s for s, _ in found["together"][0][key]] == [s for s, _ in history]
        assert [v for _, v in found["together"][0][key]] == pytest.approx([v for _, v in history], abs=1e-6)
    assert found["together"][1] == pytest.approx(found["alone"][1], abs=1e-6)


def test_a_crashed_group_goes_on_from_its_checkpoint_in_its_runs(ray_local, tmp_path):
    uri = new_store(tmp_path / "mlflow.db")
    code, output, killed = run_crashing_search(
        tmp_path, "--alphas", "0.1,0.1", "0.01,0.01", "--beta", "2", "3", "--gamma", "2", "--fuse", "4"
    )  # evaluations at steps 2, ..., 12
    assert code == 0 and killed, output[-3000:]
    (parent,) = parents(uri, "crash")
    kids = children(uri, "crash", parent.info.run_id)
    assert len(kids) == 4  # the retry went on in the points' runs
    for kid in kids:
        assert kid.info.status == "FINISHED" and kid.data.tags["softfine.attempt"] == "2"
        assert (
            int(kid.data.tags["softfine.resumed_from_step"]) >= 2 and kid.data.tags["softfine.retried_after"]
        )
        assert "test_f1" in kid.data.metrics
    for history in histories(uri, kids).values():
        assert [s for s, _ in history] == [2, 4, 6, 8, 10, 12]  # from the checkpoint on, no step twice
    summary = read_summary(tmp_path / "ray", "crash")
    assert summary["terminated"] == 4 and summary["error"] == 0 and len(summary["retries"]) == 1
    assert "retried from its last checkpoint" in output


def test_a_killed_driver_resumes_a_fused_search(ray_local, tmp_path):
    uri = new_store(tmp_path / "mlflow.db")
    storage = tmp_path / "ray"
    flags = small_search_flags(
        shared_data_dir(),
        "--alphas",
        "0.1,0.1",
        "0.01,0.01",
        "--beta",
        "2",
        "3",
        "--gamma",
        "2",
        "--fuse",
        "2",
        "--epochs",
        "3",
        "--eval-every",
        "4",
        "--max-concurrent",
        "1",
        "--mlflow-uri",
        uri,
        "--experiment-name",
        "killed",
        "--storage-path",
        storage,
        "--name",
        "killed",
    )

    def one_group_ended_and_the_next_checkpointed() -> bool:  # in Ray's last snapshot
        saved = saved_trials_so_far(storage / "killed").values()
        return any(t.status == "TERMINATED" for t in saved) and any(
            t.status != "TERMINATED" and t.checkpoint for t in saved
        )

    kill_the_driver_when(flags, ray_local, tmp_path, one_group_ended_and_the_next_checkpointed)
    finished_before = {
        k.info.run_id: k.info.end_time for k in children(uri, "killed") if k.info.status == "FINISHED"
    }
    assert len(finished_before) == 2  # the first group's two points
    code, output = run_search(["--resume", "killed", "--storage-path", storage])
    assert code == 0 and "resuming search killed" in output
    (parent,) = parents(uri, "killed")
    kids = children(uri, "killed", parent.info.run_id)
    assert (
        len(kids) == 4
        and len({point(k) for k in kids}) == 4
        and all(k.info.status == "FINISHED" for k in kids)
    )
    for kid in kids:
        if kid.info.run_id in finished_before:  # not run again
            assert (
                kid.info.end_time == finished_before[kid.info.run_id]
                and kid.data.tags["softfine.attempt"] == "1"
            )
        else:  # went on in its own run
            assert int(kid.data.tags["softfine.attempt"]) >= 2
    for history in histories(uri, kids).values():
        steps = [s for s, _ in history]
        assert steps == sorted(set(steps)) and steps[-1] == 36  # no evaluation logged twice
    assert parent.info.status == "FINISHED"


@pytest.mark.parametrize(
    "flags, names",
    [
        (["--fuse", "0"], "--fuse 0: must be >= 1"),
        (["--fuse", "two"], "--fuse 'two': give the most grid points per trial"),
        (["--fuse", ""], "--fuse"),
        (["--fuse", "4", "--sampler", "tpe"], "--fuse 4: not with --sampler tpe"),
        (["--fuse", "4", "--scheduler", "asha"], "--fuse 4: not with --scheduler asha"),
        (
            ["--fuse", "auto", "--alphas", "0.1,0.1", "--beta", "2", "--gamma", "2", "--seeds", "3"],
            "--fuse auto: not with --seeds 3 on one point",
        ),
    ],
)
def test_refused_before_anything_starts(flags, names, tmp_path):
    code, output = run_search(
        [
            "--dataset",
            "resume",
            "--data-dir",
            str(shared_data_dir()),
            "--model",
            "tiny",
            "--mlflow-uri",
            f"sqlite:///{tmp_path / 'm.db'}",
            "--storage-path",
            str(tmp_path / "ray"),
            *flags,
        ]
    )
    assert code == 2
    (line,) = [line for line in output.splitlines() if line.startswith("tune/search.py: error:")]
    assert names in line and "Traceback" not in output
    assert not (tmp_path / "ray").exists() and not (tmp_path / "m.db").exists()


def test_groups_are_even_and_never_mix_steps():
    from softfine.config import make_config

    base = make_config({"dataset": "resume", "model": "tiny"}, lambda key: key)
    points = Grid([(0.1, 0.1), (0.01, 0.005), (0.0, 0.0)], [2, 3, 4], [1.5, 2, 2.5]).points()
    groups = fused_groups(points, 10, base)
    # 18 points with augmentation in two groups of 9; the 9 without it (alpha_aug = alpha_fea = 0) apart
    assert [len(g) for g in groups] == [9, 9, 9]
    assert all(p["alphas"] == "0,0" for p in groups[2]) and not any(
        p["alphas"] == "0,0" for g in groups[:2] for p in g
    )
    assert sorted(json.dumps(p, sort_keys=True) for g in groups for p in g) == sorted(
        json.dumps(p, sort_keys=True) for p in points
    )
    assert [len(g) for g in fused_groups(points[:18], 12, base)] == [9, 9]
    assert [len(g) for g in fused_groups(points[:18], 1, base)] == [1] * 18
    no_aug = make_config({"aug": False}, lambda key: key, base=base)  # no point uses it: one kind
    assert [len(g) for g in fused_groups(points, 27, no_aug)] == [27]


def test_the_study_gets_each_point_once(tmp_path):
    import optuna

    grid = Grid([(0.1, 0.1)], [2, 3], [2])
    rows = [
        {
            "alpha_aug": 0.1,
            "alpha_fea": 0.1,
            "beta": 2.0,
            "gamma": 2.0,
            "best_dev_f1": 0.5,
            "trial_id": "a",
            "mlflow_run_id": "r1",
        },
        {
            "alpha_aug": 0.1,
            "alpha_fea": 0.1,
            "beta": 3.0,
            "gamma": 2.0,
            "best_dev_f1": None,
            "trial_id": "a",
            "mlflow_run_id": "r2",
        },
    ]
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    assert record_points(storage, "s", grid, rows) == 2
    assert record_points(storage, "s", grid, rows) == 0  # a resumed search: nothing twice
    trials = optuna.load_study(study_name="s", storage=storage).trials
    assert [t.state.name for t in trials] == ["COMPLETE", "FAIL"] and trials[0].value == 0.5
    assert trials[1].user_attrs == {"ray_trial_id": "a", "mlflow_run_id": "r2"}


def test_fuse_auto_fits_the_measured_members_in_the_budget():
    from softfine.config import make_config
    from softfine.errors import ConfigError
    from softfine.memory import member_memory, members_that_fit

    gib = 2**30
    measured = {"one": 3 * gib, "two": 5 * gib, "each_more": 2 * gib}  # 1 GiB once, 2 GiB a member
    assert members_that_fit(21 * gib, measured, 36) == 10
    assert members_that_fit(80 * gib, measured, 36) == 36  # never more than the grid's points
    assert members_that_fit(2 * gib, measured, 36) == 1  # one point per trial, whatever the budget
    with pytest.raises(ConfigError, match="measured on a CUDA device"):
        member_memory(make_config({"dataset": "resume", "device": "cpu"}, lambda key: key))


def test_fuse_auto_on_cpus_trains_one_point_per_trial(ray_local, tmp_path):
    uri = new_store(tmp_path / "mlflow.db")
    code, output = run_search(
        small_search_flags(
            shared_data_dir(),
            "--alphas",
            "0.1,0.1",
            "--beta",
            "2",
            "3",
            "--gamma",
            "2",
            "--fuse",
            "auto",
            "--epochs",
            "1",
            "--mlflow-uri",
            uri,
            "--storage-path",
            tmp_path / "ray",
            "--name",
            "auto",
        )
    )
    assert code == 0
    assert "--fuse auto: 1 point per trial (a CPU search" in output
    assert read_summary(tmp_path / "ray", "auto")["ray_trials"] == 2
