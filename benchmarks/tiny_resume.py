#!/usr/bin/env python
"""The tiny encoder's defaults, measured: `softfine train --dataset resume --model tiny` with no
other training flag, on full Resume, timed from the command's start to its exit (data, training,
dev evaluation every epoch, the test evaluation of the best checkpoint).

    python benchmarks/tiny_resume.py                      # data from $SOFTFINE_DATA_DIR
    python benchmarks/tiny_resume.py --seed 1 --seed 2    # one run per seed

Prints, per run, the test F1 with the sentences and gold entities it was computed on, the wall
time, and the settings the defaults resolved to. A figure, not a timed assertion.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from softfine.errors import SoftFiNEError
from softfine.script import check_data, integer, run_script


def run(seed: int | None, data_dir: str | None) -> dict:
    with tempfile.TemporaryDirectory(prefix="tiny-resume-") as out:
        command = [
            sys.executable,
            "-m",
            "softfine",
            "train",
            "--dataset",
            "resume",
            "--model",
            "tiny",
            "--out",
            out,
        ]
        command += ["--seed", str(seed)] if seed is not None else []
        command += ["--data-dir", data_dir] if data_dir else []
        print("$ softfine " + " ".join(command[3:]), flush=True)
        started = time.perf_counter()
        done = subprocess.run(command, stdout=subprocess.PIPE, text=True)
        wall = time.perf_counter() - started
        if done.returncode:  # its error, or its traceback, is above (its stderr is this script's)
            raise SoftFiNEError(f"softfine train exited {done.returncode}; its output is above")
        result = json.loads(done.stdout)
        settings = json.loads((Path(out) / "best" / "train_config.json").read_text())
    return {"seed": settings["seed"], "wall_seconds": round(wall, 1), **result, "settings": settings}


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--seed",
        type=integer(0, 2**32 - 1),
        action="append",
        help="a seed (repeatable; default: the trainer's)",
    )
    parser.add_argument("--data-dir", default=os.environ.get("SOFTFINE_DATA_DIR"))
    return parser


def main(args: argparse.Namespace) -> None:
    check_data("resume", args.data_dir)
    rows = [run(seed, args.data_dir) for seed in (args.seed or [None])]
    keys = (
        "model",
        "tiny_layers",
        "tiny_hidden",
        "epochs",
        "batch_size",
        "lr",
        "schedule",
        "warmup_ratio",
        "dropout",
        "weight_decay",
        "soft",
        "aug",
        "alpha_aug",
        "alpha_fea",
        "beta",
        "gamma",
    )
    print("settings (the tiny defaults): " + ", ".join(f"{k}={rows[0]['settings'][k]}" for k in keys))
    print(
        f"{'seed':>5} {'dev F1':>7} {'test F1':>7} {'test sentences':>14} {'gold entities':>13} {'wall s':>7}"
    )
    for r in rows:
        print(
            f"{r['seed']:>5} {r['best_dev_f1']:>7.4f} {r['test_f1']:>7.4f} {r['test_sentences']:>14} "
            f"{r['test_gold_entities']:>13} {r['wall_seconds']:>7.1f}"
        )
    print(f"cpu cores: {os.cpu_count()}, torch threads: default")


if __name__ == "__main__":
    run_script(parser(), main)
