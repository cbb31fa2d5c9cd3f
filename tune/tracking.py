"""The MLflow tracking store of --mlflow-uri: resolved, checked, reached with short HTTP timeouts.
Credentials in its URI reach MLflow as MLFLOW_TRACKING_USERNAME/PASSWORD; what is shown is masked."""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import os
import re
import sqlite3
import urllib.parse
from collections.abc import Sequence
from pathlib import Path

from .space import SearchError

_CHECKOUT = Path(__file__).resolve().parents[1]
REPO = _CHECKOUT if (_CHECKOUT / "pyproject.toml").is_file() else Path.cwd()  # the package installed in place
DEFAULT_STORE = REPO / "mlflow" / "mlflow.db"
MASK = "***"
CREDENTIAL_VARS = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN")
MLFLOW_TABLES = {"experiments", "runs", "alembic_version"}  # what every MLflow SQLite store has
SQLITE = "sqlite:///"


def mask_credentials(text: str) -> str:
    """`scheme://user:password@host` anywhere in `text` with the password replaced by ***."""
    return re.sub(r"(\w+://[^/@\s:]*:)[^/\s]*@", r"\1***@", text)  # up to the authority's last @


def mask_argv(argv: Sequence[str]) -> list[str]:
    """A command line as it may be stored and shown: credentials in URIs masked."""
    return [mask_credentials(str(a)) for a in argv]


def describe_error(err: BaseException) -> str:
    """One short line for an MLflow failure: what happened, and the URL it happened on."""
    text = mask_credentials(str(err).strip())
    url = re.search(r"request to (\S+) failed", text)
    where = f" ({url.group(1)})" if url else ""
    if "Read timed out" in text or "ReadTimeout" in text:
        return f"no answer within the timeout{where}"
    if "Connection refused" in text or "NewConnectionError" in text:
        return f"connection refused{where}"
    first = text.splitlines()[0] if text else ""
    return f"{type(err).__name__}: {first[:240]}"


def default_tracking_uri() -> str:
    """The embedded store: SQLite under mlflow/ in the repository (artifacts beside it)."""
    return f"{SQLITE}{DEFAULT_STORE}"


def is_remote(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


def sqlite_file(uri: str) -> Path | None:
    return Path(uri[len(SQLITE) :]) if uri.startswith(SQLITE) else None


def resolve_tracking_uri(uri: str | None) -> str:
    """Absolute paths for local stores: trials run in other working directories."""
    if not uri:
        return default_tracking_uri()
    if uri.startswith(SQLITE) and not uri.startswith(SQLITE + "/"):
        return f"{SQLITE}{sqlite_file(uri).resolve()}"
    if ":" not in uri:  # a plain directory: MLflow's file store
        return Path(uri).resolve().as_uri()
    return uri


def local_artifact_root(uri: str) -> str | None:
    """For a SQLite store, artifacts go to an `artifacts/` folder beside the database file."""
    path = sqlite_file(uri)
    return (path.parent / "artifacts").resolve().as_uri() if path else None


def without_credentials(uri: str | None) -> str:
    """The store's address alone, to compare two URIs of one store."""
    parts = urllib.parse.urlsplit(resolve_tracking_uri(uri))
    return urllib.parse.urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))


@dataclasses.dataclass(frozen=True)
class TrackingStore:
    """`uri`: what MLflow clients get (an HTTP server's without credentials); `display`: what is shown
    and stored (the password masked); `env`: the credentials for MLflow's HTTP client."""

    uri: str
    display: str
    env: dict = dataclasses.field(default_factory=dict)


def tracking_store(uri: str | None, what: str = "--mlflow-uri") -> TrackingStore:
    """The store of `--mlflow-uri`. A password written as *** (the masked URI of a search record,
    on --resume) must come from MLFLOW_TRACKING_PASSWORD."""
    uri = resolve_tracking_uri(uri)
    env = {k: os.environ[k] for k in CREDENTIAL_VARS if os.environ.get(k)}
    parts = urllib.parse.urlsplit(uri)
    userinfo, at, host = parts.netloc.rpartition("@")
    if not at:
        return TrackingStore(uri, uri, env)
    user, colon, password = userinfo.partition(":")
    display = urllib.parse.urlunsplit(parts._replace(netloc=f"{user}{':' + MASK if colon else ''}@{host}"))
    masked = (
        f"{what} {display}: the password is masked (a search record keeps none); give {what} with the "
        "password again"
    )
    if not is_remote(uri):  # a database URI: its driver needs the credentials in it
        if password == MASK:
            raise SearchError(masked)
        return TrackingStore(uri, display, env)
    env["MLFLOW_TRACKING_USERNAME"] = urllib.parse.unquote(user)
    if colon and password != MASK:
        env["MLFLOW_TRACKING_PASSWORD"] = urllib.parse.unquote(password)
    elif colon and not os.environ.get("MLFLOW_TRACKING_PASSWORD"):
        raise SearchError(f"{masked}, or set MLFLOW_TRACKING_PASSWORD")
    return TrackingStore(urllib.parse.urlunsplit(parts._replace(netloc=host)), display, env)


