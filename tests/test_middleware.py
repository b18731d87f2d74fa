from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import pytest
from fastapi import BackgroundTasks, FastAPI, WebSocket
from fastapi.testclient import TestClient
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client import CollectorRegistry
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from bgtrace import BackgroundTaskMiddleware
from bgtrace.accumulators import LocalSeries
from bgtrace.metrics import TaskMetrics
from tests import apps
from tests.conftest import Samples
from tests.servers import ROOT

ROUTE = "/send-notification/{email}"
NOTIFY = "tests.apps.write_notification"
LOG = "tests.apps.write_log"


def test_tutorial_counts_handler_and_dependency_tasks(
    registry: CollectorRegistry, samples: Samples
) -> None:
    client = TestClient(apps.tutorial_app(registry=registry))
    assert client.post(f"/send-notification/{apps.EMAIL}").status_code == 200
    assert client.post(f"/send-notification/{apps.EMAIL}?q=hello").status_code == 200

    handler = {"task": NOTIFY, "origin": "handler", "route": ROUTE}
    dependency = {"task": LOG, "origin": "dependency", "route": ROUTE}
    assert samples("bgtask_enqueued_total", **handler) == 2
    assert samples("bgtask_enqueued_total", **dependency) == 1
    assert samples("bgtask_completed_total", **handler, outcome="success") == 2
    assert samples("bgtask_completed_total", **dependency, outcome="success") == 1
    assert samples("bgtask_duration_seconds_count", **handler) == 2
    assert samples("bgtask_queue_wait_seconds_count", **dependency) == 1
    assert samples("bgtask_queue_length", **handler) == 0
    assert samples("bgtask_in_progress", **handler) == 0
    assert samples("bgtask_post_response_seconds_count", route=ROUTE) == 2
    assert samples.total("bgtask_dropped_total") == 0
    assert len(apps.done) == 3


def test_every_queued_task_ends_completed_or_dropped(
    registry: CollectorRegistry, samples: Samples
) -> None:
    client = TestClient(apps.dropping_app(registry=registry), raise_server_exceptions=False)
    for path in ("/raise-http", "/raise", "/fail-first", "/own-background?q=x"):
        client.post(path)
    enqueued = samples.total("bgtask_enqueued_total")
    ended = samples.total("bgtask_completed_total") + samples.total("bgtask_dropped_total")
    assert enqueued == ended == 6
    assert samples.total("bgtask_queue_length") == 0
    assert samples.total("bgtask_in_progress") == 0


def test_app_exceptions_propagate_unchanged(registry: CollectorRegistry) -> None:
    client = TestClient(apps.dropping_app(registry=registry))
    with pytest.raises(RuntimeError, match="handler broke"):
        client.post("/raise")
    with pytest.raises(ValueError, match="boom"):
        client.post("/fail-first")
    assert client.post("/raise-http").status_code == 409


def test_failure_logged_once_without_arguments(
    registry: CollectorRegistry, caplog: pytest.LogCaptureFixture
) -> None:
    client = TestClient(apps.dropping_app(registry=registry), raise_server_exceptions=False)
    with caplog.at_level(logging.ERROR, logger="bgtrace"):
        client.post("/fail-first")
    lines = [r.getMessage() for r in caplog.records if r.name == "bgtrace"]
    assert len(lines) == 1
    assert "task=tests.apps.fail" in lines[0]
    assert "origin=handler" in lines[0] and "route=/fail-first" in lines[0]
    assert "error_type=ValueError" in lines[0] and "trace_id=" in lines[0]
    assert "boom" not in lines[0]


