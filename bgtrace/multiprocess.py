"""prometheus_client's multiprocess mode, as bgtrace sees it: per-process files under
``PROMETHEUS_MULTIPROC_DIR``, added up at each scrape.

A task updates bgtrace's own values (``accumulators``) in every mode: a prometheus_client value
in this mode is a locked write to a memory-mapped file, and a task would make eight of them.
``FileValues`` copies what changed into prometheus_client's metrics in batches: once a second
from a thread of bgtrace's own, before this process answers a scrape, and when it ends. The
files keep prometheus_client's format, so its ``MultiProcessCollector`` (in anyone's endpoint)
adds bgtrace's metrics up with the rest; bgtrace's own ``/metrics`` reads them faster
(``worker_files``).
"""

from __future__ import annotations

import atexit
import math
import os
import threading
import time
import weakref
from collections.abc import Mapping
from typing import Any, Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.multiprocess import mark_process_dead

from . import forks, logs, private
from .accumulators import LAG_BUCKETS, OUTCOMES, LocalHistogram, LocalSeries, LoopValues
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
    TASK_LABELS,
    THREAD_WAIT,
    THREADPOOL_FAMILIES,
    Family,
    full_name,
)  # fmt: skip

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
_MULTIPROC_ENVS = (MULTIPROC_ENV, "prometheus_multiproc_dir")  # the old name still counts

# How often the values of every worker reach the files: a scrape sees other workers' values
# at most this old (its own are copied first). Prometheus scrapes every 15 s or more.
FLUSH_INTERVAL = 1.0


_exit_hook_lock = threading.Lock()
forks.guard(_exit_hook_lock, forks.EXIT_HOOK)
_exit_hook_registered = False


def multiprocess_mode() -> bool:
    """Whether prometheus_client writes metrics to per-process files: like prometheus_client
    itself, decided by the variable's presence, even when it is empty."""
    return any(name in os.environ for name in _MULTIPROC_ENVS)


def multiprocess_dir() -> str:
    """The directory of every worker's files, as prometheus_client picks it."""
    return next((os.environ[name] for name in _MULTIPROC_ENVS if os.environ.get(name)), "")


def check_multiprocess_dir() -> None:
    """Say at start-up what prometheus_client would only show as wrong numbers."""
    if not multiprocess_mode():
        return
    path = multiprocess_dir()
    if not os.path.isdir(path):
        logs.logger.error(
            "bgtrace: %s is set but %r is not a directory: prometheus_client writes this "
            "process's metrics elsewhere and /metrics cannot add up the workers; point it at "
            "an empty directory that exists before the workers start",
            MULTIPROC_ENV,
            path,
        )


# --- bgtrace's values in prometheus_client's files -----------------------------------------

# What was last written for one series: (enqueued, queue_length, in_progress, completed by
# outcome, failures by error type, drops by reason, queue wait (bucket counts, sum),
# duration (bucket counts, sum)).
_Histogram = tuple[tuple[int, ...], float]
_Written = tuple[
    int, int, int, tuple[int, ...], dict[str, int], dict[str, int], _Histogram, _Histogram
]


def _histogram(histogram: LocalHistogram) -> _Histogram:
    return tuple(histogram.counts), histogram.sum


def _read(series: LocalSeries) -> _Written:
    """The series' values now (the caller holds its lock)."""
    return (
        series.enqueued,
        series.queue_length,
        series.in_progress,
        tuple(series.completed.values()),
        dict(series.failures),
        dict(series.drops),
        _histogram(series.queue_wait),
        _histogram(series.duration),
    )


class _Children:
    """The prometheus_client children of one (task, origin, route), looked up once."""

    __slots__ = ("completed", "duration", "enqueued", "in_progress", "queue_length", "queue_wait")

    def __init__(self, values: FileValues, labels: tuple[str, str, str]) -> None:
        self.enqueued = values.enqueued.labels(*labels)
        self.completed = [values.completed.labels(*labels, o) for o in OUTCOMES]
        self.queue_length = values.queue_length.labels(*labels)
        self.in_progress = values.in_progress.labels(*labels)
        self.queue_wait = values.queue_wait.labels(*labels)
        self.duration = values.duration.labels(*labels)


