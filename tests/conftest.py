"""Shared fixtures. Tests use the real datasets in ../shared/data (or $SOFTFINE_DATA_DIR) and fail,
not skip, when they are missing."""

import contextlib
import ctypes
import os
from pathlib import Path

import pytest

# README's test command gives a relative $SOFTFINE_DATA_DIR; the searches and jobs that tests start
# run in other folders (tmp_path, Ray's working_dir), so they inherit it made absolute.
if os.environ.get("SOFTFINE_DATA_DIR"):
    os.environ["SOFTFINE_DATA_DIR"] = str(Path(os.environ["SOFTFINE_DATA_DIR"]).resolve())


@pytest.fixture(scope="session")
def data_dir() -> Path:
    from tune_fixtures import shared_data_dir

    return shared_data_dir()


@pytest.fixture(scope="module")
def ray_local():
    """A local Ray instance of 2 CPUs for the searches of one test module; its address."""
    import ray

    ray.init(address="local", num_cpus=2, num_gpus=0, include_dashboard=False, logging_level="WARNING")
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """A real MLflow tracking server (`mlflow server`) on 127.0.0.1 for the searches of one test module."""
    from tune_fixtures import MlflowServer

    server = MlflowServer(tmp_path_factory.mktemp("mlflow-server")).start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A real S3 server (SeaweedFS's `weed mini`) on 127.0.0.1 for the session; stopped after it.
    `s3_server.env` is what a client needs (AWS_ENDPOINT_URL and the test user's keys)."""
    from s3_server import S3Server

    server = S3Server(tmp_path_factory.mktemp("s3")).start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def ui_search(tmp_path_factory):
    """The README's search on 3 points, logging over HTTP to mlflow/server.sh on 127.0.0.1, stopped
    after the session: browsed in the MLflow UI (test_mlflow_ui.py) and read as a console
    (test_console.py), whose files run in one worker (ONE_SCOPE) so that it runs once."""
    from tune_fixtures import ui_search

    with ui_search(tmp_path_factory.mktemp("mlflow-ui")) as found:
        yield found


PR_SET_CHILD_SUBREAPER, PR_GET_CHILD_SUBREAPER = 36, 37  # prctl(2), <linux/prctl.h>


@pytest.fixture
def adopting_orphans():
    """This test's process as a child subreaper: a process that outlives its parent (a daemon left by
    server.sh) stays below the test, where processes_mentioning sees it, rather than going to init.
    Those adopted and ended are reaped afterwards."""
    prctl = ctypes.CDLL(None, use_errno=True).prctl  # no psutil or os call for it
    was = ctypes.c_int()
    if prctl(PR_GET_CHILD_SUBREAPER, ctypes.byref(was)) or prctl(PR_SET_CHILD_SUBREAPER, 1):
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER)")
    import psutil

    before = {child.pid for child in psutil.Process().children()}
    yield
    prctl(PR_SET_CHILD_SUBREAPER, was.value)
    for child in psutil.Process().children():
        with contextlib.suppress(psutil.NoSuchProcess, ChildProcessError):
            if child.pid not in before and child.status() == psutil.STATUS_ZOMBIE:
                os.waitpid(child.pid, 0)


# pytest -n 2 (pyproject.toml): a file's tests run in one worker, so that its module fixtures (a
# trained model, a search, a Ray instance) are made once, as xdist's --dist loadfile does. The two
# files that start Ray nodes with `ray up`/`ray start` over sshd in namespaces of their own count
# as one: one at a time. (xdist_group marks added here would come too late for xdist: issue #1241.)
# The two files that read the one search of `ui_search` count as one too.
ONE_SCOPE = {
    "test_two_nodes.py": "ray-nodes",
    "test_ray_up.py": "ray-nodes",
    "test_mlflow_ui.py": "ui-search",
    "test_console.py": "ui-search",
}
# The longest files first (a CI-like run's durations, benchmarks/README.md "Tests"), so that the two
# workers end together instead of one running the longest file alone at the end. xdist hands out
# the scopes in this order only with --no-loadscope-reorder (pyproject.toml's addopts); otherwise it
# sorts them by their number of tests, which put the two-node test (2 tests, minutes) last.
LONGEST_FIRST = [
    "test_tune_search.py",
    "test_benchmarks.py",
    "test_tune_fused.py",
    "test_mlflow_ui.py",
    "test_tune_cluster.py",
    "test_search_state.py",
    "test_two_nodes.py",
    "test_ray_up.py",
    "test_mlflow_server.py",
    "test_cli.py",
    "test_user_data_search.py",
    "test_bad_input_tune.py",
    "test_mlflow_server_options.py",
    "test_user_data.py",
    "test_s3_search.py",
    "test_step.py",
    "test_mlflow_s3.py",
    "test_console.py",
    "test_pipeline.py",
    "test_fused.py",
]


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: a file's own order kept


@pytest.hookimpl(optionalhook=True)  # -p no:xdist runs the tests in this process
def pytest_xdist_make_scheduler(config, log):
    from xdist.scheduler import LoadFileScheduling

    class ByFile(LoadFileScheduling):
        def _split_scope(self, nodeid: str) -> str:
            file = nodeid.split("::", 1)[0]
            return ONE_SCOPE.get(Path(file).name, file)

    return ByFile(config, log)
