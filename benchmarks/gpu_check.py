#!/usr/bin/env python
"""Every GPU figure of issue 29 in one table (bert-base shape, bf16, Weibo), in parts that each fit
one call of the GPU machine (benchmarks/gpu_session.py runs them there), the most important first:

    python benchmarks/gpu_check.py                       # every part, on a CUDA machine
    python benchmarks/gpu_check.py --part 1 --budget 280 --log part1.log --json part1.json
    python benchmarks/gpu_check.py --smoke               # each check at its smallest, on any device

1. the toolchain (seconds: CUDA, bf16, Triton's C compiler and Python headers); one trial's training
   throughput at batch 16 and 4, eager, each with a profile (host step time, GPU kernel time, the
   attention kernel that ran); 12 grid points fused into one model at batch 4 (issue 18); what
   `--fuse auto` measures (the peak memory of a batch-4 step with one member and with two);
2. batch 16 on one padded length, eager and `--compile` (one graph to compile); the paper's Weibo
   trial for 1 epoch end to end, and 12 epochs computed from it; cuDNN's attention, profiled (it may
   fall back);
3. batch 4 on one padded length, eager and `--compile`; 1, 2, 4 and 8 trials packed on the GPU
   (benchmarks/gpu_packing.py); the tiny encoder's defaults on Resume, with its test F1.

Each check is a subprocess with a time limit (--limit, and what is left of --budget); one that fails
or runs out is reported as such, with the line that says why, and the rest go on. --log keeps every
child's output whole. Figures are printed, never asserted. The last line is the table as JSON. The
smoke run leaves out the compiled runs (inductor compiles for minutes on a small CPU;
tests/test_step.py trains with --compile there).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

from softfine.errors import DeviceError
from softfine.script import check_data, error_line, number, run_script

HERE = Path(__file__).resolve().parent
GOAL16, GOAL4 = ">= 100,000 chars/s", ">= 25,000 chars/s"
SKIPPED = "not run: the call's --budget was spent"


class Table:
    """The checks' rows, each printed as it ends; the call's budget; every child's output (--log)."""

    def __init__(self, budget: float | None, log: Path | None):
        self.rows: list[dict] = []
        self.results: dict[str, dict] = {}  # each throughput check's result, by its name
        self.deadline = time.monotonic() + budget if budget else None
        self.log = log

    def __call__(self, check: str, figure: str, goal: str, wall: float, note: str = "") -> None:
        self.rows.append(
            {"check": check, "figure": figure, "goal": goal, "seconds": round(wall, 1), "note": note}
        )
        print(f"  {check}: {figure or '-'} ({wall:.0f} s){' ' + note if note else ''}", flush=True)

    def left(self, limit: float) -> float:
        """Seconds the next check may take: its limit, or what is left of the budget."""
        return limit if self.deadline is None else min(limit, self.deadline - time.monotonic())

    def keep(self, command: list[str], code: int | str, wall: float, stdout: str, stderr: str) -> None:
        if self.log is None:
            return
        with self.log.open("a", encoding="utf-8") as log:
            log.write(f"\n===== {' '.join(command)}\n===== exit {code} after {wall:.1f} s\n")
            log.write(f"----- stdout\n{stdout}\n----- stderr\n{stderr}\n")


def run(report: Table, command: list[str], limit: float) -> tuple[dict | None, float, str]:
    """(the JSON of the command's last stdout line, wall seconds, a note). A check that runs out is
    stopped with everything it started (compile workers, packed trials): nothing is left on the GPU."""
    allowed = report.left(limit)
    if allowed < min(5, limit):  # too little of the budget left for a check to start
        return None, 0.0, SKIPPED
    started = time.perf_counter()
    child = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        stdout, stderr = child.communicate(timeout=allowed)
    except subprocess.TimeoutExpired:
        os.killpg(child.pid, signal.SIGKILL)
        stdout, stderr = child.communicate()
        wall = time.perf_counter() - started
        report.keep(command, "none: stopped", wall, stdout, stderr)
        return None, wall, f"stopped after {allowed:.3g} s"
    wall = time.perf_counter() - started
    report.keep(command, child.returncode, wall, stdout, stderr)
    if child.returncode:
        return None, wall, f"exit {child.returncode}: {error_line(stderr)[:300]}"
    for text in (stdout, (stdout.strip().splitlines() or [""])[-1]):  # softfine train's, the scripts'
        try:
            return json.loads(text), wall, ""
        except ValueError:
            pass
    return None, wall, "no JSON result"


