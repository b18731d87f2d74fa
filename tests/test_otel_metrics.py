"""``meter_provider=``: bgtrace's task metrics through OpenTelemetry, read with the SDK's
in-memory reader. The wire (OTLP, the Prometheus exporter scraped by Prometheus) is in
test_otel_metrics_export.py."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from fastapi import BackgroundTasks, FastAPI
from opentelemetry import metrics as otel_api
from opentelemetry.sdk.metrics import Histogram as HistogramInstrument
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import (
    AggregationTemporality,
    Gauge,
    HistogramDataPoint,
    InMemoryMetricReader,
    Sum,
)
from opentelemetry.sdk.metrics.export import Histogram as HistogramData
from opentelemetry.sdk.metrics.view import ExplicitBucketHistogramAggregation, View
from prometheus_client import REGISTRY, CollectorRegistry, generate_latest
from prometheus_client.utils import floatToGoString
from starlette.testclient import TestClient

from bgtrace import BackgroundTaskMiddleware, inflight, otel_metrics, records
from bgtrace.accumulators import LAG_BUCKETS
from bgtrace.metrics import DEFAULT_BUCKETS
from tests import apps
from tests.conftest import Samples
from tests.servers import serve_in_thread, wait_for

TASK_ATTRIBUTES = {"task", "origin", "route"}
# OpenTelemetry name -> (Prometheus name after the standard translation, kind, attributes).
# Kinds: "counter" (monotonic sum), "updown" (non-monotonic sum: a Prometheus gauge), "gauge"
# (an asynchronous gauge: a value read now), "histogram".
EXPECTED = {
    "bgtask_enqueued": ("bgtask_enqueued_total", "counter", TASK_ATTRIBUTES),
    "bgtask_completed": ("bgtask_completed_total", "counter", TASK_ATTRIBUTES | {"outcome"}),
    "bgtask_failures": ("bgtask_failures_total", "counter", TASK_ATTRIBUTES | {"error_type"}),
    "bgtask_dropped": ("bgtask_dropped_total", "counter", TASK_ATTRIBUTES | {"reason"}),
    "bgtask_duration": ("bgtask_duration_seconds", "histogram", TASK_ATTRIBUTES),
    "bgtask_queue_wait": ("bgtask_queue_wait_seconds", "histogram", TASK_ATTRIBUTES),
    "bgtask_queue_length": ("bgtask_queue_length", "updown", TASK_ATTRIBUTES),
    "bgtask_in_progress": ("bgtask_in_progress", "updown", TASK_ATTRIBUTES),
    "bgtask_post_response": ("bgtask_post_response_seconds", "histogram", {"route"}),
    "bgtask_oldest_running": ("bgtask_oldest_running_seconds", "gauge", TASK_ATTRIBUTES),
    "bgtask_oldest_queued": ("bgtask_oldest_queued_seconds", "gauge", TASK_ATTRIBUTES),
    "bgtask_thread_wait": ("bgtask_thread_wait_seconds", "histogram", TASK_ATTRIBUTES),
    "bgtask_loop_blocked": ("bgtask_loop_blocked_seconds_total", "counter", TASK_ATTRIBUTES),
    "bgtrace_event_loop_lag": ("bgtrace_event_loop_lag_seconds", "histogram", set()),
    "bgtrace_threadpool_tokens": ("bgtrace_threadpool_tokens", "gauge", set()),
    "bgtrace_threadpool_borrowed": ("bgtrace_threadpool_borrowed", "gauge", set()),
    "bgtrace_threadpool_waiting": ("bgtrace_threadpool_waiting", "gauge", set()),
}
# The event-loop watchdog's: they have points only once it measured something (a heartbeat
# late or not, a block), and move on their own between two reads.
WATCHDOG = {
    "bgtask_loop_blocked", "bgtrace_event_loop_lag", "bgtrace_threadpool_tokens",
    "bgtrace_threadpool_borrowed", "bgtrace_threadpool_waiting",
}  # fmt: skip


def translated(name: str, unit: str, kind: str) -> str:
    """OpenTelemetry's Prometheus name for an instrument (the specification's rules: the
    unit's suffix unless the name has it, then ``_total`` for a monotonic sum)."""
    if unit == "s" and not name.endswith("_seconds"):
        name += "_seconds"
    return f"{name}_total" if kind == "counter" else name


def unit_of(prometheus_name: str) -> str:
    return "s" if prometheus_name.removesuffix("_total").endswith("_seconds") else ""


