"""bgtrace beside the instrumentation users already run: one clean picture each time."""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator

import pytest
from fastapi import BackgroundTasks, Depends, FastAPI
from fastapi.testclient import TestClient
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client import CollectorRegistry
from starlette import background

import bgtrace
from bgtrace import BackgroundTaskMiddleware
from bgtrace.testing import BackgroundTaskRecorder
from tests import apps
from tests.conftest import Samples

HAS_FASTAPI_TELEMETRY = importlib.util.find_spec("fastapi.telemetry") is not None


def _app(
    registry: CollectorRegistry, tracer_provider: TracerProvider | None, **kwargs: object
) -> FastAPI:
    app = FastAPI(**kwargs)  # type: ignore[arg-type]
    app.add_middleware(BackgroundTaskMiddleware, registry=registry, tracer_provider=tracer_provider)

    @app.post("/notify/{email}")
    async def notify(email: str, background_tasks: BackgroundTasks) -> None:
        background_tasks.add_task(apps.write_notification, email)
        background_tasks.add_task(apps.fail, "x")

    return app


TASK_SPAN_NAMES = ("bgtask ", "BackgroundTask ", "fastapi.background_task")


def _task_spans(exporter: InMemorySpanExporter) -> list[ReadableSpan]:
    """Every span opened for a task, by bgtrace or by another instrumentation."""
    return [s for s in exporter.get_finished_spans() if s.name.startswith(TASK_SPAN_NAMES)]


def _server_span(exporter: InMemorySpanExporter) -> ReadableSpan:
    (server,) = [s for s in exporter.get_finished_spans() if s.kind is trace.SpanKind.SERVER]
    return server


def _assert_one_span_per_task_in_request_trace(
    exporter: InMemorySpanExporter, names: set[str]
) -> None:
    server = _server_span(exporter)
    spans = _task_spans(exporter)
    assert {s.name for s in spans} == names
    names = sorted(str((s.attributes or {})["code.function.name"]) for s in spans)
    assert names == ["tests.apps.fail", "tests.apps.write_notification"]
    for span in spans:
        assert span.context.trace_id == server.context.trace_id
        assert (span.attributes or {})["bgtask.origin"] == "handler"
        assert (span.attributes or {})["http.route"] == "/notify/{email}"
        assert "bgtask.queue.wait_duration" in (span.attributes or {})
    (failed,) = [
        s for s in spans if (s.attributes or {})["code.function.name"] == "tests.apps.fail"
    ]
    assert failed.status.status_code is trace.StatusCode.ERROR
    assert (failed.attributes or {})["error.type"] == "ValueError"
    # One exception event: bgtrace's (no message), or the one the span's owner records.
    (event,) = [e for e in failed.events if e.name == "exception"]
    assert (event.attributes or {})["exception.type"] in ("ValueError", "builtins.ValueError")


@pytest.mark.skipif(not HAS_FASTAPI_TELEMETRY, reason="this FastAPI has no built-in telemetry")
def test_fastapi_builtin_telemetry_one_span_per_task(
    registry: CollectorRegistry,
    tracer_provider: TracerProvider,
    exporter: InMemorySpanExporter,
    samples: Samples,
) -> None:
    app = _app(registry, tracer_provider, telemetry={"tracer_provider": tracer_provider})
    TestClient(app, raise_server_exceptions=False).post("/notify/a@b.c")
    _assert_one_span_per_task_in_request_trace(
        exporter, {"bgtask write_notification", "bgtask fail"}
    )
    # FastAPI opened the server span: bgtrace opened none of its own.
    assert _server_span(exporter).attributes.get("url.path") == "/notify/a@b.c"  # type: ignore[union-attr]
    assert samples.total("bgtask_completed_total") == 2


