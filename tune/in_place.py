"""A search restored where its folder now is: a copied or moved search folder resumes in place.

Ray Tune restores its trials' storage to the folder it is given, but two parts of a search's
saved state name the folder it had when the search started, by absolute path: the Optuna study's
storage (OptunaSearch saves its whole state) and the experiment from which the searcher makes new
trials (SearchGenerator's state). A resumed copy would write its study, and the trials it had not
started yet, into the original's folder. Restored through these classes, both are the folder
resumed: the driver sets it (tuner.make_tuner) before it restores.
"""

from __future__ import annotations

import copy
from pathlib import Path

import optuna
from ray.tune.search import SearchGenerator
from ray.tune.search.optuna import OptunaSearch


class StudyInPlace(OptunaSearch):
    resumed_study: Path | None = None  # the optuna.db of the search folder being resumed

    def restore(self, checkpoint_path: str) -> None:
        super().restore(checkpoint_path)
        if self.resumed_study is None:
            return
        storage = optuna.storages.RDBStorage(f"sqlite:///{self.resumed_study}")
        self._storage = storage
        self._ot_study = optuna.load_study(study_name=self._study_name, storage=storage,
                                           sampler=self._ot_study.sampler, pruner=self._ot_study.pruner)
        # The trials in flight report to their study's storage: the same trials (ids) of this copy's
        self._ot_trials = {key: optuna.trial.Trial(self._ot_study, trial._trial_id)
                           for key, trial in self._ot_trials.items()}


class TrialsInPlace(SearchGenerator):
    """New trials go where the search's folder is now: the saved experiment they are made from
    gets the storage that Ray gives the restored trials (its _restore_trials does the same)."""

    resumed_folder: Path | None = None  # the search folder being resumed

    def set_state(self, state: dict) -> None:
        super().set_state(state)
        if self.resumed_folder is None or self._experiment is None:
            return
        storage = copy.copy(self._experiment.spec["storage"])
        storage.storage_fs_path = str(self.resumed_folder.parent)
        storage.experiment_dir_name = self.resumed_folder.name
        self._experiment.spec["storage"] = storage
