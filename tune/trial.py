"""The trainable: a grid point or a fused group (--fuse) trained by `softfine.train.train_group`, each
evaluation reported with its checkpoint, then the test scores with a checkpoint of best/ only."""

from __future__ import annotations

import json
import logging
import shutil
import sys
import tempfile
import time
from pathlib import Path

from ray import tune

from softfine.config import METRICS_FILE, TEST_METRICS_FILE, TrainConfig
from softfine.datasets import Corpus
from softfine.errors import SoftFiNEError

from .cluster import placement
from .space import FUSED, METRIC, point_name, trial_config

FINAL = "final.json"  # a checkpoint holding it is a finished trial


def fused_config(points: list[dict]) -> dict:
    """A fused trial's config value: its points, and a name for Ray's progress table."""
    return {"name": f"{point_name(points[0])} +{len(points) - 1}", "points": points}


def members_of(config: dict) -> list[dict]:
    """The grid points a trial trains: its group's, or its own."""
    return list(config[FUSED]["points"]) if FUSED in config else [config]


def member_dirs(config: dict) -> list[str]:
    """Where each member's files are in the trial's directory: "." for a point alone."""
    if FUSED not in config:
        return ["."]
    return [f"{k:02d}-{point_name(p)}" for k, p in enumerate(members_of(config))]


def member_results(result: dict) -> list[dict]:
    """Each member's results in a trial's report (with the trial's own keys: placement, times)."""
    if "members" not in result:
        return [result]
    shared = {k: v for k, v in result.items() if k not in ("members", METRIC, "dev_f1")}
    return [{**shared, **member} for member in result["members"]]


def group_report(reports: list[dict], config: dict) -> dict:
    """A trial's report: a group's under `members`, the best member's dev F1 on top (Tune's metric)."""
    if FUSED not in config:
        return dict(reports[0])
    return {
        "members": reports,
        METRIC: max(r[METRIC] for r in reports),
        "dev_f1": max(r.get("dev_f1", r[METRIC]) for r in reports),
        "step": reports[0].get("step"),
    }


def softfine_trial(
    config: dict,
    base: TrainConfig,
    corpus: Corpus | None = None,
    allow_cpu_fallback: bool = False,
    verbose: bool = False,
) -> None:
    """Ray Tune's trainable. `base` and `corpus` come by tune.with_parameters (Ray's object store: a
    worker needs no data files); restarted by Ray, a trial goes on from its last checkpoint."""
    from softfine.train import train_group

    quiet(verbose)
    where = {"trial_start_time": time.time(), **placement(allow_cpu_fallback)}
    work = Path(tempfile.mkdtemp(prefix="softfine-trial-"))
    try:
        out = work / "run"
        members = [out / d for d in member_dirs(config)]
        resume_from, finished = from_checkpoint(out, members, where)
        if finished is not None:  # finished before the driver saw it: the result stands
            tune.report(*finished)
            return
        points = zip(members_of(config), members)
        configs = [trial_config(base, p, out=str(m), device=where["device"]) for p, m in points]

        reporting = 0.0  # seconds spent handing results and checkpoints to Ray (search_overhead.py)
        reports: list[dict] = [{} for _ in members]

        def on_evaluate(member: int, metrics: dict, out_dir: str) -> None:
            nonlocal reporting
            reports[member] = metrics
            if member < len(members) - 1:  # one report per evaluation, once every member is written
                return
            started = time.perf_counter()
            checkpoint = tune.Checkpoint.from_directory(str(out))
            tune.report({**group_report(reports, config), **where}, checkpoint=checkpoint)
            reporting += time.perf_counter() - started

        try:
            results = train_group(configs, on_evaluate=on_evaluate, resume_from=resume_from, corpus=corpus)
        except SoftFiNEError as err:
            if resume_from is None or any(reports):  # not a checkpoint that failed to load: the trial failed
                raise
            restart(out, where, err)
            results = train_group(configs, on_evaluate=on_evaluate, corpus=corpus)
        final = group_report(
            [{k: v for k, v in r.items() if k != "best_checkpoint"} for r in results], config
        )
        final.update(where, trial_end_time=time.time(), report_seconds=reporting, final=1)
        kept = keep_best(out, member_dirs(config), work / "final", final)
        tune.report(final, checkpoint=tune.Checkpoint.from_directory(kept))
    finally:
        shutil.rmtree(work, ignore_errors=True)


def from_checkpoint(out: Path, members: list[Path], where: dict) -> tuple[list[str] | None, tuple | None]:
    """This trial's checkpoint from Ray (a retry, a resume), into `out`: (the members' directories to
    resume from, or None; (result, checkpoint) when the trial had finished, else None)."""
    checkpoint = tune.get_checkpoint()
    if checkpoint is None:
        return None, None
    checkpoint.to_directory(str(out))
    if (out / FINAL).is_file():
        return None, (json.loads((out / FINAL).read_text()), checkpoint)
    evaluations = (members[0] / METRICS_FILE).read_text().splitlines()
    where["resumed_from_step"] = json.loads(evaluations[-1])["step"] if evaluations else 0
    return [str(m) for m in members], None


def restart(out: Path, where: dict, err: Exception) -> None:
    """A checkpoint that cannot be read back (the only one kept): the trial trains again from the start."""
    where["restarted"] = (
        f"its checkpoint at step {where.get('resumed_from_step')} could not be loaded "
        f"({str(err)[:300]}); trained again from the start"
    )
    logging.getLogger("softfine.tune").warning("trial: %s", where["restarted"])
    where.pop("resumed_from_step", None)
    shutil.rmtree(out, ignore_errors=True)


def keep_best(out: Path, members: list[str], final_dir: Path, final: dict) -> str:
    """The final checkpoint: each member's best/ and records, and the final result (no state/)."""
    for member in members:
        (final_dir / member).mkdir(parents=True, exist_ok=True)
        shutil.move(str(out / member / "best"), str(final_dir / member / "best"))
        for name in (METRICS_FILE, TEST_METRICS_FILE):
            if (out / member / name).is_file():
                shutil.copy2(out / member / name, final_dir / member / name)
    (final_dir / FINAL).write_text(json.dumps(final, indent=1))
    return str(final_dir)


def quiet(verbose: bool) -> None:
    """Per-trial training logs only with --verbose: 36 trials' progress lines would bury the search's
    console, and the driver has printed the data's notes once already."""
    level = logging.INFO if verbose else logging.WARNING
    logging.getLogger("softfine").setLevel(level)
    for name in ("softfine.data", "softfine.datasets"):
        logging.getLogger(name).setLevel(level if verbose else logging.ERROR)
    logging.getLogger("ray.train").setLevel(level)  # "Checkpoint successfully created", per report
    sys.unraisablehook = quiet_exit


def quiet_exit(unraisable) -> None:
    """Python's report of an exception it cannot raise, except Ray's SystemExit: when the actor's
    SIGTERM lands in a finalizer (a weakref's callback) at teardown, it is a traceback on the
    search's console that says nothing. Printed or not, Python drops it there; the hook changes no exit."""
    if not isinstance(unraisable.exc_value, SystemExit):
        sys.__unraisablehook__(unraisable)
