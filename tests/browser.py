"""A real browser for the tests: Debian's ``chromium``, headless, driven over the DevTools
protocol with a small websocket client. Nothing is downloaded; every process is stopped."""

from __future__ import annotations

import base64
import itertools
import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.servers import stop_group, wait_for

INSTALL_HINT = "chromium missing: apt-get install -y --no-install-recommends chromium"
# No network but 127.0.0.1: no updates, no sync, no field trials, no QUIC probes.
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--no-default-browser-check",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-extensions",
    "--disable-dev-shm-usage",
    "--remote-debugging-address=127.0.0.1",
    "--remote-debugging-port=0",
)


def chromium_path() -> str:
    """Debian's chromium. Locally a missing one skips the test with the install hint; in CI
    (``CI=true``) it fails it."""
    for name in ("chromium", "chromium-browser"):
        path = shutil.which(name)
        if path is not None:
            return path
    if os.environ.get("CI") == "true":
        pytest.fail(INSTALL_HINT)
    pytest.skip(INSTALL_HINT)


class Page:
    """One browser tab: evaluate JavaScript in it, take screenshots."""

    def __init__(self, socket: Any) -> None:
        self._socket = socket
        self._ids = itertools.count(1)

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        ident = next(self._ids)
        self._socket.send(json.dumps({"id": ident, "method": method, "params": params}))
        while True:  # events arrive in between; the answer carries our id
            message = json.loads(self._socket.recv(timeout=30))
            if message.get("id") == ident:
                if "error" in message:
                    raise AssertionError(f"{method} failed: {message['error']}")
                result: dict[str, Any] = message.get("result", {})
                return result

    def evaluate(self, expression: str) -> Any:
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        if "exceptionDetails" in result:
            raise AssertionError(f"{expression!r} raised: {result['exceptionDetails']}")
        return result["result"].get("value")

    def goto(self, url: str) -> None:
        self.call("Page.navigate", url=url)
        wait_for(lambda: self.evaluate("document.readyState") == "complete", what=f"{url} to load")

    def screenshot(self, path: Path, width: int = 1280, max_height: int = 1600) -> None:
        height = min(int(self.evaluate("document.documentElement.scrollHeight")), max_height)
        self.call(
            "Emulation.setDeviceMetricsOverride",
            width=width,
            height=height,
            deviceScaleFactor=1,
            mobile=False,
        )
        shot = self.call("Page.captureScreenshot", format="png")
        path.write_bytes(base64.b64decode(shot["data"]))


@contextmanager
def browser_page() -> Iterator[Page]:
    """A headless chromium with one blank tab, stopped afterwards, also on failure."""
    from websockets.sync.client import connect

    binary = chromium_path()
    profile = Path(tempfile.mkdtemp(prefix="bgtrace-chromium-"))
    log = (profile / "chromium.log").open("wb")
    process = subprocess.Popen(
        [binary, *FLAGS, f"--user-data-dir={profile}", "about:blank"],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        port_file = profile / "DevToolsActivePort"

        def started() -> bool:
            if process.poll() is not None:
                raise AssertionError(f"chromium exited: {_read(profile / 'chromium.log')}")
            return port_file.exists() and bool(port_file.read_text().strip())

        wait_for(started, timeout=60, what="chromium to start")
        port = port_file.read_text().split()[0]
        with httpx.Client(trust_env=False, timeout=10) as client:
            targets = client.get(f"http://127.0.0.1:{port}/json/list").json()
        page = next(t for t in targets if t["type"] == "page")
        with connect(page["webSocketDebuggerUrl"], max_size=None, open_timeout=30) as socket:
            tab = Page(socket)
            tab.call("Page.enable")
            tab.call("Runtime.enable")
            yield tab
    finally:
        stop_group(process)
        log.close()
        shutil.rmtree(profile, ignore_errors=True)


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")[-4000:]
    except OSError:
        return ""
