"""The live page: this worker process's background tasks in a browser, no Grafana needed.

Served by the middleware at ``tasks_path``: a self-contained HTML page (``page.html``, no CDN,
no framework) that asks the same path for JSON every 2 s. The JSON is built from what bgtrace
already keeps: the tasks in flight (``inflight``), the per-series values ``/metrics`` is
rendered from, and two small rings of recent failures and drops filled by an observer. Task
arguments and exception messages are never read.
"""

from __future__ import annotations

import json
import os
import secrets
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from importlib import resources
from time import perf_counter
from typing import Any
from urllib.parse import parse_qs

from opentelemetry import trace
from starlette.types import ASGIApp, Receive, Scope, Send

from . import inflight, logs, watchdog
from .accumulators import LocalHistogram, quantile_of
from .exposition import authorized, token_secret
from .metrics import TaskMetrics
from .records import FAILURE, RUNNING, TaskRecord, sampled_trace_id

TRACE_URL_ENV = "BGTRACE_TRACE_URL"
# The JSON's shape; a field is only ever added within a version.
FORMAT_VERSION = 1
RECENT_FAILURES = 100
RECENT_DROPS = 100

# What the page shows of the event loop and the threadpool for a metrics set: a flat mapping of
# names to numbers or short strings, shown as it is, or None ("not available"). The event-loop
# watchdog's values by default (``watchdog.diagnostics``); replaceable, or None for nothing.
DiagnosticsProvider = Callable[[TaskMetrics], Mapping[str, object] | None]
diagnostics_provider: DiagnosticsProvider | None = watchdog.diagnostics


class RecentEnds(inflight.TaskObserver):
    """The task observer behind the page: the last failures and drops of this process."""

    def __init__(self) -> None:
        self.failures: deque[dict[str, Any]] = deque(maxlen=RECENT_FAILURES)
        self.drops: deque[dict[str, Any]] = deque(maxlen=RECENT_DROPS)

    def finished(
        self,
        record: TaskRecord,
        elapsed: float,
        outcome: str,
        error_type: str | None,
        exc: BaseException | None,
    ) -> None:
        if outcome != FAILURE:
            return
        span = record.span
        self.failures.append(
            {
                "time": time.time(),
                "task": record.name,
                "origin": record.origin,
                "route": record.route,
                "error_type": error_type,
                "run_seconds": elapsed,
                "trace_id": sampled_trace_id(span) if span is not None else None,
            }
        )

    def dropped(self, record: TaskRecord, reason: str) -> None:
        self.drops.append(
            {
                "time": time.time(),
                "task": record.name,
                "origin": record.origin,
                "route": record.route,
                "reason": reason,
            }
        )


_recent: RecentEnds | None = None
_recent_lock = threading.Lock()


def recent_ends() -> RecentEnds:
    """The process's one observer, joined when the first page is configured."""
    global _recent
    with _recent_lock:
        if _recent is None:
            _recent = RecentEnds()
            inflight.add_observer(_recent)
        return _recent


def _fork_reset() -> None:
    # A forked worker's page starts from its own ends, as its metrics start from zero.
    if _recent is not None:
        _recent.failures.clear()
        _recent.drops.clear()


os.register_at_fork(after_in_child=_fork_reset)


def quantile(q: float, histogram: LocalHistogram) -> float | None:
    """Estimated as Prometheus' ``histogram_quantile`` does from these buckets."""
    return quantile_of(q, histogram.bounds, list(histogram.counts))


def _trace_id_of(record: TaskRecord) -> str | None:
    """A running task's own trace; a queued one's is its request's (where its span will go,
    or what it will link to)."""
    span = record.span
    if span is not None:
        return sampled_trace_id(span)
    parent = record.parent
    if parent is None:
        return None
    context = trace.get_current_span(parent).get_span_context()
    return format(context.trace_id, "032x") if context.trace_flags.sampled else None


def snapshot(metrics: TaskMetrics, trace_url: str | None) -> dict[str, Any]:
    """What the page shows, as the documented JSON (``FORMAT_VERSION``)."""
    now = perf_counter()
    recent = recent_ends()

    def link(trace_id: str | None) -> str | None:
        return trace_url.replace("{trace_id}", trace_id) if trace_url and trace_id else None

    running: list[dict[str, Any]] = []
    queued: list[dict[str, Any]] = []
    for record in inflight.snapshot():
        trace_id = _trace_id_of(record)
        row: dict[str, Any] = {"task": record.name, "origin": record.origin, "route": record.route}
        if record.status == RUNNING:
            row["age_seconds"] = now - record.started_at
            row["waiting_at"] = record.waiting_at
            target = running
        else:
            row["waiting_seconds"] = now - record.enqueued_at
            target = queued
        row["trace_id"] = trace_id
        row["trace_url"] = link(trace_id)
        target.append(row)
    failures = [
        {**failure, "trace_url": link(failure["trace_id"])}
        for failure in reversed(list(recent.failures))
    ]
    dropped = list(reversed(list(recent.drops)))
    diagnostics: dict[str, object] | None = None
    provider = diagnostics_provider
    if provider is not None:
        try:
            found = provider(metrics)
            diagnostics = None if found is None else {str(k): v for k, v in found.items()}
        except Exception:
            logs.internal_error("live page diagnostics")
    return {
        "version": FORMAT_VERSION,
        "pid": os.getpid(),
        "time": time.time(),
        "running": running,
        "queued": queued,
        "failures": failures,
        "dropped": dropped,
        "tasks": _per_task(metrics),
        "diagnostics": diagnostics,
    }


