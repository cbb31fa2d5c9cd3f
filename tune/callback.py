"""Tune's events as the trials' MLflow child runs, written by the driver (workers need no route to the
server): a Ray Tune callback like Ray's MLflowLoggerCallback, one run per point, retries recorded."""

from __future__ import annotations

import os
import posixpath
import re
from pathlib import Path

from ray.tune import Callback

from .account import RUNS, UNLOGGED, describe_retry, write_account
from .child_runs import ChildRunQueue
from .space import FUSED, METRIC
from .storage import uri_of
from .trial import member_dirs, member_results, members_of

FINAL_KEYS = (METRIC, "best_step", "dev_sentences", "dev_gold_entities", "train_seconds")
# A line of a traceback that names an exception ("ValueError: ...", "ray.exceptions.RayTaskError...").
EXCEPTION_LINE = re.compile(r"[A-Za-z_][\w.]*(Error|Exception|Exit|Interrupt)\b")
# a trial's results that its runs get as softfine.KEY tags (a retried trial may run elsewhere)
TAGGED = ("node_id", "node_ip", "hostname", "gpu_ids", "gpu_share", "cuda_visible_devices", "device")
TAGGED += ("device_note", "resumed_from_step", "data_sha256")


class MLflowChildRuns(ChildRunQueue, Callback):
    # The search's files where this driver keeps them (storage.SearchFiles), set before each phase:
    # a restored callback was made (and pickled) by an earlier driver, maybe on another machine.
    search_files = None

    def __init__(self, folder: str, *args, **kwargs):
        super().__init__(*args, **kwargs)  # ChildRunQueue's: the parent run, phase, base config, timeouts
        self.folder = folder  # the search's folder: the phase's account goes there at the end
        self.retries: list[dict] = []  # {trial_id, node_ip, step, error} per retry, in order

    def __getstate__(self) -> dict:
        return {**self.__dict__, "client": None}  # no connection in the Tuner's pickle

    def get_state(self) -> dict:
        """Checkpointed by Tune with the experiment: a resumed driver keeps the runs and the queue."""
        return {key: getattr(self, key) for key in ("runs", "pending", "failures", "retries")}

    def set_state(self, state: dict) -> None:
        self.runs = dict(state["runs"])
        self.pending = list(state["pending"])
        self.failures = list(state["failures"])
        self.retries = list(state.get("retries", []))  # absent from the state of an older search

    def setup(self, **info) -> None:
        """The client, from the driver's environment (search.py sets it): nothing secret is pickled."""
        from mlflow.tracking import MlflowClient

        # Explicitly the driver's store: mlflow.set_tracking_uri in this process would win otherwise.
        self.client = MlflowClient(tracking_uri=os.environ["MLFLOW_TRACKING_URI"])

    def send(self, op: str, trial, member: int | None, **fields) -> None:
        """An operation on the run of one of the trial's points."""
        self.submit({"op": op, "trial_id": trial.trial_id, "member": member, **fields})

    def on_trial_start(self, iteration, trials, trial, **info) -> None:
        for member, point in members(trial):
            self.send("open", trial, member, point=dict(point))

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        """An evaluation's metrics at its step; the final result's test scores at the best step."""
        final = bool(result.get("final"))
        for (member, _), part in zip(members(trial), member_results(result)):
            if final:
                keys = [k for k in part if k.startswith("test_")] + list(FINAL_KEYS)
            else:
                keys = [k for k in part if k.startswith(("dev_", "train_"))] + ["epoch", METRIC]
            step = int(part.get("best_step" if final else "step") or 0)
            metrics = {k: part[k] for k in keys if _number(part.get(k))}
            tags = {f"softfine.{k}": part[k] for k in TAGGED if part.get(k) not in (None, "")}
            self.send("result", trial, member, evaluation=not final, step=step, metrics=metrics, tags=tags)

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        finished = bool((trial.last_result or {}).get("final"))
        for (member, _), folder in zip(members(trial), member_dirs(trial.config)):
            if finished and trial.checkpoint is not None:  # a path, or a URI on a remote storage
                path = posixpath.normpath(posixpath.join(trial.checkpoint.path, folder))
                self.send("artifact", trial, member, checkpoint=uri_of(trial.checkpoint.filesystem, path))
            else:  # stopped by the scheduler (ASHA)
                self.send("tags", trial, member, tags={"softfine.stopped_early": "true"})
            self.send("end", trial, member, status="FINISHED" if finished else "KILLED")

    def on_trial_recover(self, iteration, trials, trial, **info) -> None:
        """A failed trial that Ray will restart from its last checkpoint: where it failed, and why."""
        last = trial.last_result or {}
        retry = {"trial_id": trial.trial_id, "node_ip": last.get("node_ip", ""), "step": last.get("step")}
        retry["error"] = trial_error(trial)
        self.retries.append(retry)
        for member, _ in members(trial):
            self.send("tags", trial, member, tags={"softfine.retried_after": describe_retry(retry)})

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        error = trial_error(trial)
        for member, _ in members(trial):
            self.send("tags", trial, member, tags={"softfine.error": error})
            self.send("end", trial, member, status="FAILED")

    def on_experiment_end(self, trials, **info) -> None:
        self.flush(force=True)
        account = (self.phase, self.runs, self.pending, self.failures, self.retries)
        files = MLflowChildRuns.search_files
        if files is not None and files.name == self.search:  # a copied folder resumes in place
            write_account(files.folder, *account)
            files.push(RUNS.format(self.phase), UNLOGGED.format(self.phase))
        else:  # the folder given when the callback was made may be another machine's
            experiment = Path(trials[0].storage.experiment_fs_path) if trials else None
            write_account(experiment.parent / self.search if experiment else Path(self.folder), *account)


def members(trial) -> list[tuple[int | None, dict]]:
    """(member number, point) of each point a trial trains; the number is None for a point alone."""
    points = members_of(trial.config)
    return list(enumerate(points)) if FUSED in trial.config else [(None, points[0])]


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def trial_error(trial) -> str:
    """Ray's account of the trial's last failure, from its last line naming an exception: read from the
    driver's error file (the storage's is synced later; the typed error is a pickle, never read)."""
    local = Path(trial.error_file) if trial.error_file else None
    if local is not None and local.is_file():
        last = local.read_text(encoding="utf-8", errors="replace").rsplit("Failure # ", 1)[-1]
        text = last.partition("\n")[2]  # without its "Failure # N (occurred at ...)" line
    else:
        error = trial.get_error()
        text = str(error) if error else ""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    named = [i for i, line in enumerate(lines) if EXCEPTION_LINE.match(line)]
    # A RayTaskError's text is the trial's traceback, whose last named exception is the cause;
    # an actor's error (ActorDiedError, ActorUnavailableError) is Ray's message alone, kept whole.
    return " ".join(lines[named[-1] if named else 0 :])[:4000] or "unknown error"
