"""``origin`` and ``bgtask.dependency``: who queued the task."""

# No "from __future__ import annotations": FastAPI must see the Annotated[...] objects.
import functools
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Annotated, Any

import pytest
from fastapi import APIRouter, BackgroundTasks, Depends, FastAPI
from fastapi.testclient import TestClient
from prometheus_client import CollectorRegistry

from bgtrace import BackgroundTaskMiddleware
from tests import apps
from tests.conftest import Samples

LOG = "tests.apps.write_log"


def sync_dep(background_tasks: BackgroundTasks) -> None:
    background_tasks.add_task(apps.write_log, "sync")


async def async_dep(background_tasks: BackgroundTasks) -> None:
    background_tasks.add_task(apps.write_log, "async")


def gen_dep(background_tasks: BackgroundTasks) -> Iterator[None]:
    background_tasks.add_task(apps.write_log, "gen")
    yield


async def agen_dep(background_tasks: BackgroundTasks) -> AsyncIterator[None]:
    background_tasks.add_task(apps.write_log, "agen")
    yield


def outer_dep(inner: None = Depends(sync_dep)) -> None:
    """Queues nothing itself: the task comes from its sub-dependency."""


class ClassDep:
    def __init__(self, background_tasks: BackgroundTasks) -> None:
        background_tasks.add_task(apps.write_log, "class")


class CallableDep:
    def __call__(self, background_tasks: BackgroundTasks) -> None:
        background_tasks.add_task(apps.write_log, "callable")


def helper(background_tasks: BackgroundTasks) -> None:
    background_tasks.add_task(apps.write_log, "helper")


