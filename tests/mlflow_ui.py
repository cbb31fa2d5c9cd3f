"""Checking the MLflow UI from a rendered page, with a headless Chromium and nothing else.

* `render(url) -> html` and `screenshot(url, path)`: one Chromium run each (`--dump-dom` /
  `--screenshot`, with `--virtual-time-budget` so that the page's scripts run and its requests
  answer before the page is taken);
* `start_chromium()` -> `Chromium`: a browser driven over the DevTools protocol on a pipe
  (`--remote-debugging-pipe`: JSON messages separated by NUL bytes on fds 3 and 4, no WebSocket and
  no Python package needed), for pages that need a click: `page = browser.open(url)`,
  `page.wait_for(js)`, `page.evaluate(js)`, `page.click(css)`, `page.type_into(css, text)`, `page.html()`, `page.screenshot(path)`;
* `text_of(html)`: the visible text of a page, whitespace collapsed, for assertions;
* `mlflow_server(store)`: mlflow/server.sh --daemon on a free 127.0.0.1 port, stopped on exit;
* `runs_page_url` / `run_page_url`: MLflow 3.17's routes. The UI opens experiments in its "GenAI"
  mode (traces overview) unless told otherwise; `?workflowType=machine_learning` is its "Model
  training" mode, whose experiment page is the runs table.

The browser is Debian's `chromium` (apt-get install chromium), or $CHROMIUM. It runs with a new,
empty profile each time and without any network access beyond the page's own server."""

from __future__ import annotations

import base64
import contextlib
import html as html_lib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = Path(os.environ.get("TEST_ARTIFACTS_DIR") or REPO / "test-artifacts")
WINDOW = (1600, 1000)
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--hide-scrollbars", "--mute-audio"]


class ChromiumError(RuntimeError):
    pass


def chromium_path() -> str | None:
    """$CHROMIUM, else Debian's /usr/bin/chromium, else a chromium/chrome on PATH."""
    if os.environ.get("CHROMIUM"):
        return os.environ["CHROMIUM"]
    if os.access("/usr/bin/chromium", os.X_OK):
        return "/usr/bin/chromium"
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        if found := shutil.which(name):
            return found
    return None


def _executable() -> str:
    path = chromium_path()
    if not path:
        raise ChromiumError("no Chromium found: apt-get install chromium, or set $CHROMIUM")
    return path


def _flags(profile: str, window: tuple[int, int]) -> list[str]:
    return [*FLAGS, f"--user-data-dir={profile}", f"--window-size={window[0]},{window[1]}"]


def render(url: str, budget_ms: int = 20000, window: tuple[int, int] = WINDOW, timeout: float = 120) -> str:
    """The page's DOM after its scripts ran for `budget_ms` of virtual time (`--dump-dom`)."""
    with tempfile.TemporaryDirectory(prefix="chromium-profile-") as profile:
        done = subprocess.run([_executable(), *_flags(profile, window), f"--virtual-time-budget={budget_ms}",
                               "--dump-dom", url], capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0 or "<html" not in done.stdout:
        raise ChromiumError(f"chromium --dump-dom {url} failed ({done.returncode}): {done.stderr[-1500:]}")
    return done.stdout


def screenshot(url: str, path: str | Path, budget_ms: int = 20000, window: tuple[int, int] = WINDOW,
               timeout: float = 120) -> Path:
    """A PNG of the page after `budget_ms` of virtual time (`--screenshot`)."""
    path = Path(path).resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="chromium-profile-") as profile:
        done = subprocess.run([_executable(), *_flags(profile, window), f"--virtual-time-budget={budget_ms}",
                               f"--screenshot={path}", url], capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0 or not path.is_file():
        raise ChromiumError(f"chromium --screenshot {url} failed ({done.returncode}): {done.stderr[-1500:]}")
    return path


def text_of(html: str) -> str:
    """Visible text: scripts, styles and tags dropped, entities decoded, whitespace collapsed."""
    html = re.sub(r"<(script|style|noscript)\b[^>]*>.*?</\1>", " ", html, flags=re.S | re.I)
    return re.sub(r"\s+", " ", html_lib.unescape(re.sub(r"<[^>]+>", " ", html))).strip()


# ---------------------------------------------------------------------------------------------
# DevTools protocol over a pipe.

def _high_fd(fd: int) -> int:
    import fcntl

    high = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10)
    os.close(fd)
    return high


