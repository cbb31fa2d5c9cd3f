"""tune/ without Ray: presets, the grid and its sampler, the command line, the refusals that
come before any trial starts, MLflow logging that must not raise."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from tune_fixtures import REPO, SEARCH_SCRIPT, free_port, new_store, run_search, shared_data_dir

from softfine_tune import results, search, space, tuner
from softfine_tune.account import read_account
from softfine_tune.callback import MLflowChildRuns
from softfine_tune.space import alphas_key, parse_alphas

PAPER_GRID = [
    dict(alphas=alphas_key(a, f), beta=b, gamma=g)
    for a, f in [(0.1, 0.1), (0.1, 0.05), (0.01, 0.01), (0.01, 0.005)]
    for b in (2.0, 3.0, 4.0)
    for g in (1.5, 2.0, 2.5)
]


def point_key(config: dict) -> tuple:
    return (config["alphas"], float(config["beta"]), float(config["gamma"]))


# ---------------------------------------------------------------------------------------------
# Presets and flags.


@pytest.mark.parametrize(
    "dataset, expected, selection",
    [
        (
            "weibo",
            dict(batch_size=4, lr=2e-5, weight_decay=0.1, dropout=0.5, epochs=12, warmup_ratio=0.1),
            dict(alpha_aug=0.01, alpha_fea=0.01, beta=3, gamma=2),
        ),
        (
            "resume",
            dict(batch_size=4, lr=3e-5, weight_decay=0.5, dropout=0.1, epochs=12, warmup_ratio=0.1),
            dict(alpha_aug=0.01, alpha_fea=0.005, beta=2, gamma=2),
        ),
        (
            "fine",
            dict(batch_size=16, lr=2e-5, dropout=0.5, epochs=20, warmup_ratio=0.05),
            dict(alpha_aug=0.1, alpha_fea=0.1, beta=4, gamma=2),
        ),
        (
            "ontonotes4",
            dict(batch_size=16, lr=2e-5, dropout=0.5, epochs=5, warmup_ratio=0.05),
            dict(alpha_aug=0.1, alpha_fea=0.1, beta=4, gamma=2),
        ),
    ],
)
def test_presets_hold_the_papers_settings_and_grid(dataset, expected, selection):
    from softfine.config import FINE_TUNING
    from softfine_tune.plan import base_config

    preset = space.load_preset(dataset)
    assert not any(
        preset["train"].get(key) == value for key, value in FINE_TUNING.items()
    )  # only what differs
    base = base_config(preset, {"dataset": dataset})  # with the trainer's fine-tuning defaults
    for key, value in expected.items():
        assert getattr(base, key) == pytest.approx(value), key
    grid = preset["grid"]
    assert len(grid) == 36
    assert sorted(map(point_key, grid.points())) == sorted(map(point_key, PAPER_GRID))
    assert preset["paper_selection"] == selection


def plan_for(*argv: str) -> search.Plan:
    args = search.build_parser().parse_args(list(argv))
    return search.make_plan(args, list(argv))


def test_flags_override_the_preset():
    from softfine.config import TrainConfig

    data = shared_data_dir()
    plan = plan_for(
        "--dataset",
        "resume",
        "--data-dir",
        str(data),
        "--lr",
        "1e-4",
        "--epochs",
        "2",
        "--beta",
        "2",
        "3",
        "--alphas",
        "0.1,0.1",
        "--limit-train",
        "8",
    )
    assert isinstance(plan.base, TrainConfig)  # one typed config, validated
    assert plan.base.lr == 1e-4 and plan.base.epochs == 2 and plan.base.limit_train == 8
    assert plan.base.batch_size == 4 and plan.base.weight_decay == 0.5  # from the Resume preset
    assert plan.base.schedule == "linear" and plan.base.model == "bert-base-chinese"
    assert plan.base.data_dir == str(data.resolve())
    assert len(plan.grid) == 1 * 2 * 3 and plan.num_samples == 6 and plan.mode == "search"
    assert plan.grid.gamma == [1.5, 2.0, 2.5]  # from the preset


def test_the_tiny_encoder_gets_its_own_defaults_not_the_presets_bert_base_ones():
    from softfine.config import FINE_TUNING, FROM_SCRATCH

    data = shared_data_dir()
    plan = plan_for("--dataset", "resume", "--data-dir", str(data), "--model", "tiny")
    for key, value in FROM_SCRATCH.items():  # not the Resume preset's batch 4, lr 3e-5, decay 0.5, 12 epochs
        assert getattr(plan.base, key) == value, key
    assert len(plan.grid) == 36  # the preset's grid still applies
    plan = plan_for(
        "--dataset", "resume", "--data-dir", str(data), "--model", "tiny", "--lr", "2e-3", "--epochs", "3"
    )
    assert (
        plan.base.lr == 2e-3 and plan.base.epochs == 3 and plan.base.batch_size == FROM_SCRATCH["batch_size"]
    )
    text = " ".join(search.build_parser().format_help().split())
    assert "With --model tiny, the preset's epochs" in text
    assert f"(default: {FINE_TUNING['epochs']}; tiny: {FROM_SCRATCH['epochs']})" in text


def test_each_trial_config_is_the_base_with_its_point_validated_again():
    import dataclasses

    from softfine.errors import ConfigError

    plan = plan_for(
        "--dataset",
        "resume",
        "--data-dir",
        str(shared_data_dir()),
        "--model",
        "tiny",
        "--soft-scope",
        "paper",
        "related",
        "--seed",
        "7",
    )
    assert plan.keys == ("alpha_aug", "alpha_fea", "beta", "gamma", "soft_scope") and len(plan.grid) == 72
    point = {**plan.grid.points()[-1], "seed": 9}  # a trial's config: its point (and seed), nothing else
    trial = space.trial_config(plan.base, point, out="/tmp/x", device="cpu")
    assert (trial.alpha_aug, trial.alpha_fea, trial.beta, trial.gamma) == (0.01, 0.005, 4.0, 2.5)
    assert (
        trial.soft_scope == "related"
        and trial.seed == 9
        and trial.lr == plan.base.lr
        and trial.out == "/tmp/x"
    )
    assert (
        dataclasses.replace(
            trial,
            out=plan.base.out,
            device=plan.base.device,
            seed=7,
            alpha_aug=plan.base.alpha_aug,
            alpha_fea=plan.base.alpha_fea,
            beta=plan.base.beta,
            gamma=plan.base.gamma,
            soft_scope=plan.base.soft_scope,
        )
        == plan.base
    )  # the point's fields, nothing else
    assert (
        space.point_name(plan.grid.points()[-1]) == "0.01,0.005,4,2.5,related"
    )  # α_aug,α_fea,β,γ: a run name
    assert space.point_name(point) == "seed 9"  # a seeds-phase run: its point is the parent's
    with pytest.raises(ConfigError, match="trial config: beta"):  # a point is checked again
        space.trial_config(plan.base, {**point, "beta": "4"})
    assert tuner.progress_columns(plan.grid, "search")["soft_scope"] == "soft scope"  # Ray Tune's table
    assert tuner.progress_columns(plan.grid, "seeds") == {"seed": "seed"}
    plan = plan_for("--dataset", "resume", "--data-dir", str(shared_data_dir()), "--soft-scope", "related")
    assert (
        plan.base.soft_scope == "related" and "soft_scope" not in plan.grid.space() and len(plan.grid) == 36
    )


def test_one_point_with_seeds_runs_only_the_seeds():
    data = shared_data_dir()
    plan = plan_for(
        "--dataset",
        "resume",
        "--data-dir",
        str(data),
        "--model",
        "tiny",
        "--alphas",
        "0.01,0.005",
        "--beta",
        "2",
        "--gamma",
        "2",
        "--seeds",
        "3",
        "--no-aug",
    )
    assert plan.mode == "seeds" and plan.num_samples == 3 and not plan.base.aug
    plan = plan_for(
        "--dataset",
        "resume",
        "--data-dir",
        str(data),
        "--alphas",
        "0.01,0.005",
        "--beta",
        "2",
        "3",
        "--gamma",
        "2",
        "--seeds",
        "3",
    )
    assert plan.mode == "search" and plan.num_samples == 2


def test_credentials_in_the_tracking_uri_are_masked_and_kept_in_memory(monkeypatch):
    from softfine_tune.space import SearchError
    from softfine_tune.tracking import mask_argv, tracking_store

    for key in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN"):
        monkeypatch.delenv(key, raising=False)
    store = tracking_store("http://alice:s%40cret@127.0.0.1:5000")
    assert store.uri == "http://127.0.0.1:5000" and store.display == "http://alice:***@127.0.0.1:5000"
    assert store.env == {"MLFLOW_TRACKING_USERNAME": "alice", "MLFLOW_TRACKING_PASSWORD": "s@cret"}
    assert mask_argv(["--mlflow-uri", "https://alice:pw@host/x"]) == [
        "--mlflow-uri",
        "https://alice:***@host/x",
    ]
    assert mask_argv(["--mlflow-uri=http://a:p@ss@h:1/p@q"]) == ["--mlflow-uri=http://a:***@h:1/p@q"]
    database = tracking_store("postgresql://bob:pw@db:5432/mlflow")  # its driver needs them in the URI
    assert (
        database.uri.endswith("bob:pw@db:5432/mlflow")
        and database.display == "postgresql://bob:***@db:5432/mlflow"
    )
    with pytest.raises(SearchError, match="password is masked"):  # a record's URI, on --resume
        tracking_store(store.display)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "s@cret")
    assert tracking_store(store.display).env["MLFLOW_TRACKING_PASSWORD"] == "s@cret"
    assert tracking_store("sqlite:////tmp/m.db").display == "sqlite:////tmp/m.db"


def test_tpe_budget_and_grid_sizes():
    data = shared_data_dir()
    assert (
        plan_for(
            "--dataset", "weibo", "--data-dir", str(data), "--sampler", "tpe", "--num-samples", "7"
        ).num_samples
        == 7
    )
    assert plan_for("--dataset", "weibo", "--data-dir", str(data)).num_samples == 36


def test_alpha_pairs_round_trip():
    assert parse_alphas(alphas_key(0.01, 0.005)) == (0.01, 0.005)
    with pytest.raises(ValueError, match="AUG,FEA"):
        parse_alphas("0.1")


# ---------------------------------------------------------------------------------------------
# The grid sampler: each point exactly once, however many trials are in flight.


def test_grid_search_gives_each_point_once_with_every_trial_in_flight(tmp_path):
    grid = space.load_preset("weibo")["grid"]
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    searcher = space.make_searcher(
        "grid", grid, seed=0, num_samples=len(grid), storage=storage, study_name="g"
    )
    # Ray Tune asks the searcher for a trial whenever resources allow; here all 36 are asked for
    # before any finishes: 36 trials in flight at once, each given an enqueued point.
    configs = [searcher.suggest(f"trial{i}") for i in range(36)]
    assert sorted(map(point_key, configs)) == sorted(map(point_key, PAPER_GRID))
    for i in reversed(range(36)):  # completing them (in any order) does not disturb the study
        searcher.on_trial_complete(f"trial{i}", {"best_dev_f1": i / 100, "training_iteration": 1})
    import optuna

    study = optuna.load_study(study_name="g", storage=storage)  # persisted, for Optuna's own tools
    assert len(study.trials) == 36 and study.best_value == 0.35
    assert len({tuple(sorted(t.params.items())) for t in study.trials}) == 36


def test_tpe_searcher_samples_the_grid_values():
    grid = space.load_preset("resume")["grid"]
    searcher = space.make_searcher(
        "tpe", grid, seed=0, num_samples=5, storage="sqlite:///:memory:", study_name="t"
    )
    for i in range(5):
        config = searcher.suggest(f"t{i}")
        assert point_key(config) in set(map(point_key, PAPER_GRID))
        searcher.on_trial_complete(f"t{i}", {"best_dev_f1": 0.1 * i, "training_iteration": 1})


# ---------------------------------------------------------------------------------------------
# The command line.


def test_help_documents_every_flag_and_ray_tune_is_not_shadowed():
    result = subprocess.run(
        [sys.executable, str(SEARCH_SCRIPT), "--help"], capture_output=True, text=True, cwd=REPO, timeout=120
    )
    assert result.returncode == 0, result.stderr
    text = " ".join(result.stdout.split())
    for flag in (
        "--dataset",
        "--data-dir",
        "--model",
        "--epochs",
        "--limit-train",
        "--num-samples",
        "--mlflow-uri",
        "--experiment-name",
        "--resume",
        "--max-failures",
        "--max-concurrent",
        "--sampler",
        "--scheduler",
        "--seeds",
        "--gpus-per-trial",
        "--cpus-per-trial",
        "--address",
        "--alphas",
        "--beta",
        "--gamma",
        "--soft-scope",
        "--schedule",
        "--tiny-layers",
        "--tiny-hidden",
        "--no-soft",
        "--no-aug",
    ):
        assert f"{flag} " in text, flag
    assert "--inject-crash" not in text  # a test hook, not a user flag
    # From the repository root, where a `tune/` folder sits beside `softfine/`, both with the
    # current directory first on sys.path (python -c) and with tune/ first (python tune/search.py).
    for code in (
        "import ray.tune, sys; print(ray.tune.__file__)",
        "import sys; sys.path.insert(0, 'tune'); import ray.tune; print(ray.tune.__file__)",
    ):
        where = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120
        )
        assert where.returncode == 0, where.stderr
        assert "site-packages" in where.stdout and str(REPO / "tune") not in where.stdout


# ---------------------------------------------------------------------------------------------
# Refusals before any trial starts (before Ray starts, even).


def refused(argv: list[str], tmp_path: Path) -> str:
    import ray

    storage = tmp_path / "ray"
    code, output = run_search(
        [*argv, "--storage-path", storage, "--mlflow-uri", f"sqlite:///{tmp_path / 'm.db'}"]
    )
    assert code == 2, output
    assert not ray.is_initialized()
    assert not storage.exists()  # no search record, no trial
    return output


def test_refuses_an_unknown_dataset(tmp_path):
    output = refused(["--dataset", "nosuch", "--model", "tiny"], tmp_path)
    assert "unknown dataset 'nosuch'" in output and "weibo" in output


def test_refuses_missing_data_files(tmp_path):
    (tmp_path / "data" / "resume").mkdir(parents=True)
    output = refused(["--dataset", "resume", "--data-dir", tmp_path / "data", "--model", "tiny"], tmp_path)
    assert str(tmp_path / "data" / "resume" / "train.char.bmes") in output


def test_refuses_an_impossible_grid_value(tmp_path):
    data = shared_data_dir()
    output = refused(["--dataset", "resume", "--data-dir", data, "--beta", "0.5", "2"], tmp_path)
    assert "--beta: Input should be greater than 1 (got 0.5: float)" in output
    output = refused(
        ["--dataset", "resume", "--data-dir", data, "--gamma", "0", "--sampler", "tpe"], tmp_path
    )
    assert "--gamma: Input should be greater than 0 (got 0.0: float)" in output


def test_refuses_a_tracking_server_that_does_not_answer(tmp_path):
    import ray

    data = shared_data_dir()
    port = free_port()  # nothing listens there
    code, output = run_search(
        [
            "--dataset",
            "resume",
            "--data-dir",
            data,
            "--model",
            "tiny",
            "--gpus-per-trial",
            "0",
            "--mlflow-uri",
            f"http://127.0.0.1:{port}",
            "--storage-path",
            tmp_path / "ray",
        ]
    )
    assert code == 2
    assert f"--mlflow-uri: the MLflow tracking store http://127.0.0.1:{port} does not answer" in output
    assert not ray.is_initialized() and not (tmp_path / "ray").exists()


def test_refuses_a_grid_search_with_another_budget(tmp_path):
    output = refused(["--dataset", "resume", "--data-dir", shared_data_dir(), "--num-samples", "5"], tmp_path)
    assert "runs each of its 36 points exactly once" in output


# ---------------------------------------------------------------------------------------------
# The driver's MLflow logging never raises.


def test_child_run_logging_queues_what_an_unanswering_server_does_not_take(tmp_path):
    from softfine.config import make_config

    base = make_config({"dataset": "resume", "data_dir": str(shared_data_dir())})
    callback = MLflowChildRuns(
        str(tmp_path), "1", "p", "s", "search", base, {}, [], timeout=2, probe_interval=0
    )
    import os
    import socket

    # A port held, bound but not listening, for the whole test: refused, and no other test's server
    # (the other xdist worker's) can take it between the submits and the flush at the end.
    held = socket.socket()
    held.bind(("127.0.0.1", 0))
    os.environ["MLFLOW_TRACKING_URI"] = f"http://127.0.0.1:{held.getsockname()[1]}"
    try:
        callback.setup()
    finally:
        del os.environ["MLFLOW_TRACKING_URI"]
    callback.submit({"op": "open", "trial_id": "t1", "point": {"alphas": "0.1,0.1", "beta": 2, "gamma": 2}})
    callback.submit({"op": "result", "trial_id": "t1", "metrics": {"dev_f1": 0.5}, "tags": {}, "step": 10})
    callback.submit({"op": "end", "trial_id": "t1", "status": "FINISHED"})
    assert len(callback.pending) == 3 and callback.runs == {}
    assert callback.failures[0].startswith("connection refused")
    restored = MLflowChildRuns(str(tmp_path), "1", "p", "s", "search", base, {}, [])
    restored.set_state(callback.get_state())  # Tune checkpoints it with the experiment
    assert [op["op"] for op in restored.pending] == ["open", "result", "end"]
    callback.on_experiment_end(trials=[])
    held.close()
    runs, pending, failures = read_account(tmp_path, "search")
    assert runs == {} and [op["op"] for op in pending] == ["open", "result", "end"] and failures


def test_an_evaluation_made_again_after_a_retry_is_logged_once(tmp_path, monkeypatch):
    """A retried trial goes on from its last registered checkpoint and may report again an evaluation
    whose report reached the driver before its node died (tests/test_two_nodes.py met step 36 twice):
    each run's history keeps every step once, also when a new driver (--resume) reopens the run."""
    from mlflow.tracking import MlflowClient

    from softfine.config import make_config

    uri = new_store(tmp_path / "mlflow.db")
    client = MlflowClient(tracking_uri=uri)
    experiment = client.create_experiment("retries")
    parent = client.create_run(experiment).info.run_id
    base = make_config({"dataset": "resume", "data_dir": str(shared_data_dir())})
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)

    def evaluation(step: int) -> dict:
        return {
            "op": "result",
            "trial_id": "t1",
            "evaluation": True,
            "metrics": {"dev_f1": step / 100},
            "tags": {},
            "step": step,
        }

    callback = MLflowChildRuns(str(tmp_path), experiment, parent, "s", "search", base, {}, [])
    callback.setup()
    point = {"alphas": "0.1,0.1", "beta": 2, "gamma": 2}
    for op in [
        {"op": "open", "trial_id": "t1", "point": point},
        evaluation(12),
        evaluation(24),
        evaluation(36),
        {"op": "open", "trial_id": "t1", "point": point},
        evaluation(36),
        evaluation(48),
    ]:  # a retry from 24
        callback.submit(op)
    resumed = MLflowChildRuns(str(tmp_path), experiment, parent, "s", "search", base, {}, [])  # a new driver
    resumed.setup()
    for op in [
        {"op": "open", "trial_id": "t1", "point": point},
        evaluation(36),
        evaluation(48),
        evaluation(60),
    ]:
        resumed.submit(op)
    (run_id,) = set(resumed.runs.values())
    history = client.get_metric_history(run_id, "dev_f1")
    assert [m.step for m in history] == [12, 24, 36, 48, 60] and not callback.pending and not resumed.pending
    assert client.get_run(run_id).data.tags["softfine.attempt"] == "3"


