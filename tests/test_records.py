"""Each way a task ends: completed by outcome, or dropped by reason, exactly once."""

from __future__ import annotations

import asyncio
import gc

import pytest
from fastapi import BackgroundTasks, FastAPI
from fastapi.testclient import TestClient
from prometheus_client import REGISTRY, CollectorRegistry
from starlette.background import BackgroundTask

from bgtrace import BackgroundTaskMiddleware
from tests import apps
from tests.asgi import call
from tests.conftest import Samples

LOG = "tests.apps.write_log"


@pytest.fixture
def client(registry: CollectorRegistry) -> TestClient:
    return TestClient(apps.dropping_app(registry=registry), raise_server_exceptions=False)


def test_http_exception_after_queuing_drops_as_request_error(
    client: TestClient, samples: Samples
) -> None:
    assert client.post("/raise-http").status_code == 409
    assert samples("bgtask_dropped_total", task=LOG, origin="handler", route="/raise-http",
                   reason="request_error") == 1  # fmt: skip
    assert samples.total("bgtask_completed_total") == 0


def test_unhandled_exception_after_queuing_drops_as_request_error(
    client: TestClient, samples: Samples
) -> None:
    assert client.post("/raise").status_code == 500
    assert samples("bgtask_dropped_total", task=LOG, origin="handler", route="/raise",
                   reason="request_error") == 1  # fmt: skip
    assert samples.total("bgtask_queue_length") == 0


def test_failure_counts_by_error_type_and_drops_the_rest(
    client: TestClient, samples: Samples
) -> None:
    client.post("/fail-first")
    labels = {"origin": "handler", "route": "/fail-first"}
    assert samples("bgtask_completed_total", task="tests.apps.fail", outcome="failure",
                   **labels) == 1  # fmt: skip
    assert samples("bgtask_failures_total", task="tests.apps.fail", error_type="ValueError",
                   **labels) == 1  # fmt: skip
    assert samples("bgtask_dropped_total", task=LOG, reason="earlier_task_failed", **labels) == 1
    assert apps.done == []


def test_module_qualified_error_type(registry: CollectorRegistry, samples: Samples) -> None:
    app = FastAPI()
    app.add_middleware(BackgroundTaskMiddleware, registry=registry)

    @app.get("/custom")
    async def custom(background_tasks: BackgroundTasks) -> None:
        background_tasks.add_task(apps.fail_custom)

    TestClient(app, raise_server_exceptions=False).get("/custom")
    assert samples.label_values("bgtask_failures_total", "error_type") == {
        "tests.apps.NotificationError"
    }


def test_response_with_own_background_drops_dependency_tasks_as_not_attached(
    client: TestClient, samples: Samples
) -> None:
    client.post("/own-background?q=x")
    assert samples("bgtask_dropped_total", task=LOG, origin="dependency",
                   route="/own-background", reason="not_attached") == 1  # fmt: skip
    assert samples("bgtask_completed_total", task="tests.apps.async_log", origin="handler",
                   route="/own-background", outcome="success") == 1  # fmt: skip


def test_cancellation_counts_running_task_cancelled_and_queued_dropped(
    registry: CollectorRegistry, samples: Samples
) -> None:
    gate = apps.Gate()
    app = FastAPI()
    app.add_middleware(BackgroundTaskMiddleware, registry=registry)

    @app.post("/slow")
    async def slow(background_tasks: BackgroundTasks) -> dict[str, str]:
        background_tasks.add_task(gate.hold)
        background_tasks.add_task(apps.write_log, "after")
        return {}

    async def scenario() -> None:
        request = asyncio.ensure_future(call(app, "/slow"))
        for _ in range(500):
            if gate.entered.is_set():
                break
            await asyncio.sleep(0.01)
        assert samples("bgtask_in_progress", task="tests.apps.Gate.hold", origin="handler",
                       route="/slow") == 1  # fmt: skip
        request.cancel()
        with pytest.raises(asyncio.CancelledError):
            await request

    asyncio.run(scenario())
    labels = {"origin": "handler", "route": "/slow"}
    assert samples("bgtask_completed_total", task="tests.apps.Gate.hold", outcome="cancelled",
                   **labels) == 1  # fmt: skip
    assert samples("bgtask_dropped_total", task=LOG, reason="cancelled", **labels) == 1
    assert samples.total("bgtask_failures_total") == 0
    assert samples.total("bgtask_in_progress") == 0
    assert samples.total("bgtask_queue_length") == 0


def test_sync_task_waiting_for_a_thread_when_cancelled_is_dropped(
    registry: CollectorRegistry, samples: Samples, monkeypatch: pytest.MonkeyPatch
) -> None:
    from starlette import background

    async def never_gets_a_thread(*args: object, **kwargs: object) -> None:
        raise asyncio.CancelledError  # as when shutdown cancels the wait for a thread

    monkeypatch.setattr(background, "run_in_threadpool", never_gets_a_thread)
    app = apps.tutorial_app(registry=registry)
    with pytest.raises(asyncio.CancelledError):
        asyncio.run(call(app, "/send-notification/x"))
    assert samples("bgtask_dropped_total", task="tests.apps.write_notification",
                   origin="handler", route="/send-notification/{email}",
                   reason="cancelled") == 1  # fmt: skip
    assert samples.total("bgtask_queue_length") == 0


def test_sync_task_starts_in_its_worker_thread(
    registry: CollectorRegistry, samples: Samples
) -> None:
    import threading

    threads: list[str] = []

    def where() -> None:
        threads.append(threading.current_thread().name)

    app = FastAPI()
    app.add_middleware(BackgroundTaskMiddleware, registry=registry)

    @app.get("/sync")
    async def endpoint(background_tasks: BackgroundTasks) -> None:
        background_tasks.add_task(where)

    TestClient(app).get("/sync")
    assert threads and threads[0] != "MainThread"
    assert samples.total("bgtask_completed_total", outcome="success") == 1


def test_task_outside_any_request_dropped_when_collected_unrun() -> None:
    samples = Samples(REGISTRY)
    labels = {"task": "tests.apps.async_log", "origin": "other", "route": "none"}
    before = samples("bgtask_dropped_total", reason="not_attached", **labels)
    BackgroundTask(apps.async_log, "never run")
    gc.collect()
    assert samples("bgtask_dropped_total", reason="not_attached", **labels) == before + 1


def test_task_outside_any_request_counted_when_run() -> None:
    samples = Samples(REGISTRY)
    labels = {"task": "tests.apps.async_log", "origin": "other", "route": "none"}
    before = samples("bgtask_completed_total", outcome="success", **labels)
    task = BackgroundTask(apps.async_log, "run by hand")
    asyncio.run(task())
    del task
    gc.collect()
    assert samples("bgtask_completed_total", outcome="success", **labels) == before + 1
    assert samples("bgtask_queue_length", **labels) == 0
