"""The Prometheus metrics bgtrace exports, one set per (registry, namespace).

The values are bgtrace's own (``accumulators``) in every mode. In a single process they are
exposed through a collector registered in the registry; in multiprocess mode they are copied
into prometheus_client metrics (``multiprocess.FileValues``), whose per-process files are
added up at each scrape (``worker_files``).
"""

from __future__ import annotations

import logging
import math
import threading
import weakref
from collections.abc import Callable, Iterator, Sequence
from itertools import pairwise
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.metrics_core import Metric

from . import forks, logs
from .accumulators import LocalHistogram, LocalSeries, LoopValues, Threadpool
from .families import (
    ALL_FAMILIES,
    LOOP_FAMILIES,
    WHY_FAMILIES,
    LocalValues,
    collect,
    describe,
    full_name,
    join_encoded,
    render,
)
from .multiprocess import VALUES_LOCK, FileValues, ensure_flusher, multiprocess_mode, publish

logger = logging.getLogger("bgtrace")

# Background work runs from milliseconds (an e-mail hand-off) to minutes (a file import).
DEFAULT_BUCKETS: tuple[float, ...] = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0,
)  # fmt: skip
DEFAULT_MAX_LABEL_VALUES = 200
OTHER = "other"
# Lookup keys remembered per metrics set: far above the (task, origin, route) combinations
# of a real app, and a bound on what run-time-made callables can pin in memory.
_MAX_SERIES_KEYS = 4096


class LabelLimiter:
    """Caps the distinct values of one label; past the cap every new value becomes ``other``."""

    def __init__(self, label: str, limit: int) -> None:
        self._label = label
        self._limit = limit
        self._seen: set[str] = set()
        self._lock = threading.Lock()
        forks.guard(self._lock, forks.LABELS)
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


class _LocalCollector:
    """Registers bgtrace's local values with a registry (prometheus_client's Collector)."""

    def __init__(self, metrics: TaskMetrics) -> None:
        self._metrics = metrics

    def describe(self) -> list[Metric]:
        return describe(self._metrics.namespace)

    def collect(self) -> Iterator[Metric]:
        if getattr(_rendering, "active", False):
            return iter(())  # bgtrace's /metrics writes these itself, after the rest
        return collect(self._metrics.values())


# Set in the thread that renders /metrics while it encodes the rest of the registry.
_rendering = threading.local()


Series = LocalSeries


