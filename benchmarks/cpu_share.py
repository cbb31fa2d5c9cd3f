#!/usr/bin/env python
"""Where a trial's CPU goes: the configuration of search_overhead.py trained directly (`softfine
train`) and as a one-trial search (`tune/search.py` on a Ray instance it starts), each sampled from
/proc (Linux) over a window of its training: the CPU seconds the training process's threads got,
what every other process took, the cores left idle or stolen by the hypervisor, how often the
training threads were preempted (involuntary context switches) and how often the other processes
woke up (voluntary ones).

    python benchmarks/cpu_share.py --out DIR                 # 20 s into training, a 20 s window
    python benchmarks/cpu_share.py --out DIR --threads 1     # a core left to Ray's processes

When the training uses every core, a wake-up of another process can only run by preempting one of
the training threads: the columns show how often, and how much CPU those processes took. Run it on
an otherwise idle machine: figures, not timed assertions.
"""

from __future__ import annotations

import argparse
import collections
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import NoReturn

from search_overhead import DIRECT, OWN, POINT, REPO, run_env, search_command

from softfine.errors import SoftFiNEError
from softfine.script import check_data, integer, number, relay_error, run_script

HZ = os.sysconf("SC_CLK_TCK")
Thread = collections.namedtuple("Thread", "pid name cpu woke preempted")


def threads() -> dict[str, Thread]:
    """Every thread on the machine: its process, CPU ticks and context switches so far."""
    found = {}
    for task in Path("/proc").glob("[0-9]*/task/[0-9]*"):
        try:
            stat = (task / "stat").read_text()
            status = dict(
                line.split(":\t", 1) for line in (task / "status").read_text().splitlines() if ":\t" in line
            )
            words = (task.parents[1] / "cmdline").read_bytes().split(b"\0")[:3]
        except OSError:  # it ended meanwhile
            continue
        name = " ".join(w.decode(errors="replace").rsplit("/", 1)[-1][:30] for w in words).strip()
        fields = stat[stat.rindex(")") + 2 :].split()  # after the command name, which may hold spaces
        found[str(task)] = Thread(
            task.parts[2],
            name or stat[stat.index("(") + 1 : stat.rindex(")")],
            int(fields[11]) + int(fields[12]),
            int(status["voluntary_ctxt_switches"]),
            int(status["nonvoluntary_ctxt_switches"]),
        )
    return found


def cores() -> dict[str, int]:
    """The machine's idle and stolen ticks so far, summed over cores (/proc/stat)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    return {"idle": fields[3] + fields[4], "steal": fields[7]}


def descends_from(pid: str, ancestor: int) -> bool:
    while pid not in ("0", "1"):
        if pid == str(ancestor):
            return True
        stat = (Path("/proc") / pid / "stat").read_text()
        pid = stat[stat.rindex(")") + 2 :].split()[1]
    return False


def failed(run: subprocess.Popen, search: bool, log: Path) -> NoReturn:
    """Ends the script for a run that failed: with the run's own one-line error, else its log."""
    error = relay_error(log.read_text(errors="replace"))
    if error:  # a problem the user can fix (the data, a flag)
        raise SoftFiNEError(f"{'tune/search.py' if search else 'softfine train'}: {error}")
    sys.exit(f"cpu_share: exit {run.returncode}; its output is in {log}")


def training_process(run: subprocess.Popen, search: bool, log: Path, timeout: float = 180) -> str:
    """The pid that trains: the command itself, or the Ray worker that runs the search's trial
    (a process of the search's own Ray instance, so a descendant of the command)."""
    if not search:
        return str(run.pid)
    deadline = time.time() + timeout
    while time.time() < deadline and run.poll() is None:
        for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
            try:
                pid = cmdline.parent.name
                if cmdline.read_bytes().startswith(b"ray::ImplicitFunc") and descends_from(pid, run.pid):
                    return pid
            except OSError:  # it ended meanwhile
                continue
        time.sleep(0.2)
    if run.poll():
        failed(run, search, log)
    sys.exit(f"cpu_share: no trial process (ray::ImplicitFunc) of the search appeared within {timeout:.0f} s")


