"""Resuming a stopped search: its record (how it was started), found and checked, and its flags."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from softfine_tune.cli import DEFAULT_STORAGE, RECORD, RESUME_OVERRIDES, Parser
from softfine_tune.space import SearchError
from softfine_tune.tracking import mask_credentials, without_credentials


def find_search(storage_path: str, which: str) -> Path:
    """The results folder of the search to resume: NAME or a path, or the latest with a record."""
    if which != "latest":
        for candidate in (Path(which), Path(storage_path) / which):
            if (candidate / RECORD).is_file():
                return candidate.resolve()
        raise SearchError(f"--resume {which}: no search record ({RECORD}) there or in {storage_path}")
    records = sorted(Path(storage_path).glob(f"*/{RECORD}"), key=lambda p: p.stat().st_mtime)
    if not records:
        raise SearchError(f"--resume: no search to resume in {storage_path} (pass --storage-path, or NAME)")
    return records[-1].parent


RECORD_KEYS = {"argv": list, "name": str, "mlflow_uri": str, "experiment_id": str, "parent_run_id": str,
               "stage": str}


def read_record(path: Path) -> dict:
    """A search record, checked: a damaged one is an error naming the file, not a traceback."""
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise SearchError(f"--resume: {path}: cannot read it ({err.strerror or err})") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise SearchError(f"--resume: {path}: not a search record (damaged: {err})") from None
    if not isinstance(record, dict):
        raise SearchError(f"--resume: {path}: not a search record (a JSON {type(record).__name__}, not an object)")
    for key, kind in RECORD_KEYS.items():
        strings = key != "argv" or all(isinstance(a, str) for a in record.get(key) or [])
        if not isinstance(record.get(key), kind) or not strings:
            raise SearchError(f"--resume: {path}: not a search record (key {key!r}: missing or not a "
                              f"{'list of strings' if kind is list else 'string'})")
    if record["stage"] not in ("search", "seeds", "done"):
        raise SearchError(f"--resume: {path}: not a search record (key 'stage': {record['stage']!r})")
    return record


def refuse_changes(args: argparse.Namespace, parser: Parser, record: dict) -> None:
    """A resumed search goes on with the flags it started with: any other flag given with --resume
    (a new grid, more epochs) is refused, naming each, rather than dropped without a word."""
    from softfine.cli import flag_names

    defaults = vars(parser.parse_args([]))
    given = [dest for dest, value in vars(args).items()
             if dest not in ("resume", *RESUME_OVERRIDES) and (dest not in defaults or defaults[dest] != value)]
    if given:
        names = flag_names(parser)
        flags = ", ".join(names.get(dest, (f"--{dest}",))[0] for dest in given)
        raise SearchError(f"--resume: {flags} would change the search, which goes on with the flags it started with "
                          f"({' '.join(record['argv'])}); leave {'it' if len(given) == 1 else 'them'} out, or start a "
                          "new search (another --name)")


def resume_args(args: argparse.Namespace, parser: Parser) -> tuple[argparse.Namespace, list[str], dict, Path]:
    """The flags of the search to resume (its record's), with those of RESUME_OVERRIDES given now."""
    storage = args.storage_path or str(DEFAULT_STORAGE)
    folder = find_search(storage, args.resume)
    record = read_record(folder / RECORD)
    refuse_changes(args, parser, record)
    overrides = {k: getattr(args, k) for k in RESUME_OVERRIDES if getattr(args, k, None)}
    parser.record = folder / RECORD
    try:
        resumed = parser.parse_args(record["argv"])
    finally:
        parser.record = None
    resumed.mlflow_uri = record["mlflow_uri"]  # resolved when the search started (the argv's may be relative)
    given = overrides.get("mlflow_uri")
    if given and without_credentials(given) != without_credentials(record["mlflow_uri"]):
        raise SearchError(f"--mlflow-uri {mask_credentials(given)}: this search logs to {record['mlflow_uri']}; "
                          "resume it with that store")
    for key, value in overrides.items():
        setattr(resumed, key, value)
    resumed.name, resumed.storage_path, resumed.resume = folder.name, str(folder.parent), None
    return resumed, record["argv"], record, folder
