"""The request's SERVER span: bgtrace's own on top of the current context, or nobody's but the
HTTP instrumentation's when one is in the app, in either order."""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi import BackgroundTasks, FastAPI
from fastapi.testclient import TestClient
from opentelemetry import baggage, trace
from opentelemetry import context as otel_context
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client import CollectorRegistry
from starlette.types import ASGIApp, Receive, Scope, Send

import bgtrace.instrumentation
from bgtrace import BackgroundTaskMiddleware
from tests import apps
from tests.conftest import Samples

HAS_FASTAPI_TELEMETRY = importlib.util.find_spec("fastapi.telemetry") is not None
HAS_STARLETTE_OTEL = importlib.util.find_spec("starlette.middleware.opentelemetry") is not None


def _routes(app: FastAPI) -> FastAPI:
    @app.post("/notify/{email}")
    async def notify(email: str, background_tasks: BackgroundTasks) -> None:
        background_tasks.add_task(apps.write_notification, email)

    @app.get("/health")
    async def health(background_tasks: BackgroundTasks) -> None:
        background_tasks.add_task(apps.write_log, "healthy")

    @app.get("/tenant")
    async def tenant() -> dict[str, Any]:
        return {"tenant": baggage.get_baggage("tenant")}

    @app.post("/items")
    async def items(count: int) -> None:
        pass

    return app


def _server_spans(exporter: InMemorySpanExporter) -> list[ReadableSpan]:
    return [s for s in exporter.get_finished_spans() if s.kind is trace.SpanKind.SERVER]


def _task_span(exporter: InMemorySpanExporter) -> ReadableSpan:
    (span,) = [s for s in exporter.get_finished_spans() if s.name.startswith("bgtask ")]
    return span


def _with_baggage(app: ASGIApp) -> ASGIApp:
    """An outer middleware that puts a value in the OpenTelemetry context for the app."""

    async def wrapped(scope: Scope, receive: Receive, send: Send) -> None:
        token = otel_context.attach(baggage.set_baggage("tenant", "acme"))
        try:
            await app(scope, receive, send)
        finally:
            otel_context.detach(token)

    return wrapped


@pytest.mark.parametrize("request_spans", ["auto", "never"])
def test_request_span_keeps_baggage_an_outer_middleware_set(
    request_spans: str,
    registry: CollectorRegistry,
    tracer_provider: TracerProvider,
    exporter: InMemorySpanExporter,
) -> None:
    app = _routes(FastAPI())
    app.add_middleware(
        BackgroundTaskMiddleware,
        registry=registry,
        tracer_provider=tracer_provider,
        request_spans=request_spans,
    )
    response = TestClient(_with_baggage(app)).get("/tenant")
    assert response.json() == {"tenant": "acme"}
    if request_spans == "auto":
        assert [s.name for s in _server_spans(exporter)] == ["GET /tenant"]


