"""A small search as a user runs it, browsed in the MLflow UI and served as a model.

The tracking server is the repository's one command (mlflow/server.sh) on 127.0.0.1; the search is
`python tune/search.py` in its own process, on its own local Ray instance, logging over HTTP. Then, in
a headless Chromium driven by Playwright (tests/ui_browser.py), what a user looks for:

* the experiment: marked as model training (its kind), its runs table at the address the search
  prints and, once "Model training" has been clicked in a browser, at the experiment's own address;
  on a first visit (an empty browser profile, nothing clicked away), the experiments list opening it
  on its runs table, and the parent run's first screen showing the selection: both xfail, on exactly
  the causes MLflow 3.17.2 has (tests/ui_browser.py), and pass once MLflow or the search meets them;
  the search's parent run, its 3 trials nested under it (shown once expanded), each named by its
  grid point (0.1,0.1,2,2), whole in the table's default column width at 1280x800;
* the parent run's page in a 1280x800 window, without scrolling: the selected (α_aug, α_fea, β, γ),
  its dev and test F1 with what they were counted on, and a link to the selected child run; the
  selected alpha_aug, alpha_fea, beta and gamma as params, and its child runs;
* the selected child run tagged as such, the registered model version with the point, the
  dataset, the search's run and a description;
* the parent run's artifacts: the trials table, the dev F1 plot, and Optuna's plots in optuna/;

and `mlflow models serve --env-manager local` serves the selected model on 127.0.0.1 and answers a
POST with the entities of each sentence.

Screenshots go to test-artifacts/mlflow-ui/ (or $TEST_ARTIFACTS_DIR/mlflow-ui/). The browser tests
need Chromium (apt-get install chromium; .ci/run installs it) and Playwright (the `test` extra):
skipped without them, except in CI, where they fail.
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
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from tune_fixtures import (
    UI_EXPERIMENT,
    UI_GRID,
    free_port,
    shared_data_dir,
)
from ui_browser import (
    ASSISTANT_AUTO_OPENED_KEY,
    FIRST_SCREEN,
    WORKFLOW_KEY,
    assistant_opens,
    browser_missing,
    chromium,
    close_assistant,
    open_page,
    run_page_url,
    runs_page_url,
)

if TYPE_CHECKING:
    from playwright.sync_api import Browser, Locator, Page
with contextlib.suppress(ImportError):  # without Playwright the browser tests skip (in CI: fail, saying why)
    from playwright.sync_api import expect

needs_chromium = pytest.mark.skipif(
    browser_missing() is not None and not os.environ.get("CI"),
    reason=f"{browser_missing()}; these tests run in CI",
)

SELECTED = ("alpha_aug", "alpha_fea", "beta", "gamma")
OPTUNA_PLOTS = ("param_importances.png", "slice.png", "contour_beta_gamma.png", "optimization_history.png")


@pytest.fixture(scope="module")
def search(ui_search: dict) -> dict:
    """The README's search on 3 points, logging over HTTP to mlflow/server.sh (conftest.ui_search)."""
    return ui_search


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with chromium() as browser:
        yield browser


def test_search_prints_where_to_open_the_ui(search):
    parent = search["parent"]
    assert run_page_url(search["uri"], search["experiment_id"], parent.info.run_id) in search["output"]


# --- The experiment page: the runs table. ------------------------------------------------------------


def run_link(page: Page, name: str) -> Locator:
    """A run's name in the runs table, a link to its page."""
    return page.get_by_role("link", name=name, exact=True)


def expand(page: Page, run_id: str) -> None:
    """Opens a parent run's row: MLflow shows nested runs collapsed under their parent."""
    page.locator(f'[role=row][row-id="{run_id}"] [col-id="attributes.`Run Name`"]').get_by_role(
        "button"
    ).click()


def left(link: Locator) -> float:
    box = link.bounding_box()
    assert box is not None, link
    return box["x"]


@needs_chromium
def test_experiment_page_nests_the_trials_under_the_parent_run(search, browser):
    uri, experiment_id, parent = search["uri"], search["experiment_id"], search["parent"]
    with open_page(browser, runs_page_url(uri, experiment_id), "experiment") as page:
        parent_link = run_link(page, parent.info.run_name)
        expect(parent_link).to_have_attribute(
            "href", f"#/experiments/{experiment_id}/runs/{parent.info.run_id}"
        )
        for name in search["children"]:  # collapsed: the trials are not rows of their own yet
            expect(run_link(page, name)).to_have_count(0)

        expand(page, parent.info.run_id)
        for name, run_id in search["children"].items():
            child_link = run_link(page, name)
            expect(child_link).to_be_visible()
            expect(child_link).to_have_attribute("href", f"#/experiments/{experiment_id}/runs/{run_id}")
            assert left(child_link) > left(parent_link) + 8, f"{name} is not indented under the parent run"