class Chromium:
    """A headless Chromium driven over `--remote-debugging-pipe`."""

    def __init__(self, window: tuple[int, int] = WINDOW, timeout: float = 60):
        self.window, self.timeout = window, timeout
        self.profile = tempfile.mkdtemp(prefix="chromium-profile-")
        to_chrome_r, self._to_chrome = os.pipe()
        self._from_chrome, from_chrome_w = os.pipe()
        # The child's ends, moved above fds 3 and 4 so that the redirections below cannot clash.
        to_chrome_r, from_chrome_w = (_high_fd(to_chrome_r), _high_fd(from_chrome_w))
        # Chromium reads commands on fd 3 and writes answers on fd 4.
        launch = (f"exec 3<&{to_chrome_r} 4>&{from_chrome_w} {to_chrome_r}<&- {from_chrome_w}>&-; "
                  'exec "$@"')
        self._log = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(
            ["bash", "-c", launch, "chromium", _executable(), *_flags(self.profile, window),
             "--remote-debugging-pipe", "about:blank"],
            pass_fds=(to_chrome_r, from_chrome_w), stdin=subprocess.DEVNULL, stdout=self._log,
            stderr=subprocess.STDOUT, start_new_session=True)
        os.close(to_chrome_r)
        os.close(from_chrome_w)
        self._buffer = b""
        self._next_id = 0
        self._events: list[dict] = []
        try:
            self.version = self.send("Browser.getVersion")["product"]
        except Exception:
            self.close()
            raise

    # -- protocol ------------------------------------------------------------------------------
    def _read_message(self, deadline: float) -> dict:
        import select

        while b"\0" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0:
                raise ChromiumError("no answer from Chromium in time")
            ready, _, _ = select.select([self._from_chrome], [], [], left)
            if ready:
                chunk = os.read(self._from_chrome, 1 << 20)
                if not chunk:
                    raise ChromiumError(f"Chromium closed the pipe: {self.log_tail()}")
                self._buffer += chunk
        message, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(message)

    def send(self, method: str, params: dict | None = None, session: str | None = None,
             timeout: float | None = None) -> dict:
        self._next_id += 1
        request = {"id": self._next_id, "method": method, "params": params or {}}
        if session:
            request["sessionId"] = session
        os.write(self._to_chrome, json.dumps(request).encode() + b"\0")
        deadline = time.monotonic() + (timeout or self.timeout)
        while True:
            message = self._read_message(deadline)
            if message.get("id") == self._next_id:
                if "error" in message:
                    raise ChromiumError(f"{method}: {message['error']}")
                return message.get("result", {})
            if "method" in message:
                self._events.append(message)
                del self._events[:-200]

    def log_tail(self) -> str:
        self._log.seek(0)
        return self._log.read().decode(errors="replace")[-1500:]

    # -- pages ---------------------------------------------------------------------------------
    def open(self, url: str) -> "Page":
        target = self.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = self.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        page = Page(self, target, session)
        page.call("Page.enable")
        page.call("Runtime.enable")
        page.call("Emulation.setDeviceMetricsOverride", {"width": self.window[0], "height": self.window[1],
                                                         "deviceScaleFactor": 1, "mobile": False})
        page.goto(url)
        return page

    def close(self) -> None:
        with contextlib.suppress(Exception):
            if self.proc.poll() is None:
                self.send("Browser.close", timeout=5)
        with contextlib.suppress(Exception):
            self.proc.wait(timeout=10)
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, 9)
            self.proc.wait()
        for fd in (self._to_chrome, self._from_chrome):
            with contextlib.suppress(OSError):
                os.close(fd)
        self._log.close()
        shutil.rmtree(self.profile, ignore_errors=True)

    def __enter__(self) -> "Chromium":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class Page:
    def __init__(self, browser: Chromium, target: str, session: str):
        self.browser, self.target, self.session = browser, target, session

    def call(self, method: str, params: dict | None = None, timeout: float | None = None) -> dict:
        return self.browser.send(method, params, session=self.session, timeout=timeout)

    def goto(self, url: str) -> None:
        answer = self.call("Page.navigate", {"url": url})
        if answer.get("errorText"):
            raise ChromiumError(f"cannot open {url}: {answer['errorText']}")

    def evaluate(self, expression: str):
        """The value of a JavaScript expression (awaited if it is a promise), as JSON."""
        answer = self.call("Runtime.evaluate", {"expression": expression, "returnByValue": True,
                                                "awaitPromise": True})
        if "exceptionDetails" in answer:
            details = answer["exceptionDetails"]
            raise ChromiumError(f"{expression[:200]}: {details.get('exception', {}).get('description') or details}")
        return answer["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 60, what: str | None = None):
        """Polls a JavaScript expression until it is truthy; returns its value."""
        deadline = time.monotonic() + timeout
        while True:
            value = self.evaluate(expression)
            if value:
                return value
            if time.monotonic() > deadline:
                raise ChromiumError(f"timed out after {timeout:g}s waiting for {what or expression[:200]}")
            time.sleep(0.25)

    def click(self, selector: str) -> None:
        found = self.evaluate(f"(() => {{ const e = document.querySelector({json.dumps(selector)});"
                              " if (!e) return false; e.scrollIntoView({block: 'center'}); e.click(); return true; })()")
        if not found:
            raise ChromiumError(f"nothing to click at {selector}")

    def type_into(self, selector: str, text: str) -> None:
        """Focuses a text field and types into it, as keystrokes (React sees real input events)."""
        found = self.evaluate(f"(() => {{ const e = document.querySelector({json.dumps(selector)});"
                              " if (!e) return false; e.scrollIntoView({block: 'center'}); e.focus(); return true; })()")
        if not found:
            raise ChromiumError(f"nothing to type into at {selector}")
        self.call("Input.insertText", {"text": text})

    def html(self) -> str:
        return self.evaluate("document.documentElement.outerHTML")

    def text(self) -> str:
        return text_of(self.html())

    def screenshot(self, path: str | Path) -> Path:
        path = Path(path).resolve()
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(self.call("Page.captureScreenshot", {"format": "png"})["data"]))
        return path