def test_task_arguments_never_reach_metrics_spans_or_logs(
    registry: CollectorRegistry,
    tracer_provider: TracerProvider,
    exporter: InMemorySpanExporter,
    caplog: pytest.LogCaptureFixture,
) -> None:
    app = apps.tutorial_app(registry=registry, tracer_provider=tracer_provider)
    client = TestClient(app)
    with caplog.at_level(logging.DEBUG):
        client.post(f"/send-notification/{apps.EMAIL}?q={apps.EMAIL}")
        exposition = client.get("/metrics").text
    assert f"notification to {apps.EMAIL}: some notification" in apps.done  # it reached the task
    assert apps.EMAIL not in exposition
    spans = exporter.get_finished_spans()
    assert len(spans) == 3
    for span in spans:
        texts = [str(v) for v in (span.attributes or {}).values()]
        texts += [str(v) for e in span.events for v in (e.attributes or {}).values()]
        assert all(apps.EMAIL not in text for text in texts), span.name
        assert apps.EMAIL not in span.name
    # The test client logs the URL itself; bgtrace's own lines must not.
    assert all(apps.EMAIL not in r.getMessage() for r in caplog.records if r.name == "bgtrace")


def test_websocket_and_lifespan_pass_through(registry: CollectorRegistry) -> None:
    from collections.abc import AsyncIterator
    from contextlib import asynccontextmanager

    started: list[str] = []

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        started.append("up")
        yield
        started.append("down")

    app = FastAPI(lifespan=lifespan)
    app.add_middleware(BackgroundTaskMiddleware, registry=registry)

    @app.websocket("/ws")
    async def echo(websocket: WebSocket) -> None:
        await websocket.accept()
        await websocket.send_text(await websocket.receive_text())
        await websocket.close()

    with TestClient(app) as client, client.websocket_connect("/ws") as ws:
        ws.send_text("ping")
        assert ws.receive_text() == "ping"
    assert started == ["up", "down"]


def test_metrics_path_none_leaves_the_path_to_the_app(registry: CollectorRegistry) -> None:
    app = apps.tutorial_app(registry=registry, metrics_path=None)
    assert TestClient(app).get("/metrics").status_code == 404


def test_custom_metrics_path_and_namespace(registry: CollectorRegistry, samples: Samples) -> None:
    app = apps.tutorial_app(registry=registry, metrics_path="/internal/metrics", namespace="shop")
    client = TestClient(app)
    client.post("/send-notification/x")
    body = client.get("/internal/metrics").text
    assert "shop_bgtask_enqueued_total{" in body
    assert samples.total("shop_bgtask_enqueued_total") == 1
    assert client.get("/metrics").status_code == 404


