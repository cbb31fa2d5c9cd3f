"""A trial's MLflow child run, written from the trial: a queue of operations that a tracking server
which stops answering delays but never fails, and the records kept in every checkpoint
(`mlflow_run.json`, `mlflow_unlogged.jsonl`) that let a retried or resumed trial go on in the same
run. Like softfine_tune_trial, it travels into Ray workers by value: standard library and mlflow only.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

log = logging.getLogger("softfine.tune.trial")

RUN_RECORD = "mlflow_run.json"  # {"run_id", "params_logged", ...}: kept in every checkpoint
UNLOGGED = "mlflow_unlogged.jsonl"  # MLflow operations that could not be sent
TRIAL_ID_TAG = "softfine.trial_id"
PHASE_TAG = "softfine.phase"
SEARCH_TAG = "softfine.search"  # the Ray experiment name, on the parent and every child


# ---------------------------------------------------------------------------------------------
# MLflow: the child run, with a queue for what the server did not take.

class ChildRun:
    """The trial's MLflow child run. Operations go through a queue: a failing server delays
    them (retried at the next call, at most every `probe_interval` seconds) but never raises."""

    def __init__(self, settings: dict, trial_id: str, trial_name: str, record: dict, pending: list[dict]):
        from mlflow.tracking import MlflowClient

        self.settings = settings
        self.where = settings.get("display_uri") or settings["uri"]  # what log lines show: no credentials
        self.trial_id, self.trial_name = trial_id, trial_name
        self.client = MlflowClient(tracking_uri=settings["uri"])
        self.record = dict(record)
        self.pending: list[dict] = list(pending)
        self.failures = 0
        self.first_error: str | None = None
        self.last_error: str | None = None
        self.down_since: float | None = None
        self.last_try = 0.0
        self.probe_interval = float(settings.get("probe_interval", 30))

    @property
    def run_id(self) -> str | None:
        return self.record.get("run_id")

    # -- operations ---------------------------------------------------------------------------

    def _attach(self) -> None:
        """Find this trial's child run (by the checkpoint's record, else by its trial-id tag), or
        create it. Re-attaching sets it RUNNING again."""
        from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

        if self.run_id is None:
            found = self.client.search_runs(
                [self.settings["experiment_id"]],
                filter_string=f"tags.`{TRIAL_ID_TAG}` = '{self.trial_id}' and "
                              f"tags.`{MLFLOW_PARENT_RUN_ID}` = '{self.settings['parent_run_id']}'",
                max_results=5)
            if found:
                self.record["run_id"] = found[0].info.run_id
        if self.run_id is None:
            run = self.client.create_run(
                self.settings["experiment_id"], run_name=self.trial_name,
                tags={MLFLOW_PARENT_RUN_ID: self.settings["parent_run_id"], TRIAL_ID_TAG: self.trial_id,
                      PHASE_TAG: self.settings.get("phase", "search"),
                      SEARCH_TAG: self.settings.get("search", "")})
            self.record["run_id"] = run.info.run_id
            self.record["attempt"] = 1
        else:
            status = self.client.get_run(self.run_id).info.status
            if status != "RUNNING":
                self.client.update_run(self.run_id, status="RUNNING")
            self.record["attempt"] = int(self.record.get("attempt", 1)) + 1

    def _apply(self, op: dict) -> None:
        from mlflow.entities import Metric, Param, RunTag

        kind = op["op"]
        if kind == "attach":
            self._attach()
            return
        run_id = self.run_id
        if kind == "metrics":
            ts = int(op["time"] * 1000)
            metrics = [Metric(k, float(v), ts, int(op["step"])) for k, v in op["metrics"].items()]
            for start in range(0, len(metrics), 500):
                self.client.log_batch(run_id, metrics=metrics[start:start + 500])
        elif kind == "params":
            if not self.record.get("params_logged"):
                items = [Param(k, str(v)[:6000]) for k, v in op["params"].items()]
                for start in range(0, len(items), 100):
                    self.client.log_batch(run_id, params=items[start:start + 100])
                self.record["params_logged"] = True
        elif kind == "tags":
            self.client.log_batch(run_id, tags=[RunTag(k, str(v)[:5000]) for k, v in op["tags"].items()])
        elif kind == "dict":
            self.client.log_dict(run_id, op["data"], op["name"])
        elif kind == "end":
            self.client.set_terminated(run_id, status=op["status"])
        else:
            raise ValueError(f"unknown MLflow operation {kind!r}")

    def submit(self, op: dict) -> None:
        self.pending.append({**op, "time": op.get("time", time.time())})
        self.flush()

    def flush(self, force: bool = False) -> bool:
        """Send what is queued, in order; True when the queue is empty."""
        if self.down_since is not None and not force and time.time() - self.last_try < self.probe_interval:
            return not self.pending
        while self.pending:
            op = self.pending[0]
            if op["op"] != "attach" and self.run_id is None:
                self.pending.insert(0, {"op": "attach", "time": time.time()})
                op = self.pending[0]
            self.last_try = time.time()
            try:
                self._apply(op)
            except Exception as err:  # noqa: BLE001 - MLflow raises many kinds; none may stop training
                self.failures += 1
                message = describe_error(err)
                self.first_error = self.first_error or message
                self.last_error = message
                if self.down_since is None:
                    self.down_since = time.time()
                    log.warning("MLflow at %s did not take an update (%s); training goes on, and the "
                                "updates are kept to be sent later", self.where, message)
                return False
            self.pending.pop(0)
            if self.down_since is not None:
                log.warning("MLflow at %s answers again; sending %d queued update(s)",
                            self.where, len(self.pending))
                self.down_since = None
        return True

    def save(self, directory: Path) -> None:
        """Writes the run record and the queue into a checkpoint directory."""
        (directory / RUN_RECORD).write_text(json.dumps(self.record, indent=1))
        queue = directory / UNLOGGED
        if self.pending:
            queue.write_text("".join(json.dumps(op, ensure_ascii=False) + "\n" for op in self.pending),
                             encoding="utf-8")
        elif queue.exists():
            queue.unlink()

    def account(self) -> dict:
        return {"mlflow_run_id": self.run_id or "", "mlflow_unlogged": len(self.pending),
                "mlflow_failures": self.failures, "mlflow_error": self.last_error or self.first_error or ""}


def mask_credentials(text: str) -> str:
    """`scheme://user:password@host` anywhere in `text` with the password replaced by ***."""
    import re

    return re.sub(r"(\w+://[^/@\s:]*:)[^/\s]*@", r"\1***@", text)  # up to the authority's last @


def describe_error(err: BaseException) -> str:
    """One short line for an MLflow failure: what happened, and the URL it happened on."""
    import re

    text = mask_credentials(str(err).strip())
    url = re.search(r"request to (\S+) failed", text)
    where = f" ({url.group(1)})" if url else ""
    if "Read timed out" in text or "ReadTimeout" in text:
        return f"no answer within the timeout{where}"
    if "Connection refused" in text or "NewConnectionError" in text:
        return f"connection refused{where}"
    first = text.splitlines()[0] if text else ""
    return f"{type(err).__name__}: {first[:240]}"


def read_records(directory: Path) -> tuple[dict, list[dict]]:
    record = json.loads((directory / RUN_RECORD).read_text()) if (directory / RUN_RECORD).is_file() else {}
    queue = directory / UNLOGGED
    pending = ([json.loads(line) for line in queue.read_text(encoding="utf-8").splitlines() if line.strip()]
               if queue.is_file() else [])
    return record, pending


# ---------------------------------------------------------------------------------------------
# What a run needs to be reproduced.
