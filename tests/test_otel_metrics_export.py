"""``meter_provider=`` on the wire: OTLP/HTTP metrics decoded as a Collector receives them, and
OpenTelemetry's Prometheus exporter scraped by a real Prometheus that answers every dashboard
expression and evaluates every alert rule on it."""

from __future__ import annotations

import gzip
import threading
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import anyio.to_thread
import httpx
import pytest
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
    ExportMetricsServiceResponse,
)
from opentelemetry.proto.metrics.v1.metrics_pb2 import AggregationTemporality, Metric
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
from prometheus_client import CollectorRegistry, start_http_server

from bgtrace import otel_metrics
from bgtrace.accumulators import LAG_BUCKETS
from bgtrace.demo import app as demo
from bgtrace.demo.app import create_app, receipt_fails
from bgtrace.metrics import DEFAULT_BUCKETS
from tests.servers import prometheus_tool, serve_in_thread, wait_for
from tests.test_e2e_prometheus import (
    BLOCKING_EVERY,
    SLOWNESS,
    THREADS,
    Prometheus,
    Traffic,
    check_scraped_app,
    running_prometheus,
)
from tests.test_otel_metrics import (
    EXPECTED,
    WATCHDOG,
    _advice_supported,
    _stop_recorders,
    unit_of,
)
from tests.test_otlp import attributes

CUMULATIVE = AggregationTemporality.AGGREGATION_TEMPORALITY_CUMULATIVE


class MetricsReceiver(ThreadingHTTPServer):
    """An OTLP/HTTP metrics receiver that stores bgtrace's scope as a Collector or a
    Prometheus remote-write backend does: each series (metric and attribute set) keeps its
    last cumulative point, which holds every count since the series started.

    Per series, not per metric: opentelemetry-sdk before 1.23 leaves out of an export every
    histogram series with no new measurement since the previous one (open-telemetry/
    opentelemetry-python#3277), so the last export of a metric need not hold all its series.
    """

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _MetricsHandler)
        self.url = f"http://127.0.0.1:{self.server_address[1]}/v1/metrics"
        self.lock = threading.Lock()
        self.metrics: dict[str, Metric] = {}
        self.series: dict[str, dict[frozenset[tuple[str, object]], Any]] = {}
        self.scopes: set[tuple[str, str]] = set()

    def keep(self, metric: Metric) -> None:
        """Called with ``lock`` held."""
        if metric.WhichOneof("data") is None:  # SDK < 1.23: a histogram with no new point
            return
        self.metrics[metric.name] = metric
        kept = self.series.setdefault(metric.name, {})
        for point in points(metric):
            kept[frozenset(attributes(point).items())] = point

    def latest(self) -> dict[str, Metric]:
        """Each metric as last described, holding the last point of each of its series."""
        with self.lock:
            merged = {}
            for name, metric in self.metrics.items():
                copy = Metric()
                copy.CopyFrom(metric)
                data = getattr(copy, copy.WhichOneof("data"))
                del data.data_points[:]
                data.data_points.extend(self.series[name].values())
                merged[name] = copy
            return merged


class _MetricsHandler(BaseHTTPRequestHandler):
    server: MetricsReceiver

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        if self.path != "/v1/metrics":
            self.send_error(404)
            return
        if self.headers.get("Content-Encoding") == "gzip":
            body = gzip.decompress(body)
        request = ExportMetricsServiceRequest.FromString(body)
        with self.server.lock:
            for resource_metrics in request.resource_metrics:
                for scope_metrics in resource_metrics.scope_metrics:
                    scope = scope_metrics.scope
                    self.server.scopes.add((scope.name, scope.version))
                    if scope.name == "bgtrace":
                        for metric in scope_metrics.metrics:
                            self.server.keep(metric)
        reply = ExportMetricsServiceResponse().SerializeToString()
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", str(len(reply)))
        self.end_headers()
        self.wfile.write(reply)

    def log_message(self, format: str, *args: object) -> None:
        pass


@contextmanager
def metrics_receiver() -> Iterator[MetricsReceiver]:
    receiver = MetricsReceiver()
    thread = threading.Thread(target=receiver.serve_forever, name="otlp-metrics", daemon=True)
    thread.start()
    try:
        yield receiver
    finally:
        receiver.shutdown()
        receiver.server_close()
        thread.join(timeout=10)


def points(metric: Metric) -> list[Any]:
    kind = metric.WhichOneof("data")
    return list(getattr(metric, kind).data_points)


def number(point: Any) -> float:
    return float(point.as_int if point.HasField("as_int") else point.as_double)


