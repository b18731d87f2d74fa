"""The incoming trace goes through the configured global propagator, whatever its format."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient
from opentelemetry import baggage, propagate
from opentelemetry.baggage.propagation import W3CBaggagePropagator
from opentelemetry.context import Context
from opentelemetry.propagators.composite import CompositePropagator
from opentelemetry.propagators.textmap import TextMapPropagator
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from prometheus_client import CollectorRegistry

from tests import apps

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
SPAN_ID = "00f067aa0ba902b7"


@pytest.fixture
def global_propagator() -> Iterator[None]:
    """Each test sets the global propagator it needs; the default comes back after it."""
    saved = propagate.get_global_textmap()
    yield
    propagate.set_global_textmap(saved)


def _b3() -> TextMapPropagator:
    from opentelemetry.propagators.b3 import B3MultiFormat

    return B3MultiFormat()


def _b3_single() -> TextMapPropagator:
    from opentelemetry.propagators.b3 import B3SingleFormat

    return B3SingleFormat()


def _jaeger() -> TextMapPropagator:
    from opentelemetry.propagators.jaeger import JaegerPropagator

    return JaegerPropagator()


def _w3c() -> TextMapPropagator:
    return CompositePropagator([TraceContextTextMapPropagator(), W3CBaggagePropagator()])


def _composite() -> TextMapPropagator:
    return CompositePropagator([TraceContextTextMapPropagator(), _b3(), _jaeger()])


CASES = [
    pytest.param(_w3c, {"traceparent": f"00-{TRACE_ID}-{SPAN_ID}-01"}, id="w3c"),
    pytest.param(_b3_single, {"b3": f"{TRACE_ID}-{SPAN_ID}-1"}, id="b3-single"),
    pytest.param(
        _b3,
        {"x-b3-traceid": TRACE_ID, "x-b3-spanid": SPAN_ID, "x-b3-sampled": "1"},
        id="b3-multi",
    ),
    # B3's multi-header format also reads the single header, which its `fields` omits.
    pytest.param(_b3, {"b3": f"{TRACE_ID}-{SPAN_ID}-1"}, id="b3-multi-reading-single"),
    pytest.param(_jaeger, {"uber-trace-id": f"{TRACE_ID}:{SPAN_ID}:0:1"}, id="jaeger"),
    pytest.param(
        _composite,
        {"x-b3-traceid": TRACE_ID, "x-b3-spanid": SPAN_ID, "x-b3-sampled": "1"},
        id="composite",
    ),
]


@pytest.mark.parametrize(("propagator", "headers"), CASES)
def test_incoming_trace_extracted_through_the_global_propagator(
    propagator: type,
    headers: dict[str, str],
    global_propagator: None,
    registry: CollectorRegistry,
    tracer_provider: TracerProvider,
    exporter: InMemorySpanExporter,
) -> None:
    propagate.set_global_textmap(propagator())
    app = apps.tutorial_app(registry=registry, tracer_provider=tracer_provider)
    assert TestClient(app).post("/send-notification/x", headers=headers).status_code == 200
    spans = exporter.get_finished_spans()
    assert {s.name for s in spans} == {
        "POST /send-notification/{email}",
        "bgtask write_notification",
    }
    for span in spans:
        assert format(span.context.trace_id, "032x") == TRACE_ID
    (server,) = [s for s in spans if s.name.startswith("POST")]
    assert server.parent is not None and format(server.parent.span_id, "016x") == SPAN_ID


def test_jaeger_baggage_reaches_the_handler(
    global_propagator: None, registry: CollectorRegistry, tracer_provider: TracerProvider
) -> None:
    from fastapi import FastAPI

    from bgtrace import BackgroundTaskMiddleware

    propagate.set_global_textmap(_jaeger())
    app = FastAPI()
    app.add_middleware(BackgroundTaskMiddleware, registry=registry, tracer_provider=tracer_provider)

    @app.get("/tenant")
    async def tenant() -> dict[str, object]:
        return {"tenant": baggage.get_baggage("tenant")}

    headers = {"uber-trace-id": f"{TRACE_ID}:{SPAN_ID}:0:1", "uberctx-tenant": "acme"}
    assert TestClient(app).get("/tenant", headers=headers).json() == {"tenant": "acme"}


class _Recording(TextMapPropagator):
    """A propagator bgtrace does not know: it must be asked on every request."""

    def __init__(self) -> None:
        self.calls = 0

    def extract(
        self, carrier: object, context: Context | None = None, getter: object = None
    ) -> Context:  # type: ignore[override]
        self.calls += 1
        return context if context is not None else Context()

    def inject(
        self, carrier: object, context: Context | None = None, setter: object = None
    ) -> None:  # type: ignore[override]
        pass

    @property
    def fields(self) -> set[str]:
        return set()


def test_unknown_propagator_is_asked_even_without_trace_headers(global_propagator: None) -> None:
    from bgtrace import propagation

    custom = _Recording()
    propagate.set_global_textmap(custom)
    propagation.incoming_context([(b"host", b"x")], Context())
    assert custom.calls == 1


def test_known_propagator_is_not_called_without_its_headers(
    global_propagator: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    from bgtrace import propagation

    composite = _composite()
    propagate.set_global_textmap(composite)
    calls: list[object] = []
    monkeypatch.setattr(composite, "extract", lambda *a, **k: calls.append(a))
    base = Context()
    assert propagation.incoming_context([(b"host", b"x"), (b"accept", b"*/*")], base) is base
    assert calls == []
    propagation.incoming_context([(b"x-b3-flags", b"1")], base)
    assert len(calls) == 1


def test_split_baggage_headers_are_all_read(global_propagator: None) -> None:
    from bgtrace import propagation

    propagate.set_global_textmap(_w3c())
    headers = [(b"baggage", b"tenant=acme"), (b"baggage", b"region=eu")]
    context = propagation.incoming_context(headers, Context())
    assert baggage.get_all(context) == {"tenant": "acme", "region": "eu"}
