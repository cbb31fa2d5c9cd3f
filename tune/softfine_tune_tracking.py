"""The driver's side of MLflow: the tracking store, the parent run, and what it holds at the end.

One parent run per search (dataset, sampler, grid, code version, cluster size); the trials log
nested child runs themselves (softfine_tune_trial.py), tagged `mlflow.parentRunId`. When the
search ends the parent gets the selected (alpha_aug, alpha_fea, beta, gamma) as params, the best
dev and test F1 as metrics, a table of all trials, a plot of dev F1 against each hyperparameter,
and the selected checkpoint as an MLflow pyfunc model.

Credentials in `--mlflow-uri` (http://user:password@host) never leave memory: the URI that MLflow
uses is the one without them, they reach MLflow's HTTP client as MLFLOW_TRACKING_USERNAME and
MLFLOW_TRACKING_PASSWORD (the driver's environment; the trials' through tune.with_parameters),
and whatever is printed, logged or stored shows `http://user:***@host`.

Every call to the tracking server here goes through `Tracker.attempt`, which records a failure
instead of raising, so that a server that stops answering costs the search its records, never
its results: the account is printed at the end and the same facts are written next to the Ray
results (summary.json, trials.csv).
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import json
import logging
import math
import os
import subprocess
import urllib.parse
from pathlib import Path
from typing import Any, Callable, Sequence

from softfine_tune_childrun import (
    PHASE_TAG,
    SEARCH_TAG,
    TRIAL_ID_TAG,
    describe_error,
    mask_credentials,
)
from softfine_tune_space import SearchError
from softfine_tune_trial import COUNT_KEYS, SEARCH_KEYS

log = logging.getLogger("softfine.tune")

REPO = Path(__file__).resolve().parents[1]
DEFAULT_STORE = REPO / "mlflow" / "mlflow.db"


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
        return f"sqlite:///{Path(uri[len('sqlite:///'):]).resolve()}"
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
            raise SearchError(f"{what} {display}: the password is masked (a search record keeps none); give "
                              f"{what} with the password again")
        return TrackingStore(uri, display, env)
    bare = urllib.parse.urlunsplit(parts._replace(netloc=host))
    env = {**env, "MLFLOW_TRACKING_USERNAME": urllib.parse.unquote(user)}
    if colon and password != MASK:
        env["MLFLOW_TRACKING_PASSWORD"] = urllib.parse.unquote(password)
    elif colon and not os.environ.get("MLFLOW_TRACKING_PASSWORD"):
        raise SearchError(f"{what} {display}: the password is masked (a search record keeps none); give "
                          f"{what} with the password again, or set MLFLOW_TRACKING_PASSWORD")
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
        return (Path(uri[len("sqlite:///"):]).parent / "artifacts").resolve().as_uri()
    return None


def short_http(timeout: float, retries: int = 0):
    """MLflow's HTTP client retries for minutes by default; a check must answer quickly."""
    return credentials(dict(MLFLOW_HTTP_REQUEST_MAX_RETRIES=str(retries), MLFLOW_HTTP_REQUEST_TIMEOUT=str(int(timeout)),
                            MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR="1"))


def check_tracking(store: TrackingStore, timeout: float) -> None:
    """Refuses a tracking store that does not answer (before anything starts)."""
    from mlflow.tracking import MlflowClient

    if store.uri.startswith("sqlite:///"):
        folder = Path(store.uri[len("sqlite:///"):]).parent
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise SearchError(f"--mlflow-uri {store.display}: cannot create {folder} ({err.strerror})") from None
    try:
        with short_http(timeout):
            MlflowClient(tracking_uri=store.uri).search_experiments(max_results=1)
    except Exception as err:  # noqa: BLE001 - whatever it is, the store cannot be used: say so, with its type
        why = describe_error(err)
        silent = why.startswith(("connection refused", "no answer"))
        hint = (" Start it (e.g. `mlflow server --host 127.0.0.1 --port 5000`) or pass another --mlflow-uri "
                "(the default is the embedded SQLite store under mlflow/)." if is_remote(store.uri) else "")
        raise SearchError(f"--mlflow-uri: the MLflow tracking store {store.display} "
                          f"{'does not answer' if silent else 'cannot be used'} ({why}).{hint}") from None


