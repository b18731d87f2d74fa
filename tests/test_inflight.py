"""The in-flight set and task observers: every step of every task, once, never in the way."""

from __future__ import annotations

import asyncio
import gc
import logging
import sys
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi import BackgroundTasks, FastAPI
from fastapi.testclient import TestClient
from prometheus_client import CollectorRegistry
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from bgtrace import BackgroundTaskMiddleware, inflight
from bgtrace.records import RUNNING, TaskRecord
from tests import apps
from tests.asgi import call
from tests.conftest import Samples


class Steps:
    """An observer writing down each step as (step, task name, detail)."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str, object]] = []
        self.in_flight_while_running: list[list[str]] = []

    def queued(self, record: TaskRecord, task: Any) -> None:
        self.seen.append(("queued", record.name, task.args))

    def started(self, record: TaskRecord) -> None:
        self.seen.append(("started", record.name, None))
        self.in_flight_while_running.append([r.name for r in inflight.snapshot()])

    def finished(
        self,
        record: TaskRecord,
        elapsed: float,
        outcome: str,
        error_type: str | None,
        exc: BaseException | None,
    ) -> None:
        self.seen.append(("finished", record.name, (outcome, error_type, type(exc).__name__)))

    def dropped(self, record: TaskRecord, reason: str) -> None:
        self.seen.append(("dropped", record.name, reason))


@pytest.fixture
def steps() -> Iterator[Steps]:
    observer = Steps()
    inflight.add_observer(observer)
    yield observer
    inflight.remove_observer(observer)


def test_observer_sees_each_step_once_in_order(registry: CollectorRegistry, steps: Steps) -> None:
    client = TestClient(apps.dropping_app(registry=registry), raise_server_exceptions=False)
    client.post("/fail-first")
    assert steps.seen == [
        ("queued", "tests.apps.fail", ("boom",)),
        ("queued", "tests.apps.write_log", ("skipped",)),
        ("started", "tests.apps.fail", None),
        ("finished", "tests.apps.fail", ("failure", "ValueError", "ValueError")),
        ("dropped", "tests.apps.write_log", "earlier_task_failed"),
    ]
    # While the first ran, both were in flight, oldest first; after the request, none is.
    assert steps.in_flight_while_running == [["tests.apps.fail", "tests.apps.write_log"]]
    assert inflight.snapshot() == []


def test_def_task_is_in_flight_while_it_runs_in_its_thread(registry: CollectorRegistry) -> None:
    running, release = threading.Event(), threading.Event()
    seen: list[list[tuple[str, int]]] = []

    def blocking() -> None:
        running.set()
        release.wait(10)

    app = FastAPI()
    app.add_middleware(BackgroundTaskMiddleware, registry=registry)

    @app.post("/")
    async def endpoint(background_tasks: BackgroundTasks) -> None:
        background_tasks.add_task(blocking)

    def watch() -> None:
        running.wait(10)
        seen.append([(r.name.rsplit(".", 1)[-1], r.thread) for r in inflight.snapshot()])
        release.set()

    watcher = threading.Thread(target=watch)
    watcher.start()
    TestClient(app).post("/")
    watcher.join(10)
    [[(name, thread)]] = seen
    assert name == "blocking"
    assert thread not in (0, threading.get_ident(), watcher.ident)
    assert inflight.snapshot() == []


class Broken:
    def queued(self, record: TaskRecord, task: Any) -> None:
        raise RuntimeError("observer bug")

    started = finished = dropped = queued  # type: ignore[assignment]


def test_broken_observer_never_reaches_the_app(
    registry: CollectorRegistry, samples: Samples, caplog: pytest.LogCaptureFixture
) -> None:
    broken = Broken()
    inflight.add_observer(broken)
    try:
        with caplog.at_level(logging.ERROR, logger="bgtrace"):
            response = TestClient(apps.tutorial_app(registry=registry)).post(
                "/send-notification/a@example.com?q=x"
            )
    finally:
        inflight.remove_observer(broken)
    assert response.status_code == 200
    assert len(apps.done) == 2
    assert samples.total("bgtask_completed_total", outcome="success") == 2
    assert any("task observer" in r.getMessage() for r in caplog.records)


def test_observers_joining_and_leaving_in_two_threads_lose_none() -> None:
    """Regression: the watchdog joins and leaves at each loop block while a middleware or the
    bgtasks fixture joins on another thread; an unlocked replace of the tuple dropped one."""
    switch = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    lost = 0
    try:
        for _ in range(100):
            stop = threading.Event()
            churning, mine = Steps(), Steps()

            def churn(observer: Steps = churning, done: threading.Event = stop) -> None:
                while not done.is_set():
                    inflight.add_observer(observer)
                    inflight.remove_observer(observer)

            thread = threading.Thread(target=churn)
            thread.start()
            inflight.add_observer(mine)
            stop.set()
            thread.join(10)
            lost += mine not in inflight.observers
            inflight.remove_observer(mine)
    finally:
        sys.setswitchinterval(switch)
    assert lost == 0


# A loop left open warns when the collector frees it: that is the abandonment under test.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("closed", [True, False], ids=["closed", "left-open"])
@pytest.mark.parametrize("wait", ["event", "timer"])
def test_task_of_an_abandoned_loop_ends_and_leaves_nothing(
    registry: CollectorRegistry, samples: Samples, closed: bool, wait: str
) -> None:
    """Regression: a strong reference to the asyncio Task (kept to say where a stuck task
    waits), or to its loop (whose timers hold the task), kept an abandoned task, its frames
    and its arguments, and its record in flight for ever. The collector closes the coroutine:
    the task ends, counted cancelled."""

    async def hang(secret: str) -> None:
        if wait == "timer":
            await asyncio.sleep(3600)
        else:
            await asyncio.Event().wait()

    async def endpoint(request: Any) -> PlainTextResponse:
        return PlainTextResponse("ok", background=BackgroundTask(hang, "s3cret"))

    app = BackgroundTaskMiddleware(
        Starlette(routes=[Route("/", endpoint)]), registry=registry, loop_block_threshold=None
    )
    loop = asyncio.new_event_loop()
    loop.set_exception_handler(lambda loop, context: None)  # "Task was destroyed but pending"
    task = loop.create_task(call(app, "/", method="GET"))
    loop.run_until_complete(asyncio.sleep(0.05))
    assert [r.status for r in inflight.snapshot()] == [RUNNING]
    if closed:
        loop.close()
    del task, loop
    gc.collect()
    assert inflight.snapshot() == []
    assert samples.total("bgtask_completed_total", outcome="cancelled") == 1
    assert samples.total("bgtask_in_progress") == 0