def cut_off(link: Locator) -> float:
    """How many pixels of a link's text its cell hides (the runs table clips a long name)."""
    return link.evaluate("""e => { const text = document.createRange(); text.selectNodeContents(e);
        return text.getBoundingClientRect().right - e.getBoundingClientRect().right; }""")


@needs_chromium
def test_trials_are_named_by_their_grid_point_whole_in_the_table(search, browser):
    names = [f"{aug:g},{fea:g},2,2" for aug, fea in UI_GRID]  # α_aug,α_fea,β,γ with --beta 2 --gamma 2
    url = runs_page_url(search["uri"], search["experiment_id"])
    with open_page(browser, url, "experiment-trial-names", viewport=FIRST_SCREEN) as page:
        expand(page, search["parent"].info.run_id)
        for name in names:
            link = run_link(page, name)
            expect(link, f"a trial named by its grid point, {name}").to_be_visible()
            assert cut_off(link) <= 0.5, f"{name} is cut in the runs table's Run Name column"


@needs_chromium
def test_the_experiment_opens_in_its_runs_table(search, browser):
    """MLflow 3.17 takes GenAI or Model training from the address or from the browser, whatever the
    experiment's kind: the search marks the kind, prints the Model training address, and one click on
    "Model training" makes the experiment itself open on its runs."""
    from mlflow.tracking import MlflowClient

    uri, experiment_id, parent = search["uri"], search["experiment_id"], search["parent"]
    tags = MlflowClient(tracking_uri=uri).get_experiment(experiment_id).tags
    assert tags.get("mlflow.experimentKind") == "custom_model_development"
    with open_page(
        browser, f"{uri}/#/experiments", "experiment-opens-in-runs", viewport=FIRST_SCREEN
    ) as page:
        page.get_by_text("Model training", exact=True).click()  # the sidebar's switch, top left
        page.get_by_role("link", name=UI_EXPERIMENT, exact=True).click()
        expect(page).to_have_url(re.compile(rf"#/experiments/{experiment_id}/runs"))
        expect(run_link(page, parent.info.run_name)).to_be_visible()
        assert page.evaluate(f"localStorage.getItem('{WORKFLOW_KEY}')") == '"machine_learning"'  # remembered
        page.goto(f"{uri}/#/experiments/{experiment_id}")  # the experiment's own address, later
        expect(page).to_have_url(re.compile(rf"#/experiments/{experiment_id}/runs"))
        expect(run_link(page, parent.info.run_name)).to_be_visible()


GENAI_FIRST = (
    "MLflow 3.17.2 opens an experiment in GenAI mode on a browser's first visit whatever its "
    "mlflow.experimentKind tag: useExperimentKind follows the address's or the browser's workflowType "
    "(default genai) as shouldEnableWorkflowBasedNavigation() returns true, and no server setting "
    "changes that (mlflow/mlflow#24498; tests/ui_browser.py)"
)


@needs_chromium
def test_a_first_visit_opens_the_experiment_in_its_runs_table(search, browser):
    """Issue #25: in a browser that has never been on this server, clicking the experiment in the
    experiments list opens its runs table; nothing is switched or closed first. xfails only while
    MLflow lands on its GenAI tabs for want of a remembered or addressed workflowType."""
    from mlflow.tracking import MlflowClient

    uri, experiment_id, parent = search["uri"], search["experiment_id"], search["parent"]
    tags = MlflowClient(tracking_uri=uri).get_experiment(experiment_id).tags
    assert tags.get("mlflow.experimentKind") == "custom_model_development"
    with open_page(browser, f"{uri}/#/experiments", "first-visit-experiment", viewport=FIRST_SCREEN) as page:
        page.get_by_role("link", name=UI_EXPERIMENT, exact=True).click()
        expect(page).to_have_url(re.compile(rf"#/experiments/{experiment_id}/\w+"))  # the tab it lands on
        landed = page.url.split("#", 1)[1]
        remembered = page.evaluate(f"localStorage.getItem('{WORKFLOW_KEY}')")
        if (
            re.match(rf"/experiments/{experiment_id}/(overview|traces)\b.*workflowType=genai", landed)
            and remembered is None
        ):
            pytest.xfail(f"{GENAI_FIRST}: it landed on {landed}")
        expect(page).to_have_url(re.compile(rf"#/experiments/{experiment_id}/runs"))
        expect(run_link(page, parent.info.run_name)).to_be_visible()


