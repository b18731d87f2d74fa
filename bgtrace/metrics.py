"""The Prometheus metrics bgtrace exports, one set per (registry, namespace)."""

from __future__ import annotations

import logging
import threading
import weakref
from collections.abc import Sequence
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

logger = logging.getLogger("bgtrace")

# Background work runs from milliseconds (an e-mail hand-off) to minutes (a file import).
DEFAULT_BUCKETS: tuple[float, ...] = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0,
)  # fmt: skip
DEFAULT_MAX_LABEL_VALUES = 200
OTHER = "other"
TASK_LABELS = ("task", "origin", "route")
# Lookup keys remembered per metrics set: far above the (task, origin, route) combinations
# of a real app, and a bound on what run-time-made callables can pin in memory.
_MAX_SERIES_KEYS = 4096

OUTCOMES = ("success", "failure", "cancelled")
DROP_REASONS = ("request_error", "earlier_task_failed", "cancelled", "not_attached")


class LabelLimiter:
    """Caps the distinct values of one label; past the cap every new value becomes ``other``."""

    def __init__(self, label: str, limit: int) -> None:
        self._label = label
        self._limit = limit
        self._seen: set[str] = set()
        self._lock = threading.Lock()
        self._warned = False

    def __call__(self, value: str) -> str:
        if value in self._seen:
            return value
        with self._lock:
            if value in self._seen or len(self._seen) < self._limit:
                self._seen.add(value)
                return value
            if not self._warned:
                self._warned = True
                logger.warning(
                    "bgtrace: label %r reached %d distinct values; further values are "
                    "reported as %r (raise max_label_values to keep more)",
                    self._label,
                    self._limit,
                    OTHER,
                )
        return OTHER


class TaskSeries:
    """The labelled children of every per-task metric for one (task, origin, route)."""

    __slots__ = (
        "_metrics", "completed", "duration", "enqueued", "in_progress",
        "labels", "queue_length", "queue_wait",
    )  # fmt: skip

    def __init__(self, metrics: TaskMetrics, labels: tuple[str, str, str]) -> None:
        self._metrics = metrics
        self.labels = labels
        self.enqueued = metrics.enqueued.labels(*labels)
        self.queue_length = metrics.queue_length.labels(*labels)
        self.in_progress = metrics.in_progress.labels(*labels)
        self.queue_wait = metrics.queue_wait.labels(*labels)
        self.duration = metrics.duration.labels(*labels)
        # Created up front at zero so that failure ratios and rate() see the series from the
        # first scrape, not only after the first failure.
        self.completed = {o: metrics.completed.labels(*labels, o) for o in OUTCOMES}

    def count_failure(self, error_type: str) -> None:
        self._metrics.failures.labels(*self.labels, self._metrics.error_type(error_type)).inc()

    def count_drop(self, reason: str) -> None:
        self._metrics.dropped.labels(*self.labels, reason).inc()


