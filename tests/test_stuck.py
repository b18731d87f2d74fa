"""Stuck and long-running tasks on a real server: the oldest-age gauges, the stuck log line and
span event naming where the task waits, the thread wait of def tasks, the shutdown report."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import anyio.to_thread
import httpx
import pytest
import uvicorn
from fastapi import BackgroundTasks, FastAPI
from fastapi.testclient import TestClient
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client import CollectorRegistry

from bgtrace import BackgroundTaskMiddleware, inflight, stuck
from bgtrace.records import CLAIMED
from tests import apps
from tests.servers import in_forked_child, scrape, serve_in_thread, total, wait_for

THIS_FILE = "tests/test_stuck.py"
SECRET = "s3cr3t-token-4711"
PREFIX = "tests.test_stuck."


def line_of(marker: str) -> int:
    """The line of this file that carries ``# <marker>``."""
    lines = Path(__file__).read_text().splitlines()
    return next(n for n, text in enumerate(lines, 1) if text.endswith(f"# {marker}"))


@pytest.fixture(autouse=True)
def _default_after() -> Iterator[None]:
    """A middleware made here sets the default for tasks outside requests: put it back."""
    before = stuck._default_after
    yield
    stuck._default_after = before


# --- the tasks -----------------------------------------------------------------------------

never = threading.Event()  # set only at the end of a test, to let its tasks end


async def hang(token: str) -> None:
    secret_local = token.upper()  # a local that must not reach the log either
    event = asyncio.Event()
    while not never.is_set():
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(event.wait(), 0.2)  # async waits here
    del secret_local


def block_on_event(token: str) -> None:
    while not never.is_set():
        never.wait(0.2)  # def waits here


def block_in_sleep(token: str) -> None:
    while not never.is_set():
        time.sleep(0.05)  # def sleeps here


def quick() -> None:
    pass


def stuck_app(registry: CollectorRegistry, **options: object) -> FastAPI:
    app = FastAPI()
    app.add_middleware(BackgroundTaskMiddleware, registry=registry, **options)  # type: ignore[arg-type]
    tasks: dict[str, Callable[..., object]] = {
        "hang": hang, "event": block_on_event, "sleep": block_in_sleep,
    }  # fmt: skip

    @app.post("/run/{name}")
    async def run(name: str, background_tasks: BackgroundTasks) -> None:
        background_tasks.add_task(tasks[name], SECRET)
        background_tasks.add_task(quick)  # queued behind it

    return app


@pytest.fixture
def released() -> Iterator[None]:
    never.clear()
    yield
    never.set()


@contextmanager
def serving(app: FastAPI) -> Iterator[str]:
    """``serve_in_thread``, with the tasks let go before the server waits for them."""
    with serve_in_thread(app) as url:
        try:
            yield url
        finally:
            never.set()


def stuck_lines(caplog: pytest.LogCaptureFixture, lead: str = stuck.STUCK) -> list[str]:
    return [m for r in caplog.records if r.name == "bgtrace" and lead in (m := r.getMessage())]


# --- the oldest-age gauges -----------------------------------------------------------------


@pytest.mark.usefixtures("released")
def test_oldest_ages_rise_while_tasks_wait_and_fall_back_to_zero(
    registry: CollectorRegistry,
) -> None:
    with serving(stuck_app(registry, stuck_after=None)) as url:
        httpx.post(f"{url}/run/hang", timeout=10)

        def aged() -> bool:
            now = scrape(url)
            running = total(now, "bgtask_oldest_running_seconds", task=PREFIX + "hang")
            queued = total(now, "bgtask_oldest_queued_seconds", task=PREFIX + "quick")
            return running > 0.3 and queued > 0.3

        wait_for(aged, what="the oldest ages to grow")
        during = scrape(url)
        # Every series has both gauges, at 0 where nothing of it is in flight.
        assert total(during, "bgtask_oldest_queued_seconds", task=PREFIX + "hang") == 0
        assert total(during, "bgtask_oldest_running_seconds", task=PREFIX + "quick") == 0
        never.set()

        def rested() -> bool:
            now = scrape(url)
            return (
                total(now, "bgtask_completed_total", outcome="success") == 2
                and total(now, "bgtask_oldest_running_seconds") == 0
                and total(now, "bgtask_oldest_queued_seconds") == 0
            )

        wait_for(rested, what="the ages to fall back to 0")
        after = scrape(url)
        assert ("bgtask_oldest_running_seconds", frozenset(
            {("task", PREFIX + "hang"), ("origin", "handler"), ("route", "/run/{name}")}
        )) in after  # fmt: skip


# --- the stuck log line and span event -----------------------------------------------------


