"""bgtrace's task metrics through OpenTelemetry instruments, for a ``meter_provider``.

The counters and gauges are observable instruments read from bgtrace's own values at each
collection (the numbers ``/metrics`` shows, exact by construction, and nothing per task): the
task counts, the oldest ages of the tasks in flight (``stuck.oldest_ages``), the watchdog's
blocked time and threadpool reading. The histograms are recorded as tasks start and end, by a
task observer (``inflight``), at the end of each request's background work
(``records.post_response_observers``), and at each watchdog heartbeat
(``TaskMetrics.lag_observers``).

Names are bgtrace's Prometheus names without the suffixes OpenTelemetry's Prometheus
translation adds (``_total`` for a monotonic sum, ``_seconds`` for unit ``s``), so that the
translation gives back exactly ``bgtask_enqueued_total`` and ``bgtask_duration_seconds``, and
attributes are the label names: one dashboard and one set of alert rules for both paths.
"""

from __future__ import annotations

import logging
import os
import re
import threading
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING

from opentelemetry import metrics as otel_metrics
from opentelemetry.metrics import CallbackOptions, Histogram, MeterProvider, Observation

from . import __version__, inflight, records, stuck
from .accumulators import LAG_BUCKETS
from .families import (
    COMPLETED,
    DROPPED,
    DURATION,
    ENQUEUED,
    FAILURES,
    IN_PROGRESS,
    LOOP_BLOCKED,
    LOOP_LAG,
    OLDEST_QUEUED,
    OLDEST_RUNNING,
    POST_RESPONSE,
    QUEUE_LENGTH,
    QUEUE_WAIT,
    THREAD_WAIT,
    THREADPOOL_BORROWED,
    THREADPOOL_FAMILIES,
    THREADPOOL_TOKENS,
    THREADPOOL_WAITING,
    Family,
    full_name,
)
from .metrics import DEFAULT_BUCKETS, TaskMetrics
from .metrics import _bounds as bounds

if TYPE_CHECKING:
    from .accumulators import LocalSeries
    from .records import TaskRecord

logger = logging.getLogger("bgtrace")

# ``global``: record into OpenTelemetry's global meter provider when no ``meter_provider`` is
# given. Never by default: a service whose global provider already pushes its HTTP metrics
# would otherwise send bgtrace's series a second time beside the /metrics that is scraped.
ENV = "BGTRACE_OTEL_METRICS"
SCOPE = "bgtrace"
SECONDS = "s"
# Counts carry no unit: a UCUM annotation ("{task}") is dropped by the translation, but
# exporters older than the specification's rules (opentelemetry-exporter-prometheus before
# 0.46b0) append it and fail on the invalid name, for every metric of their registry.
COUNT = ""
# OpenTelemetry's instrument name syntax (the API refuses others); a namespace must fit it.
_INSTRUMENT_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_.\-/]{0,254}$")


def resolve_provider(meter_provider: MeterProvider | None) -> MeterProvider | None:
    """The provider to record into: the one given, else the global one when ``ENV`` says
    ``global`` (looked up now; a provider set later is used through OpenTelemetry's proxy),
    else none."""
    if meter_provider is not None:
        return meter_provider
    wanted = os.environ.get(ENV, "").strip().lower()
    if wanted == "global":
        return otel_metrics.get_meter_provider()
    if wanted not in ("", "none", "off"):
        _warn_once(f"{ENV}={wanted!r} is not 'global': OpenTelemetry metrics stay off")
    return None


def unit(family: Family) -> str:
    return SECONDS if family.name.endswith("_seconds") else COUNT


def instrument_name(namespace: str, family: Family) -> str:
    """The OpenTelemetry name of ``family``: its Prometheus name without the suffix the
    translation adds back (``_seconds`` comes from the unit; ``_total`` from a counter's
    monotonic sum, and bgtrace's family names carry none)."""
    name = full_name(namespace, family)
    if unit(family) == SECONDS:
        name = name.removesuffix("_seconds")
    if not _INSTRUMENT_NAME.match(name):
        raise ValueError(
            f"namespace {namespace!r} makes no valid OpenTelemetry instrument name ({name!r}): "
            "with a meter_provider it must start with a letter and hold no ':'"
        )
    return name


