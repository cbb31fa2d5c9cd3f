#!/usr/bin/env python
"""What the search machinery costs: one configuration trained directly (`softfine train`, i.e.
softfine.train.train) and as a one-trial search (`tune/search.py`: Ray Tune with a checkpoint at
every evaluation, the MLflow parent and child runs in a SQLite store, the Optuna study, the
model logged, checked on an example and registered), each timed from its command's start to its
exit. The search runs twice: on a Ray instance it starts itself (`--address local`), and on a Ray
instance already running (`ray start --head`, as a cluster from `ray up` is: the documented path).

    python benchmarks/search_overhead.py --out DIR            # the tiny defaults on full Resume (20 epochs)
    python benchmarks/search_overhead.py --out DIR --epochs 3  # shorter trials: the fixed costs weigh more
    python benchmarks/search_overhead.py --out DIR --threads 1  # a core left to Ray's own processes
    python benchmarks/search_overhead.py --out DIR --repeat 3  # three rounds, alternated, and the medians

Prints the wall times, the overhead in percent of the direct run, and where the search's extra
time went (the trial's own training against the direct run's, the seconds spent reporting
checkpoints to Ray). Run it on an otherwise idle machine: a figure, not a timed assertion.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

from softfine.errors import SoftFiNEError
from softfine.script import check_data, integer, relay_error, run_script

REPO = Path(__file__).resolve().parents[1]
DIRECT, OWN, RUNNING = "direct (softfine train)", "search, Ray started by it", "search, Ray already running"
POINT = ["--alpha-aug", "0.01", "--alpha-fea", "0.005", "--beta", "2", "--gamma", "2"]


def timed(command: list[str], env: dict, what: str) -> tuple[float, str]:
    """Runs `command` (`what`, in an error); its wall time and stdout."""
    print("$ " + " ".join(command), flush=True)
    started = time.perf_counter()
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - started
    error = relay_error(done.stderr) if done.returncode else None
    if error:  # the command's own one line: a problem the user can fix
        raise SoftFiNEError(f"{what}: {error}")
    if done.returncode:  # a bug: its output, for the report
        sys.exit(f"search_overhead: exit {done.returncode}:\n{done.stderr[-3000:]}")
    return wall, done.stdout


@contextlib.contextmanager
def running_ray(cpus: int, env: dict):
    """A Ray head on 127.0.0.1 for the search to join, with a token of its own (Ray's token
    authentication; `env` gets it); `--block` ties the head's processes to this one."""
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    head = subprocess.Popen(
        [
            "ray",
            "start",
            "--head",
            "--block",
            "--node-ip-address",
            "127.0.0.1",
            "--port",
            str(port),
            "--include-dashboard",
            "false",
            "--num-cpus",
            str(cpus),
            "--num-gpus",
            "0",
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        for line in head.stdout:
            if "Ray runtime started" in line:
                break
        else:
            sys.exit(f"search_overhead: `ray start --head` exited with {head.wait()}")
        yield f"127.0.0.1:{port}"
    finally:
        head.send_signal(signal.SIGTERM)
        head.wait(60)
        # `ray stop` removes the file naming the latest head (which `--address auto` reads); a
        # stopped `ray start --block` leaves it behind.
        latest = Path("/tmp/ray/ray_current_cluster")
        if latest.is_file() and latest.read_text().strip().endswith(f":{port}"):
            latest.unlink()


def run_env(threads: int | None) -> tuple[dict, int]:
    """The runs' environment (Ray's usage reporting off; OMP_NUM_THREADS when --threads is given)
    and the threads each run uses."""
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    return env, threads or os.cpu_count()


def search_command(common: list[str], out: Path, address: str, threads: int, name: str) -> list[str]:
    """A one-trial search at the benchmarks' point; its Ray results and MLflow store in `out`."""
    return [
        sys.executable,
        "tune/search.py",
        *common,
        "--alphas",
        "0.01,0.005",
        "--beta",
        "2",
        "--gamma",
        "2",
        "--gpus-per-trial",
        "0",
        "--cpus-per-trial",
        str(threads),
        "--address",
        address,
        "--storage-path",
        str(out / "ray"),
        "--name",
        name,
        "--mlflow-uri",
        f"sqlite:///{out / 'mlflow.db'}",
    ]


def search(common: list[str], out: Path, address: str, threads: int, env: dict) -> tuple[float, dict]:
    """One one-trial search; its wall time and its trial's last result. Its MLflow store is made
    before the clock starts, as a search finds it from the second on (creating a new SQLite
    store's tables is a one-off cost, not the search's)."""
    out.mkdir()
    subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys, mlflow; mlflow.MlflowClient(sys.argv[1]).search_experiments()",
            f"sqlite:///{out / 'mlflow.db'}",
        ],
        check=True,
        env=env,
        capture_output=True,
    )
    wall, _ = timed(search_command(common, out, address, threads, "overhead"), env, "tune/search.py")
    result = [
        json.loads(line) for line in next((out / "ray" / "overhead").glob("trial_*/result.json")).open()
    ][-1]
    return wall, result


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dataset", default="resume")
    parser.add_argument(
        "--epochs", type=integer(1), help="epochs of both runs (default: the tiny encoder's, 20)"
    )
    parser.add_argument("--seed", type=integer(0, 2**32 - 1), default=1)
    parser.add_argument(
        "--limit-train",
        type=integer(1),
        help="only the first N training sentences (a quick check "
        "that the benchmark runs; its figures then weigh the fixed costs far more than a real trial "
        "does)",
    )
    parser.add_argument(
        "--limit-eval",
        type=integer(1),
        help="only the first N dev and test sentences (as --limit-train: a quick check, not a figure)",
    )
    parser.add_argument("--data-dir", default=os.environ.get("SOFTFINE_DATA_DIR"))
    parser.add_argument(
        "--ray",
        choices=("own", "running", "both"),
        default="both",
        help="which searches to run: on a Ray instance of their own, on a running one, or both",
    )
    parser.add_argument(
        "--threads",
        type=integer(1),
        help="CPU threads of each run (OMP_NUM_THREADS, and the search's "
        "--cpus-per-trial); default: every core. Fewer leaves Ray's own processes a core of their own, "
        "as a GPU node's spare cores do",
    )
    parser.add_argument(
        "--repeat",
        type=integer(1),
        default=1,
        help="rounds of every run, alternated; more than one "
        "adds the median of each kind (this machine's runs of one command vary by several percent)",
    )
    parser.add_argument(
        "--out", required=True, help="a new folder for the runs (kept: the logs and MLflow stores)"
    )
    return parser


