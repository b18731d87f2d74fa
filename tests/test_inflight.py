"""The in-flight set and task observers: every step of every task, once, never in the way."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi import BackgroundTasks, FastAPI
from fastapi.testclient import TestClient
from prometheus_client import CollectorRegistry

from bgtrace import BackgroundTaskMiddleware, inflight
from bgtrace.records import TaskRecord
from tests import apps
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
