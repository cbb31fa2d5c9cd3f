#!/usr/bin/env python
"""The GPU session of issue 29: prepared here, run on the GPU machine in calls of about 5 minutes.

Here, in a checkout with ../shared beside it:

    python benchmarks/gpu_session.py prepare

writes .gpu/ (ignored by git): the project at HEAD (`git archive`: the commit the table is for), the
Weibo and Resume data, and the wheels the GPU image lacks (../shared/gpu-wheels: pydantic, seqeval),
then prints one device-tool call per part of benchmarks/gpu_check.py, the most important first, e.g.

    run(command="python3 .gpu/project/benchmarks/gpu_session.py run 1", carry=[".gpu"], timeout_s=360)

There, `run PART` installs the wheels (only if pydantic or seqeval is missing) into a folder of its
own, puts it and the project on PYTHONPATH, points SOFTFINE_DATA_DIR at the data, and runs that part
of gpu_check.py within --budget seconds, writing $OUT/partN.log (every check's command and output,
whole) and $OUT/partN.json (the rows). Standard library only: it runs before the wheels are in.
`run PART --smoke --out DIR` checks it all on a CPU.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATASETS = ("weibo", "resume")  # what gpu_check.py reads
PARTS = (1, 2, 3)  # gpu_check.py's
MARK = "COMMIT"  # in a folder this script prepared: the commit archived


def fail(message: str) -> None:
    """Ends the script as the project's scripts end on a problem the user can fix (exit status 2)."""
    print(f"gpu_session.py: error: {message}", file=sys.stderr)
    sys.exit(2)


def prepare(args: argparse.Namespace) -> None:
    target, data, wheels = args.to.resolve(), args.data_dir.resolve(), args.wheels.resolve()
    missing = [f"{data / d}" for d in DATASETS if not (data / d).is_dir()]
    if missing:
        fail(f"--data-dir {args.data_dir}: no {missing[0]} (the data of ../shared/data)")
    found = sorted(wheels.glob("*.whl"))
    if not found:
        fail(f"--wheels {args.wheels}: no wheels there (../shared/gpu-wheels)")
    if target.exists() and not (target / MARK).is_file():
        fail(f"--to {args.to}: exists and was not prepared by this script; give another folder")
    commit = git("rev-parse", "HEAD").strip()
    if git("status", "--porcelain", "--untracked-files=no").strip():
        print(f"gpu_session.py: uncommitted changes are not in the archive: it holds {commit[:12]}")
    shutil.rmtree(target, ignore_errors=True)
    with tempfile.TemporaryFile() as archive:
        subprocess.run(["git", "-C", str(REPO), "archive", "HEAD"], stdout=archive, check=True)
        archive.seek(0)
        with tarfile.open(fileobj=archive) as tar:
            tar.extractall(target / "project", filter="data")
    for dataset in DATASETS:
        shutil.copytree(data / dataset, target / "data" / dataset)
    (target / "wheels").mkdir()
    for wheel in found:
        shutil.copy2(wheel, target / "wheels")
    (target / MARK).write_text(commit + "\n", encoding="utf-8")
    size = sum(f.stat().st_size for f in target.rglob("*") if f.is_file()) / 2**20
    where = target.relative_to(REPO) if target.is_relative_to(REPO) else target
    print(
        f"{where}/: the project at {commit[:12]}, {', '.join(DATASETS)} data, {len(found)} wheels; "
        f"{size:.1f} MiB"
    )
    print(
        f'On the GPU machine, one call per part (device tool `run`, carry ["{where}"]), most important first:'
    )
    for part in PARTS:
        print(f"  python3 {where}/project/benchmarks/gpu_session.py run {part}    (timeout_s 360)")


def git(*command: str) -> str:
    return subprocess.run(
        ["git", "-C", str(REPO), *command], capture_output=True, text=True, check=True
    ).stdout


def run(args: argparse.Namespace) -> int:
    """One part of gpu_check.py with the prepared folder's packages and data; its exit status."""
    project = REPO  # this file's project: the prepared folder's copy on the GPU machine
    prepared = project.parent
    out = Path(args.out or os.environ.get("OUT") or fail("--out: give a folder for the logs (or set $OUT)"))
    if not (prepared / MARK).is_file():
        fail(f"run: {project} is not the copy `prepare` made (no {prepared / MARK}): run .gpu/project's copy")
    out.mkdir(parents=True, exist_ok=True)
    paths = [str(project)]
    if subprocess.run([sys.executable, "-c", "import pydantic, seqeval"], capture_output=True).returncode:
        site = Path(tempfile.gettempdir()) / "softfine-site"
        wheels = sorted(str(w) for w in (prepared / "wheels").glob("*.whl"))
        pip = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile"]
        subprocess.run([*pip, "--upgrade", "--target", str(site), *wheels], check=True)
        paths.insert(0, str(site))
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(paths + [p for p in [os.environ.get("PYTHONPATH")] if p]),
        "SOFTFINE_DATA_DIR": str(prepared / "data"),
        "PYTHONUNBUFFERED": "1",
        "HF_HUB_OFFLINE": "1",
    }
    commit = (prepared / MARK).read_text().strip()
    print(f"gpu_session.py: part {args.part} of gpu_check.py at commit {commit}", flush=True)
    check = [
        *(sys.executable, str(project / "benchmarks" / "gpu_check.py"), "--part", str(args.part)),
        *("--budget", str(args.budget), "--log", str(out / f"part{args.part}.log")),
        *("--json", str(out / f"part{args.part}.json"), *(["--smoke"] if args.smoke else [])),
    ]
    return subprocess.run(check, env=env).returncode


def seconds(text: str) -> float:
    """An argparse `type`: a number of seconds above 0 (softfine.script's is not importable yet)."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a number of seconds above 0 (got {text!r})")
    return value


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    verbs = parser.add_subparsers(dest="verb", required=True)
    ready = verbs.add_parser("prepare", help="write the folder the GPU machine gets (here)")
    ready.add_argument("--to", type=Path, default=REPO / ".gpu", help="the folder (default: .gpu)")
    ready.add_argument("--data-dir", type=Path, default=REPO.parent / "shared" / "data")
    ready.add_argument("--wheels", type=Path, default=REPO.parent / "shared" / "gpu-wheels")
    there = verbs.add_parser("run", help="run one part of gpu_check.py (there)")
    there.add_argument("part", type=int, choices=PARTS)
    there.add_argument(
        "--budget", type=seconds, default=270, help="seconds for the part's checks (default 270)"
    )
    there.add_argument("--out", help="the folder for the log and the rows (default: $OUT)")
    there.add_argument(
        "--smoke", action="store_true", help="gpu_check.py --smoke: on a CPU, measures nothing"
    )
    return parser


def main() -> None:
    args = parser().parse_args()
    if args.verb == "prepare":
        prepare(args)
    else:
        sys.exit(run(args))


if __name__ == "__main__":
    main()
