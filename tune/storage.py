"""Where a search's files live (--storage-path): a local folder, or a remote URI such as
s3://BUCKET/PREFIX (any file system pyarrow opens by URI: gs://, abfs://, hdfs://).

A search's folder is Ray Tune's experiment folder, STORAGE/NAME; the search's own files are kept
beside Ray's there (OWN_FILES: its record, the Optuna study, the MLflow callback's account, the
summary, trials.csv and the figures). On a local folder the driver works in it, as it always has.
On a remote storage the driver works in a local copy of the search's own files (`work_folder`: in
the user's cache folder, named from the URI and the search) and uploads each one when it changes
(`SearchFiles.push`); Ray Tune gets the URI itself and writes its experiment state and the
trials' checkpoints there. A resume empties that copy and downloads the files first
(`SearchFiles.pull`), so a driver on a machine that has never seen the search (a new head, an
empty disk) needs nothing but the URI, and the tracking server that the record names.

The endpoint and credentials come the way AWS's own tools take them, read by pyarrow (and by Ray
and every trial, through pyarrow): AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY,
AWS_PROFILE, an instance role. A URI that holds a key is refused; nothing here writes, logs or
shows one.
"""

from __future__ import annotations

import contextlib
import fnmatch
import os
import posixpath
import re
import urllib.parse
import uuid
from pathlib import Path

from .space import SearchError

# The search's own files in its folder (Ray's are its experiment_state-*.json, searcher-state-*,
# callback-states-*, tuner.pkl and the trial folders). The Optuna study during a search phase
# reaches a remote storage with Ray's own snapshots (in_place.StudyInPlace.save_to_dir).
OWN_FILES = (
    "softfine_search.json",
    "optuna.db",
    "mlflow_runs.*.json",
    "mlflow_unlogged.*.jsonl",
    "summary.json",
    "trials.csv",
    "*.png",
)
BUCKETS = ("s3", "gs", "gcs")  # schemes whose URI's first path part is a bucket that must exist
LOCK = (
    ".softfine_search.lock"  # in the search's folder (and the working folder): held by the driver running it
)


def is_remote(path: str) -> bool:
    """A URI other than file://: Ray Tune and the search reach it through pyarrow.fs."""
    return "://" in path and not path.startswith("file://")


