"""tune/search.py on a user's folder (Resume's sentences rewritten as run_ner.py's JSON lines): a
2-point search and a fused one, each ending with its MLflow runs, dataset inputs and selection, and
the same dev F1 per point as the built-in reader's search on the same sentences."""

from __future__ import annotations

import hashlib
import json

import pytest
from test_user_data import write_folder
from tune_fixtures import children, new_store, parents, run_search, shared_data_dir

from softfine.config import make_config
from softfine.datasets import load_corpus

# The tiny encoder's smallest shape, a few sentences, 2 epochs (tune_fixtures.small_search_flags,
# without its data).
TRAINING = [
    "--model",
    "tiny",
    "--tiny-layers",
    "1",
    "--tiny-hidden",
    "64",
    "--epochs",
    "2",
    "--batch-size",
    "2",
    "--lr",
    "5e-3",
    "--gpus-per-trial",
    "0",
    "--cpus-per-trial",
    "0.5",
]
PRESET = """train:
  max_length: 128
grid:
  alphas: [[0.01, 0.01]]
  beta: [2, 3]
  gamma: [2]
"""


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """Resume's first 24 training, dev and test sentences as a user's folder."""
    corpus = load_corpus(
        make_config(
            {"dataset": "resume", "data_dir": str(shared_data_dir()), "limit_train": 24, "limit_eval": 24}
        )
    )
    return write_folder(tmp_path_factory.mktemp("user") / "mydata", corpus.splits, "tokens-bio")


def dev_f1_by_point(uri: str, experiment: str) -> dict:
    (parent,) = parents(uri, experiment)
    kids = children(uri, experiment, parent.info.run_id)
    return {float(k.data.params["beta"]): k.data.metrics["best_dev_f1"] for k in kids}


def test_a_search_on_a_user_folder_logs_its_runs_data_and_selection(ray_local, folder, tmp_path):
    from mlflow.tracking import MlflowClient

    uri = new_store(tmp_path / "mlflow.db")
    (tmp_path / "preset.yaml").write_text(PRESET)
    code, output = run_search(
        [
            "--dataset",
            folder,
            "--preset",
            tmp_path / "preset.yaml",
            *TRAINING,
            "--mlflow-uri",
            uri,
            "--storage-path",
            tmp_path / "ray",
            "--name",
            "own",
        ]
    )
    assert code == 0
    assert "Selected: alpha_aug=0.01 alpha_fea=0.01" in output and "dev F1" in output
    (parent,) = parents(uri, "softfine-mydata")  # the experiment is named after the folder
    kids = children(uri, "softfine-mydata", parent.info.run_id)
    assert sorted(float(k.data.params["beta"]) for k in kids) == [2.0, 3.0]
    assert all(k.info.status == "FINISHED" and k.data.metrics["dev_sentences"] == 24 for k in kids)
    assert parent.data.params["dataset"] == "mydata" and parent.data.params["train.max_length"] == "128"
    best = max(kids, key=lambda k: k.data.metrics["best_dev_f1"])
    assert parent.data.params["selected_beta"] in (
        best.data.params["beta"],
        str(float(best.data.params["beta"])),
    )

    # Each split is a dataset input naming its file, with the file's SHA-256.
    inputs = MlflowClient(tracking_uri=uri).get_run(parent.info.run_id).inputs.dataset_inputs
    assert {i.dataset.name for i in inputs} == {"mydata-train", "mydata-dev", "mydata-test"}
    for dataset_input in inputs:
        split = dataset_input.dataset.name.split("-")[-1]
        digest = hashlib.sha256((folder / f"{split}.json").read_bytes()).hexdigest()
        profile = json.loads(dataset_input.dataset.profile)
        assert profile["sha256"] == digest and dataset_input.dataset.digest == digest[:16]
        assert profile["file"] == f"{split}.json" and profile["sentences"] == 24

    # The built-in reader's search on the same sentences: the same dev F1 at every point.
    builtin = [
        "--dataset",
        "resume",
        "--data-dir",
        shared_data_dir(),
        "--limit-train",
        "24",
        "--limit-eval",
        "24",
    ]
    code, _ = run_search(
        [
            *builtin,
            "--preset",
            tmp_path / "preset.yaml",
            *TRAINING,
            "--mlflow-uri",
            uri,
            "--experiment-name",
            "builtin",
            "--storage-path",
            tmp_path / "ray",
            "--name",
            "builtin",
        ]
    )
    assert code == 0
    assert dev_f1_by_point(uri, "builtin") == dev_f1_by_point(uri, "softfine-mydata")
    assert any(f1 > 0 for f1 in dev_f1_by_point(uri, "builtin").values())  # an equality of models that learnt

    # Fused: both points in one Ray trial, each its own run, the same dev F1 again.
    code, output = run_search(
        [
            "--dataset",
            folder,
            "--preset",
            tmp_path / "preset.yaml",
            *TRAINING,
            "--fuse",
            "2",
            "--mlflow-uri",
            uri,
            "--experiment-name",
            "fused",
            "--storage-path",
            tmp_path / "ray",
            "--name",
            "fused",
        ]
    )
    assert code == 0
    kids = children(uri, "fused", parents(uri, "fused")[0].info.run_id)
    assert len(kids) == 2 and len({k.data.tags["softfine.trial_id"] for k in kids}) == 1
    assert dev_f1_by_point(uri, "fused") == dev_f1_by_point(uri, "softfine-mydata")
