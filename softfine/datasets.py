"""Where datasets live: the registry of known datasets (download.py fetches them), the data directory,
and a user's own files; `load_corpus` reads what a run trains and scores on.

The data directory holds a folder per dataset with the files under their original names (the
layout of the project's shared data): `weibo/weiboNER_2nd_conll.train`, `resume/train.char.bmes`,
`fine/train.json`, ... It is `--data-dir`, else `$SOFTFINE_DATA_DIR`, else a per-user cache
directory (`$XDG_CACHE_HOME/softfine/data`, default `~/.cache/softfine/data`).

A user's own data is `--dataset FOLDER` (files named train, dev or validation, and test, any
extension) or `--train-file/--validation-file/--test-file`, as Hugging Face's run_ner.py names
them; each file's format is detected from its content (formats.py), one format for all.
A built-in name wins over a folder of that name: write `./weibo` for the folder.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .data import Sentence, read_bmes, read_fine, read_weibo
from .errors import ConfigError, DataError
from .formats import FORMATS, detect_format, read_label_names, read_user_file
from .stats import unseen_categories

log = logging.getLogger(__name__)

SPLITS = ("train", "dev", "test")
USER_SPLITS = {
    "train": ("train",),
    "dev": ("dev", "validation"),
    "test": ("test",),
}  # file names, before a "."
FILE_FLAGS = {"train": "--train-file", "dev": "--validation-file", "test": "--test-file"}
LABEL_NAMES = "labels.txt"  # beside a file of integer tags: the tag names, one a line, in id order


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    files: dict[str, str]  # split -> file name inside the dataset's folder
    reader: Callable[..., list[Sentence]]
    origin: str | None  # base URL of the public origin; None: not freely downloadable
    sha256: dict[str, str] = field(default_factory=dict)  # pinned checksums, where known
    note: str = ""


DATASETS: dict[str, DatasetSpec] = {
    "weibo": DatasetSpec(
        "weibo",
        {s: f"weiboNER_2nd_conll.{s}" for s in SPLITS},
        read_weibo,
        "https://raw.githubusercontent.com/hltcoe/golden-horse/master/data",
        {
            "train": "4e8954c54ab33b0afc9a8abb85715c47422645cc6d1b49fdb24540f4a427e997",
            "dev": "e72730d83aac680505280b6301c879b3ba470d29ac308979d48cdc58ee4907cc",
            "test": "faaf6c0ebde5348b935cfd5c89f0f22c9e0779d60667d8b5efbc647b6707d50e",
        },
        "Weibo NER, revised 2nd release (Peng & Dredze 2015; He & Sun 2017)",
    ),
    "resume": DatasetSpec(
        "resume",
        {s: f"{s}.char.bmes" for s in SPLITS},
        read_bmes,
        "https://raw.githubusercontent.com/jiesutd/LatticeLSTM/master/ResumeNER",
        {
            "train": "93b9bb0be5dd4730121587f9dc1378de3fbbe55cba1c575edec271f822c27be7",
            "dev": "1b0d67153e6e8543e9444936ed1b107bd843078c282533898085e1a9aa293952",
            "test": "c4a9f42622819a4b59f66e184d446ebfa89b2f1dbba06e11d70675e59fe7e79b",
        },
        "Resume NER (Zhang & Yang 2018)",
    ),
    "ontonotes4": DatasetSpec(
        "ontonotes4",
        {s: f"{s}.char.bmes" for s in SPLITS},
        read_bmes,
        None,
        note="OntoNotes 4.0 (LDC2011T03) is licensed by the LDC: put its usual Chinese NER release "
        "(train/dev/test.char.bmes) into DATA_DIR/ontonotes4/ yourself",
    ),
    "fine": DatasetSpec(
        "fine",
        {s: f"{s}.json" for s in SPLITS},
        read_fine,
        "https://raw.githubusercontent.com/XpastaX/SoftFiNE/main/data/FiNE",
        # dev and test as published in the authors' repository (checked against its snapshot);
        # train.json has no pinned checksum yet: `data download fine --allow-unverified` only.
        {
            "dev": "8022fbf8794c56af98cebf1479d2dd3e2fddefb54376f7a41ab76ccbd3af4c19",
            "test": "1f13606e64bbef2f885691a5ad87d914f97873b8367b93efcf6b64f052e7145a",
        },
        "FiNE (Yang et al., ACL 2023)",
    ),
}


def get_spec(name: str) -> DatasetSpec:
    try:
        return DATASETS[name]
    except KeyError:
        raise DataError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}") from None


def data_dir(explicit: str | os.PathLike | None = None) -> Path:
    """`--data-dir`, else `$SOFTFINE_DATA_DIR`, else the per-user cache directory. An empty one is
    an error, not the next in line: the data would silently come from elsewhere."""
    if explicit is not None:
        if not str(explicit):
            raise DataError("--data-dir '': empty; give a directory or leave the flag out")
        return Path(explicit).expanduser()
    from_env = os.environ.get("SOFTFINE_DATA_DIR")
    if from_env is not None:
        if not from_env:
            raise DataError("$SOFTFINE_DATA_DIR is set but empty; give it a directory or unset it")
        return Path(from_env).expanduser()
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "softfine" / "data"


def dataset_files(
    name: str, directory: str | os.PathLike | None = None, splits: Sequence[str] = SPLITS
) -> dict[str, Path]:
    """Paths of the requested splits; a DataError names every one that is missing."""
    spec = get_spec(name)
    folder = data_dir(directory) / name
    paths = {split: folder / spec.files[split] for split in splits}
    missing = [str(p) for p in paths.values() if not p.is_file()]
    if missing:
        how = (f"run `softfine data download {name}`" if spec.origin else spec.note) or ""
        raise DataError(
            f"missing data file(s) for {name!r}: {', '.join(missing)} ({how}; "
            f"the data directory comes from --data-dir or $SOFTFINE_DATA_DIR)"
        )
    return paths


def read_split(
    name: str, split: str, directory: str | os.PathLike | None = None, strict: bool = False
) -> list[Sentence]:
    """A built-in dataset's split, by the rules of `on_problem`."""
    path = dataset_files(name, directory, [split])[split]
    return get_spec(name).reader(path, on_problem=on_problem(split, strict))