# ---------------------------------------------------------------------------------------------


def test_selection_takes_the_best_dev_f1_never_test():
    from softfine_tune.results import select

    rows = [
        {"trial": 0, "best_dev_f1": 0.5, "test_f1": 0.9},
        {"trial": 1, "best_dev_f1": 0.7, "test_f1": 0.1},
        {"trial": 2, "best_dev_f1": 0.7, "test_f1": 0.8},
        {"trial": 3, "best_dev_f1": None},
    ]
    assert select(rows)["trial"] == 1  # the earliest of the tied best
    assert select([{"trial": 0, "best_dev_f1": None}]) is None


def test_rows_stand_in_the_grids_order_whatever_order_ray_lists_them():
    """A resumed search's ResultGrid lists its trials in another order: the rows, and so the selection
    on a tie, are those of the grid's order (seen: a tie at dev F1 0.0 chose beta 2, then beta 3)."""
    from softfine_tune.results import in_grid_order, select

    grid = space.Grid([(0.1, 0.1), (0.01, 0.005)], [3, 2], [2])  # as written: beta 3 before beta 2
    points = grid.points()
    rows = [
        {"alpha_aug": aug, "alpha_fea": fea, "beta": beta, "gamma": 2.0, "seed": 42, "best_dev_f1": f1}
        for (aug, fea, beta, f1) in [
            (0.01, 0.005, 2.0, 0.7),
            (0.1, 0.1, 2.0, 0.7),
            (0.01, 0.005, 3.0, 0.5),
            (0.1, 0.1, 3.0, 0.7),
        ]
    ]
    for listed in (rows, rows[::-1], rows[1:] + rows[:1]):
        ordered = in_grid_order([dict(r) for r in listed], grid)
        assert [space.point_of(r, grid.keys()) for r in ordered] == points
        assert [r["trial"] for r in ordered] == [0, 1, 2, 3]
        assert space.point_of(select(ordered), grid.keys()) == points[0]  # 0.1,0.1, beta 3: first of the tied
    seeds = [{**rows[1], "seed": s} for s in (44, 42, 43)]  # one point's seeds: by seed
    assert [r["seed"] for r in in_grid_order(seeds, grid)] == [42, 43, 44]