def main(args: argparse.Namespace) -> None:
    check_data(args.dataset, args.data_dir)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=False)
    env, threads = run_env(args.threads)
    common = ["--dataset", args.dataset, "--model", "tiny", "--seed", str(args.seed)]
    common += ["--epochs", str(args.epochs)] if args.epochs else []
    common += ["--data-dir", args.data_dir] if args.data_dir else []
    common += ["--limit-train", str(args.limit_train)] if args.limit_train else []
    common += ["--limit-eval", str(args.limit_eval)] if args.limit_eval else []

    rows = runs(args, common, out, env, threads)
    print_table(args, rows)
    print(
        "train s: the training loop's own time (softfine.train's train_seconds), in the trial for a search; "
        "report s: the trial's time in tune.report (results and checkpoints handed to Ray)"
    )
    print(
        f"cpu cores: {os.cpu_count()}, threads per run: {threads}, epochs: "
        f"{args.epochs or 'the tiny default'}, "
        f"dataset: {args.dataset}; runs kept in {out}"
    )


def runs(args: argparse.Namespace, common: list[str], out: Path, env: dict, threads: int) -> list[tuple]:
    """(kind, round, wall, result) of each run, the kinds alternated round by round, so that a slow
    spell of the machine hits every kind."""
    rows = []
    for round_ in range(1, args.repeat + 1):
        suffix = f"-{round_}" if args.repeat > 1 else ""
        wall, stdout = timed(
            [
                sys.executable,
                "-m",
                "softfine",
                "train",
                *common,
                *POINT,
                "--out",
                str(out / f"direct{suffix}"),
            ],
            env,
            "softfine train",
        )
        rows.append((DIRECT, round_, wall, json.loads(stdout)))
        if args.ray in ("own", "both"):
            rows.append((OWN, round_, *search(common, out / f"own{suffix}", "local", threads, env)))
        if args.ray in ("running", "both"):
            head_env = dict(env)
            with running_ray(os.cpu_count(), head_env) as address:
                rows.append(
                    (RUNNING, round_, *search(common, out / f"running{suffix}", address, threads, head_env))
                )
    return rows


def print_table(args: argparse.Namespace, rows: list[tuple]) -> None:
    direct = {round_: wall for kind, round_, wall, _ in rows if kind == DIRECT}
    print(
        f"\n{'run':<30} {'round':>5} {'wall s':>8} {'overhead':>9} {'train s':>8} {'report s':>9} "
        f"{'test F1':>8}"
    )
    for kind, round_, wall, result in rows:
        overhead = f"{100 * (wall - direct[round_]) / direct[round_]:+.1f} %" if kind != DIRECT else ""
        report = f"{float(result['report_seconds']):.1f}" if "report_seconds" in result else "-"
        print(
            f"{kind:<30} {round_:>5} {wall:>8.1f} {overhead:>9} "
            f"{float(result['train_seconds']):>8.1f} {report:>9} "
            f"{float(result['test_f1']):>8.4f}"
        )
    if args.repeat > 1:
        median = {
            kind: statistics.median(w for k, _, w, _ in rows if k == kind)
            for kind in dict.fromkeys(k for k, *_ in rows)
        }
        for kind, wall in median.items():
            overhead = f", {100 * (wall - median[DIRECT]) / median[DIRECT]:+.1f} %" if kind != DIRECT else ""
            print(f"median of {args.repeat}: {kind}: {wall:.1f} s{overhead}")


if __name__ == "__main__":
    run_script(parser(), main)
