"""Resuming a stopped search: its record (how it was started), found and checked, and its flags."""

from __future__ import annotations

import argparse
from pathlib import Path

from .cli import DEFAULT_STORAGE, RECORD, RESUME_OVERRIDES, Parser
from .record import SearchRecord
from .space import SearchError
from .storage import Storage, is_remote
from .tracking import mask_credentials, without_credentials


def find_search(storage: Storage, which: str) -> tuple[Storage, str]:
    """The storage and name of the search to resume: NAME in --storage-path, a results folder (or
    URI/NAME), or the latest search there with a record."""
    if which != "latest":
        candidates = [(storage, which)]
        if is_remote(which):
            parent, _, name = which.rstrip("/").rpartition("/")
            remote = Storage(parent)
            remote.check()  # it answers, with credentials (one line naming the flag otherwise)
            candidates.insert(0, (remote, name))
        elif (Path(which) / RECORD).is_file():
            folder = Path(which).resolve()
            candidates.insert(0, (Storage(str(folder.parent)), folder.name))
        for where, name in candidates:
            if name and "/" not in name and where.exists(name, RECORD):
                return where, name
        raise SearchError(f"--resume {which}: no search record ({RECORD}) there or in {storage}")
    records = sorted(storage.searches_with(RECORD))
    if not records:
        raise SearchError(f"--resume: no search to resume in {storage} (pass --storage-path, or NAME)")
    return storage, records[-1][1]


def refuse_changes(args: argparse.Namespace, parser: Parser, record: SearchRecord) -> None:
    """A flag given with --resume but RESUME_OVERRIDES (a new grid, more epochs) is refused, naming each."""
    from softfine.arguments import flag_names

    defaults = vars(parser.parse_args([]))
    given = [
        dest
        for dest, value in vars(args).items()
        if dest not in ("resume", *RESUME_OVERRIDES) and (dest not in defaults or defaults[dest] != value)
    ]
    if given:
        names = flag_names(parser)
        flags = ", ".join(names.get(dest, (f"--{dest}",))[0] for dest in given)
        raise SearchError(
            f"--resume: {flags} would change the search, which goes on with the flags it started with "
            f"({' '.join(record.argv)}); leave {'it' if len(given) == 1 else 'them'} out, or start a "
            "new search (another --name)"
        )


def resume_args(args: argparse.Namespace, parser: Parser) -> tuple[argparse.Namespace, SearchRecord, str]:
    """The flags of the search to resume (its record's), with those of RESUME_OVERRIDES given now;
    its record; where the search is (a folder, or URI/NAME)."""
    given = Storage(args.storage_path or str(DEFAULT_STORAGE))
    given.check()  # a remote one: it answers, with credentials (one line naming the flag otherwise)
    storage, name = find_search(given, args.resume)
    record = SearchRecord.read(storage, name)
    refuse_changes(args, parser, record)
    parser.record = f"{storage.location(name)}/{RECORD}"
    try:
        resumed = parser.parse_args(record.argv)
    finally:
        parser.record = None
    resumed.mlflow_uri = record.mlflow_uri  # resolved when the search started (the argv's may be relative)
    uri = args.mlflow_uri
    if uri and without_credentials(uri) != without_credentials(record.mlflow_uri):
        raise SearchError(
            f"--mlflow-uri {mask_credentials(uri)}: this search logs to {record.mlflow_uri}; "
            "resume it with that store"
        )
    for key in RESUME_OVERRIDES:  # those given now replace the record's
        setattr(resumed, key, getattr(args, key) or getattr(resumed, key))
    resumed.name, resumed.storage_path, resumed.resume = name, str(storage), None
    return resumed, record, storage.location(name)