def test_the_default_tracking_store_is_sqlite_under_mlflow(tmp_path, monkeypatch):
    from softfine_tune.tracking import local_artifact_root, resolve_tracking_uri

    assert resolve_tracking_uri(None) == f"sqlite:///{REPO / 'mlflow' / 'mlflow.db'}"
    assert local_artifact_root(resolve_tracking_uri(None)) == (REPO / "mlflow" / "artifacts").as_uri()
    monkeypatch.chdir(tmp_path)  # trials run elsewhere: a relative store becomes absolute
    assert resolve_tracking_uri("sqlite:///m.db") == f"sqlite:///{tmp_path / 'm.db'}"
    assert resolve_tracking_uri("http://127.0.0.1:5000") == "http://127.0.0.1:5000"


def test_max_overlap_counts_trials_running_together():
    rows = [
        {"trial_start_time": 0, "trial_end_time": 10},
        {"trial_start_time": 5, "trial_end_time": 15},
        {"trial_start_time": 10, "trial_end_time": 20},
        {"trial_start_time": 11, "trial_end_time": 12},
    ]
    assert results.max_overlap(rows) == 3


def test_busy_fraction_of_the_trial_slots():
    """GPU searches: the GPU shares trials held; CPU searches: the CPUs Ray reserved per trial."""
    assert results.slot_resource(0.5) == "gpu" and results.slot_resource(0) == "cpu"
    two = [{"trial_start_time": 0, "trial_end_time": 10}, {"trial_start_time": 0, "trial_end_time": 10}]
    assert results.busy_fraction(two, "cpu", 2, 1) == pytest.approx(1.0)  # two slots, both busy throughout
    assert results.busy_fraction(two, "cpu", 3, 1) == pytest.approx(2 / 3)  # one CPU idle
    assert results.busy_fraction(two[:1], "cpu", 3, 2) == pytest.approx(2 / 3)  # 2 per trial on 3: one slot
    staggered = [
        {"trial_start_time": 0, "trial_end_time": 10},
        {"trial_start_time": 10, "trial_end_time": 20},
    ]
    assert results.busy_fraction(staggered, "cpu", 2, 1) == pytest.approx(0.5)  # one at a time on two slots
    gpu = [
        {"trial_start_time": 0, "trial_end_time": 10, "gpu_ids": "0", "gpu_share": 0.5},
        {"trial_start_time": 0, "trial_end_time": 5, "gpu_ids": "1", "gpu_share": 1.0},
    ]
    assert results.busy_fraction(gpu, "gpu", 2, 1) == pytest.approx((10 * 0.5 + 5) / (2 * 10))
    assert results.busy_fraction(gpu, "gpu", 0, 1) is None and results.busy_fraction([], "cpu", 2, 1) is None


