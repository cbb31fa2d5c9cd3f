"""A small search as a user runs it, browsed in the MLflow UI and served as a model.

The tracking server is the repository's one command (mlflow/server.sh) on 127.0.0.1; the search is
`python tune/search.py` in its own process, on its own local Ray instance, logging over HTTP. Then:

* headless Chromium renders the experiment page: the search's parent run, its trials nested under it;
* the parent run's page shows the selected alpha_aug, alpha_fea, beta and gamma;
* `mlflow models serve --env-manager local` serves the selected model on 127.0.0.1 and answers a POST
  with the entities of each sentence.

Screenshots go to test-artifacts/ (or $TEST_ARTIFACTS_DIR). The browser tests need Chromium
(apt-get install chromium; .ci/run installs it): skipped without it, except in CI, where they fail.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
import time
import urllib.request

import pytest

from mlflow_ui import (ARTIFACTS, chromium_path, mlflow_server, run_page_url, runs_page_url, start_chromium,
                       text_of)
from tune_fixtures import REPO, SEARCH_SCRIPT, children, free_port, parents, shared_data_dir, small_search_flags

needs_chromium = pytest.mark.skipif(
    chromium_path() is None and not os.environ.get("CI"),
    reason="Chromium is not installed (apt-get install chromium, or set $CHROMIUM); these tests run in CI")

EXPERIMENT = "softfine-ui"
SEARCH_NAME = "ui-search"
SELECTED = ("alpha_aug", "alpha_fea", "beta", "gamma")
RUN_NAME_LINKS = "[...document.querySelectorAll('[role=gridcell][col-id=\"attributes.`Run Name`\"] a')]"


@pytest.fixture(scope="module")
def search(tmp_path_factory):
    """mlflow/server.sh on a free loopback port, and a 3-trial search logging to it over HTTP."""
    folder = tmp_path_factory.mktemp("mlflow-ui")
    data = shared_data_dir()
    with mlflow_server(folder / "store") as uri:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "RAY_ADDRESS"))}
        command = [sys.executable, str(SEARCH_SCRIPT), *small_search_flags(data),
                   "--alphas", "0.1,0.1", "0.01,0.005", "0.01,0.01", "--beta", "2", "--gamma", "2",
                   "--cpus-per-trial", "0.5", "--address", "local", "--mlflow-uri", uri,
                   "--experiment-name", EXPERIMENT, "--storage-path", str(folder / "ray"), "--name", SEARCH_NAME]
        done = subprocess.run(command, env={**env, "RAY_USAGE_STATS_ENABLED": "0"}, cwd=REPO,
                              capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, done.stdout[-5000:] + done.stderr[-5000:]
        (parent,) = parents(uri, EXPERIMENT)
        kids = children(uri, EXPERIMENT, parent.info.run_id)
        assert len(kids) == 3
        yield {"uri": uri, "experiment_id": parent.info.experiment_id, "parent": parent,
               "children": {k.info.run_name: k.info.run_id for k in kids}, "output": done.stdout}


def run_name_cells(page) -> list[dict]:
    return page.evaluate(f"{RUN_NAME_LINKS}.map(a => ({{name: a.textContent.trim(), href: a.getAttribute('href'), "
                         "left: a.getBoundingClientRect().left, "
                         "expander: !!a.closest('[role=gridcell]').querySelector('button')}))")


def test_search_prints_where_to_open_the_ui(search):
    parent = search["parent"]
    assert run_page_url(search["uri"], search["experiment_id"], parent.info.run_id) in search["output"]


@needs_chromium
def test_experiment_page_nests_the_trials_under_the_parent_run(search):
    uri, experiment_id = search["uri"], search["experiment_id"]
    parent_id, parent_name = search["parent"].info.run_id, search["parent"].info.run_name
    with start_chromium() as browser:
        page = browser.open(runs_page_url(uri, experiment_id))
        page.wait_for(f"{RUN_NAME_LINKS}.some(a => a.textContent.trim() === {parent_name!r})", timeout=60,
                      what="the parent run in the runs table")
        # Collapsed: the table's top level is the parent alone, with an expander; it counts all 4 runs.
        (parent,) = run_name_cells(page)
        assert parent["name"] == parent_name and parent["expander"]
        assert parent["href"] == f"#/experiments/{experiment_id}/runs/{parent_id}"
        assert "4 matching runs" in page.text()

        page.click(f'[role=row][row-id="{parent_id}"] [col-id="attributes.`Run Name`"] button')
        page.wait_for(f"{RUN_NAME_LINKS}.length === 4", timeout=20, what="the child runs after expanding")
        cells = run_name_cells(page)
        shot = page.screenshot(ARTIFACTS / "mlflow-ui-experiment.png")

    assert cells[0]["name"] == parent_name
    kids = cells[1:]
    assert sorted(k["name"] for k in kids) == sorted(search["children"])
    for kid in kids:  # indented under the parent, links to their own run pages, no expander of their own
        assert kid["left"] > parent["left"] + 8, (kid, parent)
        assert kid["href"] == f"#/experiments/{experiment_id}/runs/{search['children'][kid['name']]}"
        assert not kid["expander"]
    assert len({k["left"] for k in kids}) == 1
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 10_000


@needs_chromium
def test_parent_run_page_shows_the_selected_hyperparameters(search):
    parent = search["parent"]
    url = run_page_url(search["uri"], search["experiment_id"], parent.info.run_id)
    with start_chromium(window=(1600, 2400)) as browser:  # tall: the parameters table too
        page = browser.open(url)
        page.wait_for("document.body?.innerText.includes('selected_gamma')", timeout=60,
                      what="the parent run's parameters")
        names = json.dumps(sorted(search["children"]))
        page.wait_for(f"{names}.every(n => document.body.innerText.includes(n))", timeout=30,
                      what="the child runs in 'About this run'")
        text = page.text()
        # The search logs ~40 params; a person filters the table to find the selection.
        page.type_into('input[placeholder="Search parameters"]', "selected_")
        page.wait_for("!document.body.innerText.includes('cluster_cpus')", timeout=20,
                      what="the parameters table filtered to selected_*")
        params = page.text()
        params = params[params.index("Parameters ("):]
        shot = page.screenshot(ARTIFACTS / "mlflow-ui-parent-run.png")

    assert parent.info.run_name in text
    for name in SELECTED:  # the table's rows: name, then value, as the search logged them
        value = parent.data.params[f"selected_{name}"]
        assert re.search(rf"(?<![\w.])selected_{name} {re.escape(value)}(?![\w.])", params), (name, params[:1500])
    children_text = text[text.index("Child runs"):][:400]  # "About this run" lists the nested runs
    for name in search["children"]:
        assert name in children_text, children_text
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 10_000


@contextlib.contextmanager
def model_server(model_uri: str, tracking_uri: str, log_path):
    """`mlflow models serve` in this environment (--env-manager local) on a free loopback port."""
    port = free_port()
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri}
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "models", "serve", "-m", model_uri, "--env-manager", "local",
             "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
            stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            deadline = time.time() + 180
            while True:
                if process.poll() is not None:
                    raise RuntimeError(f"mlflow models serve exited: {log_path.read_text()[-3000:]}")
                with contextlib.suppress(OSError):
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2) as answer:
                        if answer.status == 200:
                            break
                if time.time() > deadline:
                    raise RuntimeError(f"mlflow models serve did not answer: {log_path.read_text()[-3000:]}")
                time.sleep(1)
            yield f"http://127.0.0.1:{port}"
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, 15)
            process.wait(timeout=30)


def test_selected_model_is_served_over_http(search, tmp_path):
    import mlflow

    from softfine.datasets import read_split

    parent = search["parent"]
    assert parent.data.metrics["best_dev_f1"] > 0  # so the model finds entities in those dev sentences
    # The sentences the search evaluated on (--limit-eval 24): a dev F1 above 0 means entities in them.
    texts = ["".join(s.chars) for s in read_split("resume", "dev", shared_data_dir())[:24]]
    model_uri = f"runs:/{parent.info.run_id}/model"
    with model_server(model_uri, search["uri"], tmp_path / "serve.log") as url:
        request = urllib.request.Request(f"{url}/invocations", data=json.dumps({"inputs": texts}).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=120) as answer:
            served = json.loads(answer.read())["predictions"]

    assert len(served) == len(texts)
    assert sum(len(found) for found in served) > 0
    for text, found in zip(texts, served):
        for entity in found:
            assert set(entity) == {"text", "category", "levels", "start", "end"}
            assert text[entity["start"]:entity["end"] + 1] == entity["text"]
    mlflow.set_tracking_uri(search["uri"])
    assert served == mlflow.pyfunc.load_model(model_uri).predict(texts)  # what the model says in-process