def start_chromium(window: tuple[int, int] = WINDOW, timeout: float = 60) -> Chromium:
    """A browser to drive; close() it (or use it as a context manager)."""
    return Chromium(window=window, timeout=timeout)


# ---------------------------------------------------------------------------------------------
# MLflow.

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def mlflow_server(store: str | Path, port: int | None = None):
    """mlflow/server.sh --daemon with its stores in `store`; yields the tracking URI."""
    port = port or free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env["PYTHON"] = sys.executable
    started = subprocess.run([str(REPO / "mlflow" / "server.sh"), "--daemon", "--port", str(port), "--store",
                              str(store)], env=env, capture_output=True, text=True, timeout=180)
    if started.returncode != 0:
        raise RuntimeError(f"mlflow/server.sh failed: {started.stderr[-2000:]}")
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        subprocess.run([str(REPO / "mlflow" / "server.sh"), "--stop", "--store", str(store)], env=env,
                       capture_output=True, timeout=60)


def runs_page_url(uri: str, experiment_id: str) -> str:
    return f"{uri}/#/experiments/{experiment_id}?workflowType=machine_learning"


def run_page_url(uri: str, experiment_id: str, run_id: str) -> str:
    return f"{uri}/#/experiments/{experiment_id}/runs/{run_id}?workflowType=machine_learning"
