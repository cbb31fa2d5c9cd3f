"""Where datasets live: the registry of known datasets, the data directory, and the downloader.

The data directory holds a folder per dataset with the files under their original names (the
layout of the project's shared data): `weibo/weiboNER_2nd_conll.train`, `resume/train.char.bmes`,
`fine/train.json`, ... It is `--data-dir`, else `$SOFTFINE_DATA_DIR`, else a per-user cache
directory (`$XDG_CACHE_HOME/softfine/data`, default `~/.cache/softfine/data`).
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from .data import Sentence, read_bmes, read_fine, read_weibo
from .errors import DataError

log = logging.getLogger(__name__)

SPLITS = ("train", "dev", "test")


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    files: dict[str, str]  # split -> file name inside the dataset's folder
    reader: Callable[..., list[Sentence]]
    label_separator: str | None  # splits a category into hierarchy levels; None: one level
    origin: str | None  # base URL of the public origin; None: not freely downloadable
    sha256: dict[str, str] = field(default_factory=dict)  # pinned checksums, where known
    note: str = ""


DATASETS: dict[str, DatasetSpec] = {
    "weibo": DatasetSpec(
        "weibo",
        {s: f"weiboNER_2nd_conll.{s}" for s in SPLITS},
        read_weibo,
        None,  # PER.NAM could be split on "." (--label-separator .), which the paper did not try
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
        None,
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
        None,
        note="OntoNotes 4.0 (LDC2011T03) is licensed by the LDC: put its usual Chinese NER release "
             "(train/dev/test.char.bmes) into DATA_DIR/ontonotes4/ yourself",
    ),
    "fine": DatasetSpec(
        "fine",
        {s: f"{s}.json" for s in SPLITS},
        read_fine,
        "/",
        "https://raw.githubusercontent.com/XpastaX/SoftFiNE/main/data/FiNE",
        # dev and test as published in the authors' repository (checked against its snapshot);
        # train.json has no pinned checksum yet: `data download fine --allow-unverified` only.
        {"dev": "8022fbf8794c56af98cebf1479d2dd3e2fddefb54376f7a41ab76ccbd3af4c19",
         "test": "1f13606e64bbef2f885691a5ad87d914f97873b8367b93efcf6b64f052e7145a"},
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


def dataset_files(name: str, directory: str | os.PathLike | None = None,
                  splits: Sequence[str] = SPLITS) -> dict[str, Path]:
    """Paths of the requested splits; a DataError names every one that is missing."""
    spec = get_spec(name)
    folder = data_dir(directory) / name
    paths = {split: folder / spec.files[split] for split in splits}
    missing = [str(p) for p in paths.values() if not p.is_file()]
    if missing:
        how = (f"run `softfine data download {name}`" if spec.origin else spec.note) or ""
        raise DataError(f"missing data file(s) for {name!r}: {', '.join(missing)} ({how}; "
                        f"the data directory comes from --data-dir or $SOFTFINE_DATA_DIR)")
    return paths


def read_split(name: str, split: str, directory: str | os.PathLike | None = None,
               strict: bool = False) -> list[Sentence]:
    """A split's sentences. An unreadable sentence is skipped in train and an error in dev and
    test, whose sentences are all scored; `strict` makes every problem an error (data.py)."""
    path = dataset_files(name, directory, [split])[split]
    on_problem = "error" if strict else ("skip" if split == "train" else "refuse")
    return get_spec(name).reader(path, on_problem=on_problem)


def available_splits(name: str, directory: str | os.PathLike | None = None) -> list[str]:
    spec = get_spec(name)
    folder = data_dir(directory) / name
    return [s for s in SPLITS if (folder / spec.files[s]).is_file()]


def sha256_of(paths: Sequence[Path]) -> str:
    """One checksum over the given files (in order), for run records."""
    digest = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def download(name: str, directory: str | os.PathLike | None = None, *, mirror: str | None = None,
             splits: Sequence[str] = SPLITS, force: bool = False, allow_unverified: bool = False,
             timeout: float = 60.0) -> dict[str, Path]:
    """Fetch a dataset's files from its public origin (or a mirror with the data-dir layout).

    Each file is checked against its pinned SHA-256 before it is moved into place, so a failed
    or tampered download never replaces good data. Files already present and valid are kept. A
    file without a pinned checksum is refused unless `allow_unverified`, and then saved with a
    warning that prints its checksum.
    """
    spec = get_spec(name)
    if mirror:
        try:
            parts = urllib.parse.urlsplit(mirror)
        except ValueError as err:
            raise DataError(f"--mirror {mirror}: not a URL ({err})") from None
        if parts.scheme not in ("http", "https", "file") or not (parts.netloc or parts.scheme == "file"):
            raise DataError(f"--mirror {mirror}: not a URL; give http://HOST/PATH, https://HOST/PATH or "
                            "file:///FOLDER (laid out as MIRROR/NAME/FILE)")
        base = f"{mirror.rstrip('/')}/{name}"
    elif spec.origin:
        base = spec.origin
    else:
        raise DataError(f"{name!r} has no public origin to download from: {spec.note}")
    unpinned = [spec.files[s] for s in splits if s not in spec.sha256]
    if unpinned and not allow_unverified:
        raise DataError(f"{name}: no pinned checksum for {', '.join(unpinned)}, so it cannot be verified; "
                        "pass --allow-unverified to save it anyway, or --split to leave it out")
    folder = data_dir(directory) / name
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise DataError(f"--data-dir: cannot create {folder} ({err.strerror})") from None
    fetched = {}
    for split in splits:
        target = folder / spec.files[split]
        expected = spec.sha256.get(split)
        if target.is_file() and not force and (expected is None or sha256_of([target]) == expected):
            log.info("%s: already present", target)
            fetched[split] = target
            continue
        url = f"{base}/{spec.files[split]}"
        log.info("downloading %s", url)
        with tempfile.NamedTemporaryFile(dir=folder, delete=False, suffix=".part") as tmp:
            try:
                with urllib.request.urlopen(url, timeout=timeout) as response:
                    shutil.copyfileobj(response, tmp)
            except (urllib.error.URLError, OSError, ValueError) as err:  # ValueError: a URL urllib cannot read
                Path(tmp.name).unlink(missing_ok=True)
                raise DataError(f"{url}: download failed ({err})") from None
        got = sha256_of([Path(tmp.name)])
        if expected and got != expected:
            Path(tmp.name).unlink(missing_ok=True)
            raise DataError(f"{url}: checksum mismatch (sha256 {got}, expected {expected}); "
                            f"nothing was written to {target}")
        if not expected:
            log.warning("%s: UNVERIFIED (no pinned checksum; --allow-unverified): its sha256 is %s", url, got)
        os.replace(tmp.name, target)
        fetched[split] = target
    return fetched
