"""Search state a user can trust: the tracking store is MLflow's or new, one driver per search,
a resume goes on with the flags, grid and data it started with, an encoder no trial could load is
refused before Ray starts, and a damaged model is never logged or registered.

Each refusal is one line, `tune/search.py: error: ...`, naming the file or flag, with nothing
started: the searches run in this process (tune_fixtures.run_search) and are refused before Ray."""

from __future__ import annotations

import contextlib
import json
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from tune_fixtures import new_store, run_search, shared_data_dir, small_search_flags

from softfine_tune.cli import RECORD
from softfine_tune.tuner import OPTUNA_DB, check_study


def refused(argv: list, *fragments: str) -> str:
    code, output = run_search(argv)
    last = output.strip().splitlines()[-1]
    assert code == 2 and "Traceback" not in output, output[-3000:]
    assert last.startswith("tune/search.py: error: "), last
    for fragment in fragments:
        assert fragment in last, f"{fragment!r} not in {last!r}"
    return last


def flags(tmp_path: Path, *extra) -> list:
    return small_search_flags(shared_data_dir(), "--storage-path", tmp_path / "ray", *extra)


# --- The tracking store ----------------------------------------------------------------------------


def test_another_applications_sqlite_file_is_not_taken_as_the_store(tmp_path):
    other = tmp_path / "app.db"
    with sqlite3.connect(other) as db:
        db.execute("CREATE TABLE customers (id INTEGER PRIMARY KEY, name TEXT)")
        db.execute("INSERT INTO customers (name) VALUES ('Ada')")
    refused(
        flags(tmp_path, "--mlflow-uri", f"sqlite:///{other}"),
        f"--mlflow-uri sqlite:///{other}: {other} is another application's SQLite database (tables: "
        "customers)",
    )
    with sqlite3.connect(other) as db:  # untouched: MLflow created none of its tables in it
        assert [r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")] == [
            "customers"
        ]
    text = tmp_path / "notes.db"
    text.write_text("not a database, but not empty either\n" * 100)
    refused(flags(tmp_path, "--mlflow-uri", f"sqlite:///{text}"), f"{text} is not an SQLite database")
    assert not (tmp_path / "ray").exists()


CREATE_STORE = """
import sys
from softfine_tune.tracking import check_tracking, tracking_store
check_tracking(tracking_store(sys.argv[1]), 30)
print("ok")
"""