@pytest.mark.skipif(not HAS_FASTAPI_TELEMETRY, reason="this FastAPI has no built-in telemetry")
@pytest.mark.parametrize("provider", ["global", "fastapi_own"])
def test_fastapi_task_span_taken_over_whoever_provides_it(
    provider: str,
    registry: CollectorRegistry,
    tracer_provider: TracerProvider,
    exporter: InMemorySpanExporter,
    samples: Samples,
    request: pytest.FixtureRequest,
) -> None:
    """bgtrace passes no provider: FastAPI's span gets its name, attributes and one exception
    event whether the SDK is the global provider or FastAPI's own ``tracer_provider``."""
    if provider == "global":
        request.getfixturevalue("global_tracer_provider")
        app = _app(registry, None)
    else:
        app = _app(registry, None, telemetry={"tracer_provider": tracer_provider})
    TestClient(app, raise_server_exceptions=False).post("/notify/a@b.c")
    _assert_one_span_per_task_in_request_trace(
        exporter, {"bgtask write_notification", "bgtask fail"}
    )
    (failed,) = [s for s in _task_spans(exporter) if s.name == "bgtask fail"]
    (event,) = failed.events
    assert event.name == "exception" and "x" not in str(dict(event.attributes or {}).values())
    assert samples.total("bgtask_completed_total") == 2


def test_opentelemetry_fastapi_instrumentor_task_span_with_its_own_provider(
    otel_instrumentor: type,
    registry: CollectorRegistry,
    tracer_provider: TracerProvider,
    exporter: InMemorySpanExporter,
) -> None:
    app = _app(registry, None)
    otel_instrumentor.instrument_app(app, tracer_provider=tracer_provider)  # type: ignore[attr-defined]
    if not hasattr(background.BackgroundTask, "_otel_original_call"):
        pytest.skip("releases before 0.63b0 open no span per task")
    TestClient(app, raise_server_exceptions=False).post("/notify/a@b.c")
    _assert_one_span_per_task_in_request_trace(
        exporter, {"bgtask write_notification", "bgtask fail"}
    )


def test_opentelemetry_fastapi_instrumentor_installed_first_keeps_its_task_span_without_bgtraces(
    otel_instrumentor: type,
    registry: CollectorRegistry,
    tracer_provider: TracerProvider,
    exporter: InMemorySpanExporter,
    samples: Samples,
) -> None:
    """The usual order: ``instrument_app`` at import, bgtrace's middleware built at start-up,
    so bgtrace's class wrapper goes on top of the instrumentor's. With the instrumentor's own
    provider only, bgtrace opens no span: the instrumentor's task span must stay (bgtrace
    used to call past it, leaving the task with no span at all), and bgtrace takes it over
    as in the other order: the task starts inside it (a def task in its worker thread, its
    thread wait measured)."""
    bgtrace.uninstrument()
    app = _app(registry, None)

    @app.post("/async")
    async def queue_async(background_tasks: BackgroundTasks) -> None:
        background_tasks.add_task(apps.async_log, "x")

    otel_instrumentor.instrument_app(app, tracer_provider=tracer_provider)  # type: ignore[attr-defined]
    if not hasattr(background.BackgroundTask, "_otel_original_call"):
        pytest.skip("releases before 0.63b0 open no span per task")
    bgtrace.instrument()  # as the middleware does when the stack is built
    client = TestClient(app, raise_server_exceptions=False)
    client.post("/notify/a@b.c")
    _assert_one_span_per_task_in_request_trace(
        exporter, {"bgtask write_notification", "bgtask fail"}
    )
    assert samples.total("bgtask_thread_wait_seconds_count") == 2
    assert samples.total("bgtask_completed_total", outcome="success") == 1
    assert samples.total("bgtask_completed_total", outcome="failure") == 1

    exporter.clear()
    client.post("/async")
    (span,) = _task_spans(exporter)
    assert span.name == "bgtask async_log"
    assert (span.attributes or {})["bgtask.origin"] == "handler"
    assert samples.total("bgtask_completed_total", task="tests.apps.async_log") == 1
    assert samples.total("bgtask_thread_wait_seconds_count") == 2  # none for the async task


