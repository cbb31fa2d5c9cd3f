#!/usr/bin/env python
"""Every GPU figure of issue 17 in one command and one table (bert-base shape, bf16, Weibo):

    python benchmarks/gpu_check.py                 # on a CUDA machine; about 8 minutes
    python benchmarks/gpu_check.py --smoke         # each check at its smallest, on any device (plumbing only)

The smoke run leaves out the compiled runs (inductor compiles for minutes on a small CPU;
tests/test_step.py trains with --compile there).

1. one trial's training throughput at batch 16 and 4, eager and `--compile`, and at batch 16 with
   cuDNN's attention; the batch-16 eager run with `--profile` (step host time, GPU kernel time);
   and 12 grid points fused into one model at batch 4 (issue 18); what `--fuse auto` measures: the
   peak memory of a batch-4 step with one member and with two;
2. 1, 2, 4 and 8 trials packed on the GPU at batch 4 (benchmarks/gpu_packing.py);
3. the paper's 12-epoch Weibo trial end to end (bert-base shape, batch 4, evaluation every epoch),
   from the command's start to its exit, compilation included;
4. the tiny encoder's defaults on Resume (seed 1), end to end, with its test F1.

Each check is a subprocess with a time limit; one that fails or runs out is reported as such and the
rest go on. Figures are printed, never asserted. The last line is the table as JSON.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from softfine.errors import DeviceError
from softfine.script import check_data, number, run_script

HERE = Path(__file__).resolve().parent


def run(command: list[str], limit: float) -> tuple[dict | None, float, str]:
    """(the JSON of the command's last stdout line, wall seconds, a note)."""
    started = time.perf_counter()
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=limit)
    except subprocess.TimeoutExpired:
        return None, time.perf_counter() - started, f"stopped after {limit:.0f} s"
    wall = time.perf_counter() - started
    if done.returncode:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return None, wall, f"exit {done.returncode}: {last[:160]}"
    for text in (
        done.stdout,
        (done.stdout.strip().splitlines() or [""])[-1],
    ):  # softfine train's, the benchmarks'
        try:
            return json.loads(text), wall, ""
        except ValueError:
            pass
    return None, wall, "no JSON result"


def throughput_checks(args: argparse.Namespace) -> list[tuple[str, list[str], str]]:
    base = [
        sys.executable,
        str(HERE / "train_throughput.py"),
        "--dataset",
        "weibo",
        "--device",
        args.device,
        "--shape",
        args.shape,
        "--steps",
        str(args.steps),
        "--warmup",
        str(args.warmup),
    ] + args.data
    goal16, goal4 = ">= 100,000 chars/s", ">= 25,000 chars/s"
    checks = [
        ("batch 16, eager, profiled", base + ["--batch-size", "16", "--profile", str(args.profile)], goal16),
        ("batch 16, --compile", base + ["--batch-size", "16", "--compile"], goal16),
        ("batch 4, eager", base + ["--batch-size", "4"], goal4),
        ("batch 4, --compile", base + ["--batch-size", "4", "--compile"], goal4),
        ("batch 16, eager, --attention cudnn", base + ["--batch-size", "16", "--attention", "cudnn"], goal16),
        (
            f"batch 4, {args.fused} fused members (issue 18)",
            base + ["--batch-size", "4", "--fuse", str(args.fused)],
            ">= 10x one trial's chars/s",
        ),
    ]
    return [c for c in checks if not (args.smoke and "--compile" in c[1])]


def trial_command(args: argparse.Namespace, out: str, *flags: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "softfine",
        "train",
        "--out",
        out,
        "--device",
        args.device,
        *args.data,
        *flags,
    ]


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data-dir")
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="every check at its smallest, on --device (default cpu): checks the script, measures nothing",
    )
    parser.add_argument("--device", help="default: cuda, or cpu with --smoke")
    parser.add_argument("--limit", type=number(0), default=150, help="seconds a check may take (trials: 3x)")
    return parser


class Table:
    """The checks' rows, each printed as it ends."""

    def __init__(self):
        self.rows: list[dict] = []

    def __call__(self, check: str, figure: str, goal: str, wall: float, note: str = "") -> None:
        self.rows.append(
            {"check": check, "figure": figure, "goal": goal, "seconds": round(wall, 1), "note": note}
        )
        print(f"  {check}: {figure or '-'} ({wall:.0f} s){' ' + note if note else ''}", flush=True)


def check_throughput(args: argparse.Namespace, report: Table) -> None:
    for check, command, goal in throughput_checks(args):
        result, wall, note = run(command, args.limit)
        figure = ""
        if result:
            figure = (
                f"{result['chars_per_s']:,} chars/s, step {result['step_ms']} ms, warm-up "
                f"{result['warmup_s']} s, "
                f"{result['padded_lengths']} lengths, peak {result['peak_memory_MiB']:,} MiB"
            )
            if result.get("profile_kernel_ms") is not None:
                figure += (
                    f"; profile: step {result['profile_step_ms']} ms, kernels "
                    f"{result['profile_kernel_ms']} ms "
                    f"({result['profile_kernel_ms'] / result['profile_step_ms']:.0%}; goal >= 70 %)"
                )
        report(check, figure, goal, wall, note)