def available_splits(name: str, directory: str | os.PathLike | None = None) -> list[str]:
    spec = get_spec(name)
    folder = data_dir(directory) / name
    return [s for s in SPLITS if (folder / spec.files[s]).is_file()]


def on_problem(split: str, strict: bool) -> str:
    """An unreadable sentence is skipped in train and an error in dev and test, whose sentences are
    all scored; `strict` makes every problem an error (data.py)."""
    if strict:
        return "error"
    return "skip" if split == "train" else "refuse"


# ---------------------------------------------------------------------------------------------
# A run's data: a built-in dataset or the user's files (`Source`), read once (`Corpus`).


@dataclass(frozen=True)
class Source:
    """Where a run's data comes from: its name, the file of each split there is, and their format
    (a built-in dataset's name, or a FORMATS key)."""

    name: str
    files: dict[str, Path]
    format: str
    builtin: bool
    tag_scheme: str | None = None

    def read(self, split: str, strict: bool) -> list[Sentence]:
        path, rule = self.files[split], on_problem(split, strict)
        if self.builtin:
            return get_spec(self.name).reader(path, on_problem=rule)
        names = path.parent / LABEL_NAMES
        label_names = read_label_names(names) if self.format == "tokens" and names.is_file() else None
        try:
            return read_user_file(path, self.format, self.tag_scheme, label_names, rule)
        except DataError as err:  # which reader the content chose, with its line
            raise DataError(f"{err} [read as {FORMATS[self.format]}, detected from its content]") from None

    def describe(self, split: str) -> str:
        return self.name if self.builtin else f"{self.files[split]} ({FORMATS[self.format]})"


