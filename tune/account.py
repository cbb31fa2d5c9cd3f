"""A phase's account of its child runs, beside the Ray results: the trials' runs and retries
(mlflow_runs.PHASE.json) and the MLflow operations the server never took (mlflow_unlogged.PHASE.jsonl)."""

from __future__ import annotations

import json
from pathlib import Path

RUNS, UNLOGGED = "mlflow_runs.{}.json", "mlflow_unlogged.{}.jsonl"  # per phase: search, seeds


def write_account(folder: Path, phase: str, runs: dict, pending: list, failures: list, retries: list) -> None:
    """The trials' runs and retries, and what MLflow never took (if anything)."""
    record = {"runs": runs, "failures": failures[-100:], "retries": retries}
    (folder / RUNS.format(phase)).write_text(json.dumps(record, indent=1))
    unlogged = folder / UNLOGGED.format(phase)
    if pending:
        lines = [json.dumps(op, ensure_ascii=False, default=str) + "\n" for op in pending]
        unlogged.write_text("".join(lines), encoding="utf-8")
    else:
        unlogged.unlink(missing_ok=True)


def _record(folder: Path, phase: str) -> dict:
    runs = folder / RUNS.format(phase)
    return json.loads(runs.read_text()) if runs.is_file() else {"runs": {}, "failures": []}


def read_account(folder: Path, phase: str) -> tuple[dict, list, list]:
    """(runs by trial id, unsent operations, failures) of a phase, as its callback left them."""
    unlogged = folder / UNLOGGED.format(phase)
    lines = unlogged.read_text(encoding="utf-8").splitlines() if unlogged.is_file() else []
    record = _record(folder, phase)
    return record["runs"], [json.loads(line) for line in lines if line.strip()], record["failures"]


def read_retries(folder: Path, phase: str) -> list[dict]:
    """The retries of a phase's trials ({trial_id, node_ip, step, error} each), in order."""
    return _record(folder, phase).get("retries", [])


def describe_retry(retry: dict) -> str:
    """'failed on 10.0.0.2 after step 24: ActorDiedError: ...': where and when an attempt failed, and why."""
    where = f" on {retry['node_ip']}" if retry.get("node_ip") else ""
    when = f"after step {retry['step']}" if retry.get("step") is not None else "before its first evaluation"
    return f"failed{where} {when}: {retry['error']}"
