"""``/metrics`` render time and memory with many live series, and what drives them.

Runs in a child process of its own (``bench.py --child render``), so that its peak RSS is its
own and not the in-process benchmark's.
"""

from __future__ import annotations

import gc
import gzip
import statistics
import time
import tracemalloc
from collections.abc import Callable, Sequence
from typing import Any

import prometheus_client.metrics
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.openmetrics.exposition import generate_latest as generate_openmetrics
from prometheus_client.utils import floatToGoString
from rss import clear_peak_rss, peak_rss_bytes, rss_bytes

from bgtrace.metrics import OUTCOMES, TaskMetrics, task_metrics

TASKS, ROUTES = 50, 20
ORIGINS = ("handler", "dependency", "other")
FEWER_BUCKETS = (0.01, 0.05, 0.25, 1.0, 5.0, 30.0, 120.0, 600.0)
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
MIB = 1024 * 1024


def populate(
    registry: CollectorRegistry,
    buckets: Sequence[float] | None = None,
    outcomes_up_front: bool = True,
) -> TaskMetrics:
    """50 tasks x 20 routes x 3 origins of live series, each task queued, run and ended once."""
    metrics = task_metrics(registry, buckets=buckets)
    for t in range(TASKS):
        task = f"app.tasks.notifications.send_message_{t:02d}"
        for r in range(ROUTES):
            route = f"/api/v1/accounts/{{account_id}}/resource_{r:02d}/{{item_id}}"
            for origin in ORIGINS:
                series = metrics.series(task, origin, route)
                series.enqueued.inc()
                series.queue_length.inc()
                series.queue_length.dec()
                series.in_progress.inc()
                series.queue_wait.observe(0.0004)
                series.in_progress.dec()
                # With tracing on, bgtrace attaches the trace id as an exemplar.
                series.duration.observe(0.012, {"trace_id": TRACE_ID})
                series.completed["success"].inc()
                if not outcomes_up_front:
                    for outcome in OUTCOMES[1:]:
                        metrics.completed.remove(*series.labels, outcome)
    for r in range(ROUTES):
        route = f"/api/v1/accounts/{{account_id}}/resource_{r:02d}/{{item_id}}"
        metrics.post_response.labels(route).observe(0.015)
    return metrics


def timed(render: Callable[[], bytes], repeats: int) -> tuple[float, int]:
    """Median milliseconds of ``render`` and the size of its output."""
    times = []
    body = b""
    for _ in range(repeats):
        gc.collect()
        start = time.perf_counter()
        body = render()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times), len(body)


def sample_count(body: bytes) -> int:
    return sum(1 for line in body.splitlines() if line and not line.startswith(b"#"))


def _family_registry(metrics: TaskMetrics, attribute: str) -> CollectorRegistry:
    # A metric can sit in several registries: render each family alone to see its share.
    registry = CollectorRegistry()
    registry.register(getattr(metrics, attribute))
    return registry


FAMILIES = (
    "enqueued", "completed", "queue_length", "in_progress", "queue_wait", "duration",
    "post_response",
)  # fmt: skip


def _with_created(enabled: bool) -> None:
    if enabled:
        prometheus_client.metrics.enable_created_metrics()
    else:
        prometheus_client.metrics.disable_created_metrics()


def measure(quick: bool) -> dict[str, Any]:
    repeats = 2 if quick else 9
    gc.collect()
    rss_empty = rss_bytes()
    registry = CollectorRegistry()
    metrics = populate(registry)
    gc.collect()
    rss_populated = rss_bytes()

    def text() -> bytes:
        return generate_latest(registry)

    text_ms, text_bytes = timed(text, repeats)
    body = text()
    om_ms, om_bytes = timed(lambda: generate_openmetrics(registry), 1 if quick else 4)
    start = time.perf_counter()
    compressed = gzip.compress(body, compresslevel=6)
    gzip_ms = (time.perf_counter() - start) * 1e3

    # Peak memory of one render: the Python allocations it makes, and the process's RSS.
    gc.collect()
    clear_peak_rss()
    peak_before = rss_bytes()
    text()
    rss_peak_delta = max(0, peak_rss_bytes() - peak_before)
    tracemalloc.start()
    text()
    _, traced_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()

    result = {
        "series": TASKS * ROUTES * len(ORIGINS),
        "samples": sample_count(body),
        "text_ms": text_ms,
        "text_bytes": text_bytes,
        "openmetrics_ms": om_ms,
        "openmetrics_bytes": om_bytes,
        "gzip_ms": gzip_ms,
        "gzip_bytes": len(compressed),
        "registry_rss_mib": (rss_populated - rss_empty) / MIB,
        "render_rss_peak_mib": rss_peak_delta / MIB,
        "render_traced_peak_mib": traced_peak / MIB,
    }
    if quick:
        return result
    families = []
    for attribute in FAMILIES:
        family = _family_registry(metrics, attribute)
        ms, _ = timed(lambda family=family: generate_latest(family), max(3, repeats // 3))
        samples = sample_count(generate_latest(family))
        families.append({"family": attribute, "ms": ms, "samples": samples})

    options = []

    def option(name: str, build: Callable[[], CollectorRegistry], created: bool) -> bytes:
        reg = build()
        _with_created(created)
        try:
            ms, _ = timed(lambda: generate_latest(reg), max(3, repeats // 2))
            rendered = generate_latest(reg)
        finally:
            _with_created(True)
        options.append({"option": name, "ms": ms, "samples": sample_count(rendered)})
        return rendered

    def fresh(**kwargs: Any) -> Callable[[], CollectorRegistry]:
        def build() -> CollectorRegistry:
            reg = CollectorRegistry()
            populate(reg, **kwargs)
            return reg

        return build

    option("as shipped (16 buckets, _created, 3 outcomes up front)", lambda: registry, True)
    option("no `_created` samples (disable_created_metrics)", lambda: registry, False)
    option("8 buckets instead of 16", fresh(buckets=FEWER_BUCKETS), True)
    option("only `success` created up front", fresh(outcomes_up_front=False), True)
    reduced = option(
        "all three above", fresh(buckets=FEWER_BUCKETS, outcomes_up_front=False), False
    )
    # What prometheus_client spends before any formatting: a faster encoder on top of
    # registry.collect() could not go below this.
    collect_ms, _ = timed(lambda: _collect_only(registry), max(3, repeats // 2))
    options.append({"option": "`registry.collect()` alone, as shipped (no formatting)",
                    "ms": collect_ms, "samples": sample_count(body)})  # fmt: skip
    # A floor for any encoder written in Python: the same lines from label strings prepared in
    # advance, only the values formatted at scrape time.
    for name, rendered in (("as shipped", body), ("all three above", reduced)):
        pairs = _prepared(rendered)
        floor_ms, _ = timed(lambda pairs=pairs: _format_only(pairs), 3)
        options.append({"option": f"floor, {name}: label strings prepared in advance, only "
                        "values formatted", "ms": floor_ms, "samples": len(pairs)})  # fmt: skip
    return {**result, "families": families, "options": options}


def _collect_only(registry: CollectorRegistry) -> bytes:
    for metric in registry.collect():
        for _ in metric.samples:
            pass
    return b""


def _prepared(body: bytes) -> list[tuple[str, float]]:
    lines = [line.rpartition(b" ") for line in body.splitlines() if not line.startswith(b"#")]
    return [(prefix.decode(), float(value)) for prefix, _, value in lines]


def _format_only(pairs: list[tuple[str, float]]) -> bytes:
    return "".join([f"{prefix} {floatToGoString(value)}\n" for prefix, value in pairs]).encode()
