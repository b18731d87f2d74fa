"""``/metrics`` render time and memory with many live series, rendered as bgtrace's
``/metrics`` app renders them: in one process, and in multiprocess mode.

Runs in a child process of its own (``bench.py --child render`` or ``multiprocess``), so that
its peak RSS is its own and not the in-process benchmark's.
"""

from __future__ import annotations

import gc
import gzip
import os
import statistics
import time
import tracemalloc
from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.exposition import choose_encoder
from prometheus_client.multiprocess import MultiProcessCollector
from rss import clear_peak_rss, peak_rss_bytes, rss_bytes

from bgtrace.accumulators import exemplar
from bgtrace.exposition import GZIP_LEVEL, _render
from bgtrace.metrics import TaskMetrics, task_metrics

TASKS, ROUTES = 50, 20
ORIGINS = ("handler", "dependency", "other")
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
MIB = 1024 * 1024
# What Prometheus sends; without it the text format is served.
OPENMETRICS = "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5"


def _page(registry: CollectorRegistry, accept: str) -> bytes:
    """What bgtrace's /metrics renders for a scraper sending ``accept`` (not compressed)."""
    encoder, content_type = choose_encoder(accept)
    openmetrics = content_type.startswith("application/openmetrics-text")
    return _render(registry, encoder, openmetrics, False)


def populate(registry: CollectorRegistry) -> TaskMetrics:
    """50 tasks x 20 routes x 3 origins of live series, each task queued, run and ended once."""
    metrics = task_metrics(registry)
    for t in range(TASKS):
        task = f"app.tasks.notifications.send_message_{t:02d}"
        for r in range(ROUTES):
            route = f"/api/v1/accounts/{{account_id}}/resource_{r:02d}/{{item_id}}"
            for origin in ORIGINS:
                series = metrics.series(task, origin, route)
                with series.lock:
                    series.queued()
                    series.started(0.0004)
                    # With tracing on, bgtrace attaches the trace id as an exemplar.
                    series.finished(0.012, "success", None, exemplar(TRACE_ID, 0.012))
    for r in range(ROUTES):
        route = f"/api/v1/accounts/{{account_id}}/resource_{r:02d}/{{item_id}}"
        metrics.post_response_for(route).observe(0.015)
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


def measure(quick: bool) -> dict[str, Any]:
    repeats = 3 if quick else 15
    gc.collect()
    rss_empty = rss_bytes()
    registry = CollectorRegistry()
    populate(registry)
    gc.collect()
    rss_populated = rss_bytes()

    # Exactly what bgtrace's /metrics app runs, in its worker thread, for each format.
    def text() -> bytes:
        return _page(registry, "")

    def openmetrics() -> bytes:
        return _page(registry, OPENMETRICS)

    text_ms, text_bytes = timed(text, repeats)
    om_ms, om_bytes = timed(openmetrics, repeats)
    body = text()
    start = time.perf_counter()
    compressed = gzip.compress(body, compresslevel=GZIP_LEVEL)
    gzip_ms = (time.perf_counter() - start) * 1e3
    # The same registry through prometheus_client's own encoder, which builds its sample
    # objects from bgtrace's collector: what another exporter of this registry pays.
    generic_ms, _ = timed(lambda: generate_latest(registry), 1 if quick else 3)

    # Peak memory of one render: the Python allocations it makes, and the process's RSS.
    gc.collect()
    clear_peak_rss()
    peak_before = rss_bytes()
    openmetrics()
    rss_peak_delta = max(0, peak_rss_bytes() - peak_before)
    tracemalloc.start()
    openmetrics()
    _, traced_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()

    return {
        "series": TASKS * ROUTES * len(ORIGINS),
        "samples": sample_count(body),
        "text_ms": text_ms,
        "text_bytes": text_bytes,
        "openmetrics_ms": om_ms,
        "openmetrics_bytes": om_bytes,
        "generic_ms": generic_ms,
        "gzip_ms": gzip_ms,
        "gzip_bytes": len(compressed),
        "registry_rss_mib": (rss_populated - rss_empty) / MIB,
        "render_rss_peak_mib": rss_peak_delta / MIB,
        "render_traced_peak_mib": traced_peak / MIB,
        "repeats": repeats,
    }


def measure_multiprocess(quick: bool) -> dict[str, Any]:
    """The same set as ``measure``, in multiprocess mode (``PROMETHEUS_MULTIPROC_DIR`` set by
    the parent): values in prometheus_client's files, read back as bgtrace's ``/metrics``
    reads them, and as prometheus_client's ``MultiProcessCollector`` does."""
    directory = os.environ["PROMETHEUS_MULTIPROC_DIR"]
    registry = CollectorRegistry()
    metrics = populate(registry)
    # The values reach the files in batches: time the batch of the whole set (every series
    # changed), which the flush thread would otherwise write within a second.
    start = time.perf_counter()
    metrics.flush()
    flush_ms = (time.perf_counter() - start) * 1000
    steady_flush_us = steady_flush(metrics, 3 if quick else 15)
    # A worker's first scrape reads every key of the files; later ones the values only.
    first_ms, _ = timed(lambda: _page(registry, OPENMETRICS), 1)
    repeats = 3 if quick else 15
    text_ms, _ = timed(lambda: _page(registry, ""), repeats)
    om_ms, _ = timed(lambda: _page(registry, OPENMETRICS), repeats)

    def collector() -> bytes:
        reader = CollectorRegistry()
        MultiProcessCollector(reader)  # type: ignore[no-untyped-call]
        return generate_latest(reader)

    collector_ms, _ = timed(collector, 1)
    size = sum(entry.stat().st_size for entry in os.scandir(directory))
    return {
        "text_ms": text_ms, "openmetrics_ms": om_ms, "first_ms": first_ms,
        "collector_ms": collector_ms, "files_mib": size / MIB, "flush_ms": flush_ms,
        "steady_flush_us": steady_flush_us,
    }  # fmt: skip


def steady_flush(metrics: TaskMetrics, repeats: int) -> float:
    """Median microseconds of the flush thread's copy when 10 of the 3,000 series changed
    since the last one (a task each), the rest quiet: what a busy worker pays each second."""
    busy = [metrics.series(f"app.tasks.notifications.send_message_{t:02d}", "handler",
                           "/api/v1/accounts/{account_id}/resource_00/{item_id}")
            for t in range(10)]  # fmt: skip
    times = []
    for _ in range(repeats):
        for series in busy:
            with series.lock:
                series.queued()
                series.started(0.0004)
                series.finished(0.012, "success", None, None)
        start = time.perf_counter()
        metrics.flush()
        times.append((time.perf_counter() - start) * 1e6)
    return statistics.median(times)