@contextlib.contextmanager
def credentials(env: dict):
    """Environment variables set while the block runs, put back after (tests run searches in-process)."""
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        os.environ.update({k: v for k, v in saved.items() if v is not None})
        for key in [k for k, v in saved.items() if v is None]:
            os.environ.pop(key, None)


def short_http(timeout: float, retries: int = 0):
    """MLflow's HTTP client retries for minutes by default; a check must answer quickly."""
    env = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": str(retries), "MLFLOW_HTTP_REQUEST_TIMEOUT": str(int(timeout))}
    return credentials({**env, "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1"})


def check_sqlite_store(path: Path, display: str) -> None:
    """A SQLite file given as the store is new, empty or MLflow's: MLflow would create its tables
    inside any other database it is given."""
    if not path.is_file() or path.stat().st_size == 0:
        return
    try:
        tables = sqlite_tables(path)
    except sqlite3.DatabaseError as err:
        raise SearchError(
            f"--mlflow-uri {display}: {path} is not an SQLite database ({err}); give a new file or an "
            "MLflow store"
        ) from None
    if tables and not tables >= MLFLOW_TABLES:
        shown = ", ".join(sorted(tables)[:5]) + (", ..." if len(tables) > 5 else "")
        raise SearchError(
            f"--mlflow-uri {display}: {path} is another application's SQLite database (tables: {shown}), "
            "not an MLflow store; give a new file or an MLflow store"
        )


def sqlite_tables(path: Path) -> set[str]:
    """The tables of a SQLite file, opened read-only (sqlite3.DatabaseError: not a database)."""
    try:
        return _tables(f"{path.resolve().as_uri()}?mode=ro")
    except sqlite3.OperationalError as err:
        if getattr(err, "sqlite_errorname", "") != "SQLITE_READONLY_ROLLBACK":
            raise
    # A writer killed mid-transaction (a driver, a server) left a hot journal that only a writable
    # connection may roll back: the one step SQLite takes on any open, restoring the last commit.
    return _tables(path.resolve().as_uri())


def _tables(uri: str) -> set[str]:
    with contextlib.closing(sqlite3.connect(uri, uri=True)) as db:
        return {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}


@contextlib.contextmanager
def folder_lock(folder: Path):
    """An exclusive lock on `folder` while the block runs (flock): two searches that open one new
    SQLite store create MLflow's tables one after the other."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def check_tracking(store: TrackingStore, timeout: float) -> None:
    """Refuses a store that does not answer or a SQLite file not MLflow's; makes a new SQLite store."""
    from mlflow.tracking import MlflowClient

    lock = contextlib.nullcontext()
    path = sqlite_file(store.uri)
    if path is not None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise SearchError(
                f"--mlflow-uri {store.display}: cannot create {path.parent} ({err.strerror})"
            ) from None
        check_sqlite_store(path, store.display)
        lock = folder_lock(path.parent)
    try:
        with short_http(timeout), lock:
            MlflowClient(tracking_uri=store.uri).search_experiments(max_results=1)
    except Exception as err:  # noqa: BLE001 - whatever it is, the store cannot be used: say so, with its type
        why = describe_error(err)
        silent = why.startswith(("connection refused", "no answer"))
        hint = ""
        if is_remote(store.uri):
            hint = " Start it (e.g. `mlflow server --host 127.0.0.1 --port 5000`) or pass another "
            hint += "--mlflow-uri (the default is the embedded SQLite store under mlflow/)."
        raise SearchError(
            f"--mlflow-uri: the MLflow tracking store {store.display} "
            f"{'does not answer' if silent else 'cannot be used'} ({why}).{hint}"
        ) from None