def is_folder(dataset: str) -> bool:
    """A --dataset value names a folder (not a built-in dataset) when it is not a built-in name."""
    return dataset not in DATASETS


def dataset_name(config) -> str:
    """The name a run's data goes by (MLflow's experiment and model names): the built-in name, the
    folder's, or the folder of --train-file (else that file's name)."""
    if config.dataset is not None:
        return config.dataset if not is_folder(config.dataset) else Path(config.dataset).resolve().name
    path = Path(config.train_file or config.validation_file or config.test_file).resolve()
    return path.parent.name or path.stem


def data_source(config) -> Source:
    """The data a config names, its files found and their format detected; a DataError names what
    is missing, ambiguous or mixed."""
    if config.dataset is not None and not is_folder(config.dataset):
        name = config.dataset
        spec = get_spec(name)
        folder = data_dir(config.data_dir) / name
        files = {s: folder / spec.files[s] for s in SPLITS if (folder / spec.files[s]).is_file()}
        if not files:
            dataset_files(name, config.data_dir)  # raises, naming the missing files
        return Source(name, files, name, True)
    if config.dataset is not None:
        files = folder_files(Path(config.dataset).expanduser())
    else:
        given = {"train": config.train_file, "dev": config.validation_file, "test": config.test_file}
        files = {split: Path(path).expanduser() for split, path in given.items() if path is not None}
        for split, path in files.items():
            if not path.is_file():
                raise DataError(f"{FILE_FLAGS[split]} {path}: no such data file")
    formats = {split: detect_format(path) for split, path in files.items()}
    if len(set(formats.values())) > 1:
        mixed = ", ".join(f"{files[s].name} is {FORMATS[f]}" for s, f in formats.items())
        raise DataError(
            f"{files[next(iter(files))].parent}: the splits mix formats ({mixed}); give every split "
            "in one format"
        )
    return Source(dataset_name(config), files, next(iter(formats.values())), False, config.tag_scheme)


def folder_files(folder: Path) -> dict[str, Path]:
    """The split files of a user's folder: train, dev or validation, and test, any extension."""
    if not folder.is_dir():
        what = "not a folder" if folder.exists() else "no such folder"
        raise DataError(
            f"--dataset {folder}: {what}; give a built-in dataset ({', '.join(DATASETS)}) or a folder "
            "holding train, dev (or validation) and test files"
        )
    files = {}
    for split, stems in USER_SPLITS.items():
        found = sorted(p for p in folder.iterdir() if p.is_file() and p.name.split(".")[0] in stems)
        if len(found) > 1:
            raise DataError(
                f"--dataset {folder}: {' and '.join(p.name for p in found)} are all {split} files; keep one"
            )
        if found:
            files[split] = found[0]
    if "train" not in files:
        held = ", ".join(sorted(p.name for p in folder.iterdir())[:8]) or "nothing"
        raise DataError(
            f"--dataset {folder}: no training file (train, train.json, train.txt, ...); it holds {held}"
        )
    return files


@dataclass
class Corpus:
    """A run's sentences, each split read and checked once: what `train_group` trains and scores
    on, and what the search's driver sends to its trials (no trial reads a file)."""

    name: str
    splits: dict[str, list[Sentence]]
    files: dict[
        str, dict
    ]  # split -> {"path", "sha256", "format", "sentences"} (and "carved" for a carved dev)
    sha256: str  # over the files, in split order: what a run's results say they came from
    unseen: dict[str, dict[str, int]]  # data.unseen_categories


