"""The MLflow UI in a headless Chromium, driven by Playwright.

The browser is Debian's `chromium` (apt-get install chromium), or $CHROMIUM: Playwright launches it by
path, so `playwright install` (which downloads a browser build of its own) is never needed. Each page
gets a new browser context (empty profile) and only talks to the test's own servers on 127.0.0.1.

MLflow 3.17 opens an experiment in its "GenAI" mode (a traces overview) unless the address says
`?workflowType=machine_learning` (its "Model training" mode, whose experiment page is the runs table,
as the search's own hint prints it, tune/report.py ui_hint) or the browser remembers a click on
"Model training". On a server on 127.0.0.1 it also opens its Assistant panel on a browser's first
visit, which narrows the page to one column (`close_assistant`).

Where that comes from in MLflow 3.17.2's UI (mlflow/server/js/build/static/js, the names from its
sources), for the tests that check a first visit without working around either:
* the mode: WorkflowTypeProvider takes `workflowType` from the address, else from localStorage
  WORKFLOW_KEY (default "genai"; only the sidebar's GenAI / Model training switch writes it), and
  useExperimentKind returns the kind of that mode, not the experiment's `mlflow.experimentKind` tag,
  because shouldEnableWorkflowBasedNavigation() is `return true` (main.*.js: `n=(0,s.Z0)(); ...
  n?m(t):(e=>...find(e=>"mlflow.experimentKind"===e.key)...)(e)`, `Z0:()=>R`, `R=()=>!0`). No server
  option or environment variable sets it (mlflow/mlflow#24498; its proposed fix, #24493, is not in 3.17.2).
* the Assistant: its button's effect `n&&!f&&(p(!0),o||a())` opens the panel when the page's host
  name is localhost, 127.0.0.1 or ::1 (`n`) and localStorage ASSISTANT_AUTO_OPENED_KEY is unset
  (`f`); ASSISTANT_OPEN_KEY then keeps it open on every visit until it is closed. The server has no
  switch for it (MLFLOW_ENABLE_REMOTE_ASSISTANT only lets other hosts use it). The panel takes 25% of
  the window; a run page narrower than the theme's lg breakpoint stacks its side sections (About this
  run, Datasets, Tags, Registered models) above the description (verticalStackOrder "aside-first").
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from playwright.sync_api import Browser, Locator, Page

REPO = Path(__file__).resolve().parents[1]
# CI keeps test-artifacts/ as an artifact: the screenshots show what the UI looked like, failed or not.
SCREENSHOTS = Path(os.environ.get("TEST_ARTIFACTS_DIR") or REPO / "test-artifacts") / "mlflow-ui"
VIEWPORT = {"width": 1600, "height": 1000}
FIRST_SCREEN = {"width": 1280, "height": 800}  # what a laptop shows without scrolling
# MLflow 3.17.2's localStorage keys (its useLocalStorage hook appends _v1 to each), see above.
WORKFLOW_KEY = "mlflow.workflowType_v1"
ASSISTANT_AUTO_OPENED_KEY = "mlflow.assistant.fab.autoOpenedOnFirstLoad_v1"
ASSISTANT_OPEN_KEY = "mlflow.assistant.panelOpen_v1"


def chromium_path() -> str | None:
    """$CHROMIUM, else a chromium on PATH (Debian's /usr/bin/chromium)."""
    return os.environ.get("CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")


def browser_missing() -> str | None:
    """Why the browser tests cannot run here, or None when they can."""
    if chromium_path() is None:
        return "Chromium is not installed (apt-get install chromium, or set $CHROMIUM)"
    if importlib.util.find_spec("playwright") is None:
        return "Playwright is not installed (pip install -e '.[test]')"
    return None


@contextlib.contextmanager
def chromium() -> Iterator[Browser]:
    """A headless Chromium, closed (with Playwright's driver) on exit."""
    from playwright.sync_api import expect, sync_playwright

    if reason := browser_missing():  # in CI the tests run anyway, and fail here with the reason
        raise RuntimeError(reason)
    # MLflow's single-page app loads a large bundle and then queries the server: on a busy 2-core
    # machine that takes far longer than Playwright's 5 s default.
    expect.set_options(timeout=60_000)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=chromium_path(), headless=True, args=["--disable-dev-shm-usage", "--disable-gpu"]
        )
        try:
            yield browser
        finally:
            browser.close()


@contextlib.contextmanager
def open_page(
    browser: Browser,
    url: str,
    screenshot: str,
    height: int = VIEWPORT["height"],
    viewport: dict | None = None,
) -> Iterator[Page]:
    """`url` in a new context; on exit, pass or fail, a full-page PNG SCREENSHOTS/`screenshot`.png.

    MLflow's layout scrolls inside its own panes, so a "full page" is the viewport: tall pages
    (a run's parameters) ask for a taller one, a first screen for FIRST_SCREEN."""
    context = browser.new_context(viewport=viewport or {**VIEWPORT, "height": height})
    context.set_default_timeout(60_000)
    page = context.new_page()
    try:
        page.goto(url)
        yield page
    finally:
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(Exception):  # a screenshot never hides the test's own error
            page.screenshot(path=SCREENSHOTS / f"{screenshot}.png", full_page=True)
        context.close()


def assistant_panel(page: Page) -> Locator:
    return page.get_by_role(
        "button", name="New Chat"
    )  # the panel's own (its title is "MLflow Assistant Beta")


def assistant_opens(page: Page) -> bool:
    """Whether MLflow's Assistant panel is open once the app has started (it opens then, if at all)."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    page.get_by_text("Model training", exact=True).wait_for()  # the sidebar: the app has loaded
    try:
        assistant_panel(page).wait_for(timeout=10_000)
    except PlaywrightTimeout:
        return False
    return True


def close_assistant(page: Page) -> None:
    """Closes MLflow's Assistant panel if it is open, as a person does once (the browser remembers)."""
    if not assistant_opens(page):
        return
    page.get_by_role("button", name="Close").last.click()
    assistant_panel(page).wait_for(state="hidden")


def runs_page_url(uri: str, experiment_id: str) -> str:
    return f"{uri}/#/experiments/{experiment_id}?workflowType=machine_learning"


def run_page_url(uri: str, experiment_id: str, run_id: str, tab: str = "") -> str:
    tab = f"/{tab}" if tab else ""
    return f"{uri}/#/experiments/{experiment_id}/runs/{run_id}{tab}?workflowType=machine_learning"