def cache_home() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")


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

    # -- where ------------------------------------------------------------------------------

    @property
    def ray_path(self) -> str:
        """RunConfig(storage_path=...): the folder, or the URI itself."""
        return str(self)

    def location(self, name: str) -> str:
        """The search's folder as shown and stored: a path, or URI/NAME."""
        return f"{self.uri}/{name}" if self.remote else str(self.local / name)

    def work_folder(self, name: str) -> Path:
        """The local folder the driver works in: the search's folder itself, or (remote) its copy
        in the user's cache folder, CACHE/softfine/searches/SCHEME/BUCKET/PREFIX/NAME."""
        if not self.remote:
            return self.local / name
        parts = urllib.parse.urlsplit(self.uri)
        where = [
            re.sub(r"[^\w.@+=-]", "_", p)
            for p in f"{parts.netloc}/{parts.path}".split("/")
            if p not in ("", ".", "..")
        ]
        return cache_home() / "softfine" / "searches" / parts.scheme / Path(*where) / name

    def filesystem(self):
        """(pyarrow file system, the storage's path on it) of a remote storage."""
        if self._fs is None:
            import pyarrow.fs

            self._fs, self._base = pyarrow.fs.FileSystem.from_uri(self.uri)
            self._base = self._base.rstrip("/")
        return self._fs, self._base

    def fs_path(self, name: str, file: str = "") -> str:
        return (
            posixpath.join(self.filesystem()[1], name, file)
            if file
            else posixpath.join(self.filesystem()[1], name)
        )

    # -- checks -----------------------------------------------------------------------------

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
        if (
            parts.query or parts.fragment
        ):  # pyarrow's options (region=, endpoint_override=): the environment's
            raise SearchError(
                f"--storage-path {self.uri}: give the bucket and prefix alone (s3://BUCKET/PREFIX); the "
                "endpoint and region come from the environment (AWS_ENDPOINT_URL, AWS_REGION)"
            )
        import pyarrow.fs

        how = (
            "the endpoint and credentials come from the environment, as AWS tools take them: "
            "AWS_ENDPOINT_URL, "
            "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, AWS_PROFILE, an instance role"
        )
        unusable = f"--storage-path {self.uri}: cannot reach it or write there"
        try:
            fs, base = self.filesystem()  # an S3 URI: the bucket's region is looked up unless it is given
        except (ValueError, ImportError) as err:  # ArrowInvalid is a ValueError
            raise SearchError(
                f"--storage-path {self.uri}: not a storage URI pyarrow can open ({first_line(err)})"
            ) from None
        except OSError as err:
            raise SearchError(f"{unusable} ({first_line(err)}; endpoint {endpoint()}); {how}") from None
        try:
            if parts.scheme in BUCKETS:
                bucket = base.split("/")[0]
                if fs.get_file_info(bucket).type != pyarrow.fs.FileType.Directory:
                    raise SearchError(
                        f"--storage-path {self.uri}: bucket {bucket!r} does not exist at that endpoint "
                        f"({endpoint()}); create it first ({how})"
                    )
            probe = posixpath.join(base, f".softfine-write-check-{uuid.uuid4().hex}")
            with fs.open_output_stream(probe) as out:
                out.write(b"")
            fs.delete_file(probe)
        except OSError as err:
            raise SearchError(f"{unusable} ({first_line(err)}; endpoint {endpoint()}); {how}") from None

    # -- files ------------------------------------------------------------------------------

    def read_bytes(self, name: str, file: str) -> bytes | None:
        """A file of the search's folder, or None when it is not there."""
        if not self.remote:
            path = self.local / name / file
            return path.read_bytes() if path.is_file() else None
        fs, _ = self.filesystem()
        try:
            with fs.open_input_stream(self.fs_path(name, file)) as stream:
                return stream.readall()
        except FileNotFoundError:
            return None

    def exists(self, name: str, file: str) -> bool:
        if not self.remote:
            return (self.local / name / file).exists()
        import pyarrow.fs

        return (
            self.filesystem()[0].get_file_info(self.fs_path(name, file)).type != pyarrow.fs.FileType.NotFound
        )

    def searches_with(self, file: str) -> list[tuple[float, str]]:
        """(modification time, NAME) of the search folders that hold `file`."""
        if not self.remote:
            return (
                [(p.stat().st_mtime, p.parent.name) for p in self.local.glob(f"*/{file}")]
                if self.local.is_dir()
                else []
            )
        import pyarrow.fs

        fs, base = self.filesystem()
        folders = [
            i.base_name
            for i in fs.get_file_info(pyarrow.fs.FileSelector(base, allow_not_found=True))
            if i.type == pyarrow.fs.FileType.Directory
        ]
        found = []
        for info in fs.get_file_info([self.fs_path(name, file) for name in folders]):
            if info.type == pyarrow.fs.FileType.File:
                found.append(
                    (
                        info.mtime.timestamp() if info.mtime else 0.0,
                        posixpath.basename(posixpath.dirname(info.path)),
                    )
                )
        return found


def open_path(path: str):
    """(pyarrow file system, path on it) of a local path or a URI."""
    import pyarrow.fs

    if is_remote(path):
        return pyarrow.fs.FileSystem.from_uri(path)
    return pyarrow.fs.LocalFileSystem(), str(Path(path).resolve())


def uri_of(filesystem, path: str) -> str:
    """A path on a pyarrow file system as the URI that names it (a local path as it is), e.g. a
    checkpoint's, for the tables and tags that users and later drivers read."""
    kind = getattr(filesystem, "type_name", "local")
    scheme = {"s3": "s3", "gcs": "gs"}.get(kind)  # whose paths start with the bucket
    return f"{scheme}://{path}" if scheme and "://" not in path else path


def read_uri(uri: str) -> bytes | None:
    """A file's content by path or URI, or None when it is not there."""
    fs, path = open_path(uri)
    try:
        with fs.open_input_stream(path) as stream:
            return stream.readall()
    except FileNotFoundError:
        return None


def first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0][:300]


def endpoint() -> str:
    """The S3 endpoint the environment gives (as shown: a user and password in it masked)."""
    url = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or "AWS's own"
    return re.sub(r"//[^/@\s]*@", "//***@", url)