@pytest.fixture
def reader() -> InMemoryMetricReader:
    return InMemoryMetricReader()


@pytest.fixture
def meter_provider(reader: InMemoryMetricReader) -> Iterator[MeterProvider]:
    provider = MeterProvider(metric_readers=[reader], shutdown_on_exit=False)
    yield provider
    _stop_recorders()
    provider.shutdown()


def _stop_recorders() -> None:
    """Recorders live as long as the process; a test's must not outlive it."""
    for recorder in list(otel_metrics._recorders.values()):
        recorder.stop()
    otel_metrics._recorders.clear()
    otel_metrics._unexposed.clear()


def collected(reader: InMemoryMetricReader) -> dict[str, Any]:
    """Instrument name -> the SDK's Metric, for bgtrace's meter."""
    data = reader.get_metrics_data()
    found: dict[str, Any] = {}
    for resource_metrics in data.resource_metrics if data else ():
        for scope_metrics in resource_metrics.scope_metrics:
            if scope_metrics.scope.name == "bgtrace":
                found.update((metric.name, metric) for metric in scope_metrics.metrics)
    return found


def points(metric: Any, **attributes: str) -> list[Any]:
    return [
        point
        for point in metric.data.data_points
        if attributes.items() <= dict(point.attributes).items()
    ]


def value(metrics: dict[str, Any], name: str, **attributes: str) -> float:
    """A counter's or gauge's sum over the matching points; a histogram's count."""
    if name not in metrics:
        return 0
    found = points(metrics[name], **attributes)
    return sum(p.count if isinstance(p, HistogramDataPoint) else p.value for p in found)


def traffic(client: TestClient) -> None:
    """The tutorial twice (two tasks each), a failing task, and every kind of drop."""
    for _ in range(2):
        assert client.post("/send-notification/a?q=x").status_code == 200
    client.post("/fail")
    client.post("/raise-http")
    client.post("/fail-first")
    client.post("/own-background?q=x")


def full_app(**middleware: Any) -> FastAPI:
    app = apps.dropping_app(**middleware)
    tutorial = apps.tutorial_app()
    app.router.routes.extend(tutorial.router.routes)

    @app.post("/fail")
    async def fail(background_tasks: BackgroundTasks) -> None:
        background_tasks.add_task(apps.fail_custom)

    return app


def test_every_metric_reaches_the_meter_provider_named_to_translate_to_bgtraces_names(
    registry: CollectorRegistry, meter_provider: MeterProvider, reader: InMemoryMetricReader
) -> None:
    client = TestClient(
        full_app(registry=registry, meter_provider=meter_provider), raise_server_exceptions=False
    )
    traffic(client)
    metrics = collected(reader)
    assert set(EXPECTED) - WATCHDOG <= set(metrics) <= set(EXPECTED)
    for name, metric in metrics.items():
        check_instrument(name, metric)


def check_instrument(name: str, metric: Any) -> None:
    prometheus_name, kind, attributes = EXPECTED[name]
    data = metric.data
    assert metric.unit == unit_of(prometheus_name), name
    assert translated(name, metric.unit, kind) == prometheus_name
    assert metric.description, name
    assert isinstance(data, KINDS[kind]), name
    if kind != "gauge":
        assert data.aggregation_temporality == AggregationTemporality.CUMULATIVE, name
    if kind in ("counter", "updown"):
        # A monotonic sum: "_total" in Prometheus; an up-down counter: a Prometheus gauge.
        assert data.is_monotonic == (kind == "counter"), name
    for point in data.data_points:
        assert set(point.attributes) == attributes, name


KINDS = {"counter": Sum, "updown": Sum, "gauge": Gauge, "histogram": HistogramData}