class OtelRecorder(inflight.TaskObserver):
    """One metrics set recorded into one meter provider (shared, see ``recorder_for``)."""

    def __init__(self, metrics: TaskMetrics, provider: MeterProvider) -> None:
        self.metrics = metrics
        self.provider = provider
        namespace = metrics.namespace
        names = {family: instrument_name(namespace, family) for family in _ALL}
        meter = provider.get_meter(SCOPE, __version__)

        def histogram(family: Family, buckets: Sequence[float] = metrics.buckets) -> Histogram:
            name, help = names[family], family.help
            try:
                # Explicit bucket advice (opentelemetry-api 1.23+, honoured by the SDK 1.23+).
                return meter.create_histogram(
                    name, SECONDS, help, explicit_bucket_boundaries_advisory=list(buckets)
                )
            except TypeError:
                # An older API: the bounds come from a View (the README shows it).
                return meter.create_histogram(name, SECONDS, help)

        self.duration = histogram(DURATION)
        self.queue_wait = histogram(QUEUE_WAIT)
        self.post_response = histogram(POST_RESPONSE)
        self.thread_wait = histogram(THREAD_WAIT)
        self.loop_lag = histogram(LOOP_LAG, LAG_BUCKETS)
        for family, callback in (
            (ENQUEUED, self._enqueued),
            (COMPLETED, self._completed),
            (FAILURES, self._failures),
            (DROPPED, self._dropped),
            (LOOP_BLOCKED, self._loop_blocked),
        ):
            meter.create_observable_counter(names[family], [callback], unit(family), family.help)
        for family, callback in (
            (QUEUE_LENGTH, self._queue_length),
            (IN_PROGRESS, self._in_progress),
        ):
            meter.create_observable_up_down_counter(names[family], [callback], COUNT, family.help)
        # Values read now, not sums of changes: asynchronous gauges (Prometheus gauges too).
        for family, callback in (
            (OLDEST_RUNNING, self._oldest_running),
            (OLDEST_QUEUED, self._oldest_queued),
            (THREADPOOL_TOKENS, self._threadpool_tokens),
            (THREADPOOL_BORROWED, self._threadpool_borrowed),
            (THREADPOOL_WAITING, self._threadpool_waiting),
        ):
            meter.create_observable_gauge(names[family], [callback], unit(family), family.help)
        # The attributes of each series, made once: a histogram record then allocates nothing.
        self._attributes: dict[LocalSeries, dict[str, str]] = {}
        self._routes: dict[str, dict[str, str]] = {}

    # --- histograms, as tasks move (a TaskObserver) ---------------------------------------

    def started(self, record: TaskRecord) -> None:
        if record.config.metrics is self.metrics:
            attributes = self._series_attributes(record.series)
            self.queue_wait.record(record.started_at - record.enqueued_at, attributes)
            if record.claimed_at:
                # A def task, claimed for a thread: the wait bgtrace's own histogram counts
                # (records.TaskRecord.start), from the same two times.
                self.thread_wait.record(record.started_at - record.claimed_at, attributes)

    def finished(
        self,
        record: TaskRecord,
        elapsed: float,
        outcome: str,
        error_type: str | None,
        exc: BaseException | None,
    ) -> None:
        if record.config.metrics is self.metrics:
            # Recorded while the task's span is still current: an SDK with exemplars on links
            # the duration to the task's trace, as /metrics does.
            self.duration.record(elapsed, self._series_attributes(record.series))

    def post_response_ended(self, metrics: TaskMetrics, route: str, seconds: float) -> None:
        if metrics is self.metrics:
            attributes = self._routes.get(route)
            if attributes is None:
                attributes = self._routes[route] = {"route": metrics.route(route)}
            self.post_response.record(seconds, attributes)

    def loop_lag_observed(self, seconds: float) -> None:
        self.loop_lag.record(seconds, _NO_ATTRIBUTES)

    def _series_attributes(self, series: LocalSeries) -> dict[str, str]:
        attributes = self._attributes.get(series)
        if attributes is None:
            task, origin, route = series.labels
            attributes = self._attributes[series] = {
                "task": task,
                "origin": origin,
                "route": route,
            }
        return attributes

    # --- counters and gauges, read at each collection -------------------------------------

    def _series(self) -> list[LocalSeries]:
        return list(self.metrics.values().series)

    def _enqueued(self, options: CallbackOptions) -> Iterable[Observation]:
        return [Observation(s.enqueued, _labels(s)) for s in self._series()]

    def _completed(self, options: CallbackOptions) -> Iterable[Observation]:
        return _by(self._series(), "outcome", lambda s: s.completed)

    def _failures(self, options: CallbackOptions) -> Iterable[Observation]:
        return _by(self._series(), "error_type", lambda s: s.failures)

    def _dropped(self, options: CallbackOptions) -> Iterable[Observation]:
        return _by(self._series(), "reason", lambda s: s.drops)

    def _queue_length(self, options: CallbackOptions) -> Iterable[Observation]:
        return [Observation(s.queue_length, _labels(s)) for s in self._series()]

    def _in_progress(self, options: CallbackOptions) -> Iterable[Observation]:
        return [Observation(s.in_progress, _labels(s)) for s in self._series()]

    def _oldest_running(self, options: CallbackOptions) -> Iterable[Observation]:
        return self._oldest(0)

    def _oldest_queued(self, options: CallbackOptions) -> Iterable[Observation]:
        return self._oldest(1)

    def _oldest(self, index: int) -> list[Observation]:
        ages = stuck.oldest_ages(self.metrics)
        # Every series, at 0 when it has no task now, as /metrics writes them: alerts resolve.
        return [Observation(ages.get(s.labels, _NO_AGE)[index], _labels(s)) for s in self._series()]

    def _loop_blocked(self, options: CallbackOptions) -> Iterable[Observation]:
        loop = self.metrics.loop  # read each time: a forked child gets new values
        with loop.lock:
            blocked = list(loop.blocked.items())
        return [Observation(seconds, _as_attributes(labels)) for labels, seconds in blocked]

    def _threadpool_tokens(self, options: CallbackOptions) -> Iterable[Observation]:
        return self._threadpool(0)

    def _threadpool_borrowed(self, options: CallbackOptions) -> Iterable[Observation]:
        return self._threadpool(1)

    def _threadpool_waiting(self, options: CallbackOptions) -> Iterable[Observation]:
        return self._threadpool(2)

    def _threadpool(self, index: int) -> list[Observation]:
        """(tokens, borrowed, waiting)[index], summed over the watched loops; 0 before the
        first reading, as /metrics writes it."""
        loop = self.metrics.loop
        with loop.lock:
            reading = loop.threadpool()
        return [Observation(reading[index], _NO_ATTRIBUTES)]

    # --- switched on and off (the benchmark interleaves variants) -------------------------

    def start(self) -> None:
        inflight.add_observer(self)
        records.add_post_response_observer(self.post_response_ended)
        self.metrics.add_lag_observer(self.loop_lag_observed)

    def stop(self) -> None:
        inflight.remove_observer(self)
        records.remove_post_response_observer(self.post_response_ended)
        self.metrics.remove_lag_observer(self.loop_lag_observed)