def test_an_async_task_started_inside_the_instrumentors_span_is_still_an_async_task(
    otel_instrumentor: type,
    registry: CollectorRegistry,
    tracer_provider: TracerProvider,
) -> None:
    """Regression (review): started inside the instrumentor's wrapper (installed first, no
    span of bgtrace's own), an async task is claimed so that it starts once; it was then
    taken for a def task: the stuck check read the loop thread's stack instead of where the
    task waits, and OpenTelemetry's thread-wait histogram counted it."""
    import threading
    import time

    import anyio
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader

    from bgtrace import inflight, stuck
    from bgtrace.records import RUNNING
    from tests.test_otel_metrics import _stop_recorders

    reader = InMemoryMetricReader()
    meters = MeterProvider(metric_readers=[reader], shutdown_on_exit=False)
    release = threading.Event()

    async def waits_for_release() -> None:
        while not release.is_set():
            await anyio.sleep(0.01)

    app = FastAPI()
    app.add_middleware(BackgroundTaskMiddleware, registry=registry, meter_provider=meters)

    @app.post("/wait")
    async def queue(background_tasks: BackgroundTasks) -> None:
        background_tasks.add_task(waits_for_release)

    bgtrace.uninstrument()
    otel_instrumentor.instrument_app(app, tracer_provider=tracer_provider)  # type: ignore[attr-defined]
    if not hasattr(background.BackgroundTask, "_otel_original_call"):
        pytest.skip("releases before 0.63b0 open no span per task")
    bgtrace.instrument()
    found: list[str] = []

    def probe() -> None:
        deadline = time.monotonic() + 10
        try:
            while time.monotonic() < deadline and not found:
                for record in inflight.snapshot():
                    if record.status == RUNNING and record.name.endswith("waits_for_release"):
                        found.append(stuck.location(record))
                time.sleep(0.01)
        finally:
            release.set()

    prober = threading.Thread(target=probe)
    prober.start()
    try:
        TestClient(app).post("/wait")
    finally:
        release.set()
        prober.join()
        _stop_recorders()
    assert found and "in waits_for_release" in found[0], found
    data = reader.get_metrics_data()
    waits = [
        point
        for resource in (data.resource_metrics if data else ())
        for scope in resource.scope_metrics
        for metric in scope.metrics
        if "thread_wait" in metric.name
        for point in metric.data.data_points  # type: ignore[union-attr]
    ]
    assert sum(point.count for point in waits) == 0  # type: ignore[attr-defined]
    meters.shutdown()


def test_a_task_that_will_not_be_copied_is_not_touched_beside_the_instrumentor(
    otel_instrumentor: type, registry: CollectorRegistry, samples: Samples
) -> None:
    """Regression (review): bgtrace starts a task inside the instrumentor's wrapper on a
    copy of it; a subclass whose ``__copy__`` returns itself had its function replaced, and
    each later run counted under bgtrace's own stand-in's name."""
    from starlette.responses import Response

    class Uncopied(background.BackgroundTask):
        def __copy__(self) -> Uncopied:
            return self

    app = FastAPI()
    app.add_middleware(BackgroundTaskMiddleware, registry=registry)

    @app.get("/")
    async def endpoint() -> Response:
        return Response(background=task)

    bgtrace.uninstrument()
    task = Uncopied(apps.write_log, "x")  # built before bgtrace is on: queued as it starts
    func = task.func
    otel_instrumentor.instrument_app(app)  # type: ignore[attr-defined]
    if not hasattr(background.BackgroundTask, "_otel_original_call"):
        pytest.skip("releases before 0.63b0 patch no BackgroundTask.__call__")
    bgtrace.instrument()
    client = TestClient(app)
    for _ in range(2):
        client.get("/")
    assert task.func is func
    assert samples.total("bgtask_completed_total", task="tests.apps.write_log") == 2