def _per_task(metrics: TaskMetrics) -> list[dict[str, Any]]:
    """One row per task name since the process started, summed over origins and routes."""
    sums: dict[str, dict[str, Any]] = {}
    with metrics.lock:
        for s in metrics.values().series:
            task = s.labels[0]
            row = sums.get(task)
            if row is None:
                row = sums[task] = {
                    "task": task, "enqueued": 0, "completed": 0, "failed": 0, "dropped": 0,
                    "run": [0] * len(s.duration.counts), "wait": [0] * len(s.queue_wait.counts),
                }  # fmt: skip
            row["enqueued"] += s.enqueued
            row["completed"] += sum(s.completed.values())
            row["failed"] += s.completed["failure"]
            row["dropped"] += sum(s.drops.values())
            for i, count in enumerate(s.duration.counts):
                row["run"][i] += count
            for i, count in enumerate(s.queue_wait.counts):
                row["wait"][i] += count
        loop = metrics.loop
        blocked: dict[str, float] = {}
        for (task, _origin, _route), seconds in loop.blocked.items():
            blocked[task] = blocked.get(task, 0.0) + seconds
    bounds = metrics.buckets
    rows = []
    for task in sorted(sums):
        row = sums[task]
        run, wait = row.pop("run"), row.pop("wait")
        row["run_p50_seconds"] = quantile_of(0.5, bounds, run)
        row["run_p95_seconds"] = quantile_of(0.95, bounds, run)
        row["wait_p50_seconds"] = quantile_of(0.5, bounds, wait)
        row["wait_p95_seconds"] = quantile_of(0.95, bounds, wait)
        row["loop_blocked_seconds"] = blocked.get(task, 0.0)
        rows.append(row)
    return rows


def _html() -> str:
    return resources.files(__package__).joinpath("page.html").read_text("utf-8")


def _wants_json(scope: Scope) -> bool:
    query = parse_qs(bytes(scope.get("query_string", b"")).decode("latin-1"))
    if query.get("format") == ["json"]:
        return True
    for key, value in scope.get("headers", ()):
        if key.lower() == b"accept":
            return b"application/json" in bytes(value).lower()
    return False


def _json_bytes(data: object) -> bytes:
    text = json.dumps(data, separators=(",", ":"), allow_nan=False)
    # Never markup, whatever reads it: a task name cannot close a tag anywhere.
    text = text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
    return text.encode()


def tasks_app(
    metrics: TaskMetrics, *, token: str | None = None, trace_url: str | None = None
) -> ASGIApp:
    """The live page of this worker process, for ``metrics``' per-task values.

    ``token`` (default ``BGTRACE_METRICS_TOKEN``) guards the data as it guards ``/metrics``:
    the JSON needs ``Authorization: Bearer <token>``. The HTML itself holds no data; the
    browser passes the token once in the URL fragment (``#token=...``, never sent to a
    server) or the query, and the page keeps it in memory for its requests.
    """
    expected = token_secret(token)
    url = trace_url if trace_url is not None else os.environ.get(TRACE_URL_ENV) or None
    if url is not None and "{trace_id}" not in url:
        raise ValueError(f"trace_url must contain '{{trace_id}}', got {url!r}")
    if url is not None and not url.startswith(("http://", "https://", "/")):
        raise ValueError(f"trace_url must be an http(s) URL or a path, got {url!r}")
    recent_ends()
    template = _html()

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        method = scope.get("method")
        if method not in ("GET", "HEAD"):
            await _respond(
                send, 405, b"Method Not Allowed\n", "text/plain", [(b"allow", b"GET, HEAD")]
            )
            return
        head = method == "HEAD"
        if _wants_json(scope):
            if expected is not None and not authorized(scope, expected):
                challenge = [(b"www-authenticate", b'Bearer realm="metrics"')]
                await _respond(
                    send, 401, b'{"error":"unauthorized"}', "application/json", challenge
                )
                return
            try:
                body = _json_bytes(snapshot(metrics, url))
            except Exception:
                logs.internal_error("live page")
                await _respond(send, 500, b'{"error":"internal"}', "application/json", [])
                return
            await _respond(send, 200, body, "application/json", [], head=head)
            return
        # A fresh nonce per response: only the page's own script and style may run, so even
        # markup that slipped into the document could not execute.
        nonce = secrets.token_urlsafe(18)
        body = template.replace("{{nonce}}", nonce).encode()
        csp = (
            f"default-src 'none'; script-src 'nonce-{nonce}'; style-src 'nonce-{nonce}'; "
            "connect-src 'self'; img-src 'self'; base-uri 'none'; form-action 'none'; "
            "frame-ancestors 'none'"
        )
        extra = [(b"content-security-policy", csp.encode()), (b"x-frame-options", b"DENY")]
        await _respond(send, 200, body, "text/html; charset=utf-8", extra, head=head)

    return app


async def _respond(
    send: Send,
    status: int,
    body: bytes,
    content_type: str,
    extra: list[tuple[bytes, bytes]],
    *,
    head: bool = False,
) -> None:
    headers = [
        (b"content-type", content_type.encode("latin-1")),
        (b"content-length", str(len(body)).encode("latin-1")),
        (b"cache-control", b"no-store"),
        (b"x-content-type-options", b"nosniff"),
        (b"referrer-policy", b"no-referrer"),
        (b"vary", b"Accept"),
        *extra,
    ]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": b"" if head else body})
