"""Where a search's files live (--storage-path): a folder, or a URI pyarrow opens (s3://BUCKET/PREFIX),
the search's own files beside Ray Tune's; on a URI, worked on in a local copy, uploaded as they change."""

from __future__ import annotations

import fnmatch
import json
import os
import posixpath
import re
import urllib.parse
import uuid
from pathlib import Path

import pyarrow.fs

from softfine.errors import first_line

from .space import SearchError

# The search's own files in its folder (Ray's are its experiment_state-*.json, searcher-state-*,
# callback-states-*, tuner.pkl and the trial folders). The Optuna study during a search phase
# reaches a remote storage with Ray's own snapshots (in_place.StudyInPlace.save_to_dir).
OWN_FILES = ("softfine_search.json", "optuna.db", "mlflow_runs.*.json", "mlflow_unlogged.*.jsonl")
OWN_FILES += ("summary.json", "trials.csv", "*.png")
BUCKETS = ("s3", "gs", "gcs")  # schemes whose URI's first path part is a bucket that must exist
LOCK = ".softfine_search.lock"  # in the search's folder (and the working folder): held by its driver
HOW = (
    "the endpoint and credentials come from the environment, as AWS tools take them: AWS_ENDPOINT_URL, "
    "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, AWS_PROFILE, an instance role"
)


def is_remote(path: str) -> bool:
    """A URI other than file://: Ray Tune and the search reach it through pyarrow.fs."""
    return "://" in path and not path.startswith("file://")


class Storage:
    """--storage-path: a local folder (`local`) or a remote URI (`uri`), checked by `check`."""

    def __init__(self, given: str):
        self.given = given
        self.remote = is_remote(given)
        if self.remote:
            self.uri, self.local = given.rstrip("/"), None
        else:
            path = urllib.parse.urlsplit(given).path if given.startswith("file://") else given
            self.uri, self.local = None, Path(path).expanduser().resolve()
        self._fs = None
        self._base = ""

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_fs": None}  # no file system (and none of its settings) in a pickle

    def __str__(self) -> str:
        return self.uri if self.remote else str(self.local)

    @property
    def ray_path(self) -> str:  # RunConfig(storage_path=...)
        return str(self)

    def location(self, name: str) -> str:
        """The search's folder as shown and stored: a path, or URI/NAME."""
        return f"{self.uri}/{name}" if self.remote else str(self.local / name)

    def work_folder(self, name: str) -> Path:
        """The local folder the driver works in: the search's folder, or (remote) its copy in
        CACHE/softfine/searches/SCHEME/BUCKET/PREFIX/NAME."""
        if not self.remote:
            return self.local / name
        parts = urllib.parse.urlsplit(self.uri)
        names = f"{parts.netloc}/{parts.path}".split("/")
        path = [re.sub(r"[^\w.@+=-]", "_", p) for p in names if p not in ("", ".", "..")]
        cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
        return cache.joinpath("softfine", "searches", parts.scheme, *path, name)

    def filesystem(self):
        """(pyarrow file system, the storage's path on it): the remote one's, or this machine's."""
        if self._fs is None:
            if self.remote:
                self._fs, base = pyarrow.fs.FileSystem.from_uri(self.uri)
                self._base = base.rstrip("/")
            else:
                self._fs, self._base = pyarrow.fs.LocalFileSystem(), str(self.local)
        return self._fs, self._base

    def fs_path(self, name: str, file: str = "") -> str:
        return posixpath.join(self.filesystem()[1], name, *([file] if file else []))

    def check(self) -> None:
        """A remote storage answers, with credentials that may list and write it, and its bucket
        exists; else one line naming the flag (the URI shown, never a key). Nothing is created."""
        if not self.remote:
            return
        parts = urllib.parse.urlsplit(self.uri)
        if "@" in parts.netloc:
            raise SearchError(
                f"--storage-path {parts.scheme}://...@{parts.netloc.rpartition('@')[2]}{parts.path}: "
                "no credentials in the URI; give them the way AWS tools take them (AWS_ACCESS_KEY_ID "
                "and AWS_SECRET_ACCESS_KEY, AWS_PROFILE, an instance role)"
            )
        if parts.query or parts.fragment:  # pyarrow's options (region=, ...): the environment's here
            raise SearchError(
                f"--storage-path {self.uri}: give the bucket and prefix alone (s3://BUCKET/PREFIX); the "
                "endpoint and region come from the environment (AWS_ENDPOINT_URL, AWS_REGION)"
            )
        unusable = f"--storage-path {self.uri}: cannot reach it or write there"
        try:
            fs, base = self.filesystem()  # an S3 URI: the bucket's region is looked up unless it is given
        except (ValueError, ImportError) as err:  # ArrowInvalid is a ValueError
            raise SearchError(
                f"--storage-path {self.uri}: not a storage URI pyarrow can open ({first_line(err)})"
            ) from None
        except OSError as err:
            raise SearchError(f"{unusable} ({first_line(err)}; endpoint {endpoint()}); {HOW}") from None
        try:
            bucket = base.split("/")[0]
            if parts.scheme in BUCKETS and fs.get_file_info(bucket).type != pyarrow.fs.FileType.Directory:
                raise SearchError(
                    f"--storage-path {self.uri}: bucket {bucket!r} does not exist at that endpoint "
                    f"({endpoint()}); create it first ({HOW})"
                )
            probe = posixpath.join(base, f".softfine-write-check-{uuid.uuid4().hex}")
            with fs.open_output_stream(probe) as out:
                out.write(b"")
            fs.delete_file(probe)
        except OSError as err:
            raise SearchError(f"{unusable} ({first_line(err)}; endpoint {endpoint()}); {HOW}") from None

    def read_bytes(self, name: str, file: str) -> bytes | None:
        return read_from(self.filesystem()[0], self.fs_path(name, file))

    def exists(self, name: str, file: str) -> bool:
        info = self.filesystem()[0].get_file_info(self.fs_path(name, file))
        return info.type != pyarrow.fs.FileType.NotFound

    def searches_with(self, file: str) -> list[tuple[float, str]]:
        """(modification time, NAME) of the search folders that hold `file`."""
        fs, base = self.filesystem()
        listed = fs.get_file_info(pyarrow.fs.FileSelector(base, allow_not_found=True))
        folders = [i.base_name for i in listed if i.type == pyarrow.fs.FileType.Directory]
        return [
            (info.mtime.timestamp() if info.mtime else 0.0, posixpath.basename(posixpath.dirname(info.path)))
            for info in fs.get_file_info([self.fs_path(name, file) for name in folders])
            if info.type == pyarrow.fs.FileType.File
        ]


