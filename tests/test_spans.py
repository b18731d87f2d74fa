from __future__ import annotations

import pytest
from fastapi import BackgroundTasks
from fastapi.testclient import TestClient
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client import CollectorRegistry

from bgtrace import records
from tests import apps

ROUTE = "/send-notification/{email}"


def _by_name(exporter: InMemorySpanExporter) -> dict[str, ReadableSpan]:
    return {span.name: span for span in exporter.get_finished_spans()}


def test_task_spans_are_children_of_the_request_span(
    registry: CollectorRegistry, tracer_provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    app = apps.tutorial_app(registry=registry, tracer_provider=tracer_provider)
    TestClient(app).post("/send-notification/x?q=1")
    spans = _by_name(exporter)
    request = spans[f"POST {ROUTE}"]
    notify = spans["bgtask write_notification"]
    log = spans["bgtask write_log"]
    assert request.kind is trace.SpanKind.SERVER
    assert notify.kind is log.kind is trace.SpanKind.INTERNAL
    for task in (notify, log):
        assert task.context.trace_id == request.context.trace_id
        assert task.parent is not None and task.parent.span_id == request.context.span_id
    # The request span ends at the last response byte, before the tasks run.
    assert request.end_time is not None and notify.start_time is not None
    assert request.end_time <= notify.start_time


def test_task_span_attributes(
    registry: CollectorRegistry, tracer_provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    app = apps.tutorial_app(registry=registry, tracer_provider=tracer_provider)
    TestClient(app).post("/send-notification/x?q=1")
    spans = _by_name(exporter)
    notify = dict(spans["bgtask write_notification"].attributes or {})
    log = dict(spans["bgtask write_log"].attributes or {})
    wait = notify.pop("bgtask.queue.wait_duration")
    assert isinstance(wait, float) and 0 <= wait < 10
    assert notify == {
        "code.function.name": "tests.apps.write_notification",
        "bgtask.origin": "handler",
        "http.route": ROUTE,
    }
    log.pop("bgtask.queue.wait_duration")
    assert log == {
        "code.function.name": "tests.apps.write_log",
        "bgtask.origin": "dependency",
        "bgtask.dependency": "tests.apps.get_query",
        "http.route": ROUTE,
    }
    request = dict(spans[f"POST {ROUTE}"].attributes or {})
    assert request == {
        "http.request.method": "POST",
        "http.route": ROUTE,
        "http.response.status_code": 200,
    }


def test_enqueued_event_on_the_span_current_at_queue_time(
    registry: CollectorRegistry, tracer_provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    app = apps.tutorial_app(registry=registry, tracer_provider=tracer_provider)
    TestClient(app).post("/send-notification/x?q=1")
    request = _by_name(exporter)[f"POST {ROUTE}"]
    events = [(e.name, dict(e.attributes or {})) for e in request.events]
    assert events == [
        ("bgtask.enqueued", {"code.function.name": "tests.apps.write_log",
                             "bgtask.origin": "dependency"}),
        ("bgtask.enqueued", {"code.function.name": "tests.apps.write_notification",
                             "bgtask.origin": "handler"}),
    ]  # fmt: skip


def test_only_tasks_queued_under_a_span_not_bgtraces_own_look_for_another_instrumentations(
    registry: CollectorRegistry,
    tracer_provider: TracerProvider,
    exporter: InMemorySpanExporter,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A task queued right under bgtrace's own request span was queued outside any other
    # instrumentation's span, and neither OpenTelemetry's class patch nor FastAPI's telemetry
    # is here: no task span of theirs to adopt, so none is looked for (the look is most of a
    # task span's bookkeeping). Under a span the app opened itself, bgtrace cannot know: it
    # looks.
    looked: list[str] = []
    look = records.foreign_task_span

    def counting_look() -> trace.Span | None:
        looked.append("looked")
        return look()

    monkeypatch.setattr(records, "foreign_task_span", counting_look)
    app = apps.tutorial_app(registry=registry, tracer_provider=tracer_provider)
    tracer = tracer_provider.get_tracer("the app's own")

    @app.post("/own-span")
    async def own_span(background_tasks: BackgroundTasks) -> dict[str, str]:
        with tracer.start_as_current_span("the app's span"):
            background_tasks.add_task(apps.write_notification, "x")
        return {}

    client = TestClient(app)
    client.post("/send-notification/x?q=1")
    assert looked == []
    assert {"bgtask write_notification", "bgtask write_log"} <= set(_by_name(exporter))
    exporter.clear()
    client.post("/own-span")
    assert looked == ["looked"]
    spans = _by_name(exporter)
    task = spans["bgtask write_notification"]
    assert task.parent is not None
    assert task.parent.span_id == spans["the app's span"].context.span_id


def test_link_mode_starts_a_new_trace_linked_to_the_request(
    registry: CollectorRegistry, tracer_provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    app = apps.tutorial_app(registry=registry, tracer_provider=tracer_provider, trace_mode="link")
    TestClient(app).post("/send-notification/x")
    spans = _by_name(exporter)
    request, task = spans[f"POST {ROUTE}"], spans["bgtask write_notification"]
    assert task.parent is None
    assert task.context.trace_id != request.context.trace_id
    assert [link.context.span_id for link in task.links] == [request.context.span_id]


def test_failed_task_span_has_error_status_and_exception(
    registry: CollectorRegistry, tracer_provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    app = apps.dropping_app(registry=registry, tracer_provider=tracer_provider)
    TestClient(app, raise_server_exceptions=False).post("/fail-first")
    span = _by_name(exporter)["bgtask fail"]
    assert span.status.status_code is trace.StatusCode.ERROR
    assert (span.attributes or {})["error.type"] == "ValueError"
    (event,) = [e for e in span.events if e.name == "exception"]
    attributes = dict(event.attributes or {})
    assert attributes["exception.type"] == "ValueError"
    assert "raise ValueError(message)" in str(attributes["exception.stacktrace"])
    # The message quotes the task's argument ("boom"): it is left out.
    assert "boom" not in str(attributes)


def test_incoming_traceparent_is_honoured(
    registry: CollectorRegistry, tracer_provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    app = apps.tutorial_app(registry=registry, tracer_provider=tracer_provider)
    TestClient(app).post(
        "/send-notification/x", headers={"traceparent": f"00-{trace_id}-00f067aa0ba902b7-01"}
    )
    for span in exporter.get_finished_spans():
        assert format(span.context.trace_id, "032x") == trace_id


def test_malformed_traceparent_starts_a_fresh_trace(
    registry: CollectorRegistry, tracer_provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    app = apps.tutorial_app(registry=registry, tracer_provider=tracer_provider)
    response = TestClient(app).post(
        "/send-notification/x", headers={"traceparent": "00-zzzz-not-a-trace" + "x" * 5000}
    )
    assert response.status_code == 200
    assert len({s.context.trace_id for s in exporter.get_finished_spans()}) == 1


def test_no_request_span_when_one_is_already_recording(
    registry: CollectorRegistry, tracer_provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    from starlette.types import ASGIApp, Receive, Scope, Send

    inner = apps.tutorial_app(registry=registry, tracer_provider=tracer_provider)
    tracer = tracer_provider.get_tracer("http-instrumentation")

    def outer(app: ASGIApp) -> ASGIApp:
        async def wrapped(scope: Scope, receive: Receive, send: Send) -> None:
            with tracer.start_as_current_span("their server span"):
                await app(scope, receive, send)

        return wrapped

    TestClient(outer(inner)).post("/send-notification/x")
    spans = _by_name(exporter)
    assert set(spans) == {"their server span", "bgtask write_notification"}
    task = spans["bgtask write_notification"]
    assert task.parent is not None
    assert task.parent.span_id == spans["their server span"].context.span_id


def test_request_spans_never(
    registry: CollectorRegistry, tracer_provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    app = apps.tutorial_app(
        registry=registry, tracer_provider=tracer_provider, request_spans="never"
    )
    TestClient(app).post("/send-notification/x")
    (span,) = exporter.get_finished_spans()
    assert span.name == "bgtask write_notification" and span.parent is None


def test_unknown_method_is_bounded_in_request_span(
    registry: CollectorRegistry, tracer_provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    app = apps.tutorial_app(registry=registry, tracer_provider=tracer_provider)
    TestClient(app).request("FROBNICATE", "/nowhere")
    (span,) = exporter.get_finished_spans()
    assert span.name == "HTTP"
    assert (span.attributes or {})["http.request.method"] == "_OTHER"
    assert "http.route" not in (span.attributes or {})
