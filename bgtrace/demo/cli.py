"""``python -m bgtrace.demo``: serve the example app, send it traffic, print what bgtrace saw.

Everything runs in this one process: uvicorn in a thread on 127.0.0.1, the traffic from the
main thread, and the table read back from the app's own ``/metrics``. No Prometheus, Jaeger
or Docker needed; with ``--serve`` a real Prometheus can scrape the app afterwards.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from types import FrameType

import httpx
import uvicorn
from fastapi import FastAPI

from .app import configure_tracing, create_app
from .table import format_table, pending, read_rows
from .traffic import ProgressBar, Sent, drive

START_TIMEOUT = 30.0  # seconds for the server to start, or a --target to answer
DRAIN_TIMEOUT = 30.0  # seconds for the queued tasks to finish after the traffic
TASKS_PATH = "/bgtasks"  # the live page, turned on in the demo's own server


class DemoError(Exception):
    """Something the user can fix (a busy port, a target that does not answer)."""


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bgtrace.demo",
        description="Run bgtrace's example app, send it traffic, and print the background "
        "task metrics it recorded. Spans go to OTLP when OTEL_EXPORTER_OTLP_ENDPOINT is set.",
    )
    parser.add_argument(
        "--port", type=int, default=0, help="port on 127.0.0.1 (default: a free one)"
    )
    parser.add_argument(
        "--duration", type=_positive, default=5.0, help="seconds of traffic (default: 5)"
    )
    parser.add_argument(
        "--concurrency", type=int, default=8, help="concurrent clients (default: 8)"
    )
    parser.add_argument(
        "--serve",
        action="store_true",
        help="keep serving after the table, for a Prometheus to scrape, until Ctrl-C",
    )
    parser.add_argument(
        "--target",
        metavar="URL",
        help="send the traffic to an app already running there (such as `uvicorn "
        "bgtrace.demo.app:app`) instead of starting one, and read its /metrics",
    )
    parser.add_argument("--console-spans", action="store_true", help="print every span to stderr")
    parser.add_argument(
        "--verbose",
        action="store_true",
        help="show the server's log: a traceback and a bgtrace line per failed task",
    )
    args = parser.parse_args(argv)
    if args.target and (args.serve or args.port):
        parser.error("--target sends traffic to another server: --serve and --port do not apply")
    if args.concurrency < 1:
        parser.error("--concurrency must be at least 1")
    return args


def _positive(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be more than 0, got {text}")
    return value


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    provider = configure_tracing(console=args.console_spans)
    try:
        with _task_failure_logs(shown=args.verbose):
            if args.target:
                base_url = args.target.rstrip("/")
                _wait_until_up(base_url)
                _burst_and_report(base_url, args)
                return 0
            log_level = "warning" if args.verbose else "critical"
            with serving(create_app(tasks_path=TASKS_PATH), args.port, log_level) as base_url:
                print(f"Live page: {base_url}{TASKS_PATH}", file=sys.stderr, flush=True)
                _burst_and_report(base_url, args)
                if args.serve:
                    print(
                        f"\nServing {base_url}/metrics for Prometheus and the live page at "
                        f"{base_url}{TASKS_PATH}; Ctrl-C stops.",
                        flush=True,
                    )
                    _wait_for_stop()
        return 0
    except DemoError as exc:
        print(f"bgtrace demo: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # Ctrl-C before the table: stop quietly, as shells expect
        print(file=sys.stderr)
        return 130
    finally:
        if provider is not None:
            provider.shutdown()  # flushes the spans still buffered


@contextmanager
def serving(app: FastAPI, port: int, log_level: str) -> Iterator[str]:
    """Run ``app`` under uvicorn in a thread on 127.0.0.1; yield its base URL."""
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level=log_level, access_log=False)
    server = uvicorn.Server(config)
    # Off the main thread uvicorn installs no signal handlers: Ctrl-C stays ours.
    thread = threading.Thread(target=server.run, name="uvicorn", daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise DemoError(f"the server did not start on 127.0.0.1:{port} (port in use?)")
            time.sleep(0.02)
        bound = server.servers[0].sockets[0].getsockname()[1]
        yield f"http://127.0.0.1:{bound}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def _burst_and_report(base_url: str, args: argparse.Namespace) -> None:
    print(f"Sending {args.duration:g} s of traffic to {base_url}", file=sys.stderr)
    sent = asyncio.run(
        drive(
            base_url,
            args.duration,
            concurrency=args.concurrency,
            progress=ProgressBar(sys.stderr),
        )
    )
    with httpx.Client(base_url=base_url, timeout=10) as client:
        text = _drained_metrics(client)
    print(_summary(sent))
    print()
    print(format_table(read_rows(text)), flush=True)


def _drained_metrics(client: httpx.Client) -> str:
    """The ``/metrics`` text once no task is queued or running (or at the deadline)."""
    deadline = time.monotonic() + DRAIN_TIMEOUT
    while True:
        text = client.get("/metrics").text
        if pending(text) == 0 or time.monotonic() > deadline:
            return text
        time.sleep(0.05)


def _summary(sent: Sent) -> str:
    by_status = ", ".join(
        f"{count} x {'no response' if status == 0 else status}"
        for status, count in sorted(sent.statuses.items())
    )
    line = f"{sent.total()} requests: {by_status or 'none'}"
    if sent.resent:
        line += (
            f"\n{sent.resent} re-sent after getting no answer: uvicorn closes a keep-alive "
            "connection when a background task raises"
        )
    return line


def _wait_until_up(base_url: str) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        try:
            if httpx.get(f"{base_url}/metrics", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise DemoError(f"{base_url}/metrics did not answer in {START_TIMEOUT:g} s")
        time.sleep(0.2)


def _wait_for_stop() -> None:
    """Block until SIGINT (Ctrl-C) or SIGTERM (``docker stop``)."""
    stop = threading.Event()

    def handler(signum: int, frame: FrameType | None) -> None:
        stop.set()

    # Installed explicitly: a process started with SIGINT ignored (as background jobs of a
    # non-interactive shell are) would otherwise never see Ctrl-C.
    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        while not stop.wait(0.5):
            pass
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


@contextmanager
def _task_failure_logs(*, shown: bool) -> Iterator[None]:
    # A quarter of the receipts fail by design; a log line per failure would bury the table,
    # which counts them anyway.
    logger = logging.getLogger("bgtrace")
    level = logger.level
    if not shown:
        logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)