# --- The parent run's page. -------------------------------------------------------------------------


def selected_child(search: dict):
    (kid,) = [k for k in search["kids"] if k.info.run_id == search["parent"].data.params["selected_run_id"]]
    return kid


def selection_text(search: dict) -> str:
    p = search["parent"].data.params
    point = ", ".join(f"{float(p[f'selected_{k}']):g}" for k in SELECTED)
    return f"Selected (α_aug, α_fea, β, γ) = ({point})"


def selection_link(page: Page, search: dict) -> Locator:
    """The description's link to the selected child run, in the paragraph that names the selection."""
    description = page.get_by_test_id("note-editor-preview-content")  # the run's description, rendered
    paragraph = description.locator("p").filter(has_text=selection_text(search))
    return paragraph.get_by_role("link", name=selected_child(search).info.run_name, exact=True)


def expect_selection_on_screen(page: Page, search: dict) -> None:
    """The selection, its dev and test F1 with their counts and the link to its run, all in the
    viewport; the link opens the selected child run."""
    parent, experiment_id, kid = search["parent"], search["experiment_id"], selected_child(search)
    m = parent.data.metrics
    counted = (
        f"dev F1 {m['best_dev_f1']:.4f} on {m['best_dev_sentences']:g} sentences, "
        f"{m['best_dev_gold_entities']:g} gold entities; test F1 {m['best_test_f1']:.4f} on "
        f"{m['best_test_sentences']:g} sentences, {m['best_test_gold_entities']:g} gold entities"
    )
    description = page.get_by_test_id("note-editor-preview-content")
    expect(description.get_by_text(selection_text(search))).to_be_in_viewport(ratio=1)
    paragraph = description.locator("p").filter(has_text=selection_text(search))
    expect(paragraph).to_contain_text(counted)
    link = selection_link(page, search)
    expect(link).to_be_in_viewport(ratio=1)
    with page.context.expect_page() as opened:  # MLflow opens a description's links in a new tab
        link.click()
    expect(opened.value).to_have_url(re.compile(rf"#/experiments/{experiment_id}/runs/{kid.info.run_id}"))
    expect(opened.value.get_by_role("heading", name=kid.info.run_name)).to_be_visible()


@needs_chromium
def test_parent_run_first_screen_shows_the_selection_and_links_its_run(search, browser):
    """Once the Assistant panel has been closed (the browser remembers): a first visit is
    test_a_first_visit_to_the_parent_run_shows_the_selection_on_the_first_screen."""
    url = run_page_url(search["uri"], search["experiment_id"], search["parent"].info.run_id)
    with open_page(browser, url, "parent-run-first-screen", viewport=FIRST_SCREEN) as page:
        close_assistant(page)  # open on a browser's first visit: the page is then one column, details first
        expect_selection_on_screen(page, search)


ASSISTANT_FIRST = (
    "MLflow 3.17.2 opens its Assistant panel on a browser's first visit to a server on localhost, "
    "127.0.0.1 or ::1, with no server-side switch; it narrows the run page below two columns, and "
    "the stacked page puts About this run, Datasets, Tags and Registered models above the "
    "description (tests/ui_browser.py)"
)


