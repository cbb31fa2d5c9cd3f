"""The MLflow UI, rendered by a headless Chromium, shows a search the way the search logs it: one
parent run whose trials are nested child runs (tag mlflow.parentRunId), and on the parent's page
the four SoftFiNE hyperparameters with their values.

For now the runs are built directly with MlflowClient, shaped like tune/search.py's (a parent run
with alpha_aug, alpha_fea, beta, gamma; one child per trial). Screenshots go to test-artifacts/
(or $TEST_ARTIFACTS_DIR). Needs Chromium (apt-get install chromium): skipped without it, except in
CI, where it must run."""

from __future__ import annotations

import os
import re

import pytest
from mlflow import MlflowClient
from mlflow.entities import Metric, Param

from mlflow_ui import (ARTIFACTS, chromium_path, mlflow_server, render, run_page_url, runs_page_url, screenshot,
                       start_chromium, text_of)

pytestmark = pytest.mark.skipif(
    chromium_path() is None and not os.environ.get("CI"),
    reason="Chromium is not installed (apt-get install chromium, or set $CHROMIUM); these tests run in CI")

PARENT_NAME = "search-weibo"
PARENT_PARAMS = {"alpha_aug": "0.01", "alpha_fea": "0.005", "beta": "3", "gamma": "2.5"}
TRIALS = [{"alpha_aug": "0.1", "alpha_fea": "0.1", "beta": "2", "gamma": "1.5"},
          {"alpha_aug": "0.01", "alpha_fea": "0.005", "beta": "3", "gamma": "2.5"},
          {"alpha_aug": "0.01", "alpha_fea": "0.01", "beta": "4", "gamma": "2"}]
RUN_NAME_LINKS = "[...document.querySelectorAll('[role=gridcell][col-id=\"attributes.`Run Name`\"] a')]"


@pytest.fixture(scope="module")
def search(tmp_path_factory):
    """A tracking server with one experiment: a parent run and three nested trial runs."""
    with mlflow_server(tmp_path_factory.mktemp("mlflow-ui") / "store") as uri:
        client = MlflowClient(tracking_uri=uri)
        experiment_id = client.create_experiment("softfine-ui")
        parent = client.create_run(experiment_id, run_name=PARENT_NAME)
        parent_id = parent.info.run_id
        client.log_batch(parent_id, params=[Param(k, v) for k, v in PARENT_PARAMS.items()])
        children = {}
        for i, params in enumerate(TRIALS):
            child = client.create_run(experiment_id, run_name=f"trial-{i}", tags={"mlflow.parentRunId": parent_id})
            client.log_batch(child.info.run_id, params=[Param(k, v) for k, v in params.items()],
                             metrics=[Metric("dev_f1", 0.5 + i / 10, 0, step=1)])
            client.set_terminated(child.info.run_id)
            children[f"trial-{i}"] = child.info.run_id
        client.log_metric(parent_id, "best_dev_f1", 0.7)
        client.set_terminated(parent_id)
        yield {"uri": uri, "experiment_id": experiment_id, "parent_id": parent_id, "children": children}


def run_name_cells(page) -> list[dict]:
    return page.evaluate(f"{RUN_NAME_LINKS}.map(a => ({{name: a.textContent.trim(), href: a.getAttribute('href'), "
                         "left: a.getBoundingClientRect().left, "
                         "expander: !!a.closest('[role=gridcell]').querySelector('button')}))")


def test_experiment_page_nests_the_trials_under_the_parent_run(search):
    uri, experiment_id, parent_id = search["uri"], search["experiment_id"], search["parent_id"]
    with start_chromium() as browser:
        page = browser.open(runs_page_url(uri, experiment_id))
        page.wait_for(f"{RUN_NAME_LINKS}.some(a => a.textContent.trim() === {PARENT_NAME!r})", timeout=60,
                      what="the parent run in the runs table")
        # Collapsed: the table's top level is the parent alone, with an expander; it counts all 4 runs.
        (parent,) = run_name_cells(page)
        assert parent["name"] == PARENT_NAME and parent["expander"]
        assert parent["href"] == f"#/experiments/{experiment_id}/runs/{parent_id}"
        assert "4 matching runs" in page.text()

        page.click(f'[role=row][row-id="{parent_id}"] [col-id="attributes.`Run Name`"] button')
        page.wait_for(f"{RUN_NAME_LINKS}.length === 4", timeout=20, what="the child runs after expanding")
        cells = run_name_cells(page)
        shot = page.screenshot(ARTIFACTS / "mlflow-ui-experiment.png")

    assert cells[0]["name"] == PARENT_NAME
    kids = cells[1:]
    assert sorted(k["name"] for k in kids) == sorted(search["children"])
    for kid in kids:  # indented under the parent, links to their own run pages, no expander of their own
        assert kid["left"] > parent["left"] + 8, (kid, parent)
        assert kid["href"] == f"#/experiments/{experiment_id}/runs/{search['children'][kid['name']]}"
        assert not kid["expander"]
    assert len({k["left"] for k in kids}) == 1
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 10_000


def test_parent_run_page_shows_the_four_hyperparameters_and_the_trials(search):
    url = run_page_url(search["uri"], search["experiment_id"], search["parent_id"])
    text = text_of(render(url))
    assert PARENT_NAME in text
    assert "Parameters (4)" in text, text[:3000]
    params = text[text.index("Parameters (4)"):]
    for name, value in PARENT_PARAMS.items():  # the table's rows: name, then value
        assert re.search(rf"(?<![\w.]){re.escape(name)} {re.escape(value)}(?![\w.])", params), (name, params[:600])
    # "About this run" lists the nested runs.
    children = text[text.index("Child runs"):][:200]
    for name in search["children"]:
        assert name in children, children

    shot = screenshot(url, ARTIFACTS / "mlflow-ui-parent-run.png", window=(1600, 2000))  # tall: the params too
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 10_000
