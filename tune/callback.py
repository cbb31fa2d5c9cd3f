"""The trials' MLflow child runs, written from the driver: a Ray Tune callback.

Like Ray's own `MLflowLoggerCallback`, it turns Tune's events into MLflow calls on the driver, so
workers need no route to the tracking server. Beyond it, it keeps what this project needs:

* one child run per grid point, nested under the search's parent run and named by its point
  (`0.01,0.005,2,2`: α_aug,α_fea,β,γ), with its TrainConfig as params, its data as dataset inputs, the code
  version as source; a fused trial (--fuse) is several points, each with its own run (keyed
  `TRIAL_ID/MEMBER`), fed from the member's part of each report (trial.member_results);
* a retried or resumed trial goes on in its own run: the trial-to-run map is the callback's state,
  which Tune checkpoints with the experiment (`get_state`/`set_state`), and a run is also found by
  its trial-id tag, so no trial ever gets two runs;
* no evaluation is logged twice: a retried trial goes on from its last registered checkpoint, and
  may make again an evaluation whose report reached the driver before its node died (the same
  values: resuming is exact); a run's last logged step is read from MLflow when the run is
  reopened and kept as it grows, and a report at or before it adds no metrics;
* every retry (--max-failures) is recorded with where the failed attempt ran, its last step and
  Ray's error: on the run (`softfine.retried_after`) and in the phase's account, which the summary
  and trials.csv read (`read_retries`);
* a tracking server that stops answering delays the runs but never the trials: every call goes
  through a queue, retried on later events (at most every `probe_interval` seconds while the
  server is down) and kept in the callback's state; what is still unsent at the end is written
  beside the Ray results (`mlflow_unlogged.jsonl`) and counted in the summary.

Nothing secret is pickled with the Tuner: the client is made in `setup()` from the driver's
environment (MLFLOW_TRACKING_URI and the credentials, set by search.py while the phase runs).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import posixpath
import re
import tempfile
import time
from pathlib import Path

from ray.tune import Callback

from softfine.config import TEST_METRICS_FILE

from .space import FUSED, METRIC, point_name, trial_config
from .storage import read_uri, uri_of
from .tracking import PHASE_TAG, SEARCH_TAG, TRIAL_ID_TAG, describe_error, short_http
from .trial import member_dirs, member_results, members_of

log = logging.getLogger("softfine.tune")

ATTEMPT_TAG = "softfine.attempt"  # 2 and more: retried (--max-failures) or resumed (--resume)
MEMBER_TAG = "softfine.fused_member"  # a fused trial's runs: the member's number in its group
FINAL_KEYS = (METRIC, "best_step", "dev_sentences", "dev_gold_entities", "train_seconds")
PLACEMENT = (
    "node_id",
    "node_ip",
    "hostname",
    "gpu_ids",
    "gpu_share",
    "cuda_visible_devices",
    "device",
    "device_note",
    "resumed_from_step",
)


class MLflowChildRuns(Callback):
    # The search's files where this driver keeps them (storage.SearchFiles), set by the driver
    # before each phase: a restored callback was made (and pickled) by an earlier driver, maybe on
    # another machine.
    search_files = None

    def __init__(
        self,
        folder: str,
        experiment_id: str,
        parent_run_id: str,
        search: str,
        phase: str,
        base,
        run_tags: dict,
        datasets: list,
        timeout: float = 10,
        probe_interval: float = 30,
    ):
        self.folder = folder  # the search's folder: the phase's account goes there at the end
        self.experiment_id, self.parent_run_id, self.search, self.phase = (
            experiment_id,
            parent_run_id,
            search,
            phase,
        )
        self.base = base  # the search's TrainConfig: a trial's params are it with the point replaced
        self.run_tags, self.datasets = run_tags, datasets  # source and code version; mlflow DatasetInputs
        self.timeout, self.probe_interval = timeout, probe_interval
        self.runs: dict[str, str] = {}  # trial id (TRIAL_ID/MEMBER in a fused trial) -> run id
        self.pending: list[dict] = []  # operations the server has not taken yet, in order
        self.failures: list[str] = []
        self.retries: list[dict] = []  # {trial_id, node_ip, step, error} per retry, in order
        # run key -> the last evaluation step its run has: read from MLflow when a run is reopened
        # (a retry, a resumed driver), so it is not part of the state
        self.logged: dict[str, int] = {}
        self.client = None
        self.down_since: float | None = None
        self.last_try = 0.0

    def __getstate__(self) -> dict:
        return {**self.__dict__, "client": None}  # no connection in the Tuner's pickle

    def get_state(self) -> dict:
        return {
            "runs": self.runs,
            "pending": self.pending,
            "failures": self.failures,
            "retries": self.retries,
        }

    def set_state(self, state: dict) -> None:
        self.runs, self.pending, self.failures = (
            dict(state["runs"]),
            list(state["pending"]),
            list(state["failures"]),
        )
        self.retries = list(state.get("retries", []))  # absent from the state of an older search

    def setup(self, **info) -> None:
        import os

        from mlflow.tracking import MlflowClient

        # Explicitly the driver's store: mlflow.set_tracking_uri in this process would win otherwise.
        self.client = MlflowClient(tracking_uri=os.environ["MLFLOW_TRACKING_URI"])

    # -- Tune's events ------------------------------------------------------------------------

    def on_trial_start(self, iteration, trials, trial, **info) -> None:
        for member, point in members(trial):
            self.submit({"op": "open", "trial_id": trial.trial_id, "member": member, "point": dict(point)})

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        """An evaluation's metrics at its step; the final result's test scores at the best step.
        The trial's placement as tags each time (a retried trial may run elsewhere)."""
        final = bool(result.get("final"))
        for (member, _), part in zip(members(trial), member_results(result)):
            keys = (
                [k for k in part if k.startswith("test_")] + list(FINAL_KEYS)
                if final
                else [k for k in part if k.startswith(("dev_", "train_"))] + ["epoch", METRIC]
            )
            tags = {
                f"softfine.{k}": part[k]
                for k in PLACEMENT + ("data_sha256",)
                if part.get(k) not in (None, "")
            }
            self.submit(
                {
                    "op": "result",
                    "trial_id": trial.trial_id,
                    "member": member,
                    "evaluation": not final,
                    "step": int(part.get("best_step" if final else "step") or 0),
                    "metrics": {k: part[k] for k in keys if _number(part.get(k))},
                    "tags": tags,
                }
            )

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        finished = bool((trial.last_result or {}).get("final"))
        for (member, _), folder in zip(members(trial), member_dirs(trial.config)):
            if finished and trial.checkpoint is not None:  # a path, or a URI on a remote storage
                where = uri_of(
                    trial.checkpoint.filesystem,
                    posixpath.normpath(posixpath.join(trial.checkpoint.path, folder)),
                )
                self.submit(
                    {"op": "artifact", "trial_id": trial.trial_id, "member": member, "checkpoint": where}
                )
            else:  # stopped by the scheduler (ASHA)
                self.submit(
                    {
                        "op": "tags",
                        "trial_id": trial.trial_id,
                        "member": member,
                        "tags": {"softfine.stopped_early": "true"},
                    }
                )
            self.submit(
                {
                    "op": "end",
                    "trial_id": trial.trial_id,
                    "member": member,
                    "status": "FINISHED" if finished else "KILLED",
                }
            )

    def on_trial_recover(self, iteration, trials, trial, **info) -> None:
        """A failed trial that Ray will restart from its last checkpoint: where it failed, and why."""
        last = trial.last_result or {}
        retry = {
            "trial_id": trial.trial_id,
            "node_ip": last.get("node_ip", ""),
            "step": last.get("step"),
            "error": trial_error(trial),
        }
        self.retries.append(retry)
        for member, _ in members(trial):
            self.submit(
                {
                    "op": "tags",
                    "trial_id": trial.trial_id,
                    "member": member,
                    "tags": {"softfine.retried_after": describe_retry(retry)},
                }
            )

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        error = trial_error(trial)
        for member, _ in members(trial):
            self.submit(
                {
                    "op": "tags",
                    "trial_id": trial.trial_id,
                    "member": member,
                    "tags": {"softfine.error": error},
                }
            )
            self.submit({"op": "end", "trial_id": trial.trial_id, "member": member, "status": "FAILED"})

    def on_experiment_end(self, trials, **info) -> None:
        self.flush(force=True)
        # The search's folder where it is now (a copied folder resumes in place; a remote storage's
        # working copy is this driver's): the folder given when the callback was made may be
        # another machine's.
        files = MLflowChildRuns.search_files
        if files is not None and files.name == self.search:
            write_account(files.folder, self.phase, self.runs, self.pending, self.failures, self.retries)
            files.push(RUNS.format(self.phase), UNLOGGED.format(self.phase))
            return
        folder = (
            Path(trials[0].storage.experiment_fs_path).parent / self.search if trials else Path(self.folder)
        )
        write_account(folder, self.phase, self.runs, self.pending, self.failures, self.retries)

    # -- the queue ----------------------------------------------------------------------------

    def submit(self, op: dict) -> None:
        self.pending.append({**op, "time": time.time()})
        self.flush()

    def flush(self, force: bool = False) -> bool:
        """Sends what is queued, in order; True when nothing is left."""
        if self.down_since is not None and not force and time.time() - self.last_try < self.probe_interval:
            return not self.pending
        while self.pending:
            self.last_try = time.time()
            try:
                with short_http(self.timeout, retries=1):
                    self.apply(self.pending[0])
            except Exception as err:  # noqa: BLE001 - MLflow raises many kinds; none may stop the search
                self.failures.append(describe_error(err))
                if self.down_since is None:
                    self.down_since = time.time()
                    log.warning(
                        "MLflow did not take an update of trial %s (%s); the trials go on, and the updates "
                        "are kept to be sent later",
                        self.pending[0]["trial_id"],
                        self.failures[-1],
                    )
                return False
            self.pending.pop(0)
            if self.down_since is not None:
                log.warning("MLflow answers again; sending %d queued update(s)", len(self.pending))
                self.down_since = None
        return True

    def apply(self, op: dict) -> None:
        from mlflow.entities import Metric, RunTag

        if op["op"] == "open":
            self.open(op["trial_id"], op.get("member"), op["point"])
            return
        key = run_key(op["trial_id"], op.get("member"))
        run_id = self.runs[key]
        if op["op"] == "result":
            at = int(op["time"] * 1000)
            again = op.get("evaluation") and op["step"] <= self.logged.get(
                key, -1
            )  # made again after a retry
            metrics = [] if again else [Metric(k, float(v), at, op["step"]) for k, v in op["metrics"].items()]
            self.client.log_batch(
                run_id, metrics=metrics, tags=[RunTag(k, str(v)[:5000]) for k, v in op["tags"].items()]
            )
            if op.get("evaluation") and not again:
                self.logged[key] = op["step"]
        elif op["op"] == "tags":
            self.client.log_batch(run_id, tags=[RunTag(k, str(v)[:5000]) for k, v in op["tags"].items()])
        elif op["op"] == "artifact":  # where the point's best checkpoint is kept, and its test scores
            self.client.set_tag(run_id, "softfine.checkpoint", op["checkpoint"])
            test_metrics = read_uri(f"{op['checkpoint'].rstrip('/')}/{TEST_METRICS_FILE}")
            if test_metrics is not None:
                with tempfile.TemporaryDirectory(prefix="softfine-metrics-") as tmp:
                    (Path(tmp) / TEST_METRICS_FILE).write_bytes(test_metrics)
                    self.client.log_artifact(run_id, str(Path(tmp) / TEST_METRICS_FILE))
        elif op["op"] == "end":
            self.client.set_terminated(run_id, status=op["status"])

    def open(self, trial_id: str, member: int | None, point: dict) -> None:
        """The point's run: created with its params, inputs and tags, or (a retried or resumed
        trial) the one it has, RUNNING again."""
        from mlflow.entities import Param

        key = run_key(trial_id, member)
        run_id = self.runs.get(key) or self.find(trial_id, member)
        if run_id is not None:
            self.runs[key] = run_id
            attempt = int(self.client.get_run(run_id).data.tags.get(ATTEMPT_TAG, "1")) + 1
            self.client.set_tag(run_id, ATTEMPT_TAG, str(attempt))
            history = self.client.get_metric_history(
                run_id, "dev_f1"
            )  # what it has, whatever the driver knew
            self.logged[key] = max((m.step for m in history), default=-1)
            self.client.update_run(run_id, status="RUNNING")
            return
        tags = {
            "mlflow.parentRunId": self.parent_run_id,
            TRIAL_ID_TAG: trial_id,
            PHASE_TAG: self.phase,
            SEARCH_TAG: self.search,
            ATTEMPT_TAG: "1",
            **self.run_tags,
        }
        if member is not None:
            tags[MEMBER_TAG] = str(member)
        run_id = self.client.create_run(self.experiment_id, run_name=point_name(point), tags=tags).info.run_id
        self.runs[key] = run_id
        config = dataclasses.asdict(trial_config(self.base, point))
        params = [Param(k, str(v)[:6000]) for k, v in config.items() if k not in ("out", "device")]
        self.client.log_batch(run_id, params=params)
        self.client.log_inputs(run_id, datasets=self.datasets)
        self.client.log_dict(run_id, {"train_config": config, "point": point}, "config.json")

    def find(self, trial_id: str, member: int | None) -> str | None:
        """A run of this trial (member) made before the last experiment snapshot (the driver died)."""
        query = f"tags.`{TRIAL_ID_TAG}` = '{trial_id}' and tags.`mlflow.parentRunId` = '{self.parent_run_id}'"
        if member is not None:
            query += f" and tags.`{MEMBER_TAG}` = '{member}'"
        found = self.client.search_runs([self.experiment_id], max_results=1, filter_string=query)
        return found[0].info.run_id if found else None


