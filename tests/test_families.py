from __future__ import annotations

import subprocess

import pytest
from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.openmetrics import exposition as openmetrics
from prometheus_client.openmetrics import parser as openmetrics_parser

import bgtrace.metrics
import bgtrace.stuck
from bgtrace.accumulators import exemplar
from bgtrace.metrics import TaskMetrics, render_registry, task_metrics
from tests.servers import prometheus_tool

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
# Label values a route template or a task name can hold: some the formats must escape, and
# %-directives that the direct writer's templates must not take for their own.
AWKWARD = (
    "/files/{path:path}", 'app.tasks.say_"hi"', "/back\\slash", "/new\nline", "/ünï", "/%d%s%%",
)  # fmt: skip


def populate(registry: CollectorRegistry, namespace: str = "") -> TaskMetrics:
    """Every kind of sample bgtrace exports: counters, gauges left non-zero, histograms with
    exemplars, failures, drops, and the post-response histogram."""
    metrics = task_metrics(registry, namespace, buckets=[0.01, 0.1, 1.0])
    for n, value in enumerate(AWKWARD):
        series = metrics.series(f"app.tasks.task_{n}", "handler", value)
        with series.lock:
            series.queued()
            series.queued()
            series.queued()
            series.started(0.005 * n)
            series.finished(0.1, "success", None, exemplar(TRACE_ID, 0.1))
            series.started(0.2)
            series.finished(2.5, "failure", f"app.errors.Err{n}", None)
            series.dropped("request_error")
        other = metrics.series(value, "dependency", "/r")
        with other.lock:
            other.queued()  # still queued: gauges at 1
        metrics.post_response_for(value).observe(0.05 * n)
        metrics.loop_blocked(f"app.tasks.task_{n}", "handler", value, 0.25 * n + 0.1)
        metrics.loop_blocked("none", "other", value, 1 / 3)
        metrics.loop_heartbeat(n, 0.0004 * 10**n, (40.0, float(n), 2.0))
    return metrics


def test_direct_text_render_is_byte_identical_to_prometheus_client(
    registry: CollectorRegistry,
) -> None:
    populate(registry)
    direct = render_registry(registry, generate_latest, openmetrics=False)
    # generate_latest alone reads the collector's prometheus_client families.
    assert direct == generate_latest(registry)
    assert 'bgtask_enqueued_total{origin="handler",route="/new\\nline",task=' in direct.decode()


def test_direct_openmetrics_render_is_byte_identical_and_carries_exemplars(
    registry: CollectorRegistry,
) -> None:
    populate(registry, namespace="shop")
    direct = render_registry(registry, openmetrics.generate_latest, openmetrics=True)
    assert direct == openmetrics.generate_latest(registry)
    families = openmetrics_parser.text_string_to_metric_families(direct.decode())  # strict
    duration = next(f for f in families if f.name == "shop_bgtask_duration_seconds")
    exemplars = [s for s in duration.samples if s.exemplar is not None]
    assert len(exemplars) == len(AWKWARD)
    for sample in exemplars:
        assert sample.labels["le"] == "0.1"
        assert sample.exemplar is not None and sample.exemplar.value == 0.1
        assert sample.exemplar.labels == {"trace_id": TRACE_ID}