@pytest.mark.parametrize("bgtraces_provider", [True, False])
def test_a_shared_task_object_gets_one_span_per_run_beside_the_instrumentor_installed_first(
    bgtraces_provider: bool,
    otel_instrumentor: type,
    registry: CollectorRegistry,
    tracer_provider: TracerProvider,
    exporter: InMemorySpanExporter,
) -> None:
    """Regression (review): whether bgtrace's span replaces theirs was read from the object's
    first record, already run, while the later runs are queued as they start where bgtrace
    traces: their span and bgtrace's, two per run. Without a provider of bgtrace's, a later
    run (queued as it starts, once the request span ended) takes their span over too."""
    from starlette.responses import PlainTextResponse, Response

    app = FastAPI()
    app.add_middleware(
        BackgroundTaskMiddleware,
        registry=registry,
        tracer_provider=tracer_provider if bgtraces_provider else None,
    )

    @app.get("/")
    async def endpoint() -> Response:
        return PlainTextResponse("ok", background=flush)

    bgtrace.uninstrument()
    otel_instrumentor.instrument_app(app, tracer_provider=tracer_provider)  # type: ignore[attr-defined]
    if not hasattr(background.BackgroundTask, "_otel_original_call"):
        pytest.skip("releases before 0.63b0 open no span per task")
    bgtrace.instrument()
    # Built outside any request, after the skip: queued in the default registry until it runs.
    flush = background.BackgroundTask(apps.async_log, "flush")
    client = TestClient(app)
    for _ in range(3):
        exporter.clear()
        client.get("/")
        assert [s.name for s in _task_spans(exporter)] == ["bgtask async_log"]


@pytest.fixture
def otel_instrumentor() -> Iterator[type]:
    from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor

    yield FastAPIInstrumentor
    if hasattr(background.BackgroundTask, "_otel_original_call"):
        background.BackgroundTask.__call__ = background.BackgroundTask._otel_original_call  # type: ignore[attr-defined,method-assign]
        del background.BackgroundTask._otel_original_call  # type: ignore[attr-defined]


@pytest.mark.parametrize("order", ["bgtrace_first", "otel_first"])
def test_opentelemetry_fastapi_instrumentor_one_span_per_task(
    order: str,
    otel_instrumentor: type,
    registry: CollectorRegistry,
    tracer_provider: TracerProvider,
    exporter: InMemorySpanExporter,
    samples: Samples,
) -> None:
    app = _app(registry, tracer_provider)
    client = TestClient(app, raise_server_exceptions=False)
    if order == "bgtrace_first":
        bgtrace.instrument()  # already on (autouse fixture): theirs goes on top
        otel_instrumentor.instrument_app(app, tracer_provider=tracer_provider)  # type: ignore[attr-defined]
    else:
        bgtrace.uninstrument()
        otel_instrumentor.instrument_app(app, tracer_provider=tracer_provider)  # type: ignore[attr-defined]
        bgtrace.instrument()
    exporter.clear()
    client.post("/notify/a@b.c")
    # Outside ours, their span is current when ours starts: bgtrace fills it in and names it.
    # Inside ours, bgtrace calls past it: its own span replaces theirs. (Releases before
    # 0.63b0 open no span per task.)
    names = {"bgtask write_notification", "bgtask fail"}
    _assert_one_span_per_task_in_request_trace(exporter, names)

    # And after OpenTelemetry's uninstrument_app, bgtrace still measures every task.
    otel_instrumentor.uninstrument_app(app)  # type: ignore[attr-defined]
    exporter.clear()
    client.post("/notify/a@b.c")
    assert len(_task_spans(exporter)) == 2
    assert samples.total("bgtask_completed_total", outcome="failure") == 2
    assert samples.total("bgtask_dropped_total") == 0


def _link_mode_app(registry: CollectorRegistry, tracer_provider: TracerProvider) -> FastAPI:
    app = FastAPI()
    app.add_middleware(
        BackgroundTaskMiddleware,
        registry=registry,
        tracer_provider=tracer_provider,
        trace_mode="link",
    )

    @app.post("/notify/{email}")
    async def notify(email: str, background_tasks: BackgroundTasks) -> None:
        background_tasks.add_task(apps.write_notification, email)
        background_tasks.add_task(apps.write_log, "x")

    return app