class FileValues:
    """bgtrace's families as prometheus_client metrics, registered in one registry, and the
    copy of bgtrace's own values into them: each flush adds what changed since the last."""

    def __init__(self, registry: CollectorRegistry, namespace: str, buckets: tuple[float, ...]):
        self.registry = registry
        self.bounds = buckets

        def name(family: Family) -> str:
            return full_name(namespace, family)

        def counter(family: Family, *extra: str) -> Counter:
            return Counter(name(family), family.help, (*TASK_LABELS, *extra), registry=registry)

        def histogram(family: Family, labels: tuple[str, ...] = TASK_LABELS) -> Histogram:
            return Histogram(name(family), family.help, labels, buckets=buckets, registry=registry)

        def gauge(family: Family) -> Gauge:
            # livesum: with several worker processes the gauge is the sum over live workers.
            return Gauge(
                name(family), family.help, TASK_LABELS, multiprocess_mode="livesum",
                registry=registry,
            )  # fmt: skip

        self.enqueued = counter(ENQUEUED)
        self.completed = counter(COMPLETED, "outcome")
        self.failures = counter(FAILURES, "error_type")
        self.dropped = counter(DROPPED, "reason")
        self.duration = histogram(DURATION)
        self.queue_wait = histogram(QUEUE_WAIT)
        self.queue_length = gauge(QUEUE_LENGTH)
        self.in_progress = gauge(IN_PROGRESS)
        self.post_response = histogram(POST_RESPONSE, ("route",))
        self._empty: _Histogram = ((0,) * (len(buckets) + 1), 0.0)
        self._nothing: _Written = (
            0, 0, 0, (0,) * len(OUTCOMES), {}, {}, self._empty, self._empty,
        )  # fmt: skip
        self._written: dict[tuple[str, str, str], _Written] = {}
        self._written_post: dict[str, _Histogram] = {}
        self._children: dict[tuple[str, str, str], _Children] = {}
        self._post_children: dict[str, Any] = {}
        self._why_init(name, buckets)
        # The watchdog's (see families.LOOP_FAMILIES): the threadpool gauges are live sums.
        self.loop_blocked = counter(LOOP_BLOCKED)
        self.loop_lag = Histogram(
            name(LOOP_LAG), LOOP_LAG.help, buckets=LAG_BUCKETS, registry=registry
        )
        self.threadpool = [
            Gauge(name(f), f.help, multiprocess_mode="livesum", registry=registry)
            for f in THREADPOOL_FAMILIES
        ]
        self._written_loop: tuple[dict[tuple[str, str, str], float], _Histogram, Any] = (
            {}, ((0,) * (len(LAG_BUCKETS) + 1), 0.0), None,
        )  # fmt: skip

    def unregister(self) -> None:
        for metric in (
            self.enqueued, self.completed, self.failures, self.dropped, self.duration,
            self.queue_wait, self.queue_length, self.in_progress, self.post_response,
            self.oldest_running, self.oldest_queued, self.thread_wait,
            self.loop_blocked, self.loop_lag, *self.threadpool,
        ):  # fmt: skip
            self.registry.unregister(metric)

    def forget_written(self) -> None:
        """In a forked child: its files are new, and so are its values."""
        self._written.clear()
        self._written_post.clear()
        self._written_loop = ({}, ((0,) * (len(LAG_BUCKETS) + 1), 0.0), None)
        self._why_forget()

    # --- the "why" families: oldest ages (livemax) and thread wait ---

    def _why_init(self, name: Any, buckets: tuple[float, ...]) -> None:
        def gauge(family: Family) -> Gauge:
            # livemax: with several workers, the oldest task of any live one.
            return Gauge(
                name(family), family.help, TASK_LABELS, multiprocess_mode="livemax",
                registry=self.registry,
            )  # fmt: skip

        self.oldest_running = gauge(OLDEST_RUNNING)
        self.oldest_queued = gauge(OLDEST_QUEUED)
        self.thread_wait = Histogram(
            name(THREAD_WAIT), THREAD_WAIT.help, TASK_LABELS, buckets=buckets,
            registry=self.registry,
        )  # fmt: skip
        self._why_forget()

    def _why_forget(self) -> None:
        self._ages: dict[tuple[str, str, str], tuple[Any, Any, tuple[float, float]]] = {}
        self._written_waits: dict[tuple[str, str, str], _Histogram] = {}
        self._wait_children: dict[tuple[str, str, str], Any] = {}

    def flush_why(
        self,
        oldest: Mapping[tuple[str, str, str], tuple[float, float]],
        thread_wait: Mapping[tuple[str, str, str], LocalHistogram],
        lock: threading.RLock,
    ) -> None:
        """Write the oldest ages now and the thread waits that changed.

        A series gets its age gauges at the first flush that finds a task of it in flight,
        and keeps them (at 0 when none is) from then on. Not every series has them from the
        start, as in a single process: these values go through prometheus_client's own
        summing at a scrape (worker_files does not take the maximum), so only series that
        ever had a task in flight at a flush cost a scrape anything."""
        with _flush_lock:
            try:
                ages = self._ages
                for labels in oldest:
                    if labels not in ages:
                        running = self.oldest_running.labels(*labels)
                        queued = self.oldest_queued.labels(*labels)
                        ages[labels] = (running, queued, (-1.0, -1.0))
                for labels, (running, queued, was) in list(ages.items()):
                    now = oldest.get(labels, (0.0, 0.0))
                    if now != was:
                        running.set(now[0])
                        queued.set(now[1])
                        ages[labels] = (running, queued, now)
            except Exception:
                logs.internal_error("multiprocess write")
            with lock:
                changed = []
                for labels, histogram in thread_wait.items():
                    if histogram.dirty:
                        histogram.dirty = False
                        changed.append((labels, _histogram(histogram)))
            for labels, now_wait in changed:
                try:
                    child = self._wait_children.get(labels)
                    if child is None:
                        child = self._wait_children[labels] = self.thread_wait.labels(*labels)
                    _add(child, now_wait, self._written_waits.get(labels, self._empty), self.bounds)
                except Exception:
                    logs.internal_error("multiprocess write")
                self._written_waits[labels] = now_wait

    def flush_loop(self, loop: LoopValues) -> None:
        """Write what the watchdog measured since the last flush."""
        with _flush_lock:
            with loop.lock:
                if not loop.dirty:
                    return
                loop.dirty = False
                now = (dict(loop.blocked), _histogram(loop.lag), loop.threadpool())
            blocked, lag, threadpool = self._written_loop
            try:
                for labels, seconds in now[0].items():
                    if seconds != blocked.get(labels, 0.0):
                        self.loop_blocked.labels(*labels).inc(seconds - blocked.get(labels, 0.0))
                _add(self.loop_lag, now[1], lag, LAG_BUCKETS)
                if now[2] != threadpool:
                    for gauge, value in zip(self.threadpool, now[2], strict=True):
                        gauge.set(value)
            except Exception:
                logs.internal_error("multiprocess write")
            self._written_loop = now

    def flush(
        self,
        series: list[LocalSeries],
        post_response: Mapping[str, LocalHistogram],
        lock: threading.RLock,
    ) -> None:
        """Write what changed since the last flush: the series listed in ``series`` (each
        joins it as it turns dirty; emptied here) and ``post_response``'s dirty histograms."""
        # One flush at a time: each adds the difference to what the previous one wrote.
        with _flush_lock:
            # Read and mark clean together, under the lock the updates take: an update made
            # after the read flags its series again for the next flush. Only the changed
            # series are visited: thousands of quiet ones cost nothing under the lock.
            with lock:
                changed = []
                for one in series:
                    if one.dirty:
                        one.dirty = False
                        changed.append((one.labels, _read(one)))
                series.clear()
                posts = []
                for route, histogram in post_response.items():
                    if histogram.dirty:
                        histogram.dirty = False
                        posts.append((route, _histogram(histogram)))
            # The file writes outside it: tasks never wait for the disk.
            # A write that fails halfway counts as written all the same: adding its first
            # part again at every flush would grow without end; this way at most one batch of
            # one series is short, and the error is logged.
            for labels, now in changed:
                try:
                    self._write(labels, now)
                except Exception:
                    logs.internal_error("multiprocess write")
                self._written[labels] = now
            for route, now_post in posts:
                try:
                    child = self._post_children.get(route)
                    if child is None:
                        child = self._post_children[route] = self.post_response.labels(route)
                    before = self._written_post.get(route, self._empty)
                    _add(child, now_post, before, self.bounds)
                except Exception:
                    logs.internal_error("multiprocess write")
                self._written_post[route] = now_post

    def _write(self, labels: tuple[str, str, str], now: _Written) -> None:
        before = self._written.get(labels, self._nothing)
        children = self._children.get(labels)
        fresh = children is None
        if children is None:
            # Made at the first flush of the series: every value of it exists from then on.
            children = self._children[labels] = _Children(self, labels)
        if now[0] != before[0]:
            children.enqueued.inc(now[0] - before[0])
        # Gauges are absolute: set at once on new children, whatever the file held before.
        if fresh or now[1] != before[1]:
            children.queue_length.set(now[1])
        if fresh or now[2] != before[2]:
            children.in_progress.set(now[2])
        for child, count, was in zip(children.completed, now[3], before[3], strict=True):
            if count != was:
                child.inc(count - was)
        for metric, counts, was_counts in ((self.failures, now[4], before[4]),
                                           (self.dropped, now[5], before[5])):  # fmt: skip
            for value, count in counts.items():
                was = was_counts.get(value, 0)
                if count != was:
                    metric.labels(*labels, value).inc(count - was)
        _add(children.queue_wait, now[6], before[6], self.bounds)
        _add(children.duration, now[7], before[7], self.bounds)