def test_the_watchdogs_values_reach_the_meter_provider_as_metrics_shows_them(
    registry: CollectorRegistry,
    samples: Samples,
    meter_provider: MeterProvider,
    reader: InMemoryMetricReader,
) -> None:
    # Fed as the watchdog feeds them (test_watchdog shows where they come from), to a set no
    # watchdog watches (no request served), so that both readings see the same values.
    BackgroundTaskMiddleware(apps.tutorial_app(), registry=registry, meter_provider=meter_provider)
    [recorder] = otel_metrics._recorders.values()
    recorder.metrics.loop_blocked("tests.apps.write_log", "handler", "/x", 0.25)
    recorder.metrics.loop_blocked("tests.apps.write_log", "handler", "/x", 0.5)
    recorder.metrics.loop_blocked("none", "other", "/y", 0.125)
    lags = (0.0005, 0.003, 0.7, 12.0)
    for lag in lags:
        recorder.metrics.loop_heartbeat(1, lag, (40.0, 3.0, 2.0))
    metrics = collected(reader)
    assert set(metrics) >= WATCHDOG
    for name in WATCHDOG:
        check_instrument(name, metrics[name])
    assert value(metrics, "bgtask_loop_blocked", task="tests.apps.write_log") == 0.75
    assert value(metrics, "bgtask_loop_blocked", task="none", route="/y") == 0.125
    assert samples.total("bgtask_loop_blocked_seconds_total") == 0.875
    [lag] = metrics["bgtrace_event_loop_lag"].data.data_points
    assert lag.count == 4 and lag.sum == sum(lags)
    if _advice_supported():
        assert tuple(lag.explicit_bounds) == LAG_BUCKETS
        assert list(lag.bucket_counts) == [
            samples.total("bgtrace_event_loop_lag_seconds_bucket", le=le)
            - samples.total("bgtrace_event_loop_lag_seconds_bucket", le=below)
            for below, le in zip(["0", *LES], [*LES, "+Inf"], strict=True)
        ]
    for gauge, expected in (("tokens", 40), ("borrowed", 3), ("waiting", 2)):
        assert value(metrics, f"bgtrace_threadpool_{gauge}") == expected
        assert samples.total(f"bgtrace_threadpool_{gauge}") == expected


LES = [floatToGoString(b) for b in LAG_BUCKETS]


def test_a_running_and_a_queued_task_show_their_age_and_def_tasks_their_thread_wait(
    registry: CollectorRegistry,
    samples: Samples,
    meter_provider: MeterProvider,
    reader: InMemoryMetricReader,
) -> None:
    release = threading.Event()
    app = FastAPI()
    app.add_middleware(BackgroundTaskMiddleware, registry=registry, meter_provider=meter_provider)

    @app.post("/hold")
    async def hold(background_tasks: BackgroundTasks) -> None:
        background_tasks.add_task(release.wait, 30)
        background_tasks.add_task(release.wait, 30)

    def aged() -> bool:
        metrics = collected(reader)
        running = value(metrics, "bgtask_oldest_running")
        return running >= 0.2 and value(metrics, "bgtask_oldest_queued") >= running

    with serve_in_thread(app) as url:
        post = threading.Thread(target=httpx.post, args=(f"{url}/hold",), kwargs={"timeout": 30})
        post.start()
        try:
            # One task runs (in a thread), the next waits behind it.
            wait_for(aged, what="a running and a queued task's ages")
        finally:
            release.set()
            post.join(timeout=30)
        wait_for(lambda: samples.total("bgtask_completed_total") == 2, what="both tasks")
    metrics = collected(reader)
    assert value(metrics, "bgtask_oldest_running") == value(metrics, "bgtask_oldest_queued") == 0
    # Each def task's wait for a thread (the second's is new since the last collection: an SDK
    # before 1.23 leaves unchanged histogram series out, see test_otel_metrics_export).
    [point] = metrics["bgtask_thread_wait"].data.data_points
    assert point.count == samples.total("bgtask_thread_wait_seconds_count") == 2
    assert point.sum == pytest.approx(samples.total("bgtask_thread_wait_seconds_sum"), abs=1e-9)


def test_opentelemetry_counts_are_the_ones_metrics_shows_and_every_task_ends_once(
    registry: CollectorRegistry,
    samples: Samples,
    meter_provider: MeterProvider,
    reader: InMemoryMetricReader,
) -> None:
    client = TestClient(
        full_app(registry=registry, meter_provider=meter_provider), raise_server_exceptions=False
    )
    traffic(client)
    metrics = collected(reader)
    for name, (prometheus_name, kind, _) in EXPECTED.items():
        if name in WATCHDOG:
            continue  # see test_the_watchdogs_values_reach_the_meter_provider_as_metrics_...
        sample = f"{prometheus_name}_count" if kind == "histogram" else prometheus_name
        assert value(metrics, name) == samples.total(sample), name
    enqueued = value(metrics, "bgtask_enqueued")
    assert enqueued == 10
    assert enqueued == value(metrics, "bgtask_completed") + value(metrics, "bgtask_dropped")
    assert value(metrics, "bgtask_completed", outcome="failure") == 2
    assert value(metrics, "bgtask_failures", error_type="tests.apps.NotificationError") == 1
    assert value(metrics, "bgtask_dropped", reason="request_error") == 1
    assert value(metrics, "bgtask_dropped", reason="earlier_task_failed") == 1
    assert value(metrics, "bgtask_dropped", reason="not_attached") == 1
    assert value(metrics, "bgtask_queue_length") == value(metrics, "bgtask_in_progress") == 0
    # Every started task timed twice, in the histograms, and nothing else.
    assert value(metrics, "bgtask_queue_wait") == value(metrics, "bgtask_duration") == 7