def sample(command: list[str], search: bool, settle: float, window: float, env: dict, log: Path) -> dict:
    """Runs the command to its end; the window's figures, `settle` s after the training process appeared."""
    print("$ " + " ".join(command), flush=True)
    with log.open("w") as output:
        run = subprocess.Popen(command, cwd=REPO, env=env, stdout=output, stderr=subprocess.STDOUT)
        pid = training_process(run, search, log)
        time.sleep(settle)
        before, cores_before, started = threads(), cores(), time.perf_counter()
        time.sleep(window)
        after, cores_after, seconds = threads(), cores(), time.perf_counter() - started
        if run.poll():
            failed(run, search, log)
        if not (Path("/proc") / pid).exists() or run.poll() is not None:
            sys.exit(f"cpu_share: training ended before the window closed; raise --epochs (log: {log})")
        if run.wait():
            failed(run, search, log)
    delta = collections.defaultdict(lambda: [0, 0, 0])  # pid -> cpu ticks, woke, preempted
    names = {}
    for key, now in after.items():
        then = before.get(key, Thread(now.pid, now.name, 0, 0, 0))
        for i, field in enumerate(("cpu", "woke", "preempted")):
            delta[now.pid][i] += getattr(now, field) - getattr(then, field)
        names[now.pid] = now.name
    others = {p: d for p, d in delta.items() if p != pid}
    busiest = sorted(others, key=lambda p: -others[p][1])[:6]
    return {
        "seconds": seconds,
        "training": delta[pid][0] / HZ,
        "preempted": delta[pid][2] / seconds,
        "others": sum(d[0] for d in others.values()) / HZ,
        "woke": sum(d[1] for d in others.values()) / seconds,
        "idle": (cores_after["idle"] - cores_before["idle"]) / HZ,
        "steal": (cores_after["steal"] - cores_before["steal"]) / HZ,
        "busiest": [(names[p], others[p][1] / seconds, others[p][0] / HZ) for p in busiest],
    }


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dataset", default="resume")
    parser.add_argument(
        "--epochs", type=integer(1), default=3, help="epochs of both runs: enough to outlast the window"
    )
    parser.add_argument("--seed", type=integer(0, 2**32 - 1), default=1)
    parser.add_argument("--data-dir", default=os.environ.get("SOFTFINE_DATA_DIR"))
    parser.add_argument("--threads", type=integer(1), help="CPU threads of each run (default: every core)")
    parser.add_argument(
        "--settle",
        type=number(0),
        default=20.0,
        help="seconds from the start of the training process (the command, or the trial) to the window",
    )
    parser.add_argument("--window", type=number(0), default=20.0, help="seconds sampled")
    parser.add_argument("--out", required=True, help="a new folder for the runs and their logs")
    return parser


def main(args: argparse.Namespace) -> None:
    if not Path("/proc/stat").is_file():
        raise SoftFiNEError("needs Linux's /proc")
    check_data(args.dataset, args.data_dir)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=False)
    env, threads_per_run = run_env(args.threads)
    common = [
        "--dataset",
        args.dataset,
        "--model",
        "tiny",
        "--seed",
        str(args.seed),
        "--epochs",
        str(args.epochs),
    ]
    common += ["--data-dir", args.data_dir] if args.data_dir else []
    direct = [sys.executable, "-m", "softfine", "train", *common, *POINT, "--out", str(out / "direct")]
    search = search_command(common, out, "local", threads_per_run, "cpu_share")
    rows = [
        (DIRECT, sample(direct, False, args.settle, args.window, env, out / "direct.log")),
        (OWN, sample(search, True, args.settle, args.window, env, out / "search.log")),
    ]

    capacity = os.cpu_count()
    print(
        f"\n{'run':<27} {'window s':>8} {'training core-s':>17} {'others core-s':>13} {'idle core-s':>11} "
        f"{'stolen core-s':>13} {'training preempted/s':>20} {'others woke/s':>13}"
    )
    for kind, r in rows:
        share = f"{r['training']:.1f} ({100 * r['training'] / (capacity * r['seconds']):.1f} %)"
        print(
            f"{kind:<27} {r['seconds']:>8.1f} {share:>17} {r['others']:>13.2f} {r['idle']:>11.2f} "
            f"{r['steal']:>13.2f} {r['preempted']:>20.0f} {r['woke']:>13.0f}"
        )
    for kind, r in rows:
        print(f"\nmost wake-ups beside the training, {kind}: per s, core-s")
        for name, woke, cpu in r["busiest"]:
            print(f"  {woke:6.0f} {cpu:6.2f}  {name}")
    print(
        f"\ncpu cores: {capacity}, threads per run: {threads_per_run}, epochs: {args.epochs}, "
        f"dataset: {args.dataset}, window: {args.window:g} s, {args.settle:g} s into training; runs in {out}"
    )


if __name__ == "__main__":
    run_script(parser(), main)