@needs_chromium
def test_a_first_visit_to_the_parent_run_shows_the_selection_on_the_first_screen(search, browser):
    """Issue #25: the address the search prints, in a browser that has never been on this server, at
    1280x800 without scrolling: the selection, its F1s with their counts and the link to its run.
    Nothing is closed first. xfails only while the Assistant panel MLflow opened is what hides them."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    url = run_page_url(search["uri"], search["experiment_id"], search["parent"].info.run_id)
    with open_page(browser, url, "first-visit-parent-run", viewport=FIRST_SCREEN) as page:
        opened = assistant_opens(page)
        link = selection_link(page, search)
        expect(link).to_be_visible()  # rendered, on the first screen or not
        try:
            expect(link).to_be_in_viewport(ratio=1, timeout=10_000)
        except (AssertionError, PlaywrightTimeout):
            auto_opened = page.evaluate(f"localStorage.getItem('{ASSISTANT_AUTO_OPENED_KEY}')") == "true"
            if opened and auto_opened:
                box = link.bounding_box() or {}
                pytest.xfail(
                    f"{ASSISTANT_FIRST}: the link to the selected run is at y={box.get('y', 0):.0f} "
                    f"in a {FIRST_SCREEN['height']} px high window"
                )
            raise
        expect_selection_on_screen(page, search)


def test_the_selection_is_marked_on_its_run_and_model_version(search):
    from mlflow.tracking import MlflowClient

    client, parent = MlflowClient(tracking_uri=search["uri"]), search["parent"]
    kid = selected_child(search)
    assert [k.info.run_name for k in search["kids"] if k.data.tags.get("softfine.selected") == "true"] == [
        kid.info.run_name
    ]
    version = client.get_model_version_by_alias("softfine-resume", "champion")
    assert {k: float(version.tags[k]) for k in SELECTED} == {
        k: float(parent.data.params[f"selected_{k}"]) for k in SELECTED
    }
    assert (
        version.tags["dataset"] == "resume" and version.tags["softfine.search_run_id"] == parent.info.run_id
    )
    assert (
        version.tags["softfine.selected_run_id"] == kid.info.run_id and version.run_id == parent.info.run_id
    )
    assert (
        "\n" not in version.description
        and f"dev F1 {parent.data.metrics['best_dev_f1']:.4f}" in version.description
    )


@needs_chromium
def test_parent_run_page_shows_the_selected_hyperparameters(search, browser):
    parent = search["parent"]
    url = run_page_url(search["uri"], search["experiment_id"], parent.info.run_id)
    with open_page(browser, url, "parent-run", height=2400) as page:  # tall: the parameters table too
        # The search logs ~40 params; a person filters the table to find the selection.
        page.get_by_placeholder("Search parameters").fill("selected_")
        for name in SELECTED:
            row = page.get_by_role("row").filter(has=page.get_by_text(f"selected_{name}", exact=True))
            expect(row.get_by_role("cell").last).to_have_text(parent.data.params[f"selected_{name}"])
        for name in search["children"]:  # "About this run" lists the nested runs
            child_runs = page.get_by_test_id("key-value-Child runs")
            expect(child_runs.get_by_role("link", name=name, exact=True)).to_be_visible()


def expect_folder_lists(page: Page, folder: str, files: tuple[str, ...]) -> None:
    """The artifact tree has `folder`, and opening it shows `files`."""
    entry = page.get_by_text(folder, exact=True)
    expect(entry, f"a folder {folder}/ in the run's artifacts").to_be_visible()
    entry.click()
    for name in files:
        # In the viewport, not only visible: the tree slides a folder open, and an entry still clipped
        # by that animation is in the page but not yet on screen (nor in the screenshot).
        expect(
            page.get_by_text(name, exact=True), f"{folder}/{name} in the run's artifacts"
        ).to_be_in_viewport()


@needs_chromium
def test_parent_run_artifacts_list_the_plots(search, browser):
    url = run_page_url(search["uri"], search["experiment_id"], search["parent"].info.run_id, tab="artifacts")
    with open_page(browser, url, "parent-run-artifacts") as page:
        for name in ("trials.csv", "dev_f1_vs_hyperparameters.png"):
            expect(page.get_by_text(name, exact=True)).to_be_visible()
        expect_folder_lists(page, "optuna", OPTUNA_PLOTS)  # Optuna's plots of the study (the tune/ refactor)


# --- The selected model, served. ----------------------------------------------------------------------


@contextlib.contextmanager
def model_server(model_uri: str, tracking_uri: str, log_path: Path) -> Iterator[str]:
    """`mlflow models serve` in this environment (--env-manager local) on a free loopback port."""
    port = free_port()
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri}
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "mlflow",
                "models",
                "serve",
                "-m",
                model_uri,
                "--env-manager",
                "local",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--workers",
                "1",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
        try:
            deadline = time.time() + 180
            while True:
                if process.poll() is not None:
                    raise RuntimeError(f"mlflow models serve exited: {log_path.read_text()[-3000:]}")
                with (
                    contextlib.suppress(OSError),
                    urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2) as answer,
                ):
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
        request = urllib.request.Request(
            f"{url}/invocations",
            data=json.dumps({"inputs": texts}).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=120) as answer:
            served = json.loads(answer.read())["predictions"]

    assert len(served) == len(texts)
    assert sum(len(found) for found in served) > 0
    for text, found in zip(texts, served):
        for entity in found:
            assert set(entity) == {"text", "category", "levels", "start", "end"}
            assert text[entity["start"] : entity["end"] + 1] == entity["text"]
    mlflow.set_tracking_uri(search["uri"])
    assert served == mlflow.pyfunc.load_model(model_uri).predict(texts)  # what the model says in-process
