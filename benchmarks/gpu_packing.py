#!/usr/bin/env python
"""Several trials on one GPU: grid throughput with 1, 2, 4 and 8 trials sharing it.

    python benchmarks/gpu_packing.py                          # bert-base shape, bf16, Weibo, batch 4 and 16
    python benchmarks/gpu_packing.py --packing 1 4 --batch-size 16 --steps 200

Each trial is a process running benchmarks/train_throughput.py (full SoftFiNE steps: original and
augmented sentences, soft labels, feature loss) on a randomly initialised encoder of
bert-base-chinese's shape, in bf16, on the same GPU, started together after an untimed warm-up.
Printed per packing: the trials' summed training characters/s, the grid throughput in
trial-epochs per hour (summed characters/s over the characters of one Weibo training epoch), and
each trial's peak GPU memory; the last line is the rows as JSON. This is what `--gpus-per-trial 1/K`
buys on a real search. Figures are printed, not asserted; it needs a CUDA GPU.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from softfine.errors import DeviceError
from softfine.script import error_line, integer, number, run_script

HERE = Path(__file__).resolve().parent


def run_packing(k: int, args: argparse.Namespace) -> list[dict]:
    command = [
        sys.executable,
        str(HERE / "train_throughput.py"),
        "--dataset",
        "weibo",
        "--shape",
        args.shape,
        "--device",
        args.device,
        "--batch-size",
        str(args.batch_size),
        "--steps",
        str(args.steps),
        "--warmup",
        str(args.warmup),
    ] + (["--data-dir", args.data_dir] if args.data_dir else [])
    trials = [
        subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(k)
    ]
    results, deadline = [], time.monotonic() + args.limit
    for trial in trials:
        try:
            out, err = trial.communicate(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            for each in trials:
                each.kill()
                each.communicate()
            sys.exit(f"gpu_packing: {k} trials on the GPU: stopped after --limit {args.limit:g} s")
        if trial.returncode:
            why = error_line(err)  # torch's errors end with hint lines: the exception's own line
            sys.exit(f"gpu_packing: a trial exited {trial.returncode} with {k} trials on the GPU: {why}")
        results.append(json.loads(out.strip().splitlines()[-1]))
    return results


def epoch_chars(data_dir: str | None) -> int:
    from softfine.datasets import read_split

    return sum(len(s) for s in read_split("weibo", "train", data_dir))


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--packing", type=integer(1), nargs="+", default=[1, 2, 4, 8], help="trials per GPU")
    parser.add_argument("--batch-size", type=integer(1), default=4, help="the paper's Weibo batch size is 4")
    parser.add_argument("--steps", type=integer(1), default=150, help="timed steps per trial")
    parser.add_argument("--warmup", type=integer(0), default=20, help="untimed steps per trial first")
    parser.add_argument(
        "--limit", type=number(0), default=600, help="seconds the trials of one packing may take together"
    )
    parser.add_argument("--data-dir")
    parser.add_argument("--shape", choices=["tiny", "bert-base"], default="bert-base")
    parser.add_argument(
        "--device", default="cuda", help="cuda (default), or cpu to check this script's plumbing"
    )
    return parser


def main(args: argparse.Namespace) -> None:
    import torch

    from softfine.device import resolve_device

    try:
        resolve_device(args.device)
    except DeviceError as err:
        raise DeviceError(f"{err}; CPU figures come from train_throughput.py") from None
    per_epoch = epoch_chars(args.data_dir)  # missing data: a DataError, before any trial starts
    card = torch.cuda.get_device_name() + ", bf16" if args.device.startswith("cuda") else "CPU"
    print(
        f"{card}, {args.shape} shape, Weibo ({per_epoch} training characters an "
        f"epoch), batch {args.batch_size}"
    )
    print(
        f"{'trials/GPU':>10} {'chars/s (sum)':>14} {'trial-epochs/h':>15} {'chars/s per trial':>18} "
        f"{'peak MiB per trial':>19}"
    )
    base, rows = None, []
    for k in args.packing:
        results = run_packing(k, args)
        total = sum(r["chars_per_s"] for r in results)
        base = base or total
        peak = max(r["peak_memory_MiB"] for r in results)
        rows.append({"trials": k, "chars_per_s": total, "peak_memory_MiB_per_trial": peak})
        print(
            f"{k:>10} {total:>14,} {total * 3600 / per_epoch:>15.1f} {total // k:>18,} "
            f"{peak:>19,}   ({total / base:.2f}x one trial)",
            flush=True,
        )
    print(json.dumps({"rows": rows}))


if __name__ == "__main__":
    run_script(parser(), main)