def test_direct_render_builds_no_prometheus_client_families(
    registry: CollectorRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The point of the direct writer: thousands of series in milliseconds, not seconds."""
    populate(registry)
    expected = generate_latest(registry)

    def refuse(*args: object) -> None:
        raise AssertionError("the /metrics path built prometheus_client families")

    monkeypatch.setattr(bgtrace.metrics, "collect", refuse)
    assert render_registry(registry, generate_latest, openmetrics=False) == expected


def test_watchdog_families_read_through_the_registry(registry: CollectorRegistry) -> None:
    populate(registry)
    labels = {"task": "app.tasks.task_2", "origin": "handler", "route": AWKWARD[2]}
    assert registry.get_sample_value("bgtask_loop_blocked_seconds_total", labels) == 0.6
    assert registry.get_sample_value("bgtrace_event_loop_lag_seconds_count") == len(AWKWARD)
    assert registry.get_sample_value("bgtrace_event_loop_lag_seconds_bucket", {"le": "0.001"}) == 1
    # One reading per watched loop, summed.
    assert registry.get_sample_value("bgtrace_threadpool_tokens") == 40 * len(AWKWARD)
    assert registry.get_sample_value("bgtrace_threadpool_borrowed") == sum(range(len(AWKWARD)))
    assert registry.get_sample_value("bgtrace_threadpool_waiting") == 2 * len(AWKWARD)


def test_other_collectors_are_kept_and_openmetrics_ends_once(registry: CollectorRegistry) -> None:
    populate(registry)
    Counter("app_orders", "Orders taken.", registry=registry).inc()
    body = render_registry(registry, openmetrics.generate_latest, openmetrics=True).decode()
    assert body.endswith("\n# EOF\n") and body.count("# EOF") == 1
    assert "app_orders_total 1.0" in body
    assert body.count("# TYPE bgtask_enqueued counter") == 1


def test_promtool_accepts_the_text_exposition(registry: CollectorRegistry) -> None:
    populate(registry)
    body = render_registry(registry, generate_latest, openmetrics=False)
    checked = subprocess.run(
        [prometheus_tool("promtool"), "check", "metrics"],
        input=body,
        capture_output=True,
        timeout=60,
    )
    # promtool's lint rules about help text and units are not format errors.
    errors = [line for line in checked.stderr.decode().splitlines() if "error" in line.lower()]
    assert errors == [], checked.stderr.decode()


def test_counts_read_the_same_through_the_registry(registry: CollectorRegistry) -> None:
    populate(registry)
    labels = {"task": "app.tasks.task_1", "origin": "handler", "route": AWKWARD[1]}
    assert registry.get_sample_value("bgtask_enqueued_total", labels) == 3
    assert registry.get_sample_value("bgtask_queue_length", labels) == 0
    assert registry.get_sample_value("bgtask_in_progress", labels) == 0
    assert (
        registry.get_sample_value("bgtask_completed_total", {**labels, "outcome": "cancelled"}) == 0
    )
    assert (
        registry.get_sample_value(
            "bgtask_failures_total", {**labels, "error_type": "app.errors.Err1"}
        )
        == 1
    )
    assert (
        registry.get_sample_value("bgtask_dropped_total", {**labels, "reason": "request_error"})
        == 1
    )
    assert registry.get_sample_value("bgtask_duration_seconds_count", labels) == 2
    assert registry.get_sample_value("bgtask_duration_seconds_sum", labels) == 2.6
    assert (
        registry.get_sample_value(
            "bgtask_queue_length", {"task": AWKWARD[1], "origin": "dependency", "route": "/r"}
        )
        == 1
    )


def test_names_are_reserved_in_the_registry(registry: CollectorRegistry) -> None:
    task_metrics(registry)
    with pytest.raises(ValueError, match="Duplicated timeseries"):
        Counter("bgtask_enqueued", "A clash.", registry=registry)


def test_a_namespace_that_makes_no_metric_name_is_a_precise_error(
    registry: CollectorRegistry,
) -> None:
    with pytest.raises(ValueError, match="namespace 'my-app'"):
        task_metrics(registry, "my-app")


def test_oldest_ages_and_thread_waits_render_byte_identical(
    registry: CollectorRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    metrics = populate(registry)
    labels = metrics.series("app.tasks.task_1", "handler", AWKWARD[1]).labels
    ages = {labels: (12.345678, 0.0), (AWKWARD[2], "dependency", "/r"): (0.0, 1e-05)}
    monkeypatch.setattr(bgtrace.stuck, "oldest_ages", lambda _: ages)
    for value in (0.005, 0.5, 5.0):
        with metrics.lock:
            metrics.thread_wait_for(labels).add(value)
    for encoder, openmetrics_format in (
        (generate_latest, False),
        (openmetrics.generate_latest, True),
    ):
        direct = render_registry(registry, encoder, openmetrics=openmetrics_format)
        assert direct == encoder(registry)
    text = render_registry(registry, generate_latest, openmetrics=False).decode()
    assert 'bgtask_oldest_running_seconds{origin="handler",route="/back\\\\slash",' in text
    assert "bgtask_thread_wait_seconds_count{" in text
    # Every series has both ages, at 0 where nothing is in flight.
    assert text.count("\nbgtask_oldest_queued_seconds{") == 2 * len(AWKWARD)