def git_version(repo: Path = REPO) -> dict:
    """The commit the search runs, and whether the working tree differs from it. Without a git
    checkout (e.g. `ray job submit --working-dir .` uploads no .git), $SOFTFINE_GIT_COMMIT."""
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, timeout=20,
                              check=True).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        commit = os.environ.get("SOFTFINE_GIT_COMMIT", "")
        if not commit:
            log.warning("no git checkout in %s and no $SOFTFINE_GIT_COMMIT: runs will not record the code version",
                        repo)
        return {"commit": commit, "dirty": "unknown"}
    return {"commit": commit, "dirty": str(dirty).lower()}


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
        """The experiment's id, created if needed (with the artifact root beside a SQLite store)."""
        found = self.client.get_experiment_by_name(name)
        if found is not None:
            if found.lifecycle_stage == "deleted":
                raise SearchError(f"--experiment-name {name}: this MLflow experiment was deleted; restore it "
                                  "(mlflow experiments restore) or choose another name")
            return found.experiment_id
        return self.client.create_experiment(name, artifact_location=local_artifact_root(self.uri))

    def start_parent(self, experiment_id: str, run_name: str, search: str, params: dict, tags: dict) -> str:
        from mlflow.entities import Param

        run = self.client.create_run(experiment_id, run_name=run_name,
                                     tags={SEARCH_TAG: search, PHASE_TAG: "parent", **tags})
        items = [Param(k, str(v)[:6000]) for k, v in params.items()]
        try:
            for start in range(0, len(items), 100):
                self.client.log_batch(run.info.run_id, params=items[start:start + 100])
        except BaseException:  # the run exists: not RUNNING forever
            self.attempt("end the parent run (FAILED)", lambda: self.client.set_terminated(run.info.run_id, "FAILED"))
            raise
        return run.info.run_id

    def children(self, experiment_id: str, parent_run_id: str) -> dict[str, Any]:
        """The parent's child runs by trial id (one each: a retried trial re-attaches to its run)."""
        runs, token = {}, None
        while True:
            page = self.client.search_runs([experiment_id], filter_string=f"tags.`mlflow.parentRunId` = "
                                           f"'{parent_run_id}'", max_results=1000, page_token=token)
            for run in page:
                runs.setdefault(run.data.tags.get(TRIAL_ID_TAG, run.info.run_id), run)
            token = page.token
            if not token:
                return runs


# ---------------------------------------------------------------------------------------------
# The trials table, the selection, the plot.

def trial_rows(results: list, children: dict[str, Any], phase: str) -> list[dict]:
    """One row per trial of a Ray ResultGrid, with its child run."""
    from softfine_tune_trial import hyperparameters

    rows = []
    for number, result in enumerate(results):
        config, metrics = result.config or {}, result.metrics or {}
        trial_id = metrics.get("trial_id") or (Path(result.path).name.split("_")[-1] if result.path else "")
        run = children.get(trial_id)
        if result.error is not None:
            status = "ERROR"
        elif metrics.get("final"):
            status = "TERMINATED"
        elif metrics:
            status = "STOPPED"  # stopped early by the scheduler
        else:
            status = "NOT STARTED"
        row = {"trial": number, "trial_id": trial_id, "phase": phase, "status": status,
               "mlflow_run_id": run.info.run_id if run else metrics.get("mlflow_run_id", ""),
               **hyperparameters(config), "seed": config.get("seed", (config.get("train") or {}).get("seed"))}
        for key in ("best_dev_f1", "best_step", "test_precision", "test_recall", "test_f1", *COUNT_KEYS):
            row[key] = metrics.get(key)
        row.update({k: v for k, v in metrics.items() if k.startswith("test_f1_level")})
        row.update(node_id=metrics.get("node_id", ""), trial_start_time=metrics.get("trial_start_time"),
                   # a trial stopped early has no end time of its own: its last report's
                   trial_end_time=metrics.get("trial_end_time") or metrics.get("timestamp"),
                   evaluations=metrics.get("training_iteration"),
                   mlflow_unlogged=metrics.get("mlflow_unlogged", 0), mlflow_error=metrics.get("mlflow_error", ""),
                   checkpoint=result.checkpoint.path if result.checkpoint else "",
                   error=str(result.error).strip().splitlines()[-1][:500] if result.error is not None else "")
        rows.append(row)
    return rows


