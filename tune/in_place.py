"""A search restored where its folder now is: Ray Tune moves its trials there, but the Optuna study and
the experiment new trials are made from name the original folder, unless restored through these."""

from __future__ import annotations

import contextlib
import copy
import os
import sqlite3
import tempfile
from pathlib import Path

import optuna
from optuna.storages import RDBStorage
from ray.tune.search import SearchGenerator
from ray.tune.search.optuna import OptunaSearch

from .storage import open_path


@contextlib.contextmanager
def storage_opened_at(url: str):
    """While the block runs, an Optuna RDBStorage read back from a pickle opens `url`, not its own
    (Optuna's __setstate__ connects at once: into another search's study, or a folder gone)."""
    original = RDBStorage.__setstate__

    def setstate(self, state: dict) -> None:
        original(self, {**state, "url": url})

    RDBStorage.__setstate__ = setstate
    try:
        yield
    finally:
        RDBStorage.__setstate__ = original


class StudyInPlace(OptunaSearch):
    resumed_study: Path | None = None  # the optuna.db of the search folder being resumed
    snapshot_study: Path | None = None  # on a remote storage: the study copied into each snapshot of Ray's

    def restore(self, checkpoint_path: str) -> None:
        if self.resumed_study is None:
            super().restore(checkpoint_path)
            return
        url = f"sqlite:///{self.resumed_study}"
        with storage_opened_at(url):
            super().restore(checkpoint_path)
        saved = self._ot_study
        self._storage = optuna.storages.RDBStorage(url)
        self._ot_study = optuna.load_study(
            study_name=self._study_name, storage=self._storage, sampler=saved.sampler, pruner=saved.pruner
        )
        # The trials in flight report to their study's storage: the same trials (ids) of this copy's
        self._ot_trials = {
            key: optuna.trial.Trial(self._ot_study, trial._trial_id) for key, trial in self._ot_trials.items()
        }

    def save_to_dir(self, checkpoint_dir: str, session_str: str = "default") -> None:
        """The searcher's state, as Ray saves it with every snapshot; on a remote storage also a
        consistent copy of the study (SQLite's backup), put atomically in Ray's staging folder."""
        super().save_to_dir(checkpoint_dir, session_str)
        if self.snapshot_study is None or not self.snapshot_study.is_file():
            return
        target = Path(checkpoint_dir) / self.snapshot_study.name
        # Written beside the staging folder, not in it: Ray uploads whatever is in it at any time.
        fd, tmp = tempfile.mkstemp(prefix=".optuna-", suffix=".db", dir=Path(checkpoint_dir).parent)
        os.close(fd)
        try:
            with (
                contextlib.closing(sqlite3.connect(self.snapshot_study)) as source,
                contextlib.closing(sqlite3.connect(tmp)) as copy_,
            ):
                source.backup(copy_)
            os.replace(tmp, target)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)


class TrialsInPlace(SearchGenerator):
    """New trials go where the search's folder is now: the saved experiment they are made from
    gets the storage that Ray gives the restored trials (its _restore_trials does the same)."""

    resumed_at: tuple[str, str] | None = None  # (storage path or URI, experiment name) being resumed

    def set_state(self, state: dict) -> None:
        super().set_state(state)
        if self.resumed_at is None or self._experiment is None:
            return
        storage_path, name = self.resumed_at
        fs, fs_path = open_path(storage_path)
        storage = copy.copy(self._experiment.spec["storage"])
        storage.storage_filesystem, storage.storage_fs_path = fs, fs_path.rstrip("/")
        storage.experiment_dir_name = name
        self._experiment.spec["storage"] = storage