def _add(child: Any, now: _Histogram, before: _Histogram, bounds: tuple[float, ...]) -> None:
    """Add the difference of two readings of a histogram to a prometheus_client one.

    Its public ``observe()`` takes one value at a time; a batch goes to the bucket values
    themselves (``_buckets`` holds the counts per bucket, not cumulative, ``+Inf`` last, and
    ``_sum`` the sum: the layout of every prometheus_client release bgtrace supports). Where a
    release changed that layout, the batch is replayed through ``observe()`` (``_replay``)."""
    counts, total = now
    buckets = getattr(child, "_buckets", None)
    sum_value: Any = getattr(child, "_sum", None)
    if not (
        isinstance(buckets, list)
        and len(buckets) == len(counts)
        and all(callable(getattr(value, "inc", None)) for value in buckets)
        and callable(getattr(sum_value, "inc", None))
    ):
        private.missing(
            "prometheus_client Histogram's _buckets and _sum",
            "histograms reach the files through observe(), one call per observation",
        )
        _replay(child, bounds, [c - w for c, w in zip(counts, before[0], strict=True)],
                total - before[1])  # fmt: skip
        return
    for value, count, was in zip(buckets, counts, before[0], strict=True):
        if count != was:
            value.inc(count - was)
    if total != before[1]:
        sum_value.inc(total - before[1])