def own(file: str) -> bool:
    return any(fnmatch.fnmatchcase(file, pattern) for pattern in OWN_FILES)


class SearchFiles:
    """One search's own files: `folder`, the local folder the driver reads and writes them in,
    and where they are kept (the same folder, or STORAGE/NAME on a remote storage)."""

    def __init__(self, storage: Storage, name: str):
        self.storage, self.name = storage, name
        self.folder = storage.work_folder(name)
        self.location = storage.location(name)

    def __getstate__(self) -> dict:
        return dict(self.__dict__)

    @property
    def remote(self) -> bool:
        return self.storage.remote

    def push(self, *files: str) -> None:
        """Uploads the given files of the working folder (all of the search's own files there when
        none is named); nothing to do on a local storage. A file is one object: a reader sees the
        old one or the new one, never a part."""
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

    def delete(self, file: str) -> None:
        if self.remote:
            self.storage.filesystem()[0].delete_file(self.storage.fs_path(self.name, file))

    def pull(self, download: bool = True) -> list[str]:
        """Empties the working folder (whatever an earlier driver on this machine left there is no
        part of the search now) but for the lock this driver holds, and (`download`: a resumed
        search) downloads the search's own files into it; returns their names. Nothing to do on a
        local storage."""
        if not self.remote:
            return []
        import pyarrow.fs

        for path in self.folder.iterdir():
            if path.is_file() and path.name != LOCK:
                path.unlink()
        if not download:
            return []
        fs, _ = self.storage.filesystem()
        got = []
        for info in fs.get_file_info(
            pyarrow.fs.FileSelector(self.storage.fs_path(self.name), allow_not_found=True)
        ):
            if info.type == pyarrow.fs.FileType.File and own(info.base_name):
                with fs.open_input_stream(info.path) as stream:
                    (self.folder / info.base_name).write_bytes(stream.readall())
                got.append(info.base_name)
        return sorted(got)


# ---------------------------------------------------------------------------------------------
# One driver per search on a remote storage.


