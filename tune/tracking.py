"""MLflow, the driver's side: the tracking store, the parent run's client, the data as dataset
inputs, the selected model. Only the driver talks to MLflow (the child runs: callback.py).

Credentials in `--mlflow-uri` (http://user:password@host) never leave memory: the URI that MLflow
uses is the one without them, they reach MLflow's HTTP client as MLFLOW_TRACKING_USERNAME and
MLFLOW_TRACKING_PASSWORD (the driver's environment, while it talks to MLflow), and whatever is
printed, logged or stored shows `http://user:***@host`.

Every call to the tracking server here goes through `Tracker.attempt`, which records a failure
instead of raising, so that a server that stops answering costs the search its records, never
its results: the account is printed at the end and the same facts are written next to the Ray
results (summary.json, trials.csv).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import re
import subprocess
import threading
import urllib.parse
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .space import SearchError

log = logging.getLogger("softfine.tune")

# This checkout (the package installed in place), else the working directory.
REPO = next(
    (p for p in [Path(__file__).resolve().parents[1]] if (p / "pyproject.toml").is_file()), Path.cwd()
)
DEFAULT_STORE = REPO / "mlflow" / "mlflow.db"
TRIAL_ID_TAG = "softfine.trial_id"
PHASE_TAG = "softfine.phase"
SEARCH_TAG = "softfine.search"  # the search's name, on the parent and every child
# What an F1 was computed on: the evaluations' counts, on every child run and in the summary.
COUNT_KEYS = ("dev_sentences", "dev_gold_entities", "test_sentences", "test_gold_entities")
# MLflow 3's experiment-level kind (the UI's ExperimentKind; `genai_development` is the other): a
# search's experiment is model training, whose page is the runs table. MLflow 3.17's UI takes its
# GenAI / Model training switch from the URL (RUNS_VIEW) or the browser, not from this tag.
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")
RUNS_VIEW = "workflowType=machine_learning"  # the query that opens an MLflow page in Model training
SELECTED_TAG = "softfine.selected"  # "true" on the child run whose model the parent run has


def mask_credentials(text: str) -> str:
    """`scheme://user:password@host` anywhere in `text` with the password replaced by ***."""
    return re.sub(r"(\w+://[^/@\s:]*:)[^/\s]*@", r"\1***@", text)  # up to the authority's last @


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
    return f"sqlite:///{DEFAULT_STORE}"


def is_remote(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


def resolve_tracking_uri(uri: str | None) -> str:
    """Absolute paths for local stores: trials run in other working directories."""
    if not uri:
        return default_tracking_uri()
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return f"sqlite:///{Path(uri[len('sqlite:///') :]).resolve()}"
    if ":" not in uri:  # a plain directory: MLflow's file store
        return Path(uri).resolve().as_uri()
    return uri


MASK = "***"
CREDENTIAL_VARS = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN")


@dataclasses.dataclass(frozen=True)
class TrackingStore:
    """A tracking store as the search uses it. `uri`: what MLflow clients are given (an HTTP
    server's without credentials; a database URI as given, kept in memory only). `display`: what
    is printed, logged and stored (the password masked). `env`: the credentials for MLflow's HTTP
    client, from the URI or the environment."""

    uri: str
    display: str
    env: dict = dataclasses.field(default_factory=dict)


def tracking_store(uri: str | None, what: str = "--mlflow-uri") -> TrackingStore:
    """The store of `--mlflow-uri` (absolute paths for local stores). A password written as ***
    (the masked URI of a search record, on --resume) must come from MLFLOW_TRACKING_PASSWORD."""
    uri = resolve_tracking_uri(uri)
    env = {k: os.environ[k] for k in CREDENTIAL_VARS if os.environ.get(k)}
    parts = urllib.parse.urlsplit(uri)
    userinfo, at, host = parts.netloc.rpartition("@")
    if not at:
        return TrackingStore(uri, uri, env)
    user, colon, password = userinfo.partition(":")
    display = urllib.parse.urlunsplit(parts._replace(netloc=f"{user}{':' + MASK if colon else ''}@{host}"))
    if not is_remote(uri):  # a database URI: its driver needs the credentials in it
        if password == MASK:
            raise SearchError(
                f"{what} {display}: the password is masked (a search record keeps none); give "
                f"{what} with the password again"
            )
        return TrackingStore(uri, display, env)
    bare = urllib.parse.urlunsplit(parts._replace(netloc=host))
    env = {**env, "MLFLOW_TRACKING_USERNAME": urllib.parse.unquote(user)}
    if colon and password != MASK:
        env["MLFLOW_TRACKING_PASSWORD"] = urllib.parse.unquote(password)
    elif colon and not os.environ.get("MLFLOW_TRACKING_PASSWORD"):
        raise SearchError(
            f"{what} {display}: the password is masked (a search record keeps none); give "
            f"{what} with the password again, or set MLFLOW_TRACKING_PASSWORD"
        )
    return TrackingStore(bare, display, env)


@contextlib.contextmanager
def credentials(env: dict):
    """Environment variables for MLflow's HTTP client (credentials, timeouts) while the block runs,
    what was there put back after (tests run the search in their own process)."""
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def without_credentials(uri: str | None) -> str:
    """The store's address alone, to compare two URIs of one store."""
    parts = urllib.parse.urlsplit(resolve_tracking_uri(uri))
    return urllib.parse.urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))