def _assert_link_mode_beside_their_task_spans(exporter: InMemorySpanExporter) -> None:
    """``trace_mode="link"`` beside an instrumentation that opens a span around each task:
    bgtrace's span starts a trace of its own, linked into the request's trace, and takes
    nothing over; theirs stays in the request's trace. Two spans per task, whatever the
    order the two were installed in."""
    server = _server_span(exporter)
    spans = _task_spans(exporter)
    ours = [s for s in spans if s.name.startswith("bgtask ")]
    theirs = [s for s in spans if not s.name.startswith("bgtask ")]
    assert sorted(s.name for s in ours) == ["bgtask write_log", "bgtask write_notification"]
    for span in ours:
        assert span.context.trace_id != server.context.trace_id
        assert [link.context.trace_id for link in span.links] == [server.context.trace_id]
        assert (span.attributes or {})["bgtask.origin"] == "handler"
    assert len(theirs) == 2
    for span in theirs:
        assert span.context.trace_id == server.context.trace_id
        assert not span.name.startswith("bgtask ")  # not renamed: not bgtrace's


@pytest.mark.parametrize("order", ["bgtrace_first", "otel_first"])
def test_link_mode_beside_the_instrumentor_keeps_their_task_span_in_either_order(
    order: str,
    otel_instrumentor: type,
    registry: CollectorRegistry,
    tracer_provider: TracerProvider,
    exporter: InMemorySpanExporter,
    samples: Samples,
) -> None:
    """Installed first, their wrapper sits inside bgtrace's: bgtrace used to call past it
    (its own span replacing theirs, as in child mode), so the request's trace lost the task
    in one order and kept it in the other."""
    app = _link_mode_app(registry, tracer_provider)
    client = TestClient(app)
    if order == "bgtrace_first":
        otel_instrumentor.instrument_app(app, tracer_provider=tracer_provider)  # type: ignore[attr-defined]
    else:
        bgtrace.uninstrument()
        otel_instrumentor.instrument_app(app, tracer_provider=tracer_provider)  # type: ignore[attr-defined]
        bgtrace.instrument()
    if not hasattr(background.BackgroundTask, "_otel_original_call"):
        pytest.skip("releases before 0.63b0 open no span per task")
    exporter.clear()
    client.post("/notify/a@b.c")
    _assert_link_mode_beside_their_task_spans(exporter)
    assert samples.total("bgtask_completed_total", outcome="success") == 2
    # Both def tasks started in their worker thread, through their wrapper or not.
    assert samples.total("bgtask_thread_wait_seconds_count") == 2


@pytest.mark.parametrize("order", ["bgtrace_first", "otel_first"])
def test_link_mode_with_nothing_to_link_to_gives_one_span_per_task_beside_the_instrumentor(
    order: str,
    otel_instrumentor: type,
    registry: CollectorRegistry,
    tracer_provider: TracerProvider,
    exporter: InMemorySpanExporter,
) -> None:
    """A URL the instrumentor excludes has no request span: a task queued there has nothing
    to link to, and bgtrace's span is a root as theirs would be. One span per task, as in
    child mode (review: two unrelated roots per task, in one order)."""
    app = _link_mode_app(registry, tracer_provider)
    if order == "otel_first":
        bgtrace.uninstrument()
    otel_instrumentor.instrument_app(app, tracer_provider=tracer_provider, excluded_urls="notify")  # type: ignore[attr-defined]
    bgtrace.instrument()
    if not hasattr(background.BackgroundTask, "_otel_original_call"):
        pytest.skip("releases before 0.63b0 open no span per task")
    exporter.clear()
    TestClient(app).post("/notify/a@b.c")
    spans = exporter.get_finished_spans()
    assert sorted(s.name for s in spans) == ["bgtask write_log", "bgtask write_notification"]
    for span in spans:
        assert span.parent is None and not span.links
        assert (span.attributes or {})["bgtask.origin"] == "handler"
    assert len({s.context.trace_id for s in spans}) == 2