@pytest.mark.usefixtures("released")
def test_async_task_stuck_is_logged_once_with_the_line_it_awaits_at(
    registry: CollectorRegistry, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="bgtrace")
    with serving(stuck_app(registry, stuck_after=0.3)) as url:
        httpx.post(f"{url}/run/hang", timeout=10)
        wait_for(lambda: bool(stuck_lines(caplog)), what="the stuck log line")
        time.sleep(1.0)  # ten more checks: still one line
        [line] = stuck_lines(caplog)
    assert f"task={PREFIX}hang origin=handler route=/run/{{name}} trace_id=- " in line
    where = line.split("waiting_at=", 1)[1]
    # Innermost first: asyncio's wait, then the line of the task that awaits it.
    assert f"{THIS_FILE}:{line_of('async waits here')} in hang" in where
    assert where.index("in wait_for") < where.index("in hang")
    assert "bgtrace" not in where and "starlette" not in where


@pytest.mark.parametrize(("name", "marker"), [("event", "def waits here"),
                                              ("sleep", "def sleeps here")])  # fmt: skip
@pytest.mark.usefixtures("released")
def test_def_task_stuck_is_logged_once_with_its_threads_line(
    registry: CollectorRegistry, caplog: pytest.LogCaptureFixture, name: str, marker: str
) -> None:
    caplog.set_level(logging.WARNING, logger="bgtrace")
    with serving(stuck_app(registry, stuck_after=0.3)) as url:
        httpx.post(f"{url}/run/{name}", timeout=10)
        wait_for(lambda: bool(stuck_lines(caplog)), what="the stuck log line")
        time.sleep(1.0)
        [line] = stuck_lines(caplog)
    function = {"event": "block_on_event", "sleep": "block_in_sleep"}[name]
    assert f"task={PREFIX}{function} " in line
    assert f"{THIS_FILE}:{line_of(marker)} in {function}" in line