def mask_argv(argv: Sequence[str]) -> list[str]:
    """A command line as it may be stored and shown: credentials in URIs masked."""
    return [mask_credentials(str(a)) for a in argv]


def local_artifact_root(uri: str) -> str | None:
    """For a SQLite store, artifacts go to an `artifacts/` folder beside the database file."""
    if uri.startswith("sqlite:///"):
        return (Path(uri[len("sqlite:///") :]).parent / "artifacts").resolve().as_uri()
    return None


def short_http(timeout: float, retries: int = 0):
    """MLflow's HTTP client retries for minutes by default; a check must answer quickly."""
    return credentials(
        dict(
            MLFLOW_HTTP_REQUEST_MAX_RETRIES=str(retries),
            MLFLOW_HTTP_REQUEST_TIMEOUT=str(int(timeout)),
            MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR="1",
        )
    )


MLFLOW_TABLES = {"experiments", "runs", "alembic_version"}  # what every MLflow SQLite store has


def check_sqlite_store(path: Path, display: str) -> None:
    """A SQLite file given as the store is new, empty or MLflow's: MLflow would create its tables
    inside any other database it is given."""
    import sqlite3

    if not path.is_file() or path.stat().st_size == 0:
        return
    try:
        with contextlib.closing(sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)) as db:
            tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
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


@contextlib.contextmanager
def folder_lock(folder: Path):
    """An exclusive lock on `folder` while the block runs (flock, released when the process ends):
    two searches that open one new SQLite store create MLflow's tables one after the other."""
    import fcntl

    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def check_tracking(store: TrackingStore, timeout: float) -> None:
    """Refuses a tracking store that does not answer, or a SQLite file that is not MLflow's
    (before anything starts); a new SQLite store is created here, under a lock."""
    from mlflow.tracking import MlflowClient

    lock = contextlib.nullcontext()
    if store.uri.startswith("sqlite:///"):
        path = Path(store.uri[len("sqlite:///") :])
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
        hint = (
            " Start it (e.g. `mlflow server --host 127.0.0.1 --port 5000`) or pass another --mlflow-uri "
            "(the default is the embedded SQLite store under mlflow/)."
            if is_remote(store.uri)
            else ""
        )
        raise SearchError(
            f"--mlflow-uri: the MLflow tracking store {store.display} "
            f"{'does not answer' if silent else 'cannot be used'} ({why}).{hint}"
        ) from None


def git_version(repo: Path = REPO) -> dict:
    """The commit the search runs, and whether the working tree differs from it. Without a git
    checkout (e.g. `ray job submit --working-dir .` uploads no .git), $SOFTFINE_GIT_COMMIT."""

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", "-C", str(repo), *args], capture_output=True, text=True, timeout=20, check=True
        ).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        commit = os.environ.get("SOFTFINE_GIT_COMMIT", "")
        if not commit:
            log.warning(
                "no git checkout in %s and no $SOFTFINE_GIT_COMMIT: runs will not record the code version",
                repo,
            )
        return {"commit": commit, "dirty": "unknown"}
    return {"commit": commit, "dirty": str(dirty).lower()}


def versions() -> dict:
    """The versions of Python and the packages a run depends on (the driver's; the cluster configs
    install the same on every node)."""
    import importlib.metadata as md
    import sys

    found = {"python": sys.version.split()[0]}
    for name in ("softfine", "torch", "transformers", "ray", "optuna", "mlflow"):
        try:
            found[name] = md.version(name)
        except md.PackageNotFoundError:
            found[name] = "not installed"
    return found