class TaskMetrics:
    """Every bgtrace metric, registered once in one registry under one namespace."""

    def __init__(
        self,
        registry: CollectorRegistry | None,
        namespace: str,
        buckets: tuple[float, ...],
        max_label_values: int,
        implicit: bool = False,
    ) -> None:
        self.registry = registry
        self.namespace = namespace
        self.implicit = implicit
        self.buckets = buckets
        self.max_label_values = max_label_values
        self.task = LabelLimiter("task", max_label_values)
        self.route = LabelLimiter("route", max_label_values)
        self.error_type = LabelLimiter("error_type", max_label_values)
        # Lookup keys (raw and limited) to series, and the series themselves by label set.
        self._series: dict[tuple[str, str, str], Series] = {}
        self._local_series: dict[tuple[str, str, str], LocalSeries] = {}
        self._post_response: dict[str, LocalHistogram] = {}
        self._local_post_response: dict[str, LocalHistogram] = {}
        # bgtask_thread_wait_seconds by label set: def tasks only, so made at the first one.
        self._thread_wait: dict[tuple[str, str, str], LocalHistogram] = {}
        # Multiprocess mode: the series changed since the last flush (see accumulators).
        self._changed: list[LocalSeries] | None = None
        self._files: FileValues | None = None
        self._collector: _LocalCollector | None = None
        for family in (*ALL_FAMILIES, *WHY_FAMILIES, *LOOP_FAMILIES):
            full_name(namespace, family)  # a bad namespace fails here, before registering
        # Reentrant: see accumulators. In multiprocess mode, one for every set (see there).
        self._lock = VALUES_LOCK if multiprocess_mode() else threading.RLock()
        forks.guard(self._lock, forks.VALUES)
        # The event-loop watchdog's values (``watchdog``), updated from its thread.
        self.loop = LoopValues(self._lock)
        # Told of each heartbeat's lag (otel_metrics' histogram); empty unless OpenTelemetry
        # metrics are on. A tuple, replaced whole, as inflight's observers.
        self.lag_observers: tuple[Callable[[float], None], ...] = ()
        if registry is None:
            # Read by OpenTelemetry only (otel_metrics): nothing for prometheus_client.
            pass
        elif multiprocess_mode():
            self._files = FileValues(registry, namespace, buckets)
            self._changed = []
            publish(self)
        else:
            self._collector = _LocalCollector(self)
            registry.register(self._collector)

    @property
    def local(self) -> bool:
        """Whether this process's values are all there is (no multiprocess files)."""
        return self._files is None

    @property
    def lock(self) -> threading.RLock:
        """Held while a task changes state and its values (see accumulators)."""
        return self._lock

    def unregister(self) -> None:
        if self._files is not None:
            # Taken out of the registry, still flushed: tasks queued on its series before
            # (the implicit set, replaced by a middleware's) go on to the files as they end.
            self._files.unregister()
        if self._collector is not None and self.registry is not None:
            self.registry.unregister(self._collector)

    def flush(self) -> None:
        """Multiprocess mode: copy what changed to prometheus_client's files."""
        if self._files is not None and self._changed is not None:
            self._files.flush(self._changed, dict(self._local_post_response), self._lock)
            from . import stuck  # imports records, which imports this module

            self._files.flush_why(stuck.oldest_ages(self), dict(self._thread_wait), self._lock)
            self._files.flush_loop(self.loop)

    def forget_values(self) -> None:
        """Multiprocess mode, in a forked child: start from zero (see multiprocess)."""
        self._series = {}
        self._local_series = {}
        self._post_response = {}
        self._local_post_response = {}
        self._thread_wait = {}
        self.loop = LoopValues(self._lock)
        if self._files is not None:
            self._changed = []
            self._files.forget_written()

    def values(self) -> LocalValues:
        from . import stuck  # imports records, which imports this module

        return LocalValues(
            self.namespace,
            self.buckets,
            list(self._local_series.values()),
            dict(self._local_post_response),
            # Multiprocess: the files carry these (written by flush).
            stuck.oldest_ages(self) if self._files is None else None,
            dict(self._thread_wait),
            self.loop,
        )

    def thread_wait_for(self, labels: tuple[str, str, str]) -> LocalHistogram:
        """The ``bgtask_thread_wait_seconds`` histogram of a series, made at its first def
        task (before the caller takes the lock: see accumulators)."""
        found = self._thread_wait.get(labels)
        if found is None:
            with self._lock:
                found = self._thread_wait.get(labels)
                if found is None:
                    found = self._thread_wait[labels] = LocalHistogram(self.buckets, self._lock)
        return found

    def render(self, openmetrics: bool) -> list[bytes]:
        return render(self.values(), openmetrics)

    def loop_blocked(self, task: str, origin: str, route: str, seconds: float) -> None:
        """Count ``seconds`` of event loop blocked; labels as a series' (bounded the same)."""
        self.loop.add_blocked((self.task(task), origin, self.route(route)), seconds)
        if self._files is not None:
            ensure_flusher()

    def loop_heartbeat(self, loop: int, lag: float, threadpool: Threadpool | None) -> None:
        """One heartbeat of the watchdog on event loop ``loop``: its lag, and the loop's
        threadpool reading (``None``: not read, or the loop is gone)."""
        self.loop.observe_lag(lag)
        self.loop.set_threadpool(loop, threadpool)
        if self._files is not None:
            ensure_flusher()
        for observer in self.lag_observers:
            try:
                observer(lag)
            except Exception:
                logs.internal_error("loop lag observer")

    def add_lag_observer(self, observer: Callable[[float], None]) -> None:
        if observer not in self.lag_observers:
            self.lag_observers = (*self.lag_observers, observer)

    def remove_lag_observer(self, observer: Callable[[float], None]) -> None:
        self.lag_observers = tuple(o for o in self.lag_observers if o != observer)

    def post_response_for(self, route: str) -> LocalHistogram:
        """The ``bgtask_post_response_seconds`` histogram for ``route``, looked up once."""
        found = self._post_response.get(route)
        if found is None:
            label = self.route(route)
            with self._lock:
                found = self._local_post_response.get(label)
                if found is None:
                    found = LocalHistogram(self.buckets, self._lock)
                    self._local_post_response[label] = found
                if len(self._post_response) < _MAX_SERIES_KEYS:
                    self._post_response[route] = found
            if self._files is not None:
                ensure_flusher()
        return found

    def series(self, task: str, origin: str, route: str) -> Series:
        key = (task, origin, route)
        found = self._series.get(key)
        if found is not None:
            return found
        labels = (self.task(task), origin, self.route(route))
        with self._lock:
            found = self._series.get(labels)
            if found is None:
                found = LocalSeries(labels, self.buckets, self._lock, self._changed)
                self._local_series[labels] = found
                self._series[labels] = found
            # Remember the raw key too, so the next lookup skips the limiters; past the bound
            # (one-off callables made at run time), lookups just take the slower path.
            if len(self._series) < _MAX_SERIES_KEYS:
                self._series[key] = found
        if self._files is not None:
            # Values exist now: this process writes them (a forked child starts its thread).
            ensure_flusher()
        return found


_by_registry: weakref.WeakKeyDictionary[CollectorRegistry, dict[str, TaskMetrics]] = (
    weakref.WeakKeyDictionary()
)
_by_registry_lock = threading.Lock()
forks.guard(_by_registry_lock, forks.REGISTRIES)


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
    wanted = _bounds(buckets) if buckets is not None else DEFAULT_BUCKETS
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


def _bounds(buckets: Sequence[float]) -> tuple[float, ...]:
    """Histogram upper bounds as prometheus_client takes them: ``+Inf`` is always added, so a
    trailing one (``Histogram.DEFAULT_BUCKETS`` has it) is dropped; ascending, at least one."""
    bounds = [float(b) for b in buckets]
    if bounds and bounds[-1] == math.inf:
        bounds.pop()
    ascending = all(a < b for a, b in pairwise(bounds))
    if not bounds or not ascending or not all(map(math.isfinite, bounds)):
        raise ValueError(f"buckets must be finite and ascending (+Inf is added), got {buckets}")
    return tuple(bounds)


def local_sets(registry: CollectorRegistry) -> list[TaskMetrics]:
    """The metrics sets in ``registry`` whose values ``/metrics`` writes from this process's
    memory (single-process mode: not added up from files)."""
    with _by_registry_lock:
        return [m for m in _by_registry.get(registry, {}).values() if m.local]


def render_registry(
    registry: CollectorRegistry, encoder: Callable[[Any], bytes], openmetrics: bool
) -> bytes:
    """``registry`` in the encoder's format, bgtrace's own families written directly."""
    owned = local_sets(registry)
    if not owned:
        return encoder(registry)
    _rendering.active = True
    try:
        rest = encoder(registry)
    finally:
        _rendering.active = False
    pieces = [piece for m in owned for piece in m.render(openmetrics)]
    return join_encoded(rest, pieces, openmetrics)