class RemoteLock:
    """The search's lock object on S3, STORAGE/NAME/LOCK, made with a conditional write
    (If-None-Match: *): of two drivers that try at once, exactly one gets it, whatever machine
    each runs on. It names its holder (host, process) and is a lease: the holder writes it again
    every RENEW seconds (If-Match: its own version, so a lock taken over is never overwritten),
    and deletes it when it stops. A driver that was killed leaves it behind: a new driver takes it
    over (If-Match: the stale version: again exactly one wins) at once when the holder was a
    process of this machine that no longer runs, else once it has not been renewed for LEASE
    seconds, waiting that long at most.

    Conditional writes are S3's (AWS since 2024; SeaweedFS, MinIO); pyarrow has none, so this uses
    boto3 (the AWS SDK, which takes the endpoint and credentials as pyarrow does; the tune extra
    installs it, and botocore knows If-None-Match and If-Match on PutObject since late 2024).
    Without such a boto3, or on another kind of storage (gs://, hdfs://: no such write here), only
    the working folder's lock holds, which covers the drivers of one machine: run a search's
    driver on one machine at a time (the cluster's head), as `ray job submit` does."""

    LEASE, RENEW = 60.0, 15.0

    def __init__(self, storage: Storage, name: str):
        import logging

        import boto3

        for quiet in ("boto3", "botocore"):  # "Found credentials in environment variables", on every start
            logging.getLogger(quiet).setLevel(logging.WARNING)
        parts = urllib.parse.urlsplit(storage.uri)
        self.bucket = parts.netloc
        self.key = posixpath.join(parts.path.strip("/"), name, LOCK).lstrip("/")
        self.where = f"{storage.uri}/{name}"
        self.name = name
        self.client = boto3.client("s3")
        self.etag: str | None = None
        self.holder = {"host": socket_hostname(), "pid": os.getpid(), "driver": uuid.uuid4().hex}
        self._stop = None
        self._thread = None

    @staticmethod
    def available(storage: Storage) -> bool:
        if not storage.remote or urllib.parse.urlsplit(storage.uri).scheme != "s3":
            return False
        try:
            import botocore.session
        except ImportError:
            return False
        put = botocore.session.get_session().get_service_model("s3").operation_model("PutObject")
        return {"IfNoneMatch", "IfMatch"} <= set(put.input_shape.members)

    def _body(self) -> bytes:
        import json
        import time

        return json.dumps({**self.holder, "renewed": time.time()}).encode()

    def _put(self, **condition) -> str | None:
        """The lock written under `condition`; its version, or None when the condition failed."""
        from botocore.exceptions import ClientError

        try:
            return self.client.put_object(Bucket=self.bucket, Key=self.key, Body=self._body(), **condition)[
                "ETag"
            ]
        except ClientError as err:
            if err.response.get("Error", {}).get("Code") in (
                "PreconditionFailed",
                "ConditionalRequestConflict",
                "412",
            ):
                return None
            raise

    def _current(self) -> tuple[dict, str, float] | None:
        """(holder, version, seconds since it was written) of the lock there, or None."""
        import json
        from datetime import datetime, timezone

        from botocore.exceptions import ClientError

        try:
            found = self.client.get_object(Bucket=self.bucket, Key=self.key)
        except ClientError as err:
            if err.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                return None
            raise
        try:
            holder = json.loads(found["Body"].read())
        except ValueError:
            holder = {}
        # the server's clock on both sides: its answer's Date, the lock's Last-Modified
        now = found["ResponseMetadata"].get("HTTPHeaders", {}).get("date")
        from email.utils import parsedate_to_datetime

        now_dt = parsedate_to_datetime(now) if now else datetime.now(timezone.utc)
        return holder, found["ETag"], (now_dt - found["LastModified"]).total_seconds()

    def acquire(self) -> None:
        import time

        deadline = None
        while True:
            self.etag = self._put(IfNoneMatch="*")
            if self.etag is not None:
                break
            current = self._current()
            if current is None:
                continue  # deleted meanwhile: try again
            holder, version, age = current
            mine = holder.get("host") == self.holder["host"]
            if (mine and not pid_runs(holder.get("pid"))) or age > self.LEASE:
                self.etag = self._put(IfMatch=version)  # take over the stale lock: one driver wins
                if self.etag is not None:
                    break
                continue
            who = f"process {holder.get('pid', '?')} on {holder.get('host', '?')}"
            if mine:
                raise SearchError(
                    f"--name {self.name}: the search in {self.where} is running in {who}; wait for it "
                    "to end (or stop it), or give another --name"
                )
            if deadline is None:
                deadline = time.time() + self.LEASE - age + 1
                print(
                    f"tune/search.py: the search in {self.where} is locked by {who}, renewed "
                    f"{age:.0f} s ago; "
                    f"waiting up to {self.LEASE - age + 1:.0f} s for it to end or its lease to run out",
                    flush=True,
                )
            if time.time() > deadline:
                raise SearchError(
                    f"--name {self.name}: the search in {self.where} is running in {who} (its lock is "
                    "renewed); wait for it to end (or stop it), or give another --name"
                )
            time.sleep(min(5.0, max(0.5, deadline - time.time())))
        import threading

        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._renew, name="softfine-search-lock", daemon=True)
        self._thread.start()

    def _renew(self) -> None:
        import logging

        while not self._stop.wait(self.RENEW):
            try:
                etag = self._put(IfMatch=self.etag)
            except Exception as err:  # noqa: BLE001 - the storage may not answer for a while: try again
                logging.getLogger("softfine.tune").warning(
                    "could not renew the search's lock %s (%s)", self.where, first_line(err)
                )
                continue
            if etag is None:
                logging.getLogger("softfine.tune").error(
                    "the search's lock %s was taken over by another driver (this one did not renew "
                    "it for %.0f s)",
                    self.where,
                    self.LEASE,
                )
                return
            self.etag = etag

    def release(self) -> None:
        from botocore.exceptions import ClientError

        if self._stop is not None:
            self._stop.set()
            self._thread.join(timeout=30)
        if self.etag is not None:
            # ClientError: taken over by another driver meanwhile: its lock now
            with contextlib.suppress(ClientError):
                self.client.delete_object(Bucket=self.bucket, Key=self.key, IfMatch=self.etag)
            self.etag = None


def socket_hostname() -> str:
    import socket

    return socket.gethostname()


def pid_runs(pid) -> bool:
    """Whether process `pid` of this machine runs (a process of another user counts as running)."""
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