@pytest.mark.parametrize("order", ["bgtrace_first", "otel_first"])
def test_link_mode_for_a_task_queued_as_it_starts_beside_the_instrumentor(
    order: str,
    otel_instrumentor: type,
    registry: CollectorRegistry,
    tracer_provider: TracerProvider,
    exporter: InMemorySpanExporter,
) -> None:
    """A ``BackgroundTask`` built while bgtrace was off is queued as it starts, inside their
    span where their wrapper is outside bgtrace's: its link goes to what their span has as
    parent (the request's span), and where theirs is a root (an excluded URL) bgtrace's is
    theirs, as in the other order (review: linked to their task span, or two roots)."""
    from fastapi.responses import PlainTextResponse

    bgtrace.uninstrument()
    shared = background.BackgroundTask(apps.write_log, "shared")
    bgtrace.instrument()
    app = _link_mode_app(registry, tracer_provider)

    @app.post("/traced")
    async def traced() -> PlainTextResponse:
        return PlainTextResponse("", background=shared)

    @app.post("/excluded")
    async def excluded() -> PlainTextResponse:
        return PlainTextResponse("", background=shared)

    if order == "otel_first":
        bgtrace.uninstrument()
    otel_instrumentor.instrument_app(app, tracer_provider=tracer_provider, excluded_urls="excluded")  # type: ignore[attr-defined]
    bgtrace.instrument()
    if not hasattr(background.BackgroundTask, "_otel_original_call"):
        pytest.skip("releases before 0.63b0 open no span per task")
    client = TestClient(app)
    for _ in range(2):  # its first run, and a later one
        exporter.clear()
        client.post("/traced")
        _, ours = _split_task_spans(exporter, "bgtask write_log")
        assert [link.context.span_id for link in ours.links] == [
            _server_span(exporter).context.span_id
        ]
        exporter.clear()
        client.post("/excluded")
        (only,) = _task_spans(exporter)
        assert only.name == "bgtask write_log" and only.parent is None and not only.links


def _split_task_spans(
    exporter: InMemorySpanExporter, name: str
) -> tuple[ReadableSpan, ReadableSpan]:
    """(theirs, bgtrace's) for a task with two spans: theirs in the request's trace."""
    spans = _task_spans(exporter)
    (ours,) = [s for s in spans if s.name == name]
    (theirs,) = [s for s in spans if s is not ours]
    assert theirs.context.trace_id == _server_span(exporter).context.trace_id
    assert ours.context.trace_id != theirs.context.trace_id
    return theirs, ours


@pytest.mark.skipif(not HAS_FASTAPI_TELEMETRY, reason="this FastAPI has no built-in telemetry")
def test_link_mode_beside_fastapi_telemetry_keeps_their_task_span(
    registry: CollectorRegistry,
    tracer_provider: TracerProvider,
    exporter: InMemorySpanExporter,
    global_tracer_provider: TracerProvider,
    samples: Samples,
) -> None:
    app = _link_mode_app(registry, tracer_provider)
    TestClient(app).post("/notify/a@b.c")
    _assert_link_mode_beside_their_task_spans(exporter)
    assert samples.total("bgtask_thread_wait_seconds_count") == 2


