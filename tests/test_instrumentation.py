from __future__ import annotations

import asyncio

from fastapi import background as fastapi_background
from fastapi.testclient import TestClient
from prometheus_client import CollectorRegistry
from starlette import background

import bgtrace
from tests import apps
from tests.conftest import Samples

PATCHED = [
    (background.BackgroundTask, "__init__"),
    (background.BackgroundTask, "__call__"),
    (background.BackgroundTasks, "__call__"),
    *(
        [(fastapi_background.BackgroundTasks, "__call__")]
        if "__call__" in fastapi_background.BackgroundTasks.__dict__
        else []
    ),
]


def _current() -> list[object]:
    return [cls.__dict__[name] for cls, name in PATCHED]


def test_uninstrument_restores_the_original_functions_identically() -> None:
    bgtrace.uninstrument()
    originals = _current()
    bgtrace.instrument()
    bgtrace.instrument()
    patched = _current()
    assert all(p is not o for p, o in zip(patched, originals, strict=True))
    bgtrace.uninstrument()
    bgtrace.uninstrument()
    assert all(c is o for c, o in zip(_current(), originals, strict=True))
    bgtrace.instrument()
    assert _current() != originals


def test_uninstrumented_tasks_run_unmeasured(registry: CollectorRegistry, samples: Samples) -> None:
    client = TestClient(apps.tutorial_app(registry=registry))
    client.post("/send-notification/x")  # builds the middleware stack, which instruments
    bgtrace.uninstrument()
    client.post("/send-notification/x")
    assert len(apps.done) == 2  # both tasks ran
    assert samples.total("bgtask_enqueued_total") == 1


def test_uninstrument_under_a_later_wrapper_switches_ours_off() -> None:
    ours = background.BackgroundTask.__dict__["__call__"]

    async def theirs(self: background.BackgroundTask) -> None:
        await ours(self)

    background.BackgroundTask.__call__ = theirs  # type: ignore[method-assign]
    try:
        bgtrace.uninstrument()
        # Removing ours would remove theirs: ours stays, switched off.
        assert background.BackgroundTask.__dict__["__call__"] is theirs
        assert not bgtrace.instrumentation.is_instrumented()
        bgtrace.instrument()
        assert background.BackgroundTask.__dict__["__call__"] is theirs
        assert bgtrace.instrumentation.is_instrumented()
    finally:
        background.BackgroundTask.__call__ = ours  # type: ignore[method-assign]


def test_bgtrace_background_tasks_measured_without_class_patching() -> None:
    from prometheus_client import REGISTRY

    samples = Samples(REGISTRY)
    labels = {"task": "tests.apps.async_log", "origin": "other", "route": "none"}
    before = samples("bgtask_completed_total", outcome="success", **labels)
    bgtrace.uninstrument()
    tasks = bgtrace.BackgroundTasks()
    tasks.add_task(apps.async_log, "one")
    tasks.add_task(apps.async_log, "two")
    asyncio.run(tasks())
    assert apps.done == ["one", "two"]
    assert samples("bgtask_completed_total", outcome="success", **labels) == before + 2


def test_bgtrace_background_tasks_is_a_drop_in(
    registry: CollectorRegistry, samples: Samples
) -> None:
    from fastapi import FastAPI
    from starlette.responses import PlainTextResponse

    app = FastAPI()
    app.add_middleware(bgtrace.BackgroundTaskMiddleware, registry=registry)

    @app.get("/own")
    async def own() -> PlainTextResponse:
        tasks = bgtrace.BackgroundTasks()
        tasks.add_task(apps.write_log, "x")
        return PlainTextResponse("ok", background=tasks)

    TestClient(app).get("/own")
    assert isinstance(bgtrace.BackgroundTasks(), background.BackgroundTasks)
    assert samples("bgtask_completed_total", task="tests.apps.write_log", origin="handler",
                   route="/own", outcome="success") == 1  # fmt: skip