def test_internal_bookkeeping_error_never_reaches_app_or_task(
    registry: CollectorRegistry, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(*args: object) -> None:
        raise RuntimeError("bgtrace bug")

    monkeypatch.setattr(TaskMetrics, "series", broken)
    client = TestClient(apps.tutorial_app(registry=registry))
    with caplog.at_level(logging.ERROR, logger="bgtrace"):
        response = client.post("/send-notification/x?q=1")
    assert response.status_code == 200
    assert len(apps.done) == 2  # both tasks still ran
    assert any("internal error" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize(
    ("update", "place"),
    [
        ("queued", "task queued"),
        ("started", "task start metrics"),
        ("finished", "task end metrics"),
    ],
)
def test_failing_value_update_never_reaches_app_or_task(
    registry: CollectorRegistry,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    update: str,
    place: str,
) -> None:
    # The updates run under the series' lock, inside the task's state change.
    def broken(*args: object) -> None:
        raise RuntimeError("bgtrace bug")

    monkeypatch.setattr(LocalSeries, update, broken)
    client = TestClient(apps.tutorial_app(registry=registry))
    # DEBUG: after its first time in the process, a place's error is logged at debug level.
    with caplog.at_level(logging.DEBUG, logger="bgtrace"):
        for _ in range(2):  # the second request: the lock was released
            assert client.post("/send-notification/x?q=1").status_code == 200
    assert len(apps.done) == 4
    assert any(f"internal error in {place}" in r.getMessage() for r in caplog.records)


def test_tracer_that_raises_does_not_harm_tasks(registry: CollectorRegistry) -> None:
    class BrokenProvider(TracerProvider):
        def get_tracer(self, *args: object, **kwargs: object):  # type: ignore[no-untyped-def,override]
            tracer = super().get_tracer(*args, **kwargs)  # type: ignore[arg-type]

            def start_span(*a: object, **k: object) -> None:
                raise RuntimeError("tracer broke")

            tracer.start_span = start_span  # type: ignore[method-assign,assignment]
            return tracer

    app = apps.tutorial_app(registry=registry, tracer_provider=BrokenProvider())
    assert TestClient(app).post("/send-notification/x?q=1").status_code == 200
    assert len(apps.done) == 2


def test_two_apps_share_one_registry_without_duplicate_errors(
    registry: CollectorRegistry, samples: Samples
) -> None:
    first = TestClient(apps.tutorial_app(registry=registry))
    second = TestClient(apps.tutorial_app(registry=registry))
    first.post("/send-notification/a")
    second.post("/send-notification/b")
    assert samples("bgtask_enqueued_total", task=NOTIFY, origin="handler", route=ROUTE) == 2


def test_default_registry_apps_can_be_created_repeatedly() -> None:
    for _ in range(3):
        TestClient(apps.tutorial_app()).post("/send-notification/x")


def test_starlette_endpoint_tasks_are_origin_other(
    registry: CollectorRegistry, samples: Samples
) -> None:
    from starlette.background import BackgroundTask

    async def endpoint(request: object) -> PlainTextResponse:
        return PlainTextResponse("ok", background=BackgroundTask(apps.write_log, "x"))

    app = Starlette(routes=[Route("/plain", endpoint)])
    app.add_middleware(BackgroundTaskMiddleware, registry=registry)
    TestClient(app).get("/plain")
    assert samples("bgtask_completed_total", task=LOG, origin="other", route="/plain",
                   outcome="success") == 1  # fmt: skip


def test_invalid_options_are_precise_errors() -> None:
    with pytest.raises(ValueError, match="trace_mode"):
        BackgroundTaskMiddleware(FastAPI(), trace_mode="sibling", registry=CollectorRegistry())  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="request_spans"):
        BackgroundTaskMiddleware(FastAPI(), request_spans="yes", registry=CollectorRegistry())  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="metrics_path"):
        BackgroundTaskMiddleware(FastAPI(), metrics_path="metrics", registry=CollectorRegistry())


def test_handler_that_queues_on_background_tasks_it_built_counts(
    registry: CollectorRegistry, samples: Samples
) -> None:
    app = FastAPI()
    app.add_middleware(BackgroundTaskMiddleware, registry=registry)

    @app.get("/manual")
    async def manual() -> PlainTextResponse:
        tasks = BackgroundTasks()
        tasks.add_task(apps.async_log, "a")
        return PlainTextResponse("ok", background=tasks)

    TestClient(app).get("/manual")
    assert samples("bgtask_completed_total", task="tests.apps.async_log", origin="handler",
                   route="/manual", outcome="success") == 1  # fmt: skip


@pytest.mark.parametrize(
    ("root_path", "path", "served"),
    [("/api", "/api/metrics", True), ("/", "/metrics", True), ("/api", "/apimetrics", False)],
)
def test_metrics_served_under_the_servers_root_path(
    registry: CollectorRegistry, root_path: str, path: str, served: bool
) -> None:
    """Regression: behind `uvicorn --root-path /api` (path "/api/metrics") /metrics was 404;
    with a root path of "/" too. A root path ends where a "/" follows, as Starlette routes."""
    import asyncio

    from tests.asgi import call, status

    app = apps.tutorial_app(registry=registry)
    sent = asyncio.run(call(app, path, method="GET", root_path=root_path))
    body = b"".join(m.get("body", b"") for m in sent)
    assert (status(sent), b"bgtask_" in body) == ((200, True) if served else (404, False))