def toolchain(args: argparse.Namespace, report: Table) -> None:
    """What the checks need beside torch, found in seconds: a missing C compiler or Python headers
    would fail every --compile row (Triton builds its launchers with them)."""
    import torch

    started = time.perf_counter()
    on_gpu = args.device.startswith("cuda")
    found = {
        "cuda": torch.version.cuda if on_gpu else "not used",
        "bf16": torch.cuda.is_bf16_supported() if on_gpu else "not used",
        "C compiler": next((shutil.which(c) for c in ("cc", "gcc", "clang") if shutil.which(c)), None),
        "Python.h": (Path(sysconfig.get_paths()["include"]) / "Python.h").is_file(),
    }
    for package in ("triton", "transformers", "pydantic", "seqeval"):
        try:
            found[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            found[package] = None
    # --smoke compiles nothing
    missing = [k for k, v in found.items() if v in (None, False)] if on_gpu else []
    figure = ", ".join(f"{k} {v}" for k, v in found.items())
    report(
        "toolchain",
        figure,
        "",
        time.perf_counter() - started,
        f"missing: {', '.join(missing)}" if missing else "",
    )


def throughput(
    args: argparse.Namespace, report: Table, check: str, flags: list[str], goal: str, more=None, limit=None
) -> None:
    """One row of benchmarks/train_throughput.py on Weibo (`flags` last: they override the steps);
    `more(result)`: what the row adds to its figure; `limit`: seconds, else --limit."""
    command = [
        *(sys.executable, str(HERE / "train_throughput.py"), "--dataset", "weibo", "--device", args.device),
        *("--shape", args.shape, "--steps", str(args.steps), "--warmup", str(args.warmup), *args.data),
        *flags,
    ]
    result, wall, note = run(report, command, limit or args.limit)
    figure = ""
    if result:
        figure = (
            f"{result['chars_per_s']:,} chars/s, step {result['step_ms']} ms, "
            f"warm-up {result['warmup_s']} s, {result['padded_lengths']} lengths, "
            f"peak {result['peak_memory_MiB']:,} MiB"
        )
        if result.get("profile_step_ms"):
            kernels = result.get("profile_kernel_ms")
            gpu = "no GPU kernels"
            if kernels is not None:
                gpu = f"kernels {kernels} ms ({kernels / result['profile_step_ms']:.0%}; goal >= 70 %)"
            ran = [a.removeprefix("aten::_scaled_dot_product_") for a in result["profile_attention"]]
            figure += f"; profile: step {result['profile_step_ms']} ms, {gpu}, attention {', '.join(ran)}"
        report.results[check] = result
        figure += more(result) if more else ""
    report(check, figure, goal, wall, note)


def throughput_rows(batch: int, goal: str, *flags: str, profile: bool = False):
    def check(args: argparse.Namespace, report: Table) -> None:
        profiled = ["--profile", str(args.profile)] if profile else []
        name = f"batch {batch}, {' '.join(flags) or 'eager'}{', profiled' if profile else ''}"
        throughput(args, report, name, ["--batch-size", str(batch), *flags, *profiled], goal)

    return check


def one_length(batch: int, goal: str):
    """Eager and compiled on the same padded length: the compiled step compiles once, in its warm-up
    (given twice --limit: inductor compiles a 12-layer forward and backward for minutes)."""

    def check(args: argparse.Namespace, report: Table) -> None:
        for mode in ["--no-compile"] + ([] if args.smoke else ["--compile"]):
            name = f"batch {batch}, one length, {'eager' if mode == '--no-compile' else mode}"
            flags = ["--batch-size", str(batch), "--one-length", mode]
            throughput(
                args, report, name, flags, goal, limit=args.limit * (1 if mode == "--no-compile" else 2)
            )

    return check


def fused(args: argparse.Namespace, report: Table) -> None:
    """The fused group's chars/s against one trial's (the batch-4 row before it), and the paper's
    36-point Weibo grid computed from it: 36 points x 12 epochs of training characters, no evaluation."""
    from gpu_packing import epoch_chars

    grid_chars = 36 * 12 * epoch_chars(args.data_dir)

    def more(result: dict) -> str:
        one = report.results.get("batch 4, eager, profiled")
        times = f"{result['chars_per_s'] / one['chars_per_s']:.1f}x one trial; " if one else ""
        return f"; {times}36-point grid's training computed: {grid_chars / result['chars_per_s']:.0f} s"

    check = f"batch 4, {args.fused} fused members (issue 18)"
    # a quarter of the steps: each step trains all the members (12 on a GPU)
    steps = ["--steps", str(max(1, args.steps // 4)), "--warmup", str(max(1, args.warmup // 4))]
    flags = ["--batch-size", "4", "--fuse", str(args.fused), *steps]
    throughput(args, report, check, flags, ">= 10x one trial's chars/s; grid <= 600 s", more)


def fuse_auto(args: argparse.Namespace, report: Table) -> None:
    """What --fuse auto measures (softfine/memory.py): needs CUDA."""
    if args.smoke:
        return
    config = {
        **dict(
            dataset="weibo", model="tiny", tiny_layers=12, tiny_hidden=768, batch_size=4, device=args.device
        ),
        **({"data_dir": args.data_dir} if args.data_dir else {}),
    }
    code = (
        "import json; from softfine.config import make_config; from softfine.memory import member_memory; "
        f"print(json.dumps(member_memory(make_config({config!r}, str))))"
    )
    result, wall, note = run(report, [sys.executable, "-c", code], args.limit)
    figure = (
        f"one member {result['one'] / 2**30:.2f} GiB, each more {result['each_more'] / 2**30:.2f} GiB"
        if result
        else ""
    )
    report("--fuse auto: a batch-4 step's peak memory", figure, "", wall, note)


def packing(args: argparse.Namespace, report: Table) -> None:
    from gpu_packing import epoch_chars

    per_epoch, base = epoch_chars(args.data_dir), None
    for k in [1, 2] if args.smoke else [1, 2, 4, 8]:
        command = [
            *(sys.executable, str(HERE / "gpu_packing.py"), "--packing", str(k), "--device", args.device),
            *("--shape", args.shape, "--steps", str(args.steps), "--warmup", str(args.warmup), *args.data),
            *("--limit", str(max(1, report.left(args.limit) - 5))),
        ]
        result, wall, note = run(report, command, args.limit)
        figure = ""
        if result:
            total = result["rows"][0]["chars_per_s"]
            base = base or total
            figure = (
                f"{total:,} chars/s ({total / base:.2f}x one), {total * 3600 / per_epoch:.0f} trial-epochs/h"
            )
        report(f"{k} trials packed, batch 4", figure, "", wall, note)


def paper_trial(args: argparse.Namespace, report: Table) -> None:
    """The paper's Weibo settings at bert-base shape for 1 epoch, from the command's start to its exit;
    12 epochs computed as that plus 11 more epochs of the first's training time (its evaluation and
    checkpoint included, its warm-up too: an upper estimate)."""
    shape = (
        ["--tiny-layers", "2", "--tiny-hidden", "64"]
        if args.smoke
        else ["--tiny-layers", "12", "--tiny-hidden", "768"]
    )
    small = ["--limit-train", "8", "--limit-eval", "8"] if args.smoke else []
    flags = [
        *("--dataset", "weibo", "--model", "tiny", *shape, "--batch-size", "4", "--lr", "2e-5"),
        *("--schedule", "linear", "--dropout", "0.5", "--weight-decay", "0.1", "--log-every", "0"),
        *("--epochs", "1", *small),
    ]
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as out:
        result, wall, note = run(report, trial_command(args, out, *flags), 3 * args.limit)
    figure = ""
    if result:
        twelve = wall + 11 * result["train_seconds"]
        figure = (
            f"{wall:.0f} s end to end ({result['train_seconds']:.0f} s training and evaluation); "
            f"12 epochs computed: {twelve:.0f} s; dev F1 {result['best_dev_f1']:.4f}"
        )
    report("paper's Weibo trial, 1 epoch, eager", figure, "12 epochs <= 90 s", wall, note)


def tiny_defaults(args: argparse.Namespace, report: Table) -> None:
    small = ["--limit-train", "8", "--limit-eval", "8", "--epochs", "1"] if args.smoke else []
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as out:
        flags = ["--dataset", "resume", "--model", "tiny", "--seed", "1", *small]
        result, wall, note = run(report, trial_command(args, out, *flags), 3 * args.limit)
    figure = (
        f"test F1 {result['test_f1']:.4f} on {result['test_sentences']} sentences, "
        f"{result['test_gold_entities']} gold entities; {result['train_seconds']:.0f} s training"
        if result
        else ""
    )
    report("tiny defaults, Resume, seed 1", figure, "F1 as on CPU (0.8556)", wall, note)


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


# The parts, each one call of the GPU machine (about 5 minutes), the most important checks first.
PARTS = {
    1: [
        toolchain,
        throughput_rows(16, GOAL16, profile=True),
        throughput_rows(4, GOAL4, profile=True),
        fused,
        fuse_auto,
    ],
    2: [
        one_length(16, GOAL16),
        paper_trial,
        throughput_rows(16, GOAL16, "--attention", "cudnn", profile=True),
    ],
    3: [one_length(4, GOAL4), packing, tiny_defaults],
}


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
    parser.add_argument(
        "--part", type=int, choices=sorted(PARTS), nargs="+", help="the parts to run (default: all)"
    )
    parser.add_argument(
        "--limit",
        type=number(0),
        default=150,
        help="seconds a check may take (compiled rows: 2x, trials: 3x)",
    )
    parser.add_argument("--budget", type=number(0), help="seconds for all the checks; those left are not run")
    parser.add_argument("--log", type=Path, help="a file for every check's command and output, whole")
    parser.add_argument("--json", type=Path, help="a file for the table as JSON (also the last line printed)")
    return parser


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
        f"{'smoke run' if args.smoke else 'bf16, bert-base shape'}"
    )
    report = Table(args.budget, args.log)
    for part in args.part or sorted(PARTS):
        print(f"part {part}:", flush=True)
        for check in PARTS[part]:
            check(args, report)
    print("\n| check | figure | goal | s |\n|---|---|---|---|")
    for r in report.rows:
        print(f"| {r['check']} | {r['figure'] or r['note']} | {r['goal']} | {r['seconds']} |")
    table = {"card": card, "torch": torch.__version__, "cuda": torch.version.cuda, "rows": report.rows}
    if args.json:
        args.json.write_text(json.dumps(table, indent=1) + "\n", encoding="utf-8")
    print(json.dumps(table))


if __name__ == "__main__":
    run_script(parser(), main)
