"""The paper's 36-point grid trained as fused groups of K points (softfine.train.train_group), without
Ray: per K, the wall time, the training characters per second summed over the points, and the peak
memory per member.

    python benchmarks/fused_grid.py                     # CPU, a few minutes: 12 points, K = 1 4 12
    python benchmarks/fused_grid.py --points 36 --fuse 1 3 6 12 36 --limit-train 64   # the whole grid
    python benchmarks/fused_grid.py --device cuda --shape bert-base --dataset weibo --batch-size 4 \\
        --limit-train 0 --epochs 1 --fuse 1 6 12 36                  # GPU: bf16, the paper's shape and batch

The grid's points are taken in the search's order (alphas, then beta, then gamma). K = 1 is one
point at a time (a group of one is what `softfine train` runs). Each K runs in a
process of its own, so that its peak memory is its own: the process's peak RSS on a CPU, CUDA's
max_memory_allocated on a GPU, divided by K. A group is one `train_group` call, end to end: data,
model, training, a dev evaluation per epoch, checkpoints, test. Characters/s: training characters
(real characters of the train split, epochs times, every point) over the wall time of all groups.
Figures are printed, not asserted.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from softfine.errors import SoftFiNEError
from softfine.script import integer, relay_error, run_script


def grid_points() -> list[dict]:
    """The paper's 36 points (Appendix C), in the search's order: (alphas, beta, gamma)."""
    from softfine_tune.space import PAPER_GRID  # the search's own module (no Ray imported)

    return [
        dict(alpha_aug=aug, alpha_fea=fea, beta=float(beta), gamma=float(gamma))
        for aug, fea in PAPER_GRID["alphas"]
        for beta in PAPER_GRID["beta"]
        for gamma in PAPER_GRID["gamma"]
    ]


def point_config(args: argparse.Namespace, out: Path, point: dict):
    """The TrainConfig of one grid point (a ConfigError names a bad flag, as softfine train's does)."""
    from softfine.config import make_config

    shape = dict(tiny_layers=12, tiny_hidden=768) if args.shape == "bert-base" else {}
    return make_config(
        dict(
            dataset=args.dataset,
            data_dir=args.data_dir,
            model="tiny",
            **shape,
            batch_size=args.batch_size,
            epochs=args.epochs,
            limit_train=args.limit_train or None,
            limit_eval=args.limit_eval or None,
            device=args.device,
            log_every=0,
            seed=1,
            out=str(out),
            **point,
        )
    )


def check(args: argparse.Namespace) -> None:
    """What would stop every K's run, refused before any trains: a bad value, no CUDA, no data."""
    from softfine.datasets import data_source
    from softfine.device import resolve_device

    config = point_config(args, Path("unused"), grid_points()[0])  # checked, not run: nothing is written
    resolve_device(config.device)
    data_source(config)


def run_k(args: argparse.Namespace, k: int) -> dict:
    """Trains the grid's first `args.points` points in groups of `k`; returns the figures."""
    import torch

    from softfine.datasets import load_corpus
    from softfine.device import resolve_device
    from softfine.train import train_group

    points = grid_points()[: args.points]
    with tempfile.TemporaryDirectory(prefix="fused-grid-") as work:
        configs = [point_config(args, Path(work) / f"point{n}", p) for n, p in enumerate(points)]
        device = resolve_device(configs[0].device)
        train_chars = sum(len(s.chars) for s in load_corpus(configs[0], ["train"]).splits["train"])
        started = time.perf_counter()
        results = []
        for first in range(0, len(configs), k):
            results += train_group(configs[first : first + k])
        wall = time.perf_counter() - started
    if device.type == "cuda":
        peak, kind = torch.cuda.max_memory_allocated() / 2**20, "CUDA max allocated"
    else:
        peak, kind = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "process peak RSS"
    return {
        "K": k,
        "groups": -(-len(points) // k),
        "points": len(points),
        "wall_s": round(wall, 1),
        "chars_per_s": round(len(points) * args.epochs * train_chars / wall),
        "peak_MiB_per_member": round(peak / min(k, len(points)), 1),
        "peak_kind": kind,
        "best_dev_f1": [round(r["best_dev_f1"], 4) for r in results],
    }


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dataset", default="resume")
    parser.add_argument("--data-dir")
    parser.add_argument(
        "--shape",
        choices=["tiny", "bert-base"],
        default="tiny",
        help="tiny: the tiny encoder's defaults; bert-base: its shape, randomly initialised",
    )
    parser.add_argument("--batch-size", type=integer(1), default=32)
    parser.add_argument("--epochs", type=integer(1), default=1)
    parser.add_argument(
        "--limit-train", type=integer(0), default=64, help="first N training sentences (0: all)"
    )
    parser.add_argument(
        "--limit-eval", type=integer(0), default=32, help="first N dev and test sentences (0: all)"
    )
    parser.add_argument(
        "--points", type=integer(1, 36), default=12, help="the grid's first N points (36: all)"
    )
    parser.add_argument(
        "--fuse", type=integer(1), nargs="+", default=[1, 4, 12], metavar="K", help="group sizes"
    )
    parser.add_argument("--device", default="auto")
    parser.add_argument("--one", type=int, metavar="K", help=argparse.SUPPRESS)  # a child: one K, JSON out
    return parser


def main(args: argparse.Namespace) -> None:
    if args.one is not None:
        import logging

        logging.disable(logging.WARNING)  # the data's repair notes, once per group
        print(json.dumps(run_k(args, args.one)))
        return

    import torch

    check(args)
    child = [a for a in sys.argv[1:]]
    rows = []
    for k in args.fuse:
        done = subprocess.run(
            [sys.executable, __file__, *child, "--one", str(k)], capture_output=True, text=True
        )
        error = relay_error(done.stderr) if done.returncode else None
        if error:  # the child's one line (a problem of its data, say)
            raise SoftFiNEError(f"K={k}: {error}")
        if done.returncode:  # a bug: its traceback
            sys.exit(f"K={k} failed:\n{done.stderr[-3000:]}")
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        row = rows[-1]
        print(
            f"K={row['K']:>2}: {row['groups']:>2} groups, {row['wall_s']:>7.1f} s, "
            f"{row['chars_per_s']:>8} chars/s "
            f"summed ({row['chars_per_s'] / rows[0]['chars_per_s']:.2f}x K={rows[0]['K']}), "
            f"{row['peak_MiB_per_member']:>7.1f} MiB per member ({row['peak_kind']})",
            flush=True,
        )
    same = all(r["best_dev_f1"] == rows[0]["best_dev_f1"] for r in rows)
    print(f"every K gives each point the same best dev F1: {same}")
    print(
        json.dumps(
            {
                "machine": platform.processor() or platform.machine(),
                "torch": torch.__version__,
                "threads": torch.get_num_threads(),
                "args": vars(args),
                "rows": rows,
            }
        )
    )


if __name__ == "__main__":
    run_script(parser(), main)