def select(rows: list[dict]) -> dict | None:
    """The trial with the best dev F1 (the earliest one on a tie); test F1 plays no part."""
    scored = [r for r in rows if isinstance(r.get("best_dev_f1"), (int, float)) and not math.isnan(r["best_dev_f1"])]
    if not scored:
        return None
    best = max(r["best_dev_f1"] for r in scored)
    return min((r for r in scored if r["best_dev_f1"] == best), key=lambda r: r["trial"])


def write_table(rows: list[dict], path: Path) -> Path:
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows([{k: ("" if v is None else v) for k, v in row.items()} for row in rows])
    return path


def plot_dev_f1(rows: list[dict], path: Path, title: str, keys: Sequence[str] = SEARCH_KEYS) -> Path:
    """Dev F1 of every trial against each hyperparameter (alpha_aug, alpha_fea, beta, gamma, and
    soft_scope when searched): the points, and the mean per value."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scored = [r for r in rows if isinstance(r.get("best_dev_f1"), (int, float))]
    labels = {"alpha_aug": "α_aug", "alpha_fea": "α_fea", "beta": "β", "gamma": "γ", "soft_scope": "soft scope"}
    figure, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 4), sharey=True)
    for ax, key in zip(axes, keys):
        values = sorted({r[key] for r in scored})
        positions = {v: i for i, v in enumerate(values)}
        xs = [positions[r[key]] + 0.08 * ((n % 5) - 2) for n, r in enumerate(scored)]
        ax.scatter(xs, [r["best_dev_f1"] for r in scored], s=18, alpha=0.6)
        means = [sum(r["best_dev_f1"] for r in scored if r[key] == v) / max(1, sum(r[key] == v for r in scored))
                 for v in values]
        ax.plot(range(len(values)), means, color="black", marker="D", label="mean")
        ax.set_xticks(range(len(values)), [f"{v:g}" if isinstance(v, float) else str(v) for v in values])
        ax.set_xlabel(labels[key])
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("best dev F1")
    axes[0].legend()
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def log_model(uri: str, parent_run_id: str, checkpoint: Path) -> str:
    """The checkpoint as an MLflow pyfunc model named `model` on the parent run; returns its URI."""
    import mlflow
    import softfine

    model_code = Path(__file__).resolve().parent / "softfine_tune_pyfunc.py"

    requirements = []
    for name in ("torch", "transformers", "tokenizers", "safetensors", "seqeval", "pyyaml", "mlflow"):
        try:
            import importlib.metadata as md

            requirements.append(f"{name}=={md.version(name).split('+')[0]}")  # no local label (2.13.0+cpu)
        except Exception:  # noqa: BLE001
            requirements.append(name)
    mlflow.set_tracking_uri(uri)
    with mlflow.start_run(run_id=parent_run_id):
        info = mlflow.pyfunc.log_model(
            name="model", python_model=str(model_code), artifacts={"checkpoint": str(checkpoint)},
            code_paths=[str(Path(softfine.__file__).parent)],
            pip_requirements=requirements,
            metadata={"task": "fine-grained Chinese NER (SoftFiNE)",
                      "predict": "list of texts -> list of entities {text, category, levels, start, end}"})
    return info.model_uri


def write_json(path: Path, data: dict) -> Path:
    path.write_text(json.dumps(data, indent=1, ensure_ascii=False, default=str), encoding="utf-8")
    return path
