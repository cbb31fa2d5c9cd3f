"""The trainable: one grid point trained by softfine, reported to Ray Tune.

Ray Tune calls `softfine_trial(point, base=...)`: `point` is the trial's config (its grid point and,
in the seeds phase, its seed), `base` the search's TrainConfig (tune.with_parameters). It trains
`trial_config(base, point)` with `softfine.train.train` and reports every dev evaluation with the
training directory as the checkpoint (state/ to resume from, best/ so far), then the test scores
of the best checkpoint with a final checkpoint that holds best/ only. Restarted by Ray
(`--max-failures`, `--resume`), it goes on from its last checkpoint. MLflow is written by the
driver (callback.py): a trial needs no route to the tracking server.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import time
from pathlib import Path

from softfine.config import TrainConfig
from softfine_tune.cluster import placement
from softfine_tune.space import trial_config

FINAL = "final.json"  # a checkpoint holding it is a finished trial


def softfine_trial(point: dict, base: TrainConfig, allow_cpu_fallback: bool = False, verbose: bool = False) -> None:
    from ray import tune

    from softfine.train import train

    quiet(verbose)
    where = {"trial_start_time": time.time(), **placement(allow_cpu_fallback)}
    work = Path(tempfile.mkdtemp(prefix="softfine-trial-"))
    try:
        out, resume_from = work / "run", None
        checkpoint = tune.get_checkpoint()
        if checkpoint is not None:
            resume_from = checkpoint.to_directory(str(out))
            if (out / FINAL).is_file():  # finished before the driver saw it: the result stands
                tune.report(json.loads((out / FINAL).read_text()), checkpoint=checkpoint)
                return
            evaluations = (out / "metrics.jsonl").read_text().splitlines()
            where["resumed_from_step"] = json.loads(evaluations[-1])["step"] if evaluations else 0
        config = trial_config(base, point, out=str(out), device=where["device"])

        reporting = 0.0  # seconds spent handing results and checkpoints to Ray (search_overhead.py)

        def on_evaluate(metrics: dict, out_dir: str) -> None:
            nonlocal reporting
            started = time.perf_counter()
            tune.report({**metrics, **where}, checkpoint=tune.Checkpoint.from_directory(out_dir))
            reporting += time.perf_counter() - started

        result = train(config, on_evaluate=on_evaluate, resume_from=resume_from)
        final = {k: v for k, v in result.items() if k != "best_checkpoint"}
        final.update(where, trial_end_time=time.time(), report_seconds=reporting, final=1)
        tune.report(final, checkpoint=tune.Checkpoint.from_directory(keep_best(out, work / "final", final)))
    finally:
        shutil.rmtree(work, ignore_errors=True)


def keep_best(out: Path, final_dir: Path, final: dict) -> str:
    """The final checkpoint: best/, the records, and the final result (state/ is not needed)."""
    final_dir.mkdir()
    shutil.move(str(out / "best"), str(final_dir / "best"))
    for name in ("metrics.jsonl", "test_metrics.json"):
        if (out / name).is_file():
            shutil.copy2(out / name, final_dir / name)
    (final_dir / FINAL).write_text(json.dumps(final, indent=1))
    return str(final_dir)


def quiet(verbose: bool) -> None:
    """Per-trial training logs only with --verbose: 36 trials' progress lines would bury Ray's table."""
    level = logging.INFO if verbose else logging.WARNING
    logging.getLogger("softfine").setLevel(level)
    logging.getLogger("softfine.data").setLevel(level if verbose else logging.ERROR)  # repair notes, per trial
    logging.getLogger("ray.train").setLevel(level)  # "Checkpoint successfully created", per report
