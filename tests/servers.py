"""Real servers on 127.0.0.1 for the tests that need one, always stopped, also on failure."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
import uvicorn
from prometheus_client.parser import text_string_to_metric_families
from starlette.types import ASGIApp

ROOT = Path(__file__).resolve().parent.parent
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


def wait_for(check: Callable[[], bool], timeout: float = 15.0, what: str = "condition") -> None:
    """Poll ``check`` until it holds; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.02)


@contextmanager
def serve_in_thread(app: ASGIApp, **config: object) -> Iterator[str]:
    """Run ``app`` under uvicorn in this process; yield its base URL."""
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", **config)  # type: ignore[arg-type]
    )
    thread = threading.Thread(target=server.run, name="uvicorn", daemon=True)
    thread.start()
    try:
        wait_for(lambda: server.started or not thread.is_alive(), what="uvicorn to start")
        assert server.started, "uvicorn failed to start"
        port = server.servers[0].sockets[0].getsockname()[1]
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        assert not thread.is_alive(), "uvicorn did not stop"


def prometheus_tool(name: str) -> str:
    """The path of Debian's ``prometheus`` or ``promtool``. Locally a missing binary skips the
    test with the install hint; in CI (``CI=true``) it fails it."""
    path = shutil.which(name)
    if path is None:
        hint = f"{name} missing: apt-get install -y prometheus"
        if os.environ.get("CI") == "true":
            pytest.fail(hint)
        pytest.skip(hint)
    return path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def serve_process(
    args: list[str], env: dict[str, str], url: str, *, log: Path | None = None
) -> Iterator[subprocess.Popen[bytes]]:
    """Start ``python *args`` as a process group; wait until ``url`` answers; kill the group
    afterwards.

    Output goes to a file (``log``, or a temporary one), not a pipe: a server whose failing
    tasks log a traceback each would fill a pipe nobody reads and stall. The environment is
    this one's without multiprocess or OpenTelemetry settings, plus ``env``.
    """
    inherited = {
        k: v for k, v in os.environ.items() if k != MULTIPROC_ENV and not k.startswith("OTEL_")
    }
    own_log = log is None
    if log is None:
        descriptor, name = tempfile.mkstemp(prefix="server-", suffix=".log")
        os.close(descriptor)
        log = Path(name)
    path = log
    with path.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, *args],
            cwd=ROOT,
            env={**inherited, **env},
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:

        def up() -> bool:
            if process.poll() is not None:
                raise AssertionError(f"server exited early:\n{path.read_text(errors='replace')}")
            try:
                return httpx.get(url, timeout=1).status_code < 500
            except httpx.HTTPError:
                return False

        wait_for(up, timeout=30, what=f"{url} to answer")
        yield process
    finally:
        stop_group(process)
        if own_log:
            path.unlink(missing_ok=True)


def stop_group(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)
    if process.stdout:
        process.stdout.close()


def scrape(base_url: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """GET /metrics; return {(sample name, labels): value} for bgtrace samples."""
    text = httpx.get(f"{base_url}/metrics", timeout=10).text
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name.startswith("bgtask_")
    }


def total(
    samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str
) -> float:
    wanted = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and wanted <= ls)


def in_forked_child(check: Callable[[], bool]) -> bool:
    """Run ``check`` in a forked child; whether it held. A child that hangs is killed."""
    pid = os.fork()
    if pid == 0:  # the child reports by exit code only, and never returns into pytest
        try:
            os._exit(0 if check() else 1)
        except BaseException:
            os._exit(2)
    deadline = time.monotonic() + 10
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status) == 0
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            raise AssertionError("the forked child hung")
        time.sleep(0.02)
