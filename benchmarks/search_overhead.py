#!/usr/bin/env python
"""What the search machinery costs: one configuration trained directly (`softfine train`, i.e.
softfine.train.train) and as a one-trial search (`tune/search.py`: a local Ray instance, Ray Tune
with a checkpoint at every evaluation, the MLflow parent and child runs, the Optuna study, the
model logged and registered), one after the other, each timed from its command's start to its exit.

    python benchmarks/search_overhead.py                 # the tiny defaults on full Resume (20 epochs)
    python benchmarks/search_overhead.py --epochs 3      # shorter trials: the fixed costs weigh more

Prints both wall times, the overhead in percent, and where the search's extra time went (Ray's
start, the trial as Ray timed it, the end of the search). Run it on an otherwise idle machine:
a figure, not a timed assertion.
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

REPO = Path(__file__).resolve().parents[1]


def timed(command: list[str], env: dict) -> tuple[float, str]:
    print("$ " + " ".join(command), flush=True)
    started = time.perf_counter()
    done = subprocess.run(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wall = time.perf_counter() - started
    if done.returncode:
        sys.exit(f"search_overhead: exit {done.returncode}:\n{done.stderr[-3000:]}")
    return wall, done.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="resume")
    parser.add_argument("--epochs", type=int, help="epochs of both runs (default: the tiny encoder's, 20)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--data-dir", default=os.environ.get("SOFTFINE_DATA_DIR"))
    args = parser.parse_args()
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    point = ["--alpha-aug", "0.01", "--alpha-fea", "0.005", "--beta", "2", "--gamma", "2"]
    common = ["--dataset", args.dataset, "--model", "tiny", "--seed", str(args.seed)]
    common += ["--epochs", str(args.epochs)] if args.epochs else []
    common += ["--data-dir", args.data_dir] if args.data_dir else []
    with tempfile.TemporaryDirectory(prefix="search-overhead-") as tmp:
        direct, out = timed([sys.executable, "-m", "softfine", "train", *common, *point, "--out", f"{tmp}/direct"], env)
        direct_result = json.loads(out)
        search, out = timed([sys.executable, "tune/search.py", *common, "--alphas", "0.01,0.005", "--beta", "2",
                             "--gamma", "2", "--gpus-per-trial", "0", "--cpus-per-trial", str(os.cpu_count()),
                             "--address", "local", "--storage-path", f"{tmp}/ray", "--name", "overhead",
                             "--mlflow-uri", f"sqlite:///{tmp}/mlflow.db"], env)
        summary = json.loads((Path(tmp) / "ray" / "overhead" / "summary.json").read_text())
        trials = (Path(tmp) / "ray" / "overhead" / "trials.csv").read_text().splitlines()
        header, row = trials[0].split(","), trials[1].split(",")
        trial = dict(zip(header, row))
    trial_seconds = float(trial["trial_end_time"]) - float(trial["trial_start_time"])
    print(f"\n{'run':<34} {'wall s':>8} {'test F1':>8}")
    print(f"{'direct (softfine train)':<34} {direct:>8.1f} {direct_result['test_f1']:>8.4f}")
    print(f"{'one-trial search (tune/search.py)':<34} {search:>8.1f} {summary['best_test_f1']:>8.4f}")
    print(f"overhead: {search - direct:+.1f} s, {100 * (search - direct) / direct:+.1f} % of the direct run")
    print(f"  the trial inside the search: {trial_seconds:.1f} s ({100 * (trial_seconds - direct) / direct:+.1f} % "
          f"of the direct run); the search's own phases: {summary['wall_seconds']:.1f} s of {search:.1f} s")
    print(f"cpu cores: {os.cpu_count()}, epochs: {args.epochs or 'the tiny default'}, dataset: {args.dataset}")


if __name__ == "__main__":
    main()