def test_request_span_keeps_baggage_with_an_incoming_traceparent(
    registry: CollectorRegistry, tracer_provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    app = _routes(FastAPI())
    app.add_middleware(BackgroundTaskMiddleware, registry=registry, tracer_provider=tracer_provider)
    response = TestClient(_with_baggage(app)).get(
        "/tenant", headers={"traceparent": f"00-{trace_id}-00f067aa0ba902b7-01"}
    )
    assert response.json() == {"tenant": "acme"}
    (server,) = _server_spans(exporter)
    assert format(server.context.trace_id, "032x") == trace_id
    assert server.parent is not None and server.parent.is_remote


@pytest.mark.skipif(not HAS_FASTAPI_TELEMETRY, reason="this FastAPI has no built-in telemetry")
def test_fastapi_telemetry_logs_validation_failures_beside_bgtrace_request_span(
    registry: CollectorRegistry, tracer_provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    from opentelemetry.sdk._logs import LoggerProvider
    from opentelemetry.sdk._logs.export import InMemoryLogRecordExporter, SimpleLogRecordProcessor

    logs = InMemoryLogRecordExporter()
    logger_provider = LoggerProvider()
    logger_provider.add_log_record_processor(SimpleLogRecordProcessor(logs))
    app = _routes(
        FastAPI(
            telemetry={
                "tracing": False,
                "metrics": False,
                "logs": True,
                "logger_provider": logger_provider,
            }
        )
    )
    app.add_middleware(BackgroundTaskMiddleware, registry=registry, tracer_provider=tracer_provider)
    assert TestClient(app).post("/items?count=many").status_code == 422
    names = [record.log_record.event_name for record in logs.get_finished_logs()]
    assert names == ["fastapi.validation.failed"]
    # bgtrace opened the request span (FastAPI's tracing is off), under FastAPI's context.
    assert [s.name for s in _server_spans(exporter)] == ["POST /items"]


# Either HTTP instrumentation middleware, built the way each is added to an app.
def _starlette_otel(tracer_provider: TracerProvider, excluded: str) -> tuple[type, dict[str, Any]]:
    from starlette.middleware.opentelemetry import OpenTelemetryMiddleware

    return OpenTelemetryMiddleware, {"tracer_provider": tracer_provider, "excluded_urls": excluded}


def _asgi_otel(tracer_provider: TracerProvider, excluded: str) -> tuple[type, dict[str, Any]]:
    from opentelemetry.instrumentation.asgi import OpenTelemetryMiddleware
    from opentelemetry.util.http import parse_excluded_urls

    # Older releases take only the parsed list.
    options = {"tracer_provider": tracer_provider, "excluded_urls": parse_excluded_urls(excluded)}
    return OpenTelemetryMiddleware, options


INSTRUMENTATIONS = [
    pytest.param(
        _starlette_otel,
        id="starlette",
        marks=pytest.mark.skipif(not HAS_STARLETTE_OTEL, reason="Starlette has no OTel middleware"),
    ),
    pytest.param(_asgi_otel, id="opentelemetry-asgi"),
]
# added_first: innermost. "by_hand": bgtrace wrapped around the whole app by hand.
ORDERS = ["bgtrace_outside", "bgtrace_inside", "bgtrace_by_hand"]


def _instrumented_app(
    make: Any, order: str, registry: CollectorRegistry, tracer_provider: TracerProvider
) -> ASGIApp:
    cls, options = make(tracer_provider, "/health")
    app = _routes(FastAPI(telemetry={"tracing": False}) if HAS_FASTAPI_TELEMETRY else FastAPI())
    ours = {"registry": registry, "tracer_provider": tracer_provider}
    if order == "bgtrace_inside":
        app.add_middleware(BackgroundTaskMiddleware, **ours)
    app.add_middleware(cls, **options)
    if order == "bgtrace_outside":  # the quickstart's add_middleware, after theirs
        app.add_middleware(BackgroundTaskMiddleware, **ours)
    if order == "bgtrace_by_hand":
        return BackgroundTaskMiddleware(app, **ours)  # type: ignore[arg-type]
    return app


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("make", INSTRUMENTATIONS)
def test_http_instrumentation_opens_the_only_server_span(
    make: Any,
    order: str,
    registry: CollectorRegistry,
    tracer_provider: TracerProvider,
    exporter: InMemorySpanExporter,
    samples: Samples,
) -> None:
    client = TestClient(_instrumented_app(make, order, registry, tracer_provider))
    for _ in range(2):  # the first request builds the stack; the second uses what was found
        exporter.clear()
        assert client.post("/notify/x").status_code == 200
        (server,) = _server_spans(exporter)
        assert server.instrumentation_scope is not None
        assert server.instrumentation_scope.name != "bgtrace"
        assert len({s.context.trace_id for s in exporter.get_finished_spans()}) == 1
        task = _task_span(exporter)
        assert task.parent is not None and task.parent.span_id == server.context.span_id
    assert samples.total("bgtask_completed_total", outcome="success") == 2


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("make", INSTRUMENTATIONS)
def test_url_an_http_instrumentation_excludes_gets_no_server_span(
    make: Any,
    order: str,
    registry: CollectorRegistry,
    tracer_provider: TracerProvider,
    exporter: InMemorySpanExporter,
    samples: Samples,
) -> None:
    client = TestClient(_instrumented_app(make, order, registry, tracer_provider))
    for _ in range(2):
        exporter.clear()
        assert client.get("/health").status_code == 200
        assert _server_spans(exporter) == []
        assert _task_span(exporter).parent is None  # still traced, in a trace of its own
    assert samples.total("bgtask_completed_total", outcome="success") == 2


def test_excluded_url_of_starlette_otel_wrapped_around_bgtrace_by_hand(
    registry: CollectorRegistry, tracer_provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    """Their middleware is out of bgtrace's sight then; the scope key it sets tells."""
    if not HAS_STARLETTE_OTEL:
        pytest.skip("Starlette has no OpenTelemetry middleware")
    cls, options = _starlette_otel(tracer_provider, "/health")
    inner = BackgroundTaskMiddleware(
        _routes(FastAPI()), registry=registry, tracer_provider=tracer_provider
    )
    client = TestClient(cls(inner, **options))
    assert client.get("/health").status_code == 200
    assert _server_spans(exporter) == []
    assert client.post("/notify/x").status_code == 200
    assert [s.instrumentation_scope.name for s in _server_spans(exporter)] == ["starlette"]  # type: ignore[union-attr]


@pytest.fixture
def otel_fastapi() -> Iterator[type]:
    from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor
    from starlette import background

    yield FastAPIInstrumentor
    if hasattr(background.BackgroundTask, "_otel_original_call"):
        background.BackgroundTask.__call__ = background.BackgroundTask._otel_original_call  # type: ignore[attr-defined,method-assign]
        del background.BackgroundTask._otel_original_call  # type: ignore[attr-defined]
    # Starlette's own method is back where bgtrace's wrapper was: put bgtrace's back.
    bgtrace.instrumentation.ensure_instrumented()


def test_url_fastapi_instrumentor_excludes_gets_no_server_span(
    otel_fastapi: Any,
    registry: CollectorRegistry,
    tracer_provider: TracerProvider,
    exporter: InMemorySpanExporter,
) -> None:
    app = _routes(FastAPI())
    app.add_middleware(BackgroundTaskMiddleware, registry=registry, tracer_provider=tracer_provider)
    otel_fastapi.instrument_app(app, tracer_provider=tracer_provider, excluded_urls="/health")
    client = TestClient(app)
    assert client.get("/health").status_code == 200
    assert _server_spans(exporter) == []
    otel_fastapi.uninstrument_app(app)
    # Once uninstrumented (the stack is rebuilt), bgtrace opens the request span again.
    exporter.clear()
    assert client.get("/health").status_code == 200
    assert [s.instrumentation_scope.name for s in _server_spans(exporter)] == ["bgtrace"]  # type: ignore[union-attr]


@pytest.mark.skipif(not HAS_FASTAPI_TELEMETRY, reason="this FastAPI has no built-in telemetry")
def test_url_fastapi_telemetry_excludes_gets_no_server_span(
    registry: CollectorRegistry, tracer_provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    app = _routes(
        FastAPI(
            telemetry={
                "tracer_provider": tracer_provider,
                "exclude": lambda scope: scope["path"] == "/health",
            }
        )
    )
    app.add_middleware(BackgroundTaskMiddleware, registry=registry, tracer_provider=tracer_provider)
    client = TestClient(app)
    assert client.get("/health").status_code == 200
    assert _server_spans(exporter) == []
    assert client.post("/notify/x").status_code == 200
    assert [s.instrumentation_scope.name for s in _server_spans(exporter)] == ["fastapi"]  # type: ignore[union-attr]


def test_instrumentation_lookup_error_leaves_bgtrace_request_span(
    registry: CollectorRegistry,
    tracer_provider: TracerProvider,
    exporter: InMemorySpanExporter,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    import bgtrace.request_spans

    def broken(app: object) -> bool:
        raise RuntimeError("lookup broke")

    monkeypatch.setattr(bgtrace.request_spans, "find_http_instrumentation", broken)
    app = _routes(FastAPI())
    app.add_middleware(BackgroundTaskMiddleware, registry=registry, tracer_provider=tracer_provider)
    with caplog.at_level(logging.ERROR, logger="bgtrace"):
        assert TestClient(app).post("/notify/x").status_code == 200
    assert [s.name for s in _server_spans(exporter)] == ["POST /notify/{email}"]
    assert any("http instrumentation lookup" in r.getMessage() for r in caplog.records)


# A tracer provider that fails, at each step bgtrace asks something of it.


class _FailingProvider(TracerProvider):
    def __init__(self, step: str, exporter: InMemorySpanExporter) -> None:
        super().__init__()
        self.add_span_processor(SimpleSpanProcessor(exporter))
        self.step = step

    def get_tracer(self, *args: Any, **kwargs: Any) -> trace.Tracer:
        if self.step == "get_tracer":
            raise RuntimeError("no tracer for you")
        tracer = super().get_tracer(*args, **kwargs)
        if self.step == "start":
            tracer.start_span = _raise  # type: ignore[method-assign]
        return tracer


def _raise(*args: Any, **kwargs: Any) -> Any:
    raise RuntimeError("provider broke")


@pytest.mark.parametrize("step", ["get_tracer", "start", "end", "load"])
def test_failing_tracer_provider_leaves_app_and_counts_unharmed(
    step: str,
    registry: CollectorRegistry,
    exporter: InMemorySpanExporter,
    samples: Samples,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    import bgtrace.config
    import bgtrace.logs

    monkeypatch.setattr(bgtrace.logs, "_reported", set())
    provider: TracerProvider | None = _FailingProvider(step, exporter)
    if step == "end":
        from opentelemetry.sdk.trace import Span

        monkeypatch.setattr(Span, "end", _raise)
    if step == "load":
        # A global provider named by OTEL_PYTHON_TRACER_PROVIDER that cannot be built.
        monkeypatch.setattr(trace, "_TRACER_PROVIDER", None)
        monkeypatch.setattr(bgtrace.config, "_provider_from_environment", True)
        monkeypatch.setattr(bgtrace.config.trace, "get_tracer_provider", _raise)
        provider = None
    with caplog.at_level(logging.ERROR, logger="bgtrace"):
        # FastAPI's own tracing would ask the broken global provider too: not bgtrace's doing.
        app = _routes(FastAPI(telemetry={"tracing": False}) if HAS_FASTAPI_TELEMETRY else FastAPI())
        app.add_middleware(BackgroundTaskMiddleware, registry=registry, tracer_provider=provider)
        client = TestClient(app)
        for _ in range(3):
            assert client.post("/notify/x").status_code == 200
    assert samples.total("bgtask_completed_total", outcome="success") == 3
    assert samples.total("bgtask_queue_length") == 0
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors, "the failure is logged"
    assert len(errors) == len(set(errors)), "once per place"


def _task_spans(exporter: InMemorySpanExporter) -> list[ReadableSpan]:
    """Every span opened around a task's call, by bgtrace or by another instrumentation."""
    return [
        s
        for s in exporter.get_finished_spans()
        if s.name.startswith(("bgtask ", "BackgroundTask ", "fastapi.background_task"))
    ]


@pytest.mark.parametrize("own_provider", [True, False], ids=["bgtrace-traces", "metrics-only"])
def test_one_span_per_task_on_a_url_the_fastapi_instrumentor_excludes(
    otel_fastapi: Any,
    registry: CollectorRegistry,
    tracer_provider: TracerProvider,
    exporter: InMemorySpanExporter,
    own_provider: bool,
) -> None:
    """The instrumentor's class patch opens a task span (a trace of its own) also where its
    middleware excludes the URL, so no request span is current when the task is queued.
    Regression: bgtrace skipped the adoption there (two spans per task with a provider of its
    own; the instrumentor's unnamed one without)."""
    app = _routes(FastAPI())
    options: dict[str, Any] = {"tracer_provider": tracer_provider} if own_provider else {}
    app.add_middleware(BackgroundTaskMiddleware, registry=registry, **options)
    otel_fastapi.instrument_app(app, tracer_provider=tracer_provider, excluded_urls="/health")
    from starlette import background

    # Releases before 0.63b0 do not patch BackgroundTask: nobody else traces the task.
    patched = "_otel_original_call" in background.BackgroundTask.__dict__
    assert TestClient(app).get("/health").status_code == 200
    if not (patched or own_provider):
        assert _task_spans(exporter) == []
        return
    (task,) = _task_spans(exporter)
    assert task.name == "bgtask write_log"
    assert task.attributes is not None and task.attributes["bgtask.origin"] == "handler"
    otel_fastapi.uninstrument_app(app)


@pytest.mark.parametrize("patched", ["before the request", "after the task was queued"])
def test_one_span_per_task_under_bgtraces_request_span_while_the_instrumentor_patches_another_app(
    otel_fastapi: Any,
    registry: CollectorRegistry,
    tracer_provider: TracerProvider,
    exporter: InMemorySpanExporter,
    patched: str,
) -> None:
    """The instrumentor's class patch is process-wide: once it instruments any app, its
    wrapper opens a span around every task (0.63b0+), also a task of an app it does not
    instrument, whose request span bgtrace opened itself. One span per task, bgtrace's name
    and attributes on it; also when the patch arrives after the task was queued (bgtrace looks
    for it as the task starts)."""
    other = FastAPI()
    if patched == "before the request":
        otel_fastapi.instrument_app(other, tracer_provider=tracer_provider)
    app = FastAPI()

    @app.post("/notify")
    async def notify(background_tasks: BackgroundTasks) -> None:
        background_tasks.add_task(apps.write_notification, "x")
        if patched == "after the task was queued":
            otel_fastapi.instrument_app(other, tracer_provider=tracer_provider)

    app.add_middleware(BackgroundTaskMiddleware, registry=registry, tracer_provider=tracer_provider)
    assert TestClient(app).post("/notify").status_code == 200
    assert [s.name for s in _server_spans(exporter)] == ["POST /notify"]  # bgtrace's own
    (task,) = _task_spans(exporter)
    assert task.name == "bgtask write_notification"
    assert task.attributes is not None and task.attributes["bgtask.origin"] == "handler"
    otel_fastapi.uninstrument_app(other)


@pytest.mark.skipif(not HAS_FASTAPI_TELEMETRY, reason="this FastAPI has no built-in telemetry")
def test_one_span_per_task_with_fastapi_telemetry_inside_a_hand_wrapped_middleware(
    registry: CollectorRegistry, tracer_provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    """bgtrace wrapped around the app by hand runs before FastAPI's telemetry, so it opens the
    request span itself; FastAPI's telemetry still opens a span around each task. Regression:
    bgtrace took its own request span to mean nobody else traces, and opened a second span
    per task."""
    app = _routes(FastAPI(telemetry={"tracer_provider": tracer_provider}))
    wrapped = BackgroundTaskMiddleware(app, registry=registry, tracer_provider=tracer_provider)
    assert TestClient(wrapped).post("/notify/x").status_code == 200
    (task,) = _task_spans(exporter)
    assert task.name == "bgtask write_notification"


def test_request_span_of_a_failing_starlette_route_names_its_route(
    registry: CollectorRegistry, tracer_provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    """The request span ends after the app raised, when the request's state has already
    counted the request's end. Regression: the state let its scope go first, and the span of
    a plain Starlette route (which older Starlette does not put in the scope) lost its
    route."""
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.routing import Route

    async def broken(request: Request) -> None:
        raise RuntimeError("boom")

    app = Starlette(routes=[Route("/items/{item_id}", broken)])
    app.add_middleware(BackgroundTaskMiddleware, registry=registry, tracer_provider=tracer_provider)
    client = TestClient(app, raise_server_exceptions=False)
    assert client.get("/items/7").status_code == 500
    (server,) = _server_spans(exporter)
    assert server.attributes is not None
    assert server.attributes["http.route"] == "/items/{item_id}"
    assert server.name == "GET /items/{item_id}"


def test_request_state_lets_its_scope_go_only_after_the_request_span_ended(
    registry: CollectorRegistry,
    tracer_provider: TracerProvider,
    exporter: InMemorySpanExporter,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """On any Starlette: the span's end reads the route through the state, so the state keeps
    its scope until then (the app raised: the span ends after the request's bookkeeping)."""
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.routing import Route

    import bgtrace.middleware

    ended_before: list[bool] = []
    release = bgtrace.middleware.release

    def checked_release(state: Any) -> None:
        ended_before.append(bool(_server_spans(exporter)))
        release(state)

    monkeypatch.setattr(bgtrace.middleware, "release", checked_release)

    async def broken(request: Request) -> None:
        raise RuntimeError("boom")

    app = Starlette(routes=[Route("/items/{item_id}", broken)])
    app.add_middleware(BackgroundTaskMiddleware, registry=registry, tracer_provider=tracer_provider)
    assert TestClient(app, raise_server_exceptions=False).get("/items/7").status_code == 500
    assert ended_before == [True]
