"""bgtrace's own metric values: plain numbers under one lock.

prometheus_client keeps a lock and a value object per sample and checks every update; a task
moves through three states and would pay for eight such updates. Here one state change is one
lock and a few integer additions, and ``/metrics`` reads the numbers directly
(``families.render``). With ``PROMETHEUS_MULTIPROC_DIR`` set, the same values are copied into
prometheus_client's file-backed metrics in batches (``multiprocess.FileValues``): only those
files add up across processes.

The lock is reentrant: a garbage collection while it is held can run a ``weakref.finalize``
callback that counts a dropped task, which takes it again. Collections start only where
something is allocated: at a call (on Python 3.10, frames are allocated) or at a series' first
exemplar list in ``finished``. At none of these points is an update halfway done, so a nested
one cannot lose a count.
"""

from __future__ import annotations

import threading
from bisect import bisect_left
from time import time

OUTCOMES = ("success", "failure", "cancelled")

# (trace id, observed value, unix time) of the latest traced observation in one bucket.
Exemplar = tuple[str, float, float]


class LocalHistogram:
    """Bucket counts (not cumulative), their sum, and the latest exemplar of each bucket."""

    __slots__ = ("bounds", "counts", "dirty", "exemplars", "lock", "sum")

    def __init__(self, bounds: tuple[float, ...], lock: threading.RLock) -> None:
        self.bounds = bounds  # upper bounds, ascending, without +Inf
        self.lock = lock
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0
        # Allocated on the first exemplar (only duration histograms of traced tasks get any).
        self.exemplars: list[Exemplar | None] | None = None
        # Changed since multiprocess mode last copied it to the files (observe() only: a
        # series' histograms are flagged on the series).
        self.dirty = False

    def observe(self, value: float) -> None:
        with self.lock:
            self.add(value)
            self.dirty = True

    def add(self, value: float) -> int:
        """Count ``value`` (the caller holds ``lock``); return its bucket's index."""
        index = bisect_left(self.bounds, value)
        self.counts[index] += 1
        self.sum += value
        return index


class LocalSeries:
    """Every per-task value for one (task, origin, route).

    The update methods expect the caller to hold ``lock``: a task record changes its state
    and the values in one go (``records.TaskRecord``).
    """

    __slots__ = (
        "changed", "completed", "dirty", "drops", "duration", "enqueued", "failures", "head",
        "in_progress", "labels", "lock", "queue_length", "queue_wait", "tail", "text",
    )  # fmt: skip

    def __init__(
        self,
        labels: tuple[str, str, str],
        bounds: tuple[float, ...],
        lock: threading.RLock,
        changed: list[LocalSeries] | None = None,
    ) -> None:
        self.labels = labels
        self.lock = lock
        # The label set as the exposition writes it (sorted by name, as prometheus_client
        # does), escaped once; per-outcome and per-reason labels go between head and tail.
        task, origin, route = labels
        self.head = f'origin="{escape(origin)}"'
        self.tail = f'route="{escape(route)}",task="{escape(task)}"'
        self.text = f"{self.head},{self.tail}"
        self.enqueued = 0
        self.queue_length = 0
        self.in_progress = 0
        # All three outcomes exist from the start, so that failure ratios and rate() see the
        # series from the first scrape, not only after the first failure.
        self.completed = dict.fromkeys(OUTCOMES, 0)
        self.failures: dict[str, int] = {}
        self.drops: dict[str, int] = {}
        self.queue_wait = LocalHistogram(bounds, lock)
        self.duration = LocalHistogram(bounds, lock)
        # Changed since multiprocess mode last copied it to the files; and there, the list of
        # its set's changed series, which it joins as it turns dirty: a flush visits those
        # only. In one process it turns dirty once and stays so (nothing reads it).
        self.dirty = False
        self.changed = changed

    def _changed(self) -> None:
        self.dirty = True
        if self.changed is not None:
            self.changed.append(self)

    def queued(self) -> None:
        self.enqueued += 1
        self.queue_length += 1
        if not self.dirty:
            self._changed()

    def started(self, wait: float) -> None:
        self.queue_wait.add(wait)
        self.queue_length -= 1
        self.in_progress += 1
        if not self.dirty:
            self._changed()

    def finished(
        self, elapsed: float, outcome: str, error_type: str | None, exemplar: Exemplar | None
    ) -> None:
        """``error_type``: the label value, already bounded; ``exemplar``: made by the caller
        before taking the lock."""
        histogram = self.duration
        index = histogram.add(elapsed)
        self.in_progress -= 1
        self.completed[outcome] += 1
        if not self.dirty:
            self._changed()
        if error_type is not None:
            self.failures[error_type] = self.failures.get(error_type, 0) + 1
        if exemplar is not None:
            exemplars = histogram.exemplars
            if exemplars is None:
                # A list allocated under the lock, once per series: see the module's note.
                exemplars = histogram.exemplars = [None] * len(histogram.counts)
            exemplars[index] = exemplar

    def dropped(self, reason: str) -> None:
        self.queue_length -= 1
        self.drops[reason] = self.drops.get(reason, 0) + 1
        if not self.dirty:
            self._changed()