def test_optuna_plots_need_two_finished_trials(tmp_path):
    import optuna

    from softfine_tune.plots import optuna_figures

    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    study = optuna.create_study(study_name="s", storage=storage, direction="maximize")
    values = iter([0.5, 0.6])

    def objective(trial):
        trial.suggest_categorical("beta", [2.0, 3.0])
        trial.suggest_categorical("gamma", [1.5, 2.0])
        return next(values)

    study.optimize(objective, n_trials=1)
    assert optuna_figures(storage, "s") == {}  # one trial: nothing to compare, nothing plotted
    study.optimize(objective, n_trials=1)
    assert "optuna/optimization_history.png" in optuna_figures(storage, "s")


def test_a_trial_reports_no_system_exit_from_a_finalizer_and_every_other_error():
    # Ray's SIGTERM handler raises SystemExit; landing in a weakref's callback as an actor is torn
    # down, Python printed it as a 9-line traceback on the search's console (a README search in CI)
    code = (
        "import weakref\n"
        "from softfine_tune.trial import quiet\n"
        "quiet(False)\n"
        "class Box: pass\n"
        "def raise_(error): raise error\n"
        "for error in (SystemExit(1), ValueError('a finalizer failed')):\n"
        "    box = Box()\n"
        "    ref = weakref.ref(box, lambda _, e=error: raise_(e))\n"
        "    del box\n"
        "print('went on')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout == "went on\n", done.stderr
    assert "SystemExit" not in done.stderr
    assert "ValueError: a finalizer failed" in done.stderr and done.stderr.count("Exception ignored") == 1
