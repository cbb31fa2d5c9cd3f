"""The search's record (cli.RECORD, beside its files): how the search was started and how far it got,
all that --resume needs to go on with it."""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING

from .cli import RECORD
from .space import SearchError
from .storage import SearchFiles, Storage, write_json

if TYPE_CHECKING:
    from .plan import Plan

# The keys a record cannot go on without, and their types (`read` refuses a record without them).
REQUIRED = dict(argv=list, name=str, mlflow_uri=str, experiment_id=str, parent_run_id=str, stage=str)


def recorded_settings(plan: Plan) -> dict:
    """What a resume must not read again (a preset or data changed meanwhile would change the search
    under its trials): the resolved grid and training settings, the data's checksum."""
    return {
        "grid": plan.grid.describe(),
        "base": dataclasses.asdict(plan.base),
        "preset": plan.preset["path"],
        "paper_selection": plan.preset.get("paper_selection"),
        "data_sha256": plan.corpus.sha256,
    }


@dataclasses.dataclass(kw_only=True)
class SearchRecord:
    """The record's keys, in the file's order; None: not recorded (a record of an older search)."""

    argv: list[str] = dataclasses.field(default_factory=list)  # the search's flags, credentials masked
    name: str = ""
    created: float | None = None
    mlflow_uri: str = ""  # as shown: credentials masked
    experiment_id: str = ""
    experiment_name: str | None = None
    fuse: int | None = None  # the most grid points per trial, --fuse auto resolved
    parent_run_id: str = ""
    code: dict | None = None  # runs.git_version()
    mode: str | None = None  # Plan.mode
    stage: str = "search"  # "search", "seeds" (the selection's seeds) or "done"
    grid: dict | None = None  # grid to data_sha256: recorded_settings
    base: dict | None = None
    preset: str | None = None
    paper_selection: dict | None = None  # null in the file where the preset has none
    data_sha256: str | None = None
    selected: dict | None = None  # the point the seeds run
    summary: dict | None = None

    @classmethod
    def start(cls, plan: Plan, experiment_id: str, parent_run_id: str, code: dict) -> SearchRecord:
        """A new search's record, once its parent run exists."""
        return cls(
            **{key: getattr(plan, key) for key in ("argv", "name", "experiment_name", "fuse", "mode")},
            created=time.time(),
            mlflow_uri=plan.tracking.display,
            experiment_id=experiment_id,
            parent_run_id=parent_run_id,
            code=code,
            stage="seeds" if plan.mode == "seeds" else "search",
            **recorded_settings(plan),
        )

    def to_seeds(self, selected: dict, files: SearchFiles) -> None:
        """The search phase ended with `selected` (its point), which the seeds phase runs next."""
        self.stage, self.selected = "seeds", selected
        self.save(files)

    def done(self, summary: dict, files: SearchFiles) -> None:
        """The search ended: a resume prints its summary."""
        self.stage, self.summary = "done", summary
        self.save(files)

    def save(self, files: SearchFiles) -> None:
        """Written to the search's (working) folder, then pushed beside its files."""
        # None: not recorded; but the preset's paper selection, which it may lack (null beside the grid)
        data = {
            k: v for k, v in vars(self).items() if v is not None or (k == "paper_selection" and self.base)
        }
        write_json(files.folder / RECORD, data)
        files.push(RECORD)

    @classmethod
    def of(cls, data: Mapping) -> SearchRecord:
        """From the file's keys (those it does not know are left out), unchecked."""
        return cls(**{f.name: data[f.name] for f in dataclasses.fields(cls) if f.name in data})

    @classmethod
    def read(cls, storage: Storage, name: str) -> SearchRecord:
        """The record of search `name` in `storage`, checked: a damaged one is an error naming the
        file, not a traceback."""
        path = f"{storage.location(name)}/{RECORD}"
        damaged = f"--resume: {path}: not a search record"
        try:
            data = storage.read_bytes(name, RECORD)
            if data is None:
                raise FileNotFoundError(2, "no such file")
            record = json.loads(data.decode("utf-8"))
        except OSError as err:
            raise SearchError(f"--resume: {path}: cannot read it ({err.strerror or err})") from None
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise SearchError(f"{damaged} (damaged: {err})") from None
        if not isinstance(record, dict):
            raise SearchError(f"{damaged} (a JSON {type(record).__name__}, not an object)")
        for key, kind in REQUIRED.items():
            strings = key != "argv" or all(isinstance(a, str) for a in record.get(key) or [])
            if not isinstance(record.get(key), kind) or not strings:
                wanted = "list of strings" if kind is list else "string"
                raise SearchError(f"{damaged} (key {key!r}: missing or not a {wanted})")
        if record["stage"] not in ("search", "seeds", "done"):
            raise SearchError(f"{damaged} (key 'stage': {record['stage']!r})")
        if "base" in record and not isinstance(record["base"], dict):
            raise SearchError(
                "--resume: the search record's 'base' is not a mapping of settings; the record is damaged"
            )
        return cls.of(record)
