"""A stand-in worker process for tests/test_worker_files.py: counts some tasks with bgtrace and
updates one metric of each prometheus_client kind, writes them to its multiprocess files
(``PROMETHEUS_MULTIPROC_DIR``, set by the test), prints its pid and exits without the exit
hooks, leaving its files as a worker that is still alive has them.

    python tests/worker_writer.py TASK[,TASK...] ROUNDS [BUCKET,BUCKET...]
"""

from __future__ import annotations

import os
import sys

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Summary

from bgtrace.accumulators import exemplar
from bgtrace.metrics import TaskMetrics

GAUGE_MODES = ("all", "liveall", "livesum", "sum", "max", "min", "mostrecent")
BUCKETS = (0.01, 1.0)


def main(tasks: list[str], rounds: int, buckets: tuple[float, ...] = BUCKETS) -> None:
    registry = CollectorRegistry()
    metrics = TaskMetrics(registry, "", buckets, 200)
    shop = TaskMetrics(registry, "shop", (0.5,), 200)  # a second namespace, other buckets
    for _ in range(rounds):
        for task in tasks:
            for origin in ("handler", "dependency"):
                series = metrics.series(task, origin, "/orders/{id}")
                with series.lock:
                    for _ in range(4):
                        series.queued()
                    series.started(0.004)
                    series.finished(0.3, "success", None, exemplar("ab" * 16, 0.3))
                    series.started(2.0)
                    series.finished(0.02, "failure", "app.errors.MailError", None)
                    series.dropped("earlier_task_failed")  # one left queued
        shop.series("shop.bill", "handler", "/pay").queued()
        metrics.post_response_for("/orders/{id}").observe(0.7)
        # The watchdog's: a block, a heartbeat and a threadpool reading (a live-sum gauge).
        metrics.loop_blocked(tasks[0], "handler", "/orders/{id}", 0.25)
        metrics.loop_blocked("none", "other", "none", 0.125)
        metrics.loop_heartbeat(1, 0.003, (40.0, 3.0, 0.0))
    metrics.flush()
    shop.flush()

    # The app's own metrics, beside bgtrace's in the same files.
    Counter("app_logins", "Logins.", ["method"], registry=registry).labels("password").inc(3)
    histogram = Histogram("app_upload_seconds", "Uploads.", buckets=(0.1, 1.0), registry=registry)
    histogram.observe(0.05)
    histogram.observe(4.0)
    Summary("app_payload_bytes", "Payloads.", registry=registry).observe(512)
    for mode in GAUGE_MODES:
        gauge = Gauge(f"app_pool_{mode}", "Pool size.", multiprocess_mode=mode, registry=registry)
        gauge.set(len(tasks) + rounds)
    print(os.getpid())  # the name of its files


if __name__ == "__main__":
    bounds = tuple(float(b) for b in sys.argv[3].split(",")) if len(sys.argv) > 3 else BUCKETS
    main(sys.argv[1].split(","), int(sys.argv[2]), bounds)