class Tracker:
    """MLflow calls of the driver; failures are recorded, not raised (after the start)."""

    def __init__(self, uri: str, timeout: float = 10):
        from mlflow.tracking import MlflowClient

        self.uri, self.timeout = uri, timeout
        self.client = MlflowClient(tracking_uri=uri)
        self.failures: list[str] = []

    def attempt(self, what: str, call: Callable[[], Any], default: Any = None) -> Any:
        """`call()`, or `default` and a recorded failure. Once a call has failed, each further one
        is tried only if the store answers a quick check, so that a server that hangs costs
        seconds, not a timeout per call."""
        if self.failures and not self.answers():
            self.failures.append(f"{what}: not tried, the store still does not answer")
            log.warning("MLflow: could not %s (the store does not answer)", what)
            return default
        try:
            with short_http(self.timeout, retries=1):
                return call()
        except Exception as err:  # noqa: BLE001
            self.failures.append(f"{what}: {describe_error(err)}")
            log.warning("MLflow: could not %s (%s)", what, describe_error(err))
            return default

    def answers(self) -> bool:
        try:
            with short_http(min(self.timeout, 5), retries=0):
                self.client.search_experiments(max_results=1)
            return True
        except Exception:  # noqa: BLE001
            return False

    def experiment(self, name: str) -> str:
        """The experiment's id, created if needed (with the artifact root beside a SQLite store),
        marked as model training (EXPERIMENT_KIND), an experiment made elsewhere too."""
        found = self.client.get_experiment_by_name(name)
        if found is not None:
            if found.lifecycle_stage == "deleted":
                raise SearchError(
                    f"--experiment-name {name}: this MLflow experiment was deleted; restore it "
                    "(mlflow experiments restore) or choose another name"
                )
            if found.tags.get(EXPERIMENT_KIND[0]) != EXPERIMENT_KIND[1]:
                self.client.set_experiment_tag(found.experiment_id, *EXPERIMENT_KIND)
            return found.experiment_id
        return self.client.create_experiment(
            name, artifact_location=local_artifact_root(self.uri), tags=dict([EXPERIMENT_KIND])
        )

    def start_parent(self, experiment_id: str, run_name: str, search: str, params: dict, tags: dict) -> str:
        from mlflow.entities import Param

        run = self.client.create_run(
            experiment_id, run_name=run_name, tags={SEARCH_TAG: search, PHASE_TAG: "parent", **tags}
        )
        items = [Param(k, str(v)[:6000]) for k, v in params.items()]
        try:
            for start in range(0, len(items), 100):
                self.client.log_batch(run.info.run_id, params=items[start : start + 100])
        except BaseException:  # the run exists: not RUNNING forever
            self.attempt(
                "end the parent run (FAILED)", lambda: self.client.set_terminated(run.info.run_id, "FAILED")
            )
            raise
        return run.info.run_id


def dataset_inputs(corpus) -> list:
    """The corpus's splits as MLflow dataset inputs: each names its file and carries the file's
    SHA-256 (the digest, and whole in the profile), so a run's Datasets panel says what it was
    trained and scored on."""
    from mlflow.entities import Dataset, DatasetInput, InputTag

    inputs = []
    for split, file in corpus.files.items():
        profile = {
            "file": Path(file["path"]).name,
            "sha256": file["sha256"],
            "format": file["format"],
            "sentences": len(corpus.splits[split]),
            **({"carved": file["carved"]} if "carved" in file else {}),
        }
        dataset = Dataset(
            name=f"{corpus.name}-{split}",
            digest=file["sha256"][:16],
            source_type="local",
            source=json.dumps({"uri": Path(file["path"]).as_uri()}),
            profile=json.dumps(profile),
        )
        inputs.append(DatasetInput(dataset, tags=[InputTag("mlflow.data.context", split)]))
    return inputs


_preloading: list[threading.Thread] = []


def preload_model_code() -> None:
    """Imports, in the background while the trials run, what checking the model on its example
    at the end loads (torch, transformers' BERT, softfine.predict): 4 to 5 s of a search's end here.
    The driver is idle during the trials; log_model waits for the imports to finish."""

    def load() -> None:
        try:
            import transformers.models.bert.modeling_bert  # noqa: F401 - from_pretrained imports it lazily

            import softfine.predict  # noqa: F401
        except Exception:  # noqa: BLE001 - log_model imports them again, and reports what fails there
            pass

    if not _preloading:
        _preloading.append(threading.Thread(target=load, name="softfine-preload-model-code", daemon=True))
        _preloading[0].start()


EXAMPLE = "高勇：男，中国国籍。"  # the logged model's input example, tagged before it is logged


def check_model(checkpoint: Path) -> None:
    """Loads a checkpoint as the logged model will be loaded and tags the example: raises when it
    cannot (a truncated weights file, a damaged config)."""
    from softfine.predict import Predictor

    Predictor.from_checkpoint(str(checkpoint), "cpu").predict([EXAMPLE])


def log_model(uri: str, parent_run_id: str, checkpoint: Path) -> str:
    """The checkpoint as an MLflow pyfunc model named `model` on the parent run; returns its URI."""
    import mlflow
    import softfine

    for thread in _preloading:
        thread.join()

    model_code = Path(__file__).resolve().parent / "pyfunc.py"

    requirements = []
    for name in (
        "torch",
        "transformers",
        "tokenizers",
        "safetensors",
        "seqeval",
        "pyyaml",
        "pydantic",
        "tqdm",
        "mlflow",
    ):
        try:
            import importlib.metadata as md

            requirements.append(f"{name}=={md.version(name).split('+')[0]}")  # no local label (2.13.0+cpu)
        except Exception:  # noqa: BLE001
            requirements.append(name)
    mlflow.set_tracking_uri(uri)
    with mlflow.start_run(run_id=parent_run_id):
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=str(model_code),
            artifacts={"checkpoint": str(checkpoint)},
            code_paths=[str(Path(softfine.__file__).parent)],
            pip_requirements=requirements,
            input_example=[EXAMPLE],
            metadata={
                "task": "fine-grained Chinese NER (SoftFiNE)",
                "predict": "list of texts -> list of entities {text, category, levels, start, end}",
            },
        )
    return info.model_uri


def write_json(path: Path, data: dict) -> Path:
    path.write_text(json.dumps(data, indent=1, ensure_ascii=False, default=str), encoding="utf-8")
    return path
