"""gunicorn with uvicorn workers for an app under bgtrace's middleware.

    export PROMETHEUS_MULTIPROC_DIR=/run/bgtrace-metrics
    gunicorn -c examples/gunicorn.conf.py bgtrace.demo.app:app

PROMETHEUS_MULTIPROC_DIR must name an empty directory (a tmpfs in a container) before gunicorn
starts: every worker writes its values there and /metrics adds them up.
"""

import os

from prometheus_client import multiprocess

worker_class = "uvicorn_worker.UvicornWorker"
workers = int(os.environ.get("WEB_CONCURRENCY", "2"))
bind = os.environ.get("BIND", "0.0.0.0:8000")
# Recycling workers is safe for the counts: a recycled worker's totals stay in the sums.
max_requests = 1000
max_requests_jitter = 100
timeout = 30


def child_exit(server, worker):  # type: ignore[no-untyped-def]
    # A worker gunicorn killed (its --timeout: SIGABRT, then SIGKILL) runs no exit code of its
    # own: drop its live-sum gauges here, or /metrics reports its queued and running tasks
    # for ever. Its counters and histograms stay in the totals.
    multiprocess.mark_process_dead(worker.pid)