def members(trial) -> list[tuple[int | None, dict]]:
    """(member number, point) of each point a trial trains; the number is None for a point alone."""
    points = members_of(trial.config)
    return list(zip(range(len(points)), points)) if FUSED in trial.config else [(None, points[0])]


def run_key(trial_id: str, member: int | None) -> str:
    """The key of a point's run in the callback's map: the trial id, TRIAL_ID/MEMBER in a fused trial."""
    return trial_id if member is None else f"{trial_id}/{member}"


RUNS, UNLOGGED = "mlflow_runs.{}.json", "mlflow_unlogged.{}.jsonl"  # per phase: search, seeds


def write_account(
    folder: Path, phase: str, runs: dict, pending: list, failures: list, retries: list | None = None
) -> None:
    """Beside the Ray results: the trials' runs and retries, and what MLflow never took (if anything)."""
    (folder / RUNS.format(phase)).write_text(
        json.dumps({"runs": runs, "failures": failures[-100:], "retries": retries or []}, indent=1)
    )
    unlogged = folder / UNLOGGED.format(phase)
    if pending:
        unlogged.write_text(
            "".join(json.dumps(op, ensure_ascii=False, default=str) + "\n" for op in pending),
            encoding="utf-8",
        )
    elif unlogged.exists():
        unlogged.unlink()