def test_otlp_http_carries_bgtraces_metrics_cumulative_with_its_names_units_and_labels() -> None:
    from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter

    with metrics_receiver() as receiver:
        reader = PeriodicExportingMetricReader(
            OTLPMetricExporter(endpoint=receiver.url), export_interval_millis=200
        )
        provider = MeterProvider(metric_readers=[reader], shutdown_on_exit=False)
        app = create_app(metrics_path=None, meter_provider=provider)
        try:
            with serve_in_thread(app) as url, httpx.Client(base_url=url, timeout=10) as client:
                failing = next(n for n in range(1, 1000) if receipt_fails(n))
                for path in ("/signup/1", "/signup/2", f"/orders/{failing}/receipt",
                             "/import?rows=5000"):  # fmt: skip
                    client.post(path, headers={"connection": "close"})

                def all_ended() -> bool:
                    got = receiver.latest()
                    if "bgtask_completed" not in got or "bgtask_dropped" not in got:
                        return False
                    ended = sum(map(number, points(got["bgtask_completed"])))
                    ended += sum(map(number, points(got["bgtask_dropped"])))
                    return ended == 8

                # Each signup queues three tasks (an e-mail, a recommendations refresh, an
                # audit write), the receipt and the import one each.
                wait_for(all_ended, timeout=30, what="8 ended tasks exported")
        finally:
            provider.shutdown()
            _stop_recorders()

    got = receiver.latest()
    # The watchdog's have points once it measured something: see test_otel_metrics.
    assert set(EXPECTED) - WATCHDOG <= set(got) <= set(EXPECTED)
    assert ("bgtrace", otel_metrics.__version__) in receiver.scopes
    for name, metric in got.items():
        prometheus_name, kind, labels = EXPECTED[name]
        assert metric.unit == unit_of(prometheus_name), name
        data = getattr(metric, metric.WhichOneof("data"))
        if kind == "histogram":
            assert metric.WhichOneof("data") == "histogram", name
            assert data.aggregation_temporality == CUMULATIVE, name
            bounds = LAG_BUCKETS if name == "bgtrace_event_loop_lag" else DEFAULT_BUCKETS
            for point in points(metric):
                if _advice_supported():
                    assert tuple(point.explicit_bounds) == bounds, name
        elif kind == "gauge":
            assert metric.WhichOneof("data") == "gauge", name
        else:
            assert metric.WhichOneof("data") == "sum", name
            assert data.aggregation_temporality == CUMULATIVE, name
            assert data.is_monotonic == (kind == "counter"), name
        for point in points(metric):
            assert set(attributes(point)) == labels, name

    def total(name: str, **wanted: str) -> float:
        found = [p for p in points(got[name]) if wanted.items() <= attributes(p).items()]
        if got[name].WhichOneof("data") == "histogram":
            return float(sum(p.count for p in found))
        return sum(map(number, found))

    email = "bgtrace.demo.app.send_welcome_email"
    assert total("bgtask_enqueued") == 8
    assert total("bgtask_enqueued", task=email, origin="handler", route="/signup/{user_id}") == 2
    assert total("bgtask_completed", outcome="failure") == 1
    assert total("bgtask_failures", error_type="bgtrace.demo.app.ReceiptRenderError") == 1
    assert total("bgtask_dropped", reason="request_error") == 1
    assert total("bgtask_duration") == total("bgtask_queue_wait") == 7
    assert total("bgtask_post_response", route="/signup/{user_id}") == 2
    assert total("bgtask_queue_length") == total("bgtask_in_progress") == 0
    # The def task (the audit write, from the dependency) waited for a thread.
    audit = "bgtrace.demo.app.write_audit"
    assert total("bgtask_thread_wait") == total("bgtask_thread_wait", task=audit) == 2
    assert total("bgtask_oldest_running") == total("bgtask_oldest_queued") == 0


def test_prometheus_scrapes_the_opentelemetry_exporter_and_every_dashboard_query_answers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    binary = prometheus_tool("prometheus")
    try:
        from opentelemetry.exporter.prometheus import (
            PrometheusMetricReader,
            _mapping,  # noqa: F401
        )
    except ImportError:
        pytest.skip("needs opentelemetry-exporter-prometheus 0.46b0+ (the spec's name rules)")
    registry = CollectorRegistry()
    reader = PrometheusMetricReader(registry=registry)
    provider = MeterProvider(metric_readers=[reader], shutdown_on_exit=False)
    server, thread = start_http_server(0, addr="127.0.0.1", registry=registry)
    exporter_port = server.server_port
    # /metrics stays on beside it: the demo table's quantiles come from there, so PromQL on
    # the exported histograms must give bgtrace's own numbers.
    app = create_app(registry=CollectorRegistry(), meter_provider=provider)
    # The demo as the two-worker test serves it: a few threads, so that reports saturate the
    # pool, and the refresh blocking the loop often, so that the Why row has data.
    app.router.lifespan_context = _few_threads
    monkeypatch.setenv(demo.SLOWNESS_ENV, str(SLOWNESS))
    monkeypatch.setenv(demo.BLOCKING_EVERY_ENV, str(BLOCKING_EVERY))
    try:
        with (
            running_prometheus(binary, exporter_port, tmp_path) as prometheus_url,
            httpx.Client(base_url=prometheus_url, timeout=10) as prometheus_client,
            serve_in_thread(app) as url,
            httpx.Client(base_url=url, timeout=10, headers={"connection": "close"}) as client,
        ):
            check_scraped_app(Prometheus(prometheus_client), Traffic(client), workers=1)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
        provider.shutdown()
        _stop_recorders()


@asynccontextmanager
async def _few_threads(app: object) -> AsyncIterator[None]:
    # What the demo's own lifespan does with BGTRACE_DEMO_THREADS (the limiter is the loop's).
    anyio.to_thread.current_default_thread_limiter().total_tokens = THREADS
    yield
