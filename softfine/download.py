"""`softfine data download`: a built-in dataset's files from their public origin (or a mirror),
each checked against its pinned SHA-256 before it replaces anything."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence
from pathlib import Path

from .datasets import SPLITS, data_dir, get_spec, sha256_of
from .errors import DataError

log = logging.getLogger(__name__)


def download(
    name: str,
    directory: str | os.PathLike | None = None,
    *,
    mirror: str | None = None,
    splits: Sequence[str] = SPLITS,
    force: bool = False,
    allow_unverified: bool = False,
    timeout: float = 60.0,
) -> dict[str, Path]:
    """Fetch a dataset's files from its public origin (or a mirror with the data-dir layout).

    Each file is checked against its pinned SHA-256 before it is moved into place, so a failed
    or tampered download never replaces good data. Files already present and valid are kept. A
    file without a pinned checksum is refused unless `allow_unverified`, and then saved with a
    warning that prints its checksum.
    """
    spec = get_spec(name)
    base = download_base(name, spec, mirror)
    unpinned = [spec.files[s] for s in splits if s not in spec.sha256]
    if unpinned and not allow_unverified:
        raise DataError(
            f"{name}: no pinned checksum for {', '.join(unpinned)}, so it cannot be verified; "
            "pass --allow-unverified to save it anyway, or --split to leave it out"
        )
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
        fetched[split] = fetch_file(f"{base}/{spec.files[split]}", target, expected, timeout)
    return fetched


def download_base(name: str, spec, mirror: str | None) -> str:
    """Where a dataset's files are fetched from: the mirror's folder of the dataset, or its origin."""
    if mirror:
        try:
            parts = urllib.parse.urlsplit(mirror)
        except ValueError as err:
            raise DataError(f"--mirror {mirror}: not a URL ({err})") from None
        if parts.scheme not in ("http", "https", "file") or not (parts.netloc or parts.scheme == "file"):
            raise DataError(
                f"--mirror {mirror}: not a URL; give http://HOST/PATH, https://HOST/PATH or "
                "file:///FOLDER (laid out as MIRROR/NAME/FILE)"
            )
        return f"{mirror.rstrip('/')}/{name}"
    if spec.origin:
        return spec.origin
    raise DataError(f"{name!r} has no public origin to download from: {spec.note}")


def fetch_file(url: str, target: Path, expected: str | None, timeout: float) -> Path:
    """`url` into `target` through a temporary file beside it, moved into place only once its
    SHA-256 is `expected` (None: unverified, with a warning)."""
    log.info("downloading %s", url)
    with tempfile.NamedTemporaryFile(dir=target.parent, delete=False, suffix=".part") as tmp:
        try:
            with urllib.request.urlopen(url, timeout=timeout) as response:
                shutil.copyfileobj(response, tmp)
        except (urllib.error.URLError, OSError, ValueError) as err:  # ValueError: a URL urllib cannot read
            Path(tmp.name).unlink(missing_ok=True)
            raise DataError(f"{url}: download failed ({err})") from None
    got = sha256_of([Path(tmp.name)])
    if expected and got != expected:
        Path(tmp.name).unlink(missing_ok=True)
        raise DataError(
            f"{url}: checksum mismatch (sha256 {got}, expected {expected}); nothing was written to {target}"
        )
    if not expected:
        log.warning("%s: UNVERIFIED (no pinned checksum; --allow-unverified): its sha256 is %s", url, got)
    os.replace(tmp.name, target)
    return target
