from __future__ import annotations

import asyncio
import functools
from typing import Any

import pytest
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


def test_a_wrapper_that_dropped_ours_is_wrapped_again_one_that_holds_it_is_not(
    registry: CollectorRegistry, samples: Samples
) -> None:
    """Another library's wrapper with ``__wrapped__``: followed down through it.
    Over Starlette's own method (its uninstrument put that back, dropping ours, and it wrapped
    again), bgtrace wraps again, on the next request; over ours, it leaves it: each task is
    counted exactly once either way."""
    ours = background.BackgroundTask.__dict__["__call__"]
    starlettes = bgtrace.records.STARLETTE_TASK_CALL

    def wrapping(inner: Any) -> Any:
        # Its own __module__ (functools.wraps' default copies the inner one's): only
        # __wrapped__ tells what it calls.
        @functools.wraps(inner, assigned=("__name__", "__qualname__", "__doc__"))
        async def theirs(self: background.BackgroundTask) -> None:
            await inner(self)

        return theirs

    client = TestClient(apps.tutorial_app(registry=registry))
    try:
        over_ours = wrapping(ours)
        background.BackgroundTask.__call__ = over_ours  # type: ignore[method-assign]
        client.post("/send-notification/x")
        assert background.BackgroundTask.__dict__["__call__"] is over_ours
        assert samples.total("bgtask_completed_total") == 1

        over_starlettes = wrapping(starlettes)
        background.BackgroundTask.__call__ = over_starlettes  # type: ignore[method-assign]
        client.post("/send-notification/x")
        again = background.BackgroundTask.__dict__["__call__"]
        assert again is not over_starlettes
        assert again.__wrapped__ is over_starlettes
        assert samples.total("bgtask_completed_total") == 2
        assert samples.total("bgtask_dropped_total") == 0
        assert len(apps.done) == 2
    finally:
        bgtrace.uninstrument()
        background.BackgroundTask.__call__ = starlettes  # type: ignore[method-assign]
        bgtrace.instrument()


def test_a_request_that_read_the_wrappers_before_another_thread_wrapped_again_adds_none(
    registry: CollectorRegistry, samples: Samples, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A request's check reads the installed wrappers without the lock. Thread A read them
    while our wrapper was lost (the framework's own method put back over it); thread B then
    built a middleware, which wrapped again. A's check must not wrap over B's wrapper: every
    task would run through bgtrace twice and count twice."""
    lost = background.BackgroundTask.__dict__["__call__"]
    starlettes = bgtrace.records.STARLETTE_TASK_CALL
    client = TestClient(apps.tutorial_app(registry=registry))
    try:
        background.BackgroundTask.__call__ = starlettes  # type: ignore[method-assign]
        stale = bgtrace.instrumentation._installed
        assert stale[0][2] is lost
        bgtrace.instrument()  # thread B
        again = background.BackgroundTask.__dict__["__call__"]
        assert again is not lost and again.__wrapped__ is starlettes
        monkeypatch.setattr(bgtrace.instrumentation, "_installed", stale)
        bgtrace.instrumentation.ensure_instrumented()  # thread A, with what it read before
        assert background.BackgroundTask.__dict__["__call__"] is again
        monkeypatch.undo()
        client.post("/send-notification/x")
        assert samples.total("bgtask_enqueued_total") == 1
        assert samples.total("bgtask_completed_total") == 1
    finally:
        bgtrace.uninstrument()
        background.BackgroundTask.__call__ = starlettes  # type: ignore[method-assign]
        bgtrace.instrument()


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