def check_fuse_auto(args: argparse.Namespace, report: Table) -> None:
    """What --fuse auto measures (softfine/memory.py): needs CUDA."""
    config = {
        "dataset": "weibo",
        "model": "tiny",
        "tiny_layers": 12,
        "tiny_hidden": 768,
        "batch_size": 4,
        "device": args.device,
        **({"data_dir": args.data_dir} if args.data_dir else {}),
    }
    code = (
        "import json; from softfine.config import make_config; from softfine.memory import member_memory; "
        f"print(json.dumps(member_memory(make_config({config!r}, str))))"
    )
    result, wall, note = run([sys.executable, "-c", code], args.limit)
    figure = (
        f"one member {result['one'] / 2**30:.2f} GiB, each more {result['each_more'] / 2**30:.2f} GiB"
        if result
        else ""
    )
    report("--fuse auto: a batch-4 step's peak memory", figure, "", wall, note)


def check_packing(args: argparse.Namespace, report: Table) -> None:
    from gpu_packing import epoch_chars, run_packing

    packing = argparse.Namespace(
        batch_size=4,
        steps=args.steps,
        warmup=args.warmup,
        data_dir=args.data_dir,
        shape=args.shape,
        device=args.device,
    )
    per_epoch, base = epoch_chars(args.data_dir), None
    for k in [1, 2] if args.smoke else [1, 2, 4, 8]:
        started = time.perf_counter()
        try:
            total = sum(r["chars_per_s"] for r in run_packing(k, packing))
        except SystemExit as err:
            report(f"{k} trials packed, batch 4", "", "", time.perf_counter() - started, str(err))
            continue
        base = base or total
        report(
            f"{k} trials packed, batch 4",
            f"{total:,} chars/s ({total / base:.2f}x one), {total * 3600 / per_epoch:.0f} trial-epochs/h",
            "",
            time.perf_counter() - started,
        )


def check_trials(args: argparse.Namespace, report: Table) -> None:
    """Whole `softfine train` runs: the paper's Weibo trial at bert-base shape, the tiny defaults."""
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as out:
        shape = (
            ["--tiny-layers", "2", "--tiny-hidden", "64"]
            if args.smoke
            else ["--tiny-layers", "12", "--tiny-hidden", "768"]
        )
        small = (
            ["--limit-train", "8", "--limit-eval", "8", "--epochs", "1"] if args.smoke else ["--epochs", "12"]
        )
        paper = [
            "--dataset",
            "weibo",
            "--model",
            "tiny",
            *shape,
            "--batch-size",
            "4",
            "--lr",
            "2e-5",
            "--schedule",
            "linear",
            "--dropout",
            "0.5",
            "--weight-decay",
            "0.1",
            "--log-every",
            "0",
            *small,
        ]
        trials = [
            ("paper's Weibo trial, 12 epochs, eager", paper),
            ("paper's Weibo trial, 12 epochs, --compile", paper + ["--compile"]),
        ]
        for number, (check, flags) in enumerate(trials[:1] if args.smoke else trials):
            result, wall, note = run(trial_command(args, f"{out}/{number}", *flags), 3 * args.limit)
            figure = (
                f"{wall:.0f} s end to end ({result['train_seconds']:.0f} s training), dev F1 "
                f"{result['best_dev_f1']:.4f}"
                if result
                else ""
            )
            report(check, figure, "<= 90 s", wall, note)
        tiny = ["--dataset", "resume", "--model", "tiny", "--seed", "1"] + (small if args.smoke else [])
        result, wall, note = run(trial_command(args, f"{out}/tiny", *tiny), 3 * args.limit)
        figure = (
            f"test F1 {result['test_f1']:.4f} on {result['test_sentences']} sentences, "
            f"{result['test_gold_entities']} gold entities; {result['train_seconds']:.0f} s training"
            if result
            else ""
        )
        report("tiny defaults, Resume, seed 1", figure, "F1 as on CPU (0.8556)", wall, note)


def main(args: argparse.Namespace) -> None:
    import torch

    from softfine.device import resolve_device

    args.device = args.device or ("cpu" if args.smoke else "cuda")
    try:
        resolve_device(args.device)
    except DeviceError as err:
        raise DeviceError(f"{err}; `--smoke` checks the script on a CPU") from None
    for dataset in ("weibo", "resume"):  # else every check's subprocess would fail on them, one by one
        check_data(dataset, args.data_dir)
    args.data = ["--data-dir", args.data_dir] if args.data_dir else []
    # --smoke: one step of each kind (warm-up, timed, profiled), 2 fused members, 2 trials packed
    args.shape, args.steps, args.warmup, args.profile, args.fused = (
        ("tiny", 1, 1, 1, 2) if args.smoke else ("bert-base", 100, 20, 5, 12)
    )
    card = torch.cuda.get_device_name() if args.device.startswith("cuda") else "CPU"
    print(
        f"gpu_check: {card}, torch {torch.__version__}, "
        f"{'smoke run' if args.smoke else 'bf16, bert-base shape'}",
        flush=True,
    )
    report = Table()
    check_throughput(args, report)
    if not args.smoke:
        check_fuse_auto(args, report)
    check_packing(args, report)
    check_trials(args, report)
    print("\n| check | figure | goal | s |\n|---|---|---|---|")
    for r in report.rows:
        print(f"| {r['check']} | {r['figure'] or r['note']} | {r['goal']} | {r['seconds']} |")
    print(json.dumps({"card": card, "torch": torch.__version__, "rows": report.rows}))


if __name__ == "__main__":
    run_script(parser(), main)