class TaskMetrics:
    """Every bgtrace metric, registered once in one registry under one namespace."""

    def __init__(
        self,
        registry: CollectorRegistry,
        namespace: str,
        buckets: tuple[float, ...],
        max_label_values: int,
        implicit: bool = False,
    ) -> None:
        self.registry = registry
        self.implicit = implicit
        self.buckets = buckets
        self.max_label_values = max_label_values
        self.enqueued = Counter(
            "bgtask_enqueued",
            "Background tasks queued.",
            TASK_LABELS,
            namespace=namespace,
            registry=registry,
        )
        self.completed = Counter(
            "bgtask_completed",
            "Background tasks that ran to an end, by outcome.",
            (*TASK_LABELS, "outcome"),
            namespace=namespace,
            registry=registry,
        )
        self.failures = Counter(
            "bgtask_failures",
            "Background tasks that raised, by exception type.",
            (*TASK_LABELS, "error_type"),
            namespace=namespace,
            registry=registry,
        )
        self.dropped = Counter(
            "bgtask_dropped",
            "Background tasks queued but never started, by reason.",
            (*TASK_LABELS, "reason"),
            namespace=namespace,
            registry=registry,
        )
        self.duration = Histogram(
            "bgtask_duration_seconds",
            "Background task run time, start to end.",
            TASK_LABELS,
            buckets=buckets,
            namespace=namespace,
            registry=registry,
        )
        self.queue_wait = Histogram(
            "bgtask_queue_wait_seconds",
            "Time from queuing a background task to its start.",
            TASK_LABELS,
            buckets=buckets,
            namespace=namespace,
            registry=registry,
        )
        # livesum: with several worker processes the gauge is the sum over live workers.
        self.queue_length = Gauge(
            "bgtask_queue_length",
            "Background tasks queued and not yet started.",
            TASK_LABELS,
            multiprocess_mode="livesum",
            namespace=namespace,
            registry=registry,
        )
        self.in_progress = Gauge(
            "bgtask_in_progress",
            "Background tasks running now.",
            TASK_LABELS,
            multiprocess_mode="livesum",
            namespace=namespace,
            registry=registry,
        )
        self.post_response = Histogram(
            "bgtask_post_response_seconds",
            "Time from the last response byte to the end of the request's background work.",
            ("route",),
            buckets=buckets,
            namespace=namespace,
            registry=registry,
        )
        self.task = LabelLimiter("task", max_label_values)
        self.route = LabelLimiter("route", max_label_values)
        self.error_type = LabelLimiter("error_type", max_label_values)
        self._series: dict[tuple[str, str, str], TaskSeries] = {}
        self._post_response: dict[str, Any] = {}
        self._lock = threading.Lock()

    def unregister(self) -> None:
        for metric in (
            self.enqueued, self.completed, self.failures, self.dropped, self.duration,
            self.queue_wait, self.queue_length, self.in_progress, self.post_response,
        ):  # fmt: skip
            self.registry.unregister(metric)

    def post_response_for(self, route: str) -> Any:
        """The ``bgtask_post_response_seconds`` child for ``route``, looked up once."""
        child = self._post_response.get(route)
        if child is None:
            child = self.post_response.labels(self.route(route))
            if len(self._post_response) < _MAX_SERIES_KEYS:
                self._post_response[route] = child
        return child

    def series(self, task: str, origin: str, route: str) -> TaskSeries:
        key = (task, origin, route)
        found = self._series.get(key)
        if found is not None:
            return found
        labels = (self.task(task), origin, self.route(route))
        with self._lock:
            found = self._series.get(labels)
            if found is None:
                found = self._series[labels] = TaskSeries(self, labels)
            # Remember the raw key too, so the next lookup skips the limiters; past the bound
            # (one-off callables made at run time), lookups just take the slower path.
            if len(self._series) < _MAX_SERIES_KEYS:
                self._series[key] = found
        return found


_by_registry: weakref.WeakKeyDictionary[CollectorRegistry, dict[str, TaskMetrics]] = (
    weakref.WeakKeyDictionary()
)
_by_registry_lock = threading.Lock()


def task_metrics(
    registry: CollectorRegistry,
    namespace: str = "",
    buckets: Sequence[float] | None = None,
    max_label_values: int = DEFAULT_MAX_LABEL_VALUES,
    *,
    implicit: bool = False,
) -> TaskMetrics:
    """Return the metrics for ``registry`` and ``namespace``, creating them once.

    Several middlewares or apps in one process share one set, so test suites never hit
    prometheus_client's "Duplicated timeseries" error. ``implicit`` is bgtrace's own default
    for tasks outside any request: it takes whatever set exists, and gives way to the first
    middleware that asks for other buckets (a middleware is built at the first request,
    possibly after such a task).
    """
    wanted = tuple(float(b) for b in buckets) if buckets is not None else DEFAULT_BUCKETS
    if max_label_values < 1:
        raise ValueError(f"max_label_values must be at least 1, got {max_label_values}")
    with _by_registry_lock:
        per_namespace = _by_registry.setdefault(registry, {})
        existing = per_namespace.get(namespace)
        differs = existing is not None and (
            existing.buckets != wanted or existing.max_label_values != max_label_values
        )
        if existing is not None and existing.implicit and differs and not implicit:
            existing.unregister()
            existing = None
        if existing is None:
            existing = per_namespace[namespace] = TaskMetrics(
                registry, namespace, wanted, max_label_values, implicit
            )
        elif differs and not implicit:
            raise ValueError(
                "bgtrace metrics already exist in this registry under namespace "
                f"{namespace!r} with buckets={existing.buckets} and "
                f"max_label_values={existing.max_label_values}; pass the same values, "
                "another namespace, or another registry"
            )
        return existing