def passthrough(func: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(func)
    async def wrapper(*args: Any, **kwargs: Any) -> Any:
        return await func(*args, **kwargs)

    return wrapper


def build(registry: CollectorRegistry, **app_kwargs: Any) -> FastAPI:
    app = FastAPI(**app_kwargs)
    app.add_middleware(BackgroundTaskMiddleware, registry=registry)
    router = APIRouter(prefix="/r", dependencies=[Depends(async_dep)])

    def annotated(path: str, dep: Any) -> None:
        @app.get(path)
        async def endpoint(_: Annotated[Any, Depends(dep)]) -> None:
            pass

    for path, dep in {
        "/sync": sync_dep, "/async": async_dep, "/gen": gen_dep, "/agen": agen_dep,
        "/sub": outer_dep, "/class": ClassDep, "/callable": CallableDep(),
    }.items():  # fmt: skip
        annotated(path, dep)

    @app.get("/plain-depends")
    def plain(_: None = Depends(sync_dep)) -> None:
        pass

    @app.get("/helper")
    def via_helper(background_tasks: BackgroundTasks) -> None:
        helper(background_tasks)

    @app.get("/decorated")
    @passthrough
    async def decorated(background_tasks: BackgroundTasks) -> None:
        background_tasks.add_task(apps.write_log, "decorated")

    @router.get("/router-dep")
    async def router_dep() -> None:
        pass

    app.include_router(router)
    return app


@pytest.mark.parametrize(
    ("path", "dependency"),
    [
        ("/sync", "tests.test_origin.sync_dep"),
        ("/async", "tests.test_origin.async_dep"),
        ("/gen", "tests.test_origin.gen_dep"),
        ("/agen", "tests.test_origin.agen_dep"),
        ("/sub", "tests.test_origin.sync_dep"),
        ("/class", "tests.test_origin.ClassDep"),
        ("/callable", "tests.test_origin.CallableDep"),
        ("/plain-depends", "tests.test_origin.sync_dep"),
        ("/r/router-dep", "tests.test_origin.async_dep"),
    ],
)
def test_dependency_origin(
    registry: CollectorRegistry, samples: Samples, path: str, dependency: str
) -> None:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    assert TestClient(build(registry)).get(path).status_code == 200
    assert samples("bgtask_completed_total", task=LOG, origin="dependency", route=path,
                   outcome="success") == 1  # fmt: skip

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    app = build(CollectorRegistry())
    app.user_middleware[0].kwargs["tracer_provider"] = provider
    TestClient(app).get(path)
    (task,) = [s for s in exporter.get_finished_spans() if s.name.startswith("bgtask")]
    assert (task.attributes or {})["bgtask.dependency"] == dependency


@pytest.mark.parametrize("path", ["/helper", "/decorated"])
def test_handler_origin(registry: CollectorRegistry, samples: Samples, path: str) -> None:
    TestClient(build(registry)).get(path)
    assert samples("bgtask_completed_total", task=LOG, origin="handler", route=path,
                   outcome="success") == 1  # fmt: skip


def test_app_level_dependencies(registry: CollectorRegistry, samples: Samples) -> None:
    app = build(registry, dependencies=[Depends(gen_dep)])
    TestClient(app).get("/helper")
    assert samples("bgtask_completed_total", task=LOG, origin="dependency", route="/helper",
                   outcome="success") == 1  # fmt: skip
    assert samples("bgtask_completed_total", task=LOG, origin="handler", route="/helper",
                   outcome="success") == 1  # fmt: skip


def test_dependency_override_is_a_dependency(registry: CollectorRegistry, samples: Samples) -> None:
    def override(background_tasks: BackgroundTasks) -> None:
        background_tasks.add_task(apps.write_log, "override")

    app = build(registry)
    app.dependency_overrides[sync_dep] = override
    TestClient(app).get("/sync")
    assert samples("bgtask_completed_total", task=LOG, origin="dependency", route="/sync",
                   outcome="success") == 1  # fmt: skip


def test_include_router_dependencies_are_dependencies(
    registry: CollectorRegistry, samples: Samples
) -> None:
    app = FastAPI()
    app.add_middleware(BackgroundTaskMiddleware, registry=registry)
    router = APIRouter()

    @router.post("/items")
    async def create() -> None:
        pass

    app.include_router(router, prefix="/v2", dependencies=[Depends(agen_dep)])
    TestClient(app).post("/v2/items")
    assert samples("bgtask_completed_total", task=LOG, origin="dependency", route="/v2/items",
                   outcome="success") == 1  # fmt: skip


# --- decorators shared between handlers, dependencies and helpers -----------------------------
# One ``functools.wraps`` decorator makes every function it wraps run the same wrapper code: a
# frame of that code identifies a dependency only when it wraps that very dependency.


def shared_sync(func: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        return func(*args, **kwargs)

    return wrapper


def shared_async(func: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(func)
    async def wrapper(*args: Any, **kwargs: Any) -> Any:
        return await func(*args, **kwargs)

    return wrapper


def queues_in_wrapper(func: Callable[..., Any]) -> Callable[..., Any]:
    """A decorator that queues a task itself, before calling the function it wraps."""

    @functools.wraps(func)
    async def wrapper(background_tasks: BackgroundTasks) -> Any:
        background_tasks.add_task(apps.write_log, "wrapper")
        return await func(background_tasks)

    return wrapper


@shared_sync
def decorated_sync_dep(background_tasks: BackgroundTasks) -> None:
    background_tasks.add_task(apps.write_log, "sync dep")


@shared_async
async def decorated_async_dep(background_tasks: BackgroundTasks) -> None:
    background_tasks.add_task(apps.write_log, "async dep")


@shared_sync
def decorated_sync_helper(background_tasks: BackgroundTasks) -> None:
    background_tasks.add_task(apps.write_log, "sync helper")


@shared_async
async def decorated_async_helper(background_tasks: BackgroundTasks) -> None:
    background_tasks.add_task(apps.write_log, "async helper")


@queues_in_wrapper
async def wrapper_queuing_dep(background_tasks: BackgroundTasks) -> None:
    pass


def shared_decorator_app(registry: CollectorRegistry, tracer_provider: Any = None) -> FastAPI:
    app = FastAPI()
    app.add_middleware(BackgroundTaskMiddleware, registry=registry,
                       tracer_provider=tracer_provider)  # fmt: skip

    @app.get("/sync-helper", dependencies=[Depends(decorated_sync_dep)])
    def sync_helper_route(background_tasks: BackgroundTasks) -> None:
        decorated_sync_helper(background_tasks)

    @app.get("/async-helper", dependencies=[Depends(decorated_async_dep)])
    async def async_helper_route(background_tasks: BackgroundTasks) -> None:
        await decorated_async_helper(background_tasks)

    @app.get("/decorated-handler", dependencies=[Depends(decorated_async_dep)])
    @shared_async
    async def decorated_handler(background_tasks: BackgroundTasks) -> None:
        await decorated_async_helper(background_tasks)

    @app.get("/decorated-sync-handler", dependencies=[Depends(decorated_sync_dep)])
    @shared_sync
    def decorated_sync_handler(background_tasks: BackgroundTasks) -> None:
        decorated_sync_helper(background_tasks)

    @app.get("/in-wrapper", dependencies=[Depends(wrapper_queuing_dep)])
    async def in_wrapper(background_tasks: BackgroundTasks) -> None:
        await decorated_async_helper(background_tasks)

    return app


@pytest.mark.parametrize(
    ("path", "dependency"),
    [
        ("/sync-helper", "tests.test_origin.decorated_sync_dep"),
        ("/async-helper", "tests.test_origin.decorated_async_dep"),
        ("/decorated-handler", "tests.test_origin.decorated_async_dep"),
        ("/decorated-sync-handler", "tests.test_origin.decorated_sync_dep"),
    ],
)
def test_helper_sharing_a_dependencys_decorator_counts_as_handler(
    registry: CollectorRegistry,
    samples: Samples,
    tracer_provider: Any,
    exporter: Any,
    path: str,
    dependency: str,
) -> None:
    assert TestClient(shared_decorator_app(registry, tracer_provider)).get(path).status_code == 200
    assert samples("bgtask_completed_total", task=LOG, origin="handler", route=path,
                   outcome="success") == 1  # fmt: skip
    assert samples("bgtask_completed_total", task=LOG, origin="dependency", route=path,
                   outcome="success") == 1  # fmt: skip
    spans = [s for s in exporter.get_finished_spans() if s.name.startswith("bgtask")]
    by_origin = {(s.attributes or {})["bgtask.origin"]: s.attributes or {} for s in spans}
    assert by_origin["dependency"]["bgtask.dependency"] == dependency
    assert "bgtask.dependency" not in by_origin["handler"]


def test_task_queued_by_a_dependencys_own_wrapper_counts_as_that_dependency(
    registry: CollectorRegistry, samples: Samples, tracer_provider: Any, exporter: Any
) -> None:
    TestClient(shared_decorator_app(registry, tracer_provider)).get("/in-wrapper")
    assert samples("bgtask_completed_total", task=LOG, origin="dependency", route="/in-wrapper",
                   outcome="success") == 1  # fmt: skip
    assert samples("bgtask_completed_total", task=LOG, origin="handler", route="/in-wrapper",
                   outcome="success") == 1  # fmt: skip
    (dependency,) = [
        s.attributes or {}
        for s in exporter.get_finished_spans()
        if (s.attributes or {}).get("bgtask.origin") == "dependency"
    ]
    assert dependency["bgtask.dependency"] == "tests.test_origin.wrapper_queuing_dep"


def test_dependencies_made_by_one_factory_are_told_apart(
    registry: CollectorRegistry, tracer_provider: Any, exporter: Any
) -> None:
    """Nested functions share a code object too: their closures tell them apart."""

    def make_dependency(word: str) -> Callable[..., None]:
        def dependency(background_tasks: BackgroundTasks) -> None:
            background_tasks.add_task(apps.write_log, word)

        dependency.__qualname__ = f"dependency_{word}"
        return dependency

    first, second = make_dependency("first"), make_dependency("second")
    app = FastAPI()
    app.add_middleware(BackgroundTaskMiddleware, registry=registry,
                       tracer_provider=tracer_provider)  # fmt: skip

    @app.get("/two", dependencies=[Depends(first)])
    def two(background_tasks: BackgroundTasks) -> None:
        second(background_tasks)  # called as a helper, not a dependency

    TestClient(app).get("/two")
    origins = sorted(
        ((s.attributes or {})["bgtask.origin"], (s.attributes or {}).get("bgtask.dependency"))
        for s in exporter.get_finished_spans()
        if s.name.startswith("bgtask")
    )
    assert origins == [("dependency", "tests.test_origin.dependency_first"), ("handler", None)]