def _replay(child: Any, bounds: tuple[float, ...], counts: list[int], total: float) -> None:
    """Observe values that fall in the buckets of ``counts`` (per bucket, ``+Inf`` last) and
    add up to ``total``: the bucket counts come out exact, the sum up to float rounding. The
    observations themselves are gone; any values in their buckets with their sum will do."""
    for value, count in _stand_ins(bounds, counts, total):
        for _ in range(count):
            child.observe(value)


def _stand_ins(
    bounds: tuple[float, ...], counts: list[int], total: float
) -> list[tuple[float, int]]:
    """(value, how many times) per non-empty bucket, each value inside its bucket, the sum of
    all of them ``total`` (when the real observations allow it, as they do)."""
    finite = counts[: len(bounds)]
    at_inf = counts[len(bounds)] if len(counts) > len(bounds) else 0
    # Each bucket's range: durations are not negative; a bound belongs to its own bucket.
    lows = [min(0.0, bounds[0]) if bounds else 0.0]
    lows += [math.nextafter(bound, math.inf) for bound in bounds[:-1]]
    highs = list(bounds)
    low_sum = sum(c * low for c, low in zip(finite, lows, strict=True) if c > 0)
    high_sum = sum(c * high for c, high in zip(finite, highs, strict=True) if c > 0)
    found: list[tuple[float, int]] = []
    target = total
    if at_inf > 0:
        above = math.nextafter(bounds[-1], math.inf) if bounds else 0.0
        beyond = max(above, (total - high_sum) / at_inf)
        found.append((beyond, at_inf))
        target = total - beyond * at_inf
    share = (target - low_sum) / (high_sum - low_sum) if high_sum > low_sum else 1.0
    share = min(1.0, max(0.0, share))
    for count, low, high in zip(finite, lows, highs, strict=True):
        if count > 0:
            found.append((min(high, max(low, low + share * (high - low))), count))
    return found