@pytest.mark.usefixtures("released")
def test_stuck_log_holds_no_argument_or_local_value(
    registry: CollectorRegistry, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    with serving(stuck_app(registry, stuck_after=0.2)) as url:
        for name in ("hang", "event"):
            httpx.post(f"{url}/run/{name}", timeout=10)
        wait_for(lambda: len(stuck_lines(caplog)) == 2, what="two stuck log lines")
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert SECRET not in logged and SECRET.upper() not in logged


@pytest.mark.usefixtures("released")
def test_stuck_task_span_gets_an_event_with_the_location(
    registry: CollectorRegistry, tracer_provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    app = stuck_app(registry, stuck_after=0.3, tracer_provider=tracer_provider)
    with serving(app) as url:
        httpx.post(f"{url}/run/hang", timeout=10)

        def waiting_at_seen() -> bool:
            return any(r.waiting_at for r in stuck.inflight.snapshot())

        wait_for(waiting_at_seen, what="the task to be found stuck")
        never.set()
        task_span = "bgtask hang"
        wait_for(lambda: any(s.name == task_span for s in exporter.get_finished_spans()))
    [span] = [s for s in exporter.get_finished_spans() if s.name == task_span]
    [event] = [e for e in span.events if e.name == stuck.EVENT_STUCK]
    assert event.attributes is not None
    where = str(event.attributes[stuck.ATTR_WAITING_AT])
    assert f"{THIS_FILE}:{line_of('async waits here')} in hang" in where
    assert float(event.attributes[stuck.ATTR_RUNNING]) >= 0.3  # type: ignore[arg-type]


def test_stuck_after_none_logs_nothing(
    registry: CollectorRegistry, caplog: pytest.LogCaptureFixture, released: None
) -> None:
    caplog.set_level(logging.WARNING, logger="bgtrace")
    with serving(stuck_app(registry, stuck_after=None)) as url:
        httpx.post(f"{url}/run/hang", timeout=10)
        wait_for(lambda: total(scrape(url), "bgtask_oldest_running_seconds") > 0.5)
    assert stuck_lines(caplog) == []


def test_stuck_after_must_be_positive() -> None:
    with pytest.raises(ValueError, match="stuck_after"):
        BackgroundTaskMiddleware(FastAPI(), registry=CollectorRegistry(), stuck_after=0)


def test_a_forked_child_starts_its_own_checker(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(stuck, "_checker_wanted", True)  # a middleware asked for it
    stuck._start_checker()
    assert stuck._checker is not None
    # The parent's thread is not the child's: the child's first task starts one.
    assert in_forked_child(lambda: stuck._checker is None and stuck._OBSERVER in inflight.observers)


def test_the_checker_starter_leaves_once_the_checker_runs(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Tasks pay nothing for the stuck check once its thread runs: no observer per step.
    In a forked child, which starts with no checker of its own."""
    monkeypatch.setattr(stuck, "_checker_wanted", True)
    stuck._start_checker()

    def first_task_starts_it_and_the_starter_leaves() -> bool:
        app = FastAPI()
        app.add_middleware(BackgroundTaskMiddleware, registry=CollectorRegistry(), stuck_after=60)

        @app.post("/one")
        async def one(background_tasks: BackgroundTasks) -> None:
            background_tasks.add_task(apps.async_log, "one")

        with TestClient(app) as client:
            waiting = stuck._checker is None and stuck._OBSERVER in inflight.observers
            client.post("/one")
        return waiting and stuck._checker is not None and stuck._OBSERVER not in inflight.observers

    assert in_forked_child(first_task_starts_it_and_the_starter_leaves)


# --- the thread wait of def tasks ----------------------------------------------------------


def test_thread_wait_rises_while_sync_endpoints_hold_the_threads(
    registry: CollectorRegistry,
) -> None:
    hold = threading.Event()
    holding = threading.Semaphore(0)
    app = FastAPI()
    app.add_middleware(BackgroundTaskMiddleware, registry=registry, stuck_after=None)

    @app.post("/limit")
    async def limit() -> None:
        # The serving loop's threadpool, down to two threads.
        anyio.to_thread.current_default_thread_limiter().total_tokens = 2

    @app.get("/hold")
    def hold_thread() -> None:
        holding.release()
        hold.wait(30)

    @app.post("/def-task")
    async def def_task(background_tasks: BackgroundTasks) -> None:
        background_tasks.add_task(quick)

    with serve_in_thread(app) as url:
        httpx.post(f"{url}/def-task", timeout=10)  # one without waiting for a thread
        wait_for(lambda: total(scrape(url), "bgtask_thread_wait_seconds_count") == 1)
        assert total(scrape(url), "bgtask_thread_wait_seconds_sum") < 0.5
        httpx.post(f"{url}/limit", timeout=10)
        holders = [
            threading.Thread(target=httpx.get, args=(f"{url}/hold",), kwargs={"timeout": 30})
            for _ in range(2)
        ]
        try:
            for holder in holders:
                holder.start()
            for _ in holders:
                assert holding.acquire(timeout=15)
            httpx.post(f"{url}/def-task", timeout=10)
            # Read in-process: /metrics itself renders in the threadpool held here.
            wait_for(lambda: [r.status for r in stuck.inflight.snapshot()] == [CLAIMED])
            time.sleep(1)  # the wait measured
            [record] = stuck.inflight.snapshot()
            [(_, queued)] = stuck.oldest_ages(record.config.metrics).values()
            assert queued > 1
        finally:
            hold.set()
            for holder in holders:
                holder.join(30)
        wait_for(lambda: total(scrape(url), "bgtask_thread_wait_seconds_count") == 2)
        after = scrape(url)
        assert total(after, "bgtask_thread_wait_seconds_sum") > 1
        assert total(after, "bgtask_thread_wait_seconds_bucket", le="0.5") == 1
        assert total(after, "bgtask_oldest_queued_seconds") == 0


# --- graceful shutdown ---------------------------------------------------------------------


@contextmanager
def info_server(app: FastAPI) -> Iterator[tuple[uvicorn.Server, str]]:
    """uvicorn at its default log level (INFO), as servers run in production."""
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="info"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        wait_for(lambda: server.started or not thread.is_alive(), what="uvicorn to start")
        port = server.servers[0].sockets[0].getsockname()[1]
        yield server, f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        never.set()
        thread.join(timeout=30)
        assert not thread.is_alive(), "uvicorn did not stop"


@pytest.mark.usefixtures("released")
def test_graceful_shutdown_names_every_task_still_running_and_where_it_waits(
    registry: CollectorRegistry, caplog: pytest.LogCaptureFixture
) -> None:
    """uvicorn #2119: "Waiting for background tasks to complete" and no way to see which."""
    caplog.set_level(logging.INFO)
    with info_server(stuck_app(registry, stuck_after=None)) as (server, url):
        httpx.post(f"{url}/run/hang", timeout=10)
        httpx.post(f"{url}/run/event", timeout=10)
        wait_for(lambda: total(scrape(url), "bgtask_in_progress") == 2)
        server.should_exit = True
        wait_for(lambda: len(stuck_lines(caplog, stuck.AT_SHUTDOWN)) == 2, what="two lines")
    lines = sorted(stuck_lines(caplog, stuck.AT_SHUTDOWN))
    assert f"{THIS_FILE}:{line_of('def waits here')} in block_on_event" in lines[0]
    assert f"{THIS_FILE}:{line_of('async waits here')} in hang" in lines[1]