def open_path(path: str):
    """(pyarrow file system, path on it) of a local path or a URI."""
    if is_remote(path):
        return pyarrow.fs.FileSystem.from_uri(path)
    return pyarrow.fs.LocalFileSystem(), str(Path(path).resolve())


def uri_of(filesystem, path: str) -> str:
    """A path on a pyarrow file system as the URI that names it (a local path as it is)."""
    kind = getattr(filesystem, "type_name", "local")
    scheme = {"s3": "s3", "gcs": "gs"}.get(kind)  # their paths start with the bucket
    return f"{scheme}://{path}" if scheme and "://" not in path else path


def read_from(fs, path: str) -> bytes | None:
    """A file's content on a pyarrow file system, or None when it is not there."""
    try:
        with fs.open_input_stream(path) as stream:
            return stream.readall()
    except FileNotFoundError:
        return None


def write_json(path: Path, data: dict) -> Path:
    path.write_text(json.dumps(data, indent=1, ensure_ascii=False, default=str), encoding="utf-8")
    return path


def endpoint() -> str:
    """The S3 endpoint the environment gives (as shown: a user and password in it masked)."""
    url = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or "AWS's own"
    return re.sub(r"//[^/@\s]*@", "//***@", url)


def own(file: str) -> bool:
    return any(fnmatch.fnmatchcase(file, pattern) for pattern in OWN_FILES)


class SearchFiles:
    """One search's own files: `folder`, where the driver works on them, and their `location`."""

    def __init__(self, storage: Storage, name: str):
        self.storage, self.name = storage, name
        self.folder = storage.work_folder(name)
        self.location = storage.location(name)

    @property
    def remote(self) -> bool:
        return self.storage.remote

    def push(self, *files: str) -> None:
        """Uploads the given files (all the search's own when none is named), each as one object: a reader
        sees the old one or the new one, never a part."""
        if not self.remote:
            return
        fs, _ = self.storage.filesystem()
        names = files or sorted(p.name for p in self.folder.iterdir() if p.is_file() and own(p.name))
        for file in names:
            path = self.folder / file
            if path.is_file():
                data = path.read_bytes()
                with fs.open_output_stream(self.storage.fs_path(self.name, file)) as out:
                    out.write(data)

    def pull(self, download: bool = True) -> list[str]:
        """Empties the working folder but for the lock; with `download`, fetches the search's own files."""
        if not self.remote:
            return []
        for path in self.folder.iterdir():
            if path.is_file() and path.name != LOCK:
                path.unlink()
        if not download:
            return []
        fs, _ = self.storage.filesystem()
        got = []
        selector = pyarrow.fs.FileSelector(self.storage.fs_path(self.name), allow_not_found=True)
        for info in fs.get_file_info(selector):
            if info.type == pyarrow.fs.FileType.File and own(info.base_name):
                (self.folder / info.base_name).write_bytes(read_from(fs, info.path))
                got.append(info.base_name)
        return sorted(got)
