#!/usr/bin/env python
"""Budgeted searches against the full grid, on the tiny proxy: what each costs in trial-epochs and
what it finds.

    python benchmarks/budgeted_search.py                            # Resume, 600 training sentences, 4 epochs
    python benchmarks/budgeted_search.py --seeds 1 2 3 --budget 11  # TPE and TPE + ASHA with 11 trials each

Runs `tune/search.py` once with the paper's 36-point grid, then, per seed, a TPE search and a TPE +
ASHA search of `--budget` trials over the same values, all with the same training settings. For
each it prints the trial-epochs spent (epochs each trial trained: ASHA stops some early), the best
dev F1 found, the test F1 of its selection, and the trial-epochs after which its best dev F1 so far
(trials taken in the order they ended) first came within `--tolerance` (0.3 F1 points) of the
grid's best. A figure, not a timed assertion.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from softfine.errors import SoftFiNEError
from softfine.script import check_data, integer, number, relay_error, run_script

REPO = Path(__file__).resolve().parents[1]


def search(name: str, flags: list[str], common: list[str], tmp: str) -> tuple[list[dict], dict]:
    """One search (or the one already in `tmp`); its trials (search phase) as dicts, in the order
    they ended, and its summary."""
    if not (Path(tmp) / "ray" / name / "summary.json").is_file():
        run(name, flags, common, tmp)
    with open(Path(tmp) / "ray" / name / "trials.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["phase"] == "search"]
    summary = json.loads((Path(tmp) / "ray" / name / "summary.json").read_text())
    for r in rows:
        finished = r["status"] == "TERMINATED"
        r["epochs"] = int(r["evaluations"] or 0) - (1 if finished else 0)  # the final report is no epoch
        r["best_dev_f1"] = float(r["best_dev_f1"]) if r["best_dev_f1"] else float("nan")
    rows.sort(key=lambda r: float(r["trial_end_time"] or 0))
    return rows, summary


def run(name: str, flags: list[str], common: list[str], tmp: str) -> None:
    command = [
        sys.executable,
        "tune/search.py",
        *common,
        *flags,
        "--name",
        name,
        "--storage-path",
        f"{tmp}/ray",
        "--mlflow-uri",
        f"sqlite:///{tmp}/mlflow.db",
        "--experiment-name",
        "budget",
    ]
    print("$ " + " ".join(command[1:]), flush=True)
    done = subprocess.run(
        command,
        cwd=REPO,
        env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    error = relay_error(done.stderr) if done.returncode else None
    if error:  # the search's own one line: a problem the user can fix
        raise SoftFiNEError(f"search {name}: {error}")
    if done.returncode:  # a bug: its output, for the report
        sys.exit(f"budgeted_search: {name} exited {done.returncode}: {done.stderr[-2000:]}")


def describe(name: str, rows: list[dict], summary: dict, target: float) -> dict:
    spent, best, reached = 0, float("-inf"), None
    for r in rows:
        spent += r["epochs"]
        best = max(best, r["best_dev_f1"])
        if reached is None and best >= target:
            reached = spent
    return {
        "search": name,
        "trials": len(rows),
        "trial_epochs": spent,
        "best_dev_f1": summary.get("best_dev_f1"),
        "test_f1_of_selection": summary.get("best_test_f1"),
        "epochs_to_within": reached,
    }


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dataset", default="resume")
    parser.add_argument("--limit-train", type=integer(1), default=600)
    parser.add_argument("--epochs", type=integer(1), default=4)
    parser.add_argument(
        "--budget",
        type=integer(1),
        default=11,
        help="trials of each budgeted search (default: 11, 30%% of 36)",
    )
    parser.add_argument(
        "--seeds", type=integer(0, 2**32 - 1), nargs="+", default=[0, 1, 2], help="Optuna sampler seeds"
    )
    parser.add_argument(
        "--tolerance", type=number(0, above=False), default=0.003, help="F1 (0.003 = 0.3 points)"
    )
    parser.add_argument("--data-dir", default=os.environ.get("SOFTFINE_DATA_DIR"))
    parser.add_argument(
        "--out",
        help="keep the searches' results and MLflow store here (default: a temporary "
        "folder, removed at the end); a grid already there is reused",
    )
    return parser


def main(args: argparse.Namespace) -> None:
    check_data(args.dataset, args.data_dir)
    common = [
        "--dataset",
        args.dataset,
        "--model",
        "tiny",
        "--limit-train",
        str(args.limit_train),
        "--epochs",
        str(args.epochs),
        "--gpus-per-trial",
        "0",
        "--cpus-per-trial",
        "1",
        "--address",
        "local",
    ]
    common += ["--data-dir", args.data_dir] if args.data_dir else []
    table = []
    with contextlib.ExitStack() as stack:
        tmp = (
            str(Path(args.out).resolve())
            if args.out
            else stack.enter_context(tempfile.TemporaryDirectory(prefix="budgeted-search-"))
        )
        grid_rows, grid_summary = search("grid", [], common, tmp)
        target = grid_summary["best_dev_f1"] - args.tolerance
        table.append(describe("grid (36 points)", grid_rows, grid_summary, target))
        for seed in args.seeds:
            tpe = ["--sampler", "tpe", "--num-samples", str(args.budget), "--search-seed", str(seed)]
            table.append(describe(f"TPE, seed {seed}", *search(f"tpe-{seed}", tpe, common, tmp), target))
            asha = [*tpe, "--scheduler", "asha", "--asha-grace-period", "1", "--asha-reduction-factor", "2"]
            table.append(
                describe(f"TPE + ASHA, seed {seed}", *search(f"asha-{seed}", asha, common, tmp), target)
            )
    grid_epochs = table[0]["trial_epochs"]
    print(
        f"\n{args.dataset}, tiny encoder, {args.limit_train} training sentences, {args.epochs} "
        "epochs per trial; "
        f"target: grid's best dev F1 {grid_summary['best_dev_f1']:.4f} - {args.tolerance:g}"
    )
    print(
        f"{'search':<22} {'trials':>6} {'trial-epochs':>12} {'% grid':>7} {'best dev F1':>11} "
        f"{'its test F1':>11} "
        f"{'epochs to within':>16}"
    )
    for r in table:
        within = (
            "never"
            if r["epochs_to_within"] is None
            else f"{r['epochs_to_within']} ({100 * r['epochs_to_within'] / grid_epochs:.0f} %)"
        )
        print(
            f"{r['search']:<22} {r['trials']:>6} {r['trial_epochs']:>12} "
            f"{100 * r['trial_epochs'] / grid_epochs:>6.0f}% "
            f"{r['best_dev_f1']:>11.4f} {r['test_f1_of_selection']:>11.4f} {within:>16}"
        )


if __name__ == "__main__":
    run_script(parser(), main)