def test_opentelemetry_fastapi_instrumentor_instrumenting_again_after_dropping_bgtraces_wrapper(
    otel_instrumentor: type,
    registry: CollectorRegistry,
    tracer_provider: TracerProvider,
    exporter: InMemorySpanExporter,
    samples: Samples,
) -> None:
    """A test suite that instruments and uninstruments an app per test: the instrumentor's
    ``uninstrument_app`` puts back Starlette's method it found, dropping bgtrace's wrapper
    installed on top of its own; its next ``instrument_app`` wraps Starlette's method alone.
    bgtrace must notice that its wrapper left the chain (not count the tasks it no longer sees
    start as dropped)."""
    app = _app(registry, tracer_provider)
    client = TestClient(app, raise_server_exceptions=False)
    bgtrace.uninstrument()
    otel_instrumentor.instrument_app(app, tracer_provider=tracer_provider)  # type: ignore[attr-defined]
    if not hasattr(background.BackgroundTask, "_otel_original_call"):
        pytest.skip("releases before 0.63b0 patch no BackgroundTask.__call__")
    bgtrace.instrument()  # ours on top of theirs
    otel_instrumentor.uninstrument_app(app)  # type: ignore[attr-defined]
    otel_instrumentor.instrument_app(app, tracer_provider=tracer_provider)  # type: ignore[attr-defined]
    app.middleware_stack = None  # uninstrument_app built one without theirs
    bgtrace.instrument()  # as each new middleware does: must not take the lost wrapper as there
    exporter.clear()
    client.post("/notify/a@b.c")
    _assert_one_span_per_task_in_request_trace(
        exporter, {"bgtask write_notification", "bgtask fail"}
    )
    assert samples.total("bgtask_completed_total", outcome="failure") == 1
    assert samples.total("bgtask_completed_total", outcome="success") == 1
    assert samples.total("bgtask_dropped_total") == 0

    # Without instrument() again (a middleware built once): each request notices it too.
    otel_instrumentor.uninstrument_app(app)  # type: ignore[attr-defined]
    bgtrace.uninstrument()
    otel_instrumentor.instrument_app(app, tracer_provider=tracer_provider)  # type: ignore[attr-defined]
    bgtrace.instrument()  # ours on top of theirs again
    otel_instrumentor.uninstrument_app(app)  # type: ignore[attr-defined]
    otel_instrumentor.instrument_app(app, tracer_provider=tracer_provider)  # type: ignore[attr-defined]
    app.middleware_stack = None  # uninstrument_app built one without theirs
    exporter.clear()
    client.post("/notify/a@b.c")
    _assert_one_span_per_task_in_request_trace(
        exporter, {"bgtask write_notification", "bgtask fail"}
    )
    assert samples.total("bgtask_completed_total", outcome="failure") == 2
    assert samples.total("bgtask_dropped_total") == 0


def test_other_prometheus_middlewares_share_the_default_registry() -> None:
    """prometheus-fastapi-instrumentator and starlette-exporter beside bgtrace, default registry.

    bgtrace's middleware answers /metrics first (theirs never see it), serving the whole
    default registry, so every tool's metrics are in the one response.
    """
    from prometheus_fastapi_instrumentator import Instrumentator
    from starlette_exporter import PrometheusMiddleware, handle_metrics

    app = apps.tutorial_app()
    app.add_middleware(PrometheusMiddleware)
    app.add_route("/metrics", handle_metrics)
    Instrumentator().instrument(app).expose(app, endpoint="/metrics")
    client = TestClient(app)
    client.post("/send-notification/x")
    response = client.get("/metrics")
    assert response.status_code == 200
    body = response.text
    assert "bgtask_completed_total{" in body
    assert "starlette_requests_total{" in body  # starlette-exporter
    assert "http_request_duration_highr_seconds" in body  # the instrumentator
    assert body.count("# TYPE bgtask_enqueued_total counter") == 1


STARLETTE_ONLY = r"""
import sys
sys.modules["fastapi"] = None  # as if FastAPI were not installed
import asyncio
from prometheus_client import CollectorRegistry
from starlette.applications import Starlette
from starlette.background import BackgroundTask, BackgroundTasks
from starlette.responses import PlainTextResponse
from starlette.routing import Mount, Route
from starlette.testclient import TestClient
import bgtrace

async def ping(): pass

async def single(request):
    return PlainTextResponse("ok", background=BackgroundTask(ping))

async def several(request):
    tasks = BackgroundTasks()
    tasks.add_task(ping)
    return PlainTextResponse("ok", background=tasks)

async def own(request):
    tasks = bgtrace.BackgroundTasks()
    tasks.add_task(ping)
    return PlainTextResponse("ok", background=tasks)

sub = Starlette(routes=[Route("/own/{n:int}", own)])
app = Starlette(routes=[Route("/single", single), Mount("/v1", routes=[Route("/several", several)]),
                        Mount("/sub", app=sub)])
registry = CollectorRegistry()
app.add_middleware(bgtrace.BackgroundTaskMiddleware, registry=registry)
client = TestClient(app)
for path in ("/single", "/v1/several", "/sub/own/3"):
    assert client.get(path).status_code == 200
for route in ("/single", "/v1/several", "/sub/own/{n:int}"):
    labels = {"task": "__main__.ping", "origin": "other", "route": route, "outcome": "success"}
    assert registry.get_sample_value("bgtask_completed_total", labels) == 1, route
print("ok")
"""