def load_corpus(config, splits: Sequence[str] | None = None) -> Corpus:
    """The splits a run reads (default: train, dev and, where there is one, test) by the rules of
    `on_problem`; a dev split carved from train with `dev_fraction`; the limits applied last."""
    source = data_source(config)
    wanted = (
        list(splits)
        if splits is not None
        else ["train", "dev"] + (["test"] if "test" in source.files else [])
    )
    carve = "dev" in wanted and "dev" not in source.files and config.dev_fraction is not None
    if config.dev_fraction is not None and "dev" in source.files:
        raise ConfigError(
            f"--dev-fraction {config.dev_fraction:g}: {source.describe('dev')} is the dev split; "
            "leave --dev-fraction out"
        )
    for split in dict.fromkeys(wanted + (["train"] if carve else [])):
        if split not in source.files and not (split == "dev" and carve):
            raise missing_split(source, split, config)
    read = {
        split: source.read(split, config.strict)
        for split in SPLITS
        if split in source.files and (split in wanted or (carve and split == "train"))
    }
    files = {
        split: {
            "path": str(source.files[split].resolve()),
            "sha256": sha256_of([source.files[split]]),
            "format": source.format,
            "sentences": len(read[split]),
        }
        for split in read
    }
    if carve:
        read["train"], read["dev"] = carve_dev(read["train"], config.dev_fraction, config.dev_seed)
        files["dev"] = {
            **files["train"],
            "sentences": len(read["dev"]),
            "carved": f"{config.dev_fraction:g} of train, seed {config.dev_seed}",
        }
        files["train"]["sentences"] = len(read["train"])
        log.warning(
            "%s: no dev split; carved %d of its %d training sentences as dev (--dev-fraction %g, "
            "--dev-seed %d); train keeps %d",
            source.describe("train"),
            len(read["dev"]),
            len(read["dev"]) + len(read["train"]),
            config.dev_fraction,
            config.dev_seed,
            len(read["train"]),
        )
    if "train" in read and config.limit_train:
        read["train"] = read["train"][: config.limit_train]
    for split in ("dev", "test"):
        if split in read and config.limit_eval:
            read[split] = read[split][: config.limit_eval]
    read = {split: read[split] for split in SPLITS if split in read and split in wanted}
    unseen = unseen_categories(read) if "train" in read else {}
    paths = list(dict.fromkeys(source.files[s] for s in SPLITS if s in source.files and s in files))
    return Corpus(source.name, read, {s: files[s] for s in read}, sha256_of(paths), unseen)


def report_unseen(corpus: Corpus) -> None:
    """A warning per split holding gold entities of categories that train never has."""
    for split, counts in corpus.unseen.items():
        log.warning(
            "%s %s: %d gold entities of %d categories that train never has (%s): scored, and missed unless "
            "a model finds them anyway",
            corpus.name,
            split,
            sum(counts.values()),
            len(counts),
            ", ".join(f"{c} {n}" for c, n in counts.items()),
        )


def missing_split(source: Source, split: str, config) -> DataError:
    if source.builtin:
        dataset_files(source.name, config.data_dir, [split])  # raises, naming the file and how to get it
    if config.dataset is None:
        return DataError(
            f"{FILE_FLAGS[split]}: no {split} file given"
            + ("; give one, or --dev-fraction F to carve a dev split from train" if split == "dev" else "")
        )
    stems = " or ".join(USER_SPLITS[split])
    return DataError(
        f"--dataset {config.dataset}: no {split} file ({stems}, any extension)"
        + ("; add one, or pass --dev-fraction F to carve a dev split from train" if split == "dev" else "")
    )


def carve_dev(train: list[Sentence], fraction: float, seed: int) -> tuple[list[Sentence], list[Sentence]]:
    """(train, dev): a `fraction` of the training sentences (at least one, one left), drawn with
    `seed`, as dev; both keep the file's order."""
    import random

    if len(train) < 2:
        raise DataError(
            f"--dev-fraction {fraction:g}: {len(train)} training sentence(s), too few to carve a dev split"
        )
    size = min(max(1, round(fraction * len(train))), len(train) - 1)
    chosen = set(random.Random(seed).sample(range(len(train)), size))
    return (
        [s for i, s in enumerate(train) if i not in chosen],
        [s for i, s in enumerate(train) if i in chosen],
    )


def sha256_of(paths: Sequence[Path]) -> str:
    """One checksum over the given files (in order), for run records."""
    digest = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()
