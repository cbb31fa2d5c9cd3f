"""What the project's scripts (benchmarks/) share with the `softfine` command: flags checked as
argparse parses them, and a problem the user can fix ended as one line, `SCRIPT: error: ...` on
stderr with exit status 2 and no traceback (a bad flag with argparse's usage above it)."""

from __future__ import annotations

import argparse
import math
import re
from collections.abc import Callable, Sequence

from .errors import SoftFiNEError


def integer(low: int, high: int | None = None) -> Callable[[str], int]:
    """An argparse `type`: an integer from `low` (to `high`, inclusive)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer (got {text!r})") from None
        if value < low or (high is not None and value > high):
            wanted = f"{low} to {high}" if high is not None else f"{low} or more"
            raise argparse.ArgumentTypeError(f"expected {wanted} (got {value})")
        return value

    return parse


def number(low: float = 0.0, above: bool = True) -> Callable[[str], float]:
    """An argparse `type`: a finite number above `low` (or at least `low`, with above=False)."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number (got {text!r})") from None
        if not math.isfinite(value) or value < low or (above and value == low):
            wanted = f"a number above {low:g}" if above else f"a number of {low:g} or more"
            raise argparse.ArgumentTypeError(f"expected {wanted} (got {text})")
        return value

    return parse


def run_script(
    parser: argparse.ArgumentParser,
    main: Callable[[argparse.Namespace], None],
    argv: Sequence[str] | None = None,
) -> None:
    """Parses the flags and runs `main(args)`. A SoftFiNEError (a bad value, missing data, no CUDA
    device) ends the script as it ends the softfine command: `PROG: error: ...`, exit status 2."""
    args = parser.parse_args(argv)
    try:
        main(args)
    except SoftFiNEError as err:
        parser.exit(2, f"{parser.prog}: error: {err}\n")


def check_data(dataset: str, data_dir: str | None) -> None:
    """The files of `--dataset` are where it and `--data-dir` say (else a DataError or ConfigError
    naming the flag): what a script checks before it starts runs that would each fail on them."""
    from .config import make_config
    from .datasets import data_source

    data_source(make_config(dict(dataset=dataset, data_dir=data_dir)))


def relay_error(stderr: str) -> str | None:
    """The message of a child's one-line error (`PROG: error: MESSAGE`, as softfine, tune/search.py
    and these scripts end), if its stderr ends with one: what a script that ran it reports, instead
    of the child's whole output."""
    last = (stderr.strip().splitlines() or [""])[-1]
    found = re.match(r"\S+: error: (.+)", last)
    return found.group(1) if found else None


def error_line(stderr: str) -> str:
    """What went wrong, in one line of a child's stderr: its one-line error (relay_error), else the
    exception line of its last traceback (torch's errors add hint lines after it), else its last line."""
    relayed = relay_error(stderr)
    if relayed:
        return relayed
    lines = stderr.rstrip().splitlines()
    tracebacks = [i for i, line in enumerate(lines) if line.startswith("Traceback (most recent call last)")]
    for line in lines[tracebacks[-1] + 1 :] if tracebacks else []:
        if re.match(r"[A-Za-z_][\w.]*(:|$)", line):  # unindented, after the frames: the exception
            return line.strip()
    return next((line.strip() for line in reversed(lines) if line.strip()), "no output")
