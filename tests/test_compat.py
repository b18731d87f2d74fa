"""bgtrace beside the instrumentation users already run: one clean picture each time."""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator

import pytest
from fastapi import BackgroundTasks, FastAPI
from fastapi.testclient import TestClient
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client import CollectorRegistry
from starlette import background

import bgtrace
from bgtrace import BackgroundTaskMiddleware
from tests import apps
from tests.conftest import Samples

HAS_FASTAPI_TELEMETRY = importlib.util.find_spec("fastapi.telemetry") is not None


def _app(registry: CollectorRegistry, tracer_provider: TracerProvider, **kwargs: object) -> FastAPI:
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


@pytest.mark.skipif(not HAS_FASTAPI_TELEMETRY, reason="this FastAPI has no built-in telemetry")
def test_fastapi_builtin_telemetry_one_span_per_task(
    registry: CollectorRegistry,
    tracer_provider: TracerProvider,
    exporter: InMemorySpanExporter,
    samples: Samples,
) -> None:
    app = _app(registry, tracer_provider, telemetry={"tracer_provider": tracer_provider})
    TestClient(app, raise_server_exceptions=False).post("/notify/a@b.c")
    _assert_one_span_per_task_in_request_trace(exporter, {"fastapi.background_task"})
    # FastAPI opened the server span: bgtrace opened none of its own.
    assert _server_span(exporter).attributes.get("url.path") == "/notify/a@b.c"  # type: ignore[union-attr]
    assert samples.total("bgtask_completed_total") == 2


@pytest.fixture
def otel_instrumentor() -> Iterator[type]:
    instrumentation = pytest.importorskip("opentelemetry.instrumentation.fastapi")
    yield instrumentation.FastAPIInstrumentor
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
        client.post("/warm-up")  # builds the stack: bgtrace instruments
        otel_instrumentor.instrument_app(app, tracer_provider=tracer_provider)  # type: ignore[attr-defined]
    else:
        bgtrace.uninstrument()
        otel_instrumentor.instrument_app(app, tracer_provider=tracer_provider)  # type: ignore[attr-defined]
        bgtrace.instrument()
    exporter.clear()
    client.post("/notify/a@b.c")
    # Outside ours, their span is current when ours starts: bgtrace fills it in. Inside ours,
    # bgtrace calls past it: its own span replaces theirs.
    prefix = "BackgroundTask " if order == "bgtrace_first" else "bgtask "
    names = {prefix + "write_notification", prefix + "fail"}
    _assert_one_span_per_task_in_request_trace(exporter, names)

    # And after OpenTelemetry's uninstrument_app, bgtrace still measures every task.
    otel_instrumentor.uninstrument_app(app)  # type: ignore[attr-defined]
    exporter.clear()
    client.post("/notify/a@b.c")
    assert len(_task_spans(exporter)) == 2
    assert samples.total("bgtask_completed_total", outcome="failure") == 2
    assert samples.total("bgtask_dropped_total") == 0