@pytest.mark.parametrize(
    ("root_path", "path", "below"),
    [
        ("", "/metrics", "/metrics"),
        ("/", "/metrics", "/metrics"),
        ("/", "/", "/"),
        ("/api", "/api", "/"),
        ("/api", "/api/metrics", "/metrics"),
        ("/api", "/apimetrics", "/apimetrics"),
        ("/api/", "/api/metrics", "/api/metrics"),
    ],
)
def test_the_path_below_the_root_path_is_starlettes(root_path: str, path: str, below: str) -> None:
    """As Starlette 1.x routes (``starlette._utils.get_route_path``; 0.37 still cut the root
    path anywhere): the root path ends where the path ends or a "/" follows."""
    from bgtrace.middleware import _route_path

    assert _route_path({"path": path, "root_path": root_path}) == below


def test_nested_middlewares_record_once_with_the_whole_route(
    registry: CollectorRegistry, samples: Samples
) -> None:
    """Regression: a sub-app with its own middleware relabelled the outer one's series
    without the mount prefix."""
    inner = FastAPI()
    inner.add_middleware(BackgroundTaskMiddleware, registry=CollectorRegistry())

    @inner.post("/items/{item_id}")
    async def item(item_id: int, background_tasks: BackgroundTasks) -> None:
        background_tasks.add_task(apps.write_log, "x")

    outer = FastAPI()
    outer.mount("/sub", inner)
    outer.add_middleware(BackgroundTaskMiddleware, registry=registry)
    TestClient(outer).post("/sub/items/3")
    assert samples.label_values("bgtask_completed_total", "route") == {"/sub/items/{item_id}"}
    assert samples.total("bgtask_completed_total") == 1


def test_no_second_server_span_under_an_unsampled_one(
    registry: CollectorRegistry, tracer_provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    """Regression: behind an HTTP instrumentation whose sampler dropped the request, bgtrace
    opened its own SERVER span, overriding the sampling decision."""
    from opentelemetry import trace
    from opentelemetry.sdk.trace.sampling import ALWAYS_OFF
    from starlette.types import ASGIApp, Receive, Scope, Send

    inner = apps.tutorial_app(registry=registry, tracer_provider=tracer_provider)
    dropping = TracerProvider(sampler=ALWAYS_OFF).get_tracer("http-instrumentation")

    def outer(app: ASGIApp) -> ASGIApp:
        async def wrapped(scope: Scope, receive: Receive, send: Send) -> None:
            with dropping.start_as_current_span("unsampled", kind=trace.SpanKind.SERVER):
                await app(scope, receive, send)

        return wrapped

    TestClient(outer(inner)).post("/send-notification/x")
    assert exporter.get_finished_spans() == ()  # the task span follows its unsampled parent
    assert len(apps.done) == 1


THREADS_SCRIPT = """
import atexit, sys, threading

def bgtrace_threads():
    return sorted(t.name for t in threading.enumerate() if t.name.startswith("bgtrace-"))

# Registered before bgtrace is imported, so it runs after bgtrace's own exit hooks.
atexit.register(lambda: print("at exit:", bgtrace_threads(), flush=True))

from fastapi import BackgroundTasks, FastAPI
from fastapi.testclient import TestClient
from prometheus_client import CollectorRegistry
from bgtrace import BackgroundTaskMiddleware

print("imported:", bgtrace_threads(), flush=True)
app = FastAPI()
app.add_middleware(BackgroundTaskMiddleware, registry=CollectorRegistry())

async def noop() -> None:
    pass

@app.post("/")
async def endpoint(background_tasks: BackgroundTasks) -> None:
    background_tasks.add_task(noop)

BackgroundTaskMiddleware(app, registry=CollectorRegistry())
print("constructed:", bgtrace_threads(), flush=True)
with TestClient(app) as client:
    client.post("/")
    print("served:", bgtrace_threads(), flush=True)
"""


def test_no_bgtrace_thread_before_a_request_and_both_stop_at_exit(tmp_path: Path) -> None:
    """Importing bgtrace or constructing the middleware starts no thread; the first request and
    task start the watchdog and the stuck checker, which end before the interpreter does."""
    script = tmp_path / "threads.py"
    script.write_text(THREADS_SCRIPT)
    result = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=60, cwd=ROOT
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "imported: []",
        "constructed: []",
        "served: ['bgtrace-stuck', 'bgtrace-watchdog']",
        "at exit: []",
    ], result.stderr