def exemplar(trace_id: str, value: float) -> Exemplar:
    return (trace_id, value, time())


def escape(value: str) -> str:
    """A label value as the text formats quote it."""
    return value.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")


# How late the event loop ran the watchdog's heartbeat: from a healthy loop's fraction of a
# millisecond to a loop frozen for seconds.
LAG_BUCKETS: tuple[float, ...] = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip

# The threadpool gauges: the default thread limiter's (tokens, borrowed, waiting).
Threadpool = tuple[float, float, float]


class LoopValues:
    """What the event-loop watchdog measured for one metrics set: loop time blocked per
    (task, origin, route), the heartbeat lag, and the latest threadpool reading of each loop
    it watches (summed: one per worker process in a real server)."""

    __slots__ = ("blocked", "dirty", "lag", "last_lag", "lock", "threadpools")

    def __init__(self, lock: threading.RLock) -> None:
        self.lock = lock
        self.blocked: dict[tuple[str, str, str], float] = {}
        self.lag = LocalHistogram(LAG_BUCKETS, lock)
        self.last_lag: float | None = None  # the latest heartbeat's, for the live page
        self.threadpools: dict[int, Threadpool] = {}
        # Changed since multiprocess mode last copied it to the files.
        self.dirty = False

    def add_blocked(self, labels: tuple[str, str, str], seconds: float) -> None:
        with self.lock:
            self.blocked[labels] = self.blocked.get(labels, 0.0) + seconds
            self.dirty = True

    def observe_lag(self, seconds: float) -> None:
        with self.lock:
            self.lag.add(seconds)
            self.last_lag = seconds
            self.dirty = True

    def set_threadpool(self, loop: int, reading: Threadpool | None) -> None:
        with self.lock:
            if reading is None:
                self.threadpools.pop(loop, None)
            elif self.threadpools.get(loop) != reading:
                self.threadpools[loop] = reading
            else:
                return
            self.dirty = True

    def threadpool(self) -> Threadpool:
        """The readings summed over the loops; zeros before the first (as prometheus_client's
        unlabelled gauges read in multiprocess mode)."""
        readings = list(self.threadpools.values())
        if not readings:
            return 0.0, 0.0, 0.0
        tokens, borrowed, waiting = zip(*readings, strict=True)
        return sum(tokens), sum(borrowed), sum(waiting)


def quantile_of(q: float, bounds: tuple[float, ...], counts: list[int]) -> float | None:
    """Estimated as Prometheus' ``histogram_quantile`` does from these buckets (``counts``:
    per bucket, not cumulative, the last one ``+Inf``); ``None`` without observations."""
    total = sum(counts)
    if total <= 0:
        return None
    rank = q * total
    seen = 0
    for index, count in enumerate(counts):
        if seen + count >= rank and count > 0:
            if index == len(bounds):
                return bounds[-1] if bounds else None  # in +Inf: the highest finite bound
            start = bounds[index - 1] if index > 0 else 0.0
            return start + (bounds[index] - start) * (rank - seen) / count
        seen += count
    return bounds[-1] if bounds else None