# --- when the values reach the files -------------------------------------------------------


class Flushable(Protocol):
    def flush(self) -> None: ...

    def forget_values(self) -> None: ...


# Every metrics set of this process whose values go to the files, and its guard (a WeakSet
# changed by one thread while another copies it fails).
_flushed: weakref.WeakSet[Flushable] = weakref.WeakSet()
_flushed_lock = threading.Lock()
# Taken by every flush, and around a fork (see forks).
_flush_lock = threading.Lock()
# The lock of every metrics set in this mode, shared: a fork takes it (see forks); one
# lock per set would need an order to take several in, which a garbage collection running a
# drop of another set's task (records.py) does not keep. Reentrant: see accumulators.
VALUES_LOCK = threading.RLock()
_flusher_lock = threading.Lock()
_flusher_pid = 0


def publish(target: Flushable) -> None:
    """Copy ``target``'s values to the files from now on."""
    with _flushed_lock:
        _flushed.add(target)


def _published() -> list[Flushable]:
    with _flushed_lock:
        return list(_flushed)


def ensure_flusher() -> None:
    """Start this process's flush thread, once per process (a forked child starts its own)."""
    global _flusher_pid
    pid = os.getpid()
    if _flusher_pid == pid:
        return
    with _flusher_lock:
        if _flusher_pid == pid:
            return
        # A daemon: it ends with its process, whose last values the exit hooks write.
        thread = threading.Thread(target=_flush_periodically, name="bgtrace-flush", daemon=True)
        try:
            thread.start()
        except RuntimeError:  # at interpreter shutdown: the exit hook writes the values
            logs.internal_error("multiprocess flush thread")
            return
        _flusher_pid = pid


def _flush_periodically() -> None:
    while True:
        time.sleep(FLUSH_INTERVAL)
        flush_all()  # never raises: the thread must outlive any error


def flush_all() -> None:
    """Copy every metrics set's changes of this process to its files now."""
    try:
        targets = _published()
    except Exception:
        logs.internal_error("multiprocess flush")
        return
    for target in targets:
        try:
            target.flush()
        except Exception:
            logs.internal_error("multiprocess flush")


# A fork copies locks as they are: one held by another thread (the flush thread writing,
# a threadpool thread ending a task) would stay held in the child for ever. See forks.
forks.guard(_flusher_lock, forks.FLUSHER)
forks.guard(_flushed_lock, forks.PUBLISHED)
forks.guard(_flush_lock, forks.FLUSH)
forks.guard(VALUES_LOCK, forks.VALUES)


def _after_fork_in_child() -> None:
    # A forked worker inherits its parent's values in memory; they are the parent's to
    # write. The child counts from zero, in files of its own pid (as prometheus_client does).
    # (forks' own hook, registered first, has freed every lock by now.)
    for target in list(_flushed):
        try:
            target.forget_values()
        except Exception:
            logs.internal_error("multiprocess fork")


os.register_at_fork(after_in_child=_after_fork_in_child)


# --- the end of a worker -------------------------------------------------------------------


def forget_process_at_exit() -> None:
    """In multiprocess mode, write this process's last values and drop its live-sum gauges
    when it exits.

    Counters and histograms of a dead worker stay in the sum (they are totals); its gauges
    would otherwise report tasks queued or running forever.
    """
    global _exit_hook_registered
    if not multiprocess_mode():
        return
    with _exit_hook_lock:
        if not _exit_hook_registered:
            _exit_hook_registered = True
            # A forked worker inherits the hook, and runs it for itself: its own values,
            # its own pid's gauge files.
            atexit.register(forget_process)


def forget_process() -> None:
    """This process is ending: write its last values, then remove its live-sum gauge files."""
    flush_all()
    try:
        mark_process_dead(os.getpid())  # type: ignore[no-untyped-call]
    except Exception:
        logs.internal_error("multiprocess exit")
