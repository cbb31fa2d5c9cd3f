"""The search's MLflow runs as the driver writes them: the tags they share, the parent run's client
(`Tracker`), and what a run records of its code and data."""

from __future__ import annotations

import importlib.metadata as md
import json
import logging
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .space import SearchError
from .tracking import REPO, describe_error, local_artifact_root, short_http

log = logging.getLogger("softfine.tune")

TRIAL_ID_TAG = "softfine.trial_id"
PHASE_TAG = "softfine.phase"
SEARCH_TAG = "softfine.search"  # the search's name, on the parent and every child
SELECTED_TAG = "softfine.selected"  # "true" on the child run whose model the parent run has
# What an F1 was computed on: the evaluations' counts, on every child run and in the summary.
COUNT_KEYS = ("dev_sentences", "dev_gold_entities", "test_sentences", "test_gold_entities")
# MLflow 3's experiment kind (the UI's ExperimentKind): model training, whose page is the runs table.
# MLflow 3.17's UI takes its GenAI / Model training switch from the URL (RUNS_VIEW), not this tag.
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")
RUNS_VIEW = "workflowType=machine_learning"  # the query that opens an MLflow page in Model training


class Tracker:
    """MLflow calls of the driver; failures are recorded, not raised (after the start)."""

    def __init__(self, uri: str, timeout: float = 10):
        from mlflow.tracking import MlflowClient

        self.uri, self.timeout = uri, timeout
        self.client = MlflowClient(tracking_uri=uri)
        self.failures: list[str] = []

    def attempt(self, what: str, call: Callable[[], Any], default: Any = None) -> Any:
        """`call()`, or `default` and a recorded failure; after a failure, a call is tried only if the
        store answers a quick check (a server that hangs costs seconds, not a timeout per call)."""
        if self.failures and not self.answers():
            self.failures.append(f"{what}: not tried, the store still does not answer")
            log.warning("MLflow: could not %s (the store does not answer)", what)
            return default
        try:
            with short_http(self.timeout, retries=1):
                return call()
        except Exception as err:  # noqa: BLE001
            self.failures.append(f"{what}: {describe_error(err)}")
            log.warning("MLflow: could not %s (%s)", what, describe_error(err))
            return default

    def answers(self) -> bool:
        try:
            with short_http(min(self.timeout, 5), retries=0):
                self.client.search_experiments(max_results=1)
            return True
        except Exception:  # noqa: BLE001
            return False

    def experiment(self, name: str) -> str:
        """The experiment's id, created if needed, marked as model training (artifacts beside SQLite)."""
        found = self.client.get_experiment_by_name(name)
        if found is None:
            root = local_artifact_root(self.uri)
            return self.client.create_experiment(name, artifact_location=root, tags=dict([EXPERIMENT_KIND]))
        if found.lifecycle_stage == "deleted":
            raise SearchError(
                f"--experiment-name {name}: this MLflow experiment was deleted; restore it "
                "(mlflow experiments restore) or choose another name"
            )
        if found.tags.get(EXPERIMENT_KIND[0]) != EXPERIMENT_KIND[1]:
            self.client.set_experiment_tag(found.experiment_id, *EXPERIMENT_KIND)
        return found.experiment_id

    def start_parent(self, experiment_id: str, run_name: str, search: str, params: dict, tags: dict) -> str:
        from mlflow.entities import Param

        tags = {SEARCH_TAG: search, PHASE_TAG: "parent", **tags}
        run_id = self.client.create_run(experiment_id, run_name=run_name, tags=tags).info.run_id
        items = [Param(k, str(v)[:6000]) for k, v in params.items()]
        try:
            for start in range(0, len(items), 100):
                self.client.log_batch(run_id, params=items[start : start + 100])
        except BaseException:  # the run exists: not RUNNING forever
            self.attempt("end the parent run (FAILED)", lambda: self.client.set_terminated(run_id, "FAILED"))
            raise
        return run_id


def git_version(repo: Path = REPO) -> dict:
    """The commit the search runs, and whether the working tree differs from it. Without a git
    checkout (`ray job submit --working-dir .` uploads no .git), $SOFTFINE_GIT_COMMIT."""

    def git(*args: str) -> str:
        command = ["git", "-C", str(repo), *args]
        return subprocess.run(command, capture_output=True, text=True, timeout=20, check=True).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        commit = os.environ.get("SOFTFINE_GIT_COMMIT", "")
        if not commit:
            log.warning(
                "no git checkout in %s and no $SOFTFINE_GIT_COMMIT: runs will not record the code version",
                repo,
            )
        return {"commit": commit, "dirty": "unknown"}
    return {"commit": commit, "dirty": str(dirty).lower()}


def versions() -> dict:
    """The driver's versions of Python and of the packages a run depends on."""
    found = {"python": sys.version.split()[0]}
    for name in ("softfine", "torch", "transformers", "ray", "optuna", "mlflow"):
        try:
            found[name] = md.version(name)
        except md.PackageNotFoundError:
            found[name] = "not installed"
    return found


def dataset_inputs(corpus) -> list:
    """The corpus's splits as MLflow dataset inputs, each naming its file and SHA-256."""
    from mlflow.entities import Dataset, DatasetInput, InputTag

    inputs = []
    for split, file in corpus.files.items():
        profile = {"file": Path(file["path"]).name, "sha256": file["sha256"], "format": file["format"]}
        profile.update(sentences=len(corpus.splits[split]), **{k: file[k] for k in ("carved",) if k in file})
        dataset = Dataset(
            name=f"{corpus.name}-{split}",
            digest=file["sha256"][:16],
            source_type="local",
            source=json.dumps({"uri": Path(file["path"]).as_uri()}),
            profile=json.dumps(profile),
        )
        inputs.append(DatasetInput(dataset, tags=[InputTag("mlflow.data.context", split)]))
    return inputs