_ALL = (
    ENQUEUED, COMPLETED, FAILURES, DROPPED, DURATION, QUEUE_WAIT, QUEUE_LENGTH, IN_PROGRESS,
    POST_RESPONSE, OLDEST_RUNNING, OLDEST_QUEUED, THREAD_WAIT, LOOP_BLOCKED, LOOP_LAG,
    *THREADPOOL_FAMILIES,
)  # fmt: skip
_NO_AGE = (0.0, 0.0)
_NO_ATTRIBUTES: dict[str, str] = {}


def _labels(series: LocalSeries) -> dict[str, str]:
    return _as_attributes(series.labels)


def _as_attributes(labels: tuple[str, str, str]) -> dict[str, str]:
    task, origin, route = labels
    return {"task": task, "origin": origin, "route": route}


def _by(
    series: Sequence[LocalSeries], key: str, counts: Callable[[LocalSeries], dict[str, int]]
) -> list[Observation]:
    # list(): one C call, safe while a task adds a key in another thread (as families does).
    return [
        Observation(count, {**_labels(s), key: value})
        for s in series
        for value, count in list(counts(s).items())
    ]


# One recorder per (metrics set, meter provider): instruments made twice under one meter would
# be one instrument whose second callbacks the SDK ignores, and two recorders of one set would
# record each histogram value twice. Kept for the life of the process, as metrics sets are.
_recorders: dict[tuple[int, int], OtelRecorder] = {}
_recorders_lock = threading.Lock()


def recorder_for(metrics: TaskMetrics, provider: MeterProvider) -> OtelRecorder:
    key = (id(metrics), id(provider))
    with _recorders_lock:
        found = _recorders.get(key)
        if found is None:
            # The recorder holds both: their ids stay theirs while the key exists.
            found = _recorders[key] = OtelRecorder(metrics, provider)
            found.start()
        return found


# Metrics sets that only OpenTelemetry reads (``metrics_path=None``, no ``registry``): one per
# (meter provider, namespace), as a registry holds one per namespace; the provider is kept.
_unexposed: dict[tuple[int, str], tuple[MeterProvider, TaskMetrics]] = {}


def unexposed_metrics(
    provider: MeterProvider,
    namespace: str,
    buckets: Sequence[float] | None,
    max_label_values: int,
) -> TaskMetrics:
    """A metrics set registered in no prometheus_client registry and written to no
    multiprocess file: bgtrace's own values, for ``provider`` alone."""
    wanted = bounds(buckets) if buckets is not None else DEFAULT_BUCKETS
    if max_label_values < 1:
        raise ValueError(f"max_label_values must be at least 1, got {max_label_values}")
    key = (id(provider), namespace)
    with _recorders_lock:
        found = _unexposed.get(key)
        if found is None:
            metrics = TaskMetrics(None, namespace, wanted, max_label_values)
            _unexposed[key] = (provider, metrics)
            return metrics
        metrics = found[1]
    if metrics.buckets != wanted or metrics.max_label_values != max_label_values:
        raise ValueError(
            "bgtrace metrics already exist for this meter provider under namespace "
            f"{namespace!r} with buckets={metrics.buckets} and "
            f"max_label_values={metrics.max_label_values}; pass the same values, "
            "another namespace, or another meter provider"
        )
    return metrics


_warned: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        logger.warning("bgtrace: %s", message)