def test_two_searches_starting_on_one_new_store_both_use_it(tmp_path):
    uri = f"sqlite:///{tmp_path / 'new' / 'mlflow.db'}"
    starts = [
        subprocess.Popen(
            [sys.executable, "-c", CREATE_STORE, uri],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    for process in starts:
        out, err = process.communicate(timeout=300)
        assert process.returncode == 0 and out.strip() == "ok", err[-3000:]


# --- One driver per search -----------------------------------------------------------------------


def test_a_second_driver_on_one_search_is_refused_naming_the_first(tmp_path):
    import os

    from softfine_tune.lock import one_driver
    from softfine_tune.storage import SearchFiles, Storage

    # what the first driver holds while it runs
    with one_driver(SearchFiles(Storage(str(tmp_path / "ray")), "twice")):
        refused(
            flags(tmp_path, "--name", "twice", "--mlflow-uri", f"sqlite:///{tmp_path / 'm.db'}"),
            f"--name twice: the search in {tmp_path / 'ray' / 'twice'} is running in process {os.getpid()}",
        )
    assert not (tmp_path / "ray" / "twice").exists()  # neither left anything behind


# --- Resuming ------------------------------------------------------------------------------------


def write_record(tmp_path: Path, **values) -> Path:
    folder = tmp_path / "ray" / "s1"
    folder.mkdir(parents=True)
    record = {
        "argv": [str(a) for a in flags(tmp_path)],
        "name": "s1",
        "mlflow_uri": f"sqlite:///{tmp_path / 'm.db'}",
        "experiment_id": "1",
        "parent_run_id": "0" * 32,
        "stage": "search",
        **values,
    }
    (folder / RECORD).write_text(json.dumps(record))
    return folder


def test_resume_refuses_flags_that_would_change_the_search(tmp_path):
    write_record(tmp_path)
    refused(
        ["--resume", "s1", "--storage-path", tmp_path / "ray", "--epochs", "5", "--beta", "3"],
        "--resume: --beta, --epochs would change the search, which goes on with the flags it started with",
        "leave them out, or start a new search",
    )


def test_resume_goes_on_with_the_grid_and_settings_it_started_with(tmp_path):
    """A preset edited after the start changes nothing: the record's grid and settings are used."""
    from softfine_tune.cli import build_parser
    from softfine_tune.plan import make_plan, settings
    from softfine_tune.record import recorded_settings

    preset = tmp_path / "preset.yaml"
    preset.write_text(
        "train:\n  max_length: 128\ngrid:\n  alphas: [[0.1, 0.1]]\n  beta: [2, 3]\n  gamma: [2]\n"
    )
    argv = [str(a) for a in flags(tmp_path, "--preset", preset)]
    args = build_parser().parse_args(argv)
    started = make_plan(args, argv)
    from softfine.datasets import load_corpus

    record = recorded_settings(started.__class__(**{**started.__dict__, "corpus": load_corpus(started.base)}))
    preset.write_text("train:\n  max_length: 64\ngrid:\n  alphas: [[0.5, 0.5]]\n  beta: [9]\n  gamma: [2]\n")
    assert settings(build_parser().parse_args(argv))[2].beta == [
        9.0
    ]  # what reading the preset again would give
    resumed = make_plan(build_parser().parse_args(argv), argv, json.loads(json.dumps(record)))
    assert resumed.grid.describe() == started.grid.describe() and resumed.base == started.base
    assert resumed.base.max_length == 128 and resumed.grid.beta == [2.0, 3.0]


def test_resume_refuses_data_that_changed_since_the_start(tmp_path):
    data = tmp_path / "data"
    shutil.copytree(shared_data_dir() / "resume", data / "resume")
    write_record(tmp_path, data_sha256="0" * 64)
    refused(
        ["--resume", "s1", "--storage-path", tmp_path / "ray", "--data-dir", data],
        "--resume: --data-dir would change the search",
    )
    record = json.loads((tmp_path / "ray" / "s1" / RECORD).read_text())
    record["argv"] = [str(a) for a in small_search_flags(data, "--storage-path", tmp_path / "ray")]
    (tmp_path / "ray" / "s1" / RECORD).write_text(json.dumps(record))
    refused(
        ["--resume", "s1", "--storage-path", tmp_path / "ray"],
        f"--resume: the data changed since the search started ({data / 'resume' / 'train.char.bmes'}",
        "was 0000000000000000",
    )


# --- The encoder ---------------------------------------------------------------------------------


def test_an_encoder_no_trial_could_load_is_refused_before_ray_starts(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # as on a machine that cannot reach the Hub
    for model in (tmp_path / "no-such-encoder", "bert-base-chinesse"):
        refused(
            flags(tmp_path, "--model", model, "--mlflow-uri", f"sqlite:///{tmp_path / 'm.db'}"),
            f"--model {model}: cannot load its config and tokenizer",
            "give a local copy",
        )
    assert not (tmp_path / "ray").exists()


# --- The selected model --------------------------------------------------------------------------


def test_a_damaged_model_is_neither_logged_nor_registered(tmp_path):
    from mlflow.tracking import MlflowClient

    from softfine.config import make_config
    from softfine.train import train
    from softfine_tune.report import log_checked_model
    from softfine_tune.runs import Tracker

    out = tmp_path / "trial" / "run"
    train(
        make_config(
            {
                "dataset": "resume",
                "data_dir": str(shared_data_dir()),
                "model": "tiny",
                "tiny_layers": 1,
                "tiny_hidden": 64,
                "epochs": 1,
                "limit_train": 16,
                "limit_eval": 8,
                "device": "cpu",
                "out": str(out),
            }
        )
    )
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    tracker = Tracker(uri)
    run = tracker.client.create_run(tracker.experiment("state"))
    weights = out / "best" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # truncated, as a full disk or a lost node leaves it
    model_uri, why = log_checked_model(tracker, uri, run.info.run_id, str(out))
    assert model_uri is None and f"the selected checkpoint {out} cannot be loaded" in why
    assert "nothing was logged as the model or registered" in why
    client = MlflowClient(tracking_uri=uri)
    assert not client.search_logged_models([run.info.experiment_id])
    assert not client.search_registered_models()


# --- A copied search folder, a damaged trial checkpoint ------------------------------------------------


def fingerprint(folder: Path) -> dict:
    return {
        p.relative_to(folder): (p.stat().st_mtime_ns, p.stat().st_size)
        for p in folder.rglob("*")
        if p.is_file()
    }


def test_a_copied_search_resumes_in_place_and_a_damaged_checkpoint_starts_again(ray_local, tmp_path):
    """A search folder copied elsewhere resumes there, writing nothing into the original; a trial
    whose checkpoint cannot be loaded trains again from the start, and the summary says so; the
    MLflow callback's state cut short is done without (its runs found again by their tags)."""
    from mlflow.tracking import MlflowClient
    from tune_fixtures import children, kill_the_driver_when, parents, saved_trials, saved_trials_so_far

    storage, uri = tmp_path / "ray", new_store(tmp_path / "m.db")
    argv = small_search_flags(
        shared_data_dir(),
        "--alphas",
        "0.1,0.1",
        "--beta",
        "2",
        "3",
        "--gamma",
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
        "damaged",
        "--storage-path",
        storage,
        "--name",
        "damaged",
    )

    def one_checkpointed() -> bool:  # Ray's last snapshot names a checkpoint of a trial still going
        return any(
            t.status != "TERMINATED" and t.checkpoint
            for t in saved_trials_so_far(storage / "damaged").values()
        )

    kill_the_driver_when(argv, ray_local, tmp_path, one_checkpointed)
    copy = tmp_path / "elsewhere" / "ray"
    shutil.copytree(storage, copy)
    (going,) = [
        t for t in saved_trials(copy / "damaged").values() if t.status != "TERMINATED" and t.checkpoint
    ]
    trial_dir = Path(going.checkpoint.path).parent
    assert copy in trial_dir.parents  # Ray reads a copied folder's state where it now is
    # Every checkpoint the trial has (the one the snapshot names may be the one Ray deleted, which
    # a resume replaces with the next: tuner.mend_checkpoints), cut short as a lost node leaves it.
    for weights in trial_dir.glob("checkpoint_*/state/model.safetensors"):
        weights.write_bytes(weights.read_bytes()[:500])
    (callbacks,) = (copy / "damaged").glob("callback-states-*.pkl")
    callbacks.write_bytes(callbacks.read_bytes()[:40])  # Ray's copy of it, cut short by the kill
    original = fingerprint(storage)

    code, output = run_search(["--resume", "damaged", "--storage-path", copy])
    assert code == 0, output[-3000:]  # every point finished, the damaged one trained again
    assert fingerprint(storage) == original  # nothing written into the original
    assert f"trial {going.trial_id} (" in output and "could not be loaded" in output
    assert "trained again from the start" in output
    assert f"{callbacks.name} was cut short" in output
    summary = json.loads((copy / "damaged" / "summary.json").read_text())
    assert [r["trial_id"] for r in summary["restarted"]] == [going.trial_id]
    (parent,) = parents(uri, "damaged")
    kids = children(uri, "damaged", parent.info.run_id)
    assert len(kids) == 2 and all(k.info.status == "FINISHED" for k in kids)
    client = MlflowClient(tracking_uri=uri)
    for kid in kids:  # no evaluation logged twice, the restarted trial's included
        steps = [m.step for m in client.get_metric_history(kid.info.run_id, "dev_f1")]
        assert len(steps) == len(set(steps)), steps


KILLED_MID_WRITE = """
import os, sqlite3, sys
import optuna
optuna.logging.set_verbosity(optuna.logging.WARNING)
study = optuna.create_study(study_name="s", storage=f"sqlite:///{sys.argv[1]}")
study.optimize(lambda trial: trial.suggest_float("x", 0, 1), n_trials=3)
db = sqlite3.connect(sys.argv[1], isolation_level=None)
db.execute("PRAGMA cache_size = 1")  # spill the changed pages to the file: the journal is then hot
db.execute("BEGIN")
db.execute("CREATE TABLE filler (x)")
db.executemany("INSERT INTO filler VALUES (?)", ((os.urandom(500),) for _ in range(200)))
db.execute("UPDATE trials SET state = 'FAIL'")
os._exit(9)  # killed before the commit
"""


def test_a_study_left_mid_write_by_a_killed_driver_is_read_not_called_damaged(tmp_path):
    """A driver killed inside one of Optuna's transactions leaves a hot journal: SQLite refuses a
    read-only look at the file until it is rolled back, which is not damage (seen in CI, once)."""
    study = tmp_path / OPTUNA_DB
    subprocess.run([sys.executable, "-c", KILLED_MID_WRITE, str(study)], check=False, timeout=120)
    assert Path(f"{study}-journal").stat().st_size > 0
    read_only = contextlib.closing(sqlite3.connect(f"{study.as_uri()}?mode=ro", uri=True))
    with read_only as db, pytest.raises(sqlite3.OperationalError, match="readonly"):  # the fault
        db.execute("SELECT * FROM sqlite_master")
    check_study(tmp_path)  # not refused
    with sqlite3.connect(study) as db:  # rolled back to the last commit
        assert {r[0] for r in db.execute("SELECT state FROM trials")} == {"COMPLETE"}
        assert "filler" not in {r[0] for r in db.execute("SELECT name FROM sqlite_master")}


def test_damaged_ray_state_or_optuna_study_is_one_line_naming_the_file(ray_local, tmp_path):
    """A search stopped and then damaged on disk: its resume names the damaged file and what to do."""
    storage, uri = tmp_path / "ray", new_store(tmp_path / "m.db")
    code, _ = run_search(
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
            "--storage-path",
            storage,
            "--name",
            "s",
            "--address",
            ray_local,
        )
    )
    assert code == 0
    record = json.loads((storage / "s" / RECORD).read_text())
    record["stage"] = "search"  # as if it had stopped before its summary
    (storage / "s" / RECORD).write_text(json.dumps(record))

    study = storage / "s" / "optuna.db"
    kept = study.read_bytes()
    study.write_bytes(b"not a database " * 100)
    refused(
        ["--resume", "s", "--storage-path", storage],
        f"--resume: {study}: the search's Optuna study is damaged",
        "restore it from a copy, or start the search again under another --name",
    )
    study.write_bytes(kept)

    (state,) = (storage / "s").glob("experiment_state-*.json")
    state.write_text(state.read_text()[:200])
    refused(
        ["--resume", "s", "--storage-path", storage, "--address", ray_local],
        f"--resume: {state}: Ray Tune's saved state of this search is damaged (a JSON file: JSONDecodeError",
        "start the search again under another --name",
    )
