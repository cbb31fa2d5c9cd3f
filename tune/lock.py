"""One driver per search: a flock in the search's working folder (one_driver), and on S3, across
machines, the search's lock object STORAGE/NAME/LOCK, made with S3's conditional writes (If-None-Match,
If-Match), which pyarrow lacks and boto3 has (RemoteLock)."""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import json
import logging
import os
import posixpath
import socket
import tempfile
import threading
import time
import urllib.parse
import uuid
from datetime import datetime, timezone
from email.utils import parsedate_to_datetime

from softfine.errors import first_line

from .space import SearchError
from .storage import LOCK, SearchFiles, Storage

log = logging.getLogger("softfine.tune")
CONFLICT = ("PreconditionFailed", "ConditionalRequestConflict", "412")  # a condition that failed


@contextlib.contextmanager
def one_driver(files: SearchFiles):
    """The search locked while the block runs (flock in its working folder, released however the process ends;
    on S3 also RemoteLock, below): a second driver of the same search is refused, naming the first."""
    folder = files.folder
    made = [f for f in (folder, *folder.parents) if not f.exists()]  # to remove if nothing else is written
    try:  # the folder is made and written to before anything is recorded
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as err:
        given = files.storage.uri if files.remote else folder.parent
        what = "the search's working folder (XDG_CACHE_HOME)" if files.remote else "the search's folder"
        raise SearchError(
            f"--storage-path {given}: cannot write {what} {folder} ({err.strerror or err})"
        ) from None
    fd = os.open(folder / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    remote = None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            raise SearchError(
                f"--name {files.name}: the search in {files.location} is running in process {holder}; "
                "wait for it to end (or stop it), or give another --name"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        if RemoteLock.available(files.storage):
            remote = RemoteLock(files.storage, files.name)
            remote.acquire()
        elif files.remote:
            log.warning(
                "%s: one driver per search is checked on this machine only (lock.RemoteLock needs S3 and "
                "boto3): run the search's driver on one machine at a time",
                files.location,
            )
        yield
    finally:
        if remote is not None:
            remote.release()
        os.close(fd)
        if made and [p.name for p in folder.iterdir()] == [LOCK]:  # refused before it began: leave nothing
            (folder / LOCK).unlink()
            for empty in made:
                empty.rmdir()


class RemoteLock:
    """A lease naming its holder, renewed every RENEW s (If-Match: its own version); a killed driver's
    is taken over (If-Match) once LEASE s old, at once when its process on this machine is gone."""

    LEASE, RENEW = 60.0, 15.0

    def __init__(self, storage: Storage, name: str):
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
        self.holder = {"host": socket.gethostname(), "pid": os.getpid(), "driver": uuid.uuid4().hex}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @staticmethod
    def available(storage: Storage) -> bool:
        """An S3 storage, and boto3 (the tune extra's, >=1.36: PutObject with If-None-Match, If-Match)."""
        s3 = storage.remote and urllib.parse.urlsplit(storage.uri).scheme == "s3"
        return s3 and importlib.util.find_spec("boto3") is not None

    def _put(self, **condition) -> str | None:
        """The lock written under `condition`; its version, or None when the condition failed."""
        body = json.dumps({**self.holder, "renewed": time.time()}).encode()
        try:
            return self.client.put_object(Bucket=self.bucket, Key=self.key, Body=body, **condition)["ETag"]
        except self.client.exceptions.ClientError as err:
            if err.response.get("Error", {}).get("Code") in CONFLICT:
                return None
            raise

    def _current(self) -> tuple[dict, str, float] | None:
        """(holder, version, seconds since it was written) of the lock there, or None."""
        try:
            found = self.client.get_object(Bucket=self.bucket, Key=self.key)
        except self.client.exceptions.ClientError as err:
            if err.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                return None
            raise
        try:
            holder = json.loads(found["Body"].read())
        except ValueError:
            holder = {}
        # the server's clock on both sides: its answer's Date, the lock's Last-Modified
        date = found["ResponseMetadata"].get("HTTPHeaders", {}).get("date")
        now = parsedate_to_datetime(date) if date else datetime.now(timezone.utc)
        return holder, found["ETag"], (now - found["LastModified"]).total_seconds()

    def acquire(self) -> None:
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
            running = f"--name {self.name}: the search in {self.where} is running in {who}"
            if mine:
                raise SearchError(f"{running}; wait for it to end (or stop it), or give another --name")
            if deadline is None:
                deadline = time.time() + self.LEASE - age + 1
                print(
                    f"tune/search.py: the search in {self.where} is locked by {who}, renewed {age:.0f} s "
                    f"ago; waiting up to {self.LEASE - age + 1:.0f} s for it to end or its lease to run out",
                    flush=True,
                )
            if time.time() > deadline:
                raise SearchError(
                    f"{running} (its lock is renewed); wait for it to end (or stop it), or give another "
                    "--name"
                )
            time.sleep(min(5.0, max(0.5, deadline - time.time())))
        self._thread = threading.Thread(target=self._renew, name="softfine-search-lock", daemon=True)
        self._thread.start()

    def _renew(self) -> None:
        while not self._stop.wait(self.RENEW):
            try:
                etag = self._put(IfMatch=self.etag)
            except Exception as err:  # noqa: BLE001 - the storage may not answer for a while: try again
                log.warning("could not renew the search's lock %s (%s)", self.where, first_line(err))
                continue
            if etag is None:
                log.error(
                    "the search's lock %s was taken over by another driver (this one did not renew it "
                    "for %.0f s)",
                    self.where,
                    self.LEASE,
                )
                return
            self.etag = etag

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        if self.etag is not None:  # a ClientError: taken over by another driver meanwhile, its lock now
            with contextlib.suppress(self.client.exceptions.ClientError):
                self.client.delete_object(Bucket=self.bucket, Key=self.key, IfMatch=self.etag)
            self.etag = None


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