def read_account(folder: Path, phase: str) -> tuple[dict, list, list]:
    """(runs by trial id, unsent updates, failures) of a phase, as its callback left them."""
    runs = folder / RUNS.format(phase)
    record = json.loads(runs.read_text()) if runs.is_file() else {"runs": {}, "failures": []}
    unlogged = folder / UNLOGGED.format(phase)
    pending = (
        [json.loads(line) for line in unlogged.read_text(encoding="utf-8").splitlines() if line.strip()]
        if unlogged.is_file()
        else []
    )
    return record["runs"], pending, record["failures"]


def read_retries(folder: Path, phase: str) -> list[dict]:
    """The retries of a phase's trials ({trial_id, node_ip, step, error} each), in order."""
    runs = folder / RUNS.format(phase)
    return json.loads(runs.read_text()).get("retries", []) if runs.is_file() else []


def describe_retry(retry: dict) -> str:
    """ "failed on 10.0.0.2 after step 24: ActorDiedError: ..." (where and when an attempt failed,
    and why)."""
    where = f" on {retry['node_ip']}" if retry.get("node_ip") else ""
    when = f"after step {retry['step']}" if retry.get("step") is not None else "before its first evaluation"
    return f"failed{where} {when}: {retry['error']}"


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def trial_error(trial) -> str:
    """Ray's account of the trial's last failure (Tune writes `str(error)`): from the last line that
    names an exception on, or all of it. Read from the error file in the driver's copy of the trial
    folder, written just before Tune calls back; its copy in the storage path, which
    `trial.get_error()` reads, is synced later."""
    local = Path(trial.error_file) if trial.error_file else None
    if local is not None and local.is_file():
        last = local.read_text(encoding="utf-8", errors="replace").rsplit("Failure # ", 1)[-1]
        text = last.partition("\n")[2]  # without its "Failure # N (occurred at ...)" line
    else:
        error = trial.get_error()
        text = str(error) if error else ""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    named = [
        i
        for i, line in enumerate(lines)
        if re.match(r"[A-Za-z_][\w.]*(Error|Exception|Exit|Interrupt)\b", line)
    ]
    # A RayTaskError's text is the trial's traceback, whose last named exception is the cause;
    # an actor's error (ActorDiedError, ActorUnavailableError) is Ray's message alone, kept whole.
    return " ".join(lines[named[-1] if named else 0 :])[:4000] or "unknown error"