def test_histograms_have_the_middlewares_buckets(
    registry: CollectorRegistry, meter_provider: MeterProvider, reader: InMemoryMetricReader
) -> None:
    if not _advice_supported():
        pytest.skip("opentelemetry-api before 1.23 takes no bucket advice: see the View test")
    buckets = (0.1, 1.0, 10.0)
    app = apps.tutorial_app(registry=registry, meter_provider=meter_provider, buckets=buckets)
    client = TestClient(app)
    client.post("/send-notification/a")
    for name in ("bgtask_duration", "bgtask_queue_wait", "bgtask_post_response"):
        [point] = collected(reader)[name].data.data_points
        assert tuple(point.explicit_bounds) == buckets, name


def _advice_supported() -> bool:
    import inspect

    parameters = inspect.signature(otel_api.Meter.create_histogram).parameters
    return "explicit_bucket_boundaries_advisory" in parameters


def test_the_readmes_view_gives_the_buckets_where_the_api_takes_no_advice(
    registry: CollectorRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    reader = InMemoryMetricReader()
    view = View(  # as the README shows it
        instrument_type=HistogramInstrument,
        instrument_name="bgtask_*",
        aggregation=ExplicitBucketHistogramAggregation(list(DEFAULT_BUCKETS)),
    )
    provider = MeterProvider(metric_readers=[reader], views=[view], shutdown_on_exit=False)
    meter = provider.get_meter("bgtrace")
    made = type(meter).create_histogram

    def without_advice(self: Any, name: str, unit: str, description: str, **kw: Any) -> Any:
        if kw:
            raise TypeError("create_histogram() got an unexpected keyword argument")
        return made(self, name, unit, description)

    monkeypatch.setattr(type(meter), "create_histogram", without_advice)
    try:
        client = TestClient(apps.tutorial_app(registry=registry, meter_provider=provider))
        assert client.post("/send-notification/a").status_code == 200
        [point] = collected(reader)["bgtask_duration"].data.data_points
        assert tuple(point.explicit_bounds) == DEFAULT_BUCKETS
        assert point.count == 1
    finally:
        _stop_recorders()
        provider.shutdown()


def test_middlewares_with_their_own_meter_providers_record_only_their_own_tasks() -> None:
    readers = [InMemoryMetricReader(), InMemoryMetricReader()]
    providers = [MeterProvider(metric_readers=[r], shutdown_on_exit=False) for r in readers]
    try:
        clients = [
            TestClient(apps.tutorial_app(registry=CollectorRegistry(), meter_provider=p))
            for p in providers
        ]
        clients[0].post("/send-notification/a")
        for _ in range(3):
            clients[1].post("/send-notification/a")
        counts = [collected(r) for r in readers]
        assert [value(c, "bgtask_enqueued") for c in counts] == [1, 3]
        assert [value(c, "bgtask_duration") for c in counts] == [1, 3]
        assert [value(c, "bgtask_queue_wait") for c in counts] == [1, 3]
        assert [value(c, "bgtask_post_response") for c in counts] == [1, 3]
    finally:
        _stop_recorders()
        for provider in providers:
            provider.shutdown()


def test_one_metrics_set_and_meter_provider_shared_by_two_middlewares_count_each_task_once(
    registry: CollectorRegistry, meter_provider: MeterProvider, reader: InMemoryMetricReader
) -> None:
    first = TestClient(apps.tutorial_app(registry=registry, meter_provider=meter_provider))
    second = TestClient(apps.tutorial_app(registry=registry, meter_provider=meter_provider))
    first.post("/send-notification/a")
    second.post("/send-notification/a")
    metrics = collected(reader)
    assert value(metrics, "bgtask_enqueued") == 2
    assert value(metrics, "bgtask_duration") == 2
    assert value(metrics, "bgtask_post_response") == 2


def test_without_a_meter_provider_nothing_observes_tasks(
    registry: CollectorRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Off costs nothing: no observer joins the task path, no post-response hook.
    monkeypatch.delenv(otel_metrics.ENV, raising=False)
    before = (inflight.observers, records.post_response_observers)
    client = TestClient(apps.tutorial_app(registry=registry))
    assert client.post("/send-notification/a").status_code == 200
    assert (inflight.observers, records.post_response_observers) == before
    assert not any(isinstance(o, otel_metrics.OtelRecorder) for o in inflight.observers)


def test_metrics_path_none_with_a_meter_provider_keeps_nothing_in_prometheus_client(
    meter_provider: MeterProvider, reader: InMemoryMetricReader
) -> None:
    app = apps.tutorial_app(metrics_path=None, meter_provider=meter_provider, namespace="pushed")
    client = TestClient(app)
    assert client.post("/send-notification/a").status_code == 200
    assert client.get("/metrics").status_code == 404  # the app's, and it has none
    assert b"pushed_bgtask" not in generate_latest(REGISTRY)
    assert value(collected(reader), "pushed_bgtask_enqueued") == 1
    [recorder] = otel_metrics._recorders.values()
    assert recorder.metrics.registry is None
    assert recorder.metrics.local  # no multiprocess files either


def test_metrics_path_none_with_a_registry_still_registers_there(
    registry: CollectorRegistry,
    samples: Samples,
    meter_provider: MeterProvider,
    reader: InMemoryMetricReader,
) -> None:
    # metrics_app(registry) mounted elsewhere, or another tool's endpoint, keeps serving them.
    app = apps.tutorial_app(metrics_path=None, registry=registry, meter_provider=meter_provider)
    TestClient(app).post("/send-notification/a")
    assert samples.total("bgtask_enqueued_total") == 1
    assert value(collected(reader), "bgtask_enqueued") == 1


def test_the_global_meter_provider_only_when_bgtrace_otel_metrics_is_global(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.delenv(otel_metrics.ENV, raising=False)
    assert otel_metrics.resolve_provider(None) is None
    monkeypatch.setenv(otel_metrics.ENV, "global")
    assert otel_metrics.resolve_provider(None) is otel_api.get_meter_provider()
    given = MeterProvider(shutdown_on_exit=False)
    assert otel_metrics.resolve_provider(given) is given
    monkeypatch.setenv(otel_metrics.ENV, "yes")
    with caplog.at_level(logging.WARNING, logger="bgtrace"):
        assert otel_metrics.resolve_provider(None) is None
    assert "BGTRACE_OTEL_METRICS" in caplog.text


def test_a_namespace_opentelemetry_cannot_name_is_a_value_error(
    registry: CollectorRegistry, meter_provider: MeterProvider
) -> None:
    with pytest.raises(ValueError, match="OpenTelemetry instrument name"):
        BackgroundTaskMiddleware(
            apps.tutorial_app(), registry=registry, namespace="_x", meter_provider=meter_provider
        )


def test_a_failing_meter_never_reaches_the_app_the_counts_or_another_meter_provider(
    registry: CollectorRegistry, samples: Samples, monkeypatch: pytest.MonkeyPatch
) -> None:
    readers = [InMemoryMetricReader(), InMemoryMetricReader()]
    providers = [MeterProvider(metric_readers=[r], shutdown_on_exit=False) for r in readers]
    broken_app = apps.tutorial_app(registry=registry, meter_provider=providers[0])
    # The same metrics set (one registry) also goes to a second meter provider.
    other_app = apps.tutorial_app(registry=registry, meter_provider=providers[1])
    try:
        with TestClient(broken_app) as client, TestClient(other_app):
            # The lifespans built the middlewares: the broken provider's recorder comes first.
            broken, _ = otel_metrics._recorders.values()

            def fail(*args: Any, **kwargs: Any) -> None:
                raise RuntimeError("exporter broke")

            for histogram in (broken.duration, broken.queue_wait, broken.post_response):
                monkeypatch.setattr(histogram, "record", fail)
            assert client.post("/send-notification/a?q=x").status_code == 200
        assert len(apps.done) == 2
        assert samples.total("bgtask_completed_total", outcome="success") == 2
        # Each observer is guarded on its own: the broken one stops none after it.
        working = collected(readers[1])
        for name in ("bgtask_duration", "bgtask_queue_wait", "bgtask_post_response"):
            assert value(working, name) == (1 if name == "bgtask_post_response" else 2), name
    finally:
        _stop_recorders()
        for provider in providers:
            provider.shutdown()