def test_plain_starlette_without_fastapi_installed() -> None:
    import subprocess
    import sys

    from tests.servers import ROOT

    result = subprocess.run(
        [sys.executable, "-c", STARLETTE_ONLY], cwd=ROOT, capture_output=True, text=True,
        timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


@pytest.mark.parametrize("where", ["inside", "outside"])
def test_base_http_middleware_in_the_stack(
    where: str, registry: CollectorRegistry, samples: Samples
) -> None:
    """@app.middleware("http") runs the app in a task of its own (Starlette #919, #1438)."""
    from collections.abc import Awaitable, Callable

    from starlette.requests import Request
    from starlette.responses import Response

    app = FastAPI()

    async def passthrough(
        request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        return await call_next(request)

    if where == "inside":  # added first: innermost
        app.middleware("http")(passthrough)
    app.add_middleware(BackgroundTaskMiddleware, registry=registry)
    if where == "outside":
        app.middleware("http")(passthrough)

    @app.post("/send-notification/{email}")
    async def send(
        email: str, background_tasks: BackgroundTasks, q: str | None = Depends(apps.get_query)
    ) -> None:
        background_tasks.add_task(apps.write_notification, email)

    client = TestClient(app)
    for _ in range(3):
        assert client.post("/send-notification/x?q=1").status_code == 200
    route = "/send-notification/{email}"
    assert samples("bgtask_completed_total", task="tests.apps.write_notification",
                   origin="handler", route=route, outcome="success") == 3  # fmt: skip
    assert samples("bgtask_completed_total", task="tests.apps.write_log",
                   origin="dependency", route=route, outcome="success") == 3  # fmt: skip
    assert samples.total("bgtask_dropped_total") == 0
    assert samples("bgtask_post_response_seconds_count", route=route) == 3


def test_task_queued_after_yield_is_accounted_truthfully(
    registry: CollectorRegistry, samples: Samples, bgtasks: BackgroundTaskRecorder
) -> None:
    """FastAPI changed when a yield dependency's exit code runs (0.106, 0.118: #14137).

    Whether the framework still runs a task queued there depends on the version; bgtrace's
    numbers must say what happened either way.
    """

    def session(background_tasks: BackgroundTasks) -> Iterator[None]:
        yield
        background_tasks.add_task(apps.write_log, "queued after yield")

    app = FastAPI()
    app.add_middleware(BackgroundTaskMiddleware, registry=registry)

    @app.post("/after-yield")
    async def endpoint(_: None = Depends(session)) -> None:
        pass

    TestClient(app).post("/after-yield")
    task = bgtasks.assert_queued(apps.write_log, "queued after yield")
    labels = {"task": "tests.apps.write_log", "origin": "dependency", "route": "/after-yield"}
    assert (task.origin, task.route) == (labels["origin"], labels["route"])
    assert samples("bgtask_enqueued_total", **labels) == 1
    if task.state == "completed":  # FastAPI before 0.118 still ran it
        assert apps.done == ["queued after yield"]
        assert samples("bgtask_completed_total", outcome="success", **labels) == 1
    else:
        assert (task.state, task.reason, apps.done) == ("dropped", "not_attached", [])
        assert samples("bgtask_dropped_total", reason="not_attached", **labels) == 1
    assert samples.total("bgtask_queue_length") == 0
