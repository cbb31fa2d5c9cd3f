"""The child runs' MLflow operations, sent in order through a queue: what a silent server does not take
waits for a later event (at most every `probe_interval` s), delaying the runs, never the trials."""

from __future__ import annotations

import dataclasses
import logging
import time

from softfine.config import TEST_METRICS_FILE, TrainConfig

from .runs import PHASE_TAG, SEARCH_TAG, TRIAL_ID_TAG
from .space import point_name, trial_config
from .storage import open_path, read_from
from .tracking import describe_error, short_http

log = logging.getLogger("softfine.tune")

ATTEMPT_TAG = "softfine.attempt"  # 2 and more: retried (--max-failures) or resumed (--resume)
MEMBER_TAG = "softfine.fused_member"  # a fused trial's runs: the member's number in its group


def run_key(trial_id: str, member: int | None) -> str:
    """A point's key in the map of runs: the trial id, TRIAL_ID/MEMBER in a fused trial."""
    return trial_id if member is None else f"{trial_id}/{member}"


@dataclasses.dataclass(eq=False)
class ChildRunQueue:
    """A phase's child runs, one per point. A retried or resumed trial goes on in its own run; an
    evaluation made again after a retry adds no metrics (`logged`: the run's last step in MLflow)."""

    experiment_id: str
    parent_run_id: str
    search: str
    phase: str
    base: TrainConfig  # the search's: a trial's params are it with the point replaced
    run_tags: dict  # source and code version
    datasets: list  # mlflow DatasetInputs
    timeout: float = 10
    probe_interval: float = 30

    def __post_init__(self) -> None:
        self.runs: dict[str, str] = {}  # run_key -> run id
        self.pending: list[dict] = []  # operations the server has not taken yet, in order
        self.failures: list[str] = []
        self.logged: dict[str, int] = {}  # run_key -> the last evaluation step its run has
        self.client = None
        self.down_since: float | None = None
        self.last_try = 0.0

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
        tags = [RunTag(k, str(v)[:5000]) for k, v in op.get("tags", {}).items()]
        if op["op"] == "result":
            # an evaluation made again after a retry: its run has it
            again = op.get("evaluation") and op["step"] <= self.logged.get(key, -1)
            at = int(op["time"] * 1000)
            metrics = [] if again else [Metric(k, float(v), at, op["step"]) for k, v in op["metrics"].items()]
            self.client.log_batch(run_id, metrics=metrics, tags=tags)
            if op.get("evaluation") and not again:
                self.logged[key] = op["step"]
        elif op["op"] == "tags":
            self.client.log_batch(run_id, tags=tags)
        elif op["op"] == "artifact":  # where the point's best checkpoint is kept, and its test scores
            self.client.set_tag(run_id, "softfine.checkpoint", op["checkpoint"])
            test_metrics = read_from(*open_path(f"{op['checkpoint'].rstrip('/')}/{TEST_METRICS_FILE}"))
            if test_metrics is not None:
                self.client.log_text(run_id, test_metrics.decode("utf-8"), TEST_METRICS_FILE)
        elif op["op"] == "end":
            self.client.set_terminated(run_id, status=op["status"])

    def open(self, trial_id: str, member: int | None, point: dict) -> None:
        """The point's run: the one it has (a retried or resumed trial), RUNNING again, else a new one."""
        key = run_key(trial_id, member)
        run_id = self.runs.get(key) or self.find(trial_id, member)
        if run_id is None:
            self.create(key, trial_id, member, point)
            return
        self.runs[key] = run_id
        attempt = int(self.client.get_run(run_id).data.tags.get(ATTEMPT_TAG, "1")) + 1
        self.client.set_tag(run_id, ATTEMPT_TAG, str(attempt))
        history = self.client.get_metric_history(run_id, "dev_f1")  # what it has, whatever the driver knew
        self.logged[key] = max((m.step for m in history), default=-1)
        self.client.update_run(run_id, status="RUNNING")

    def create(self, key: str, trial_id: str, member: int | None, point: dict) -> None:
        """A new run named by its point, with its TrainConfig as params, its data as inputs, its tags."""
        from mlflow.entities import Param

        tags = {"mlflow.parentRunId": self.parent_run_id, TRIAL_ID_TAG: trial_id, PHASE_TAG: self.phase}
        tags.update({SEARCH_TAG: self.search, ATTEMPT_TAG: "1", **self.run_tags})
        if member is not None:
            tags[MEMBER_TAG] = str(member)
        run_id = self.client.create_run(self.experiment_id, run_name=point_name(point), tags=tags).info.run_id
        self.runs[key] = run_id  # at once: an open sent again (a failure below) goes on in this run
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
