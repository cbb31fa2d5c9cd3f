"""The MLflow UI in a headless Chromium, driven by Playwright.

The browser is Debian's `chromium` (apt-get install chromium), or $CHROMIUM: Playwright launches it by
path, so `playwright install` (which downloads a browser build of its own) is never needed. Each page
gets a new browser context (empty profile) and only talks to the test's own servers on 127.0.0.1.

MLflow 3.17 opens an experiment in its "GenAI" mode (a traces overview) unless the address says
`?workflowType=machine_learning` (its "Model training" mode, whose experiment page is the runs table,
as the search's own hint prints it, tune/report.py ui_hint) or the browser remembers a click on
"Model training". On a server on 127.0.0.1 it also opens its Assistant panel on a browser's first
visit, which narrows the page to one column (`close_assistant`).
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
    from playwright.sync_api import Browser, Page

REPO = Path(__file__).resolve().parents[1]
# CI keeps test-artifacts/ as an artifact: the screenshots show what the UI looked like, failed or not.
SCREENSHOTS = Path(os.environ.get("TEST_ARTIFACTS_DIR") or REPO / "test-artifacts") / "mlflow-ui"
VIEWPORT = {"width": 1600, "height": 1000}
FIRST_SCREEN = {"width": 1280, "height": 800}  # what a laptop shows without scrolling


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
        browser = playwright.chromium.launch(executable_path=chromium_path(), headless=True,
                                             args=["--disable-dev-shm-usage", "--disable-gpu"])
        try:
            yield browser
        finally:
            browser.close()


@contextlib.contextmanager
def open_page(browser: Browser, url: str, screenshot: str, height: int = VIEWPORT["height"],
              viewport: dict | None = None) -> Iterator[Page]:
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


def close_assistant(page: Page) -> None:
    """Closes MLflow's Assistant panel if it is open, as a person does once (the browser remembers)."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    page.get_by_text("Model training", exact=True).wait_for()  # the sidebar: the app has loaded
    panel = page.get_by_role("button", name="New Chat")  # the panel's own (its title is "MLflow Assistant Beta")
    try:
        panel.wait_for(timeout=10_000)  # it opens as the app starts, if at all
    except PlaywrightTimeout:
        return
    page.get_by_role("button", name="Close").last.click()
    panel.wait_for(state="hidden")


def runs_page_url(uri: str, experiment_id: str) -> str:
    return f"{uri}/#/experiments/{experiment_id}?workflowType=machine_learning"


def run_page_url(uri: str, experiment_id: str, run_id: str, tab: str = "") -> str:
    tab = f"/{tab}" if tab else ""
    return f"{uri}/#/experiments/{experiment_id}/runs/{run_id}{tab}?workflowType=machine_learning"
