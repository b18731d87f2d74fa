"""Traces on the wire: the example app, configured only by ``OTEL_*`` variables, exports
OTLP/HTTP to a receiver in this test, which decodes what a collector would get."""

from __future__ import annotations

import gzip
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status
from prometheus_client.openmetrics.parser import text_string_to_metric_families

from bgtrace.demo.app import receipt_fails
from tests.servers import free_port, serve_process, wait_for

SERVICE = "bgtrace-otlp-test"


class Receiver(ThreadingHTTPServer):
    """An OTLP/HTTP trace receiver: keeps every span with its resource's attributes."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _ExportHandler)
        self.url = f"http://127.0.0.1:{self.server_address[1]}"
        self.lock = threading.Lock()
        self.spans: list[tuple[dict[str, object], Span]] = []
        self.encodings: set[str] = set()

    def collected(self) -> list[tuple[dict[str, object], Span]]:
        with self.lock:
            return list(self.spans)


class _ExportHandler(BaseHTTPRequestHandler):
    server: Receiver

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        if self.path != "/v1/traces":
            self.send_error(404)
            return
        encoding = self.headers.get("Content-Encoding", "identity")
        if encoding == "gzip":
            body = gzip.decompress(body)
        request = ExportTraceServiceRequest.FromString(body)
        with self.server.lock:
            self.server.encodings.add(encoding)
            for resource_spans in request.resource_spans:
                resource = attributes(resource_spans.resource)
                for scope_spans in resource_spans.scope_spans:
                    self.server.spans.extend((resource, span) for span in scope_spans.spans)
        reply = ExportTraceServiceResponse().SerializeToString()
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", str(len(reply)))
        self.end_headers()
        self.wfile.write(reply)

    def log_message(self, format: str, *args: object) -> None:
        pass  # no line per export on the test's stderr


@contextmanager
def otlp_receiver() -> Iterator[Receiver]:
    receiver = Receiver()
    thread = threading.Thread(target=receiver.serve_forever, name="otlp", daemon=True)
    thread.start()
    try:
        yield receiver
    finally:
        receiver.shutdown()
        receiver.server_close()
        thread.join(timeout=10)


def request_spans(spans: list[Span]) -> list[Span]:
    """The test's requests: not the GETs of /metrics, which FastAPI's telemetry traces too."""
    return [
        span
        for span in spans
        if span.kind == Span.SPAN_KIND_SERVER and attributes(span)["http.request.method"] == "POST"
    ]


def task_spans(spans: list[Span]) -> list[Span]:
    """bgtrace's task spans: its own, or another instrumentation's that it adopted."""
    return [span for span in spans if "bgtask.origin" in attributes(span)]


def expected_task_span_name(function: str) -> str:
    # Also where FastAPI's own telemetry opened the span and bgtrace adopted it.
    return "bgtask " + function.rsplit(".", 1)[1]


def attributes(item: object) -> dict[str, object]:
    """A span's or resource's attributes as a plain dict."""
    return {
        kv.key: getattr(kv.value, kv.value.WhichOneof("value"))
        for kv in item.attributes  # type: ignore[attr-defined]
    }


def test_request_and_task_spans_reach_an_otlp_collector_linked_and_described() -> None:
    failing = next(order for order in range(1, 1000) if receipt_fails(order))
    passing = next(order for order in range(1, 1000) if not receipt_fails(order))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    args = ["-m", "uvicorn", "bgtrace.demo.app:app", "--host", "127.0.0.1",
            "--port", str(port), "--log-level", "warning"]  # fmt: skip
    with otlp_receiver() as receiver:
        env = {
            "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.url,
            "OTEL_SERVICE_NAME": SERVICE,
            "OTEL_BSP_SCHEDULE_DELAY": "100",  # ms: flush fast
            "OTEL_EXPORTER_OTLP_COMPRESSION": "gzip",
            "BGTRACE_DEMO_SLOWNESS": "0.2",
        }
        with serve_process(args, env, f"{url}/metrics"):
            # A raising task makes uvicorn close the connection: one connection per request.
            close = {"connection": "close"}
            statuses = [
                httpx.post(f"{url}{path}", headers=close, timeout=10).status_code
                for path in ("/signup/7", f"/orders/{failing}/receipt",
                             f"/orders/{passing}/receipt", "/import?rows=5000")
            ]  # fmt: skip
            assert statuses == [202, 202, 202, 413]

            def counted() -> bool:
                spans = [span for _, span in receiver.collected()]
                return len(task_spans(spans)) == 5 and len(request_spans(spans)) == 4

            # The import's task never ran: 4 requests, 5 tasks (3 of them at signup).
            try:
                wait_for(counted, timeout=30, what="4 request and 5 task spans")
            except AssertionError as exc:
                names = sorted(span.name for _, span in receiver.collected())
                raise AssertionError(f"{exc}; received {names}") from None
            openmetrics = httpx.get(
                f"{url}/metrics", headers={"accept": "application/openmetrics-text"}, timeout=10
            ).text

    collected = receiver.collected()
    assert receiver.encodings == {"gzip"}
    assert {resource["service.name"] for resource, _ in collected} == {SERVICE}
    spans = [span for _, span in collected]
    requests = request_spans(spans)
    assert {span.name for span in requests} == {"POST /signup/{user_id}",
                                                "POST /orders/{order_id}/receipt",
                                                "POST /import"}  # fmt: skip
    by_trace = {span.trace_id: span for span in requests}
    assert len(by_trace) == 4, "one trace per request"
    tasks = task_spans(spans)
    for task in tasks:
        request = by_trace[task.trace_id]  # in a request's trace...
        assert task.parent_span_id == request.span_id  # ... as the request span's child
        attrs = attributes(task)
        assert task.name == expected_task_span_name(str(attrs["code.function.name"]))
        assert attrs["http.route"] == attributes(request)["http.route"]
        assert isinstance(attrs["bgtask.queue.wait_duration"], float)
        assert attrs["bgtask.queue.wait_duration"] >= 0
    signup = next(span for span in requests if span.name == "POST /signup/{user_id}")
    assert attributes(signup)["http.response.status_code"] == 202
    rejected = next(span for span in requests if span.name == "POST /import")
    assert attributes(rejected)["http.response.status_code"] == 413

    by_function = {
        attributes(span)["code.function.name"]: span
        for span in tasks
        if span.status.code != Status.STATUS_CODE_ERROR
    }
    email = attributes(by_function["bgtrace.demo.app.send_welcome_email"])
    assert email["bgtask.origin"] == "handler"
    assert "bgtask.dependency" not in email
    assert email["http.route"] == "/signup/{user_id}"
    audit = attributes(by_function["bgtrace.demo.app.write_audit"])
    assert audit["bgtask.origin"] == "dependency"
    assert audit["bgtask.dependency"] == "bgtrace.demo.app.audit_trail"
    assert "bgtrace.demo.app.render_receipt" in by_function  # the passing order: no error

    [failed] = [span for span in tasks if span.status.code == Status.STATUS_CODE_ERROR]
    failed_attrs = attributes(failed)
    assert failed_attrs["code.function.name"] == "bgtrace.demo.app.render_receipt"
    assert failed_attrs["error.type"] == "bgtrace.demo.app.ReceiptRenderError"
    [event] = [event for event in failed.events if event.name == "exception"]
    assert attributes(event)["exception.type"] == "bgtrace.demo.app.ReceiptRenderError"
    # Left out on purpose: the message quotes the task's argument.
    assert "exception.message" not in attributes(event)

    # Exemplars on /metrics point at exported traces: Grafana's links to Jaeger resolve.
    task_traces = {span.trace_id.hex() for span in tasks}
    exemplars = [
        sample.exemplar.labels["trace_id"]
        for family in text_string_to_metric_families(openmetrics)
        for sample in family.samples
        if sample.name == "bgtask_duration_seconds_bucket" and sample.exemplar is not None
    ]
    assert len(exemplars) >= 3  # e-mail, audit, receipts
    assert set(exemplars) <= task_traces
