"""bgtrace's own metric values in a single process: plain numbers under one lock.

prometheus_client keeps a lock and a value object per sample and checks every update; a task
moves through three states and would pay for eight such updates. Here one state change is one
lock and a few integer additions, and ``/metrics`` reads the numbers directly
(``families.render``). With ``PROMETHEUS_MULTIPROC_DIR`` set, prometheus_client's file-backed
values are used instead (``metrics.ClientSeries``): only they add up across processes.

Nothing that the garbage collector tracks is allocated while the lock is held: a collection
could run a ``weakref.finalize`` callback that counts a dropped task, which takes the lock
again (it is reentrant, so that would not deadlock, but could interleave an update).
"""

from __future__ import annotations

import threading
from bisect import bisect_left
from collections.abc import Callable
from time import time

OUTCOMES = ("success", "failure", "cancelled")
DROP_REASONS = ("request_error", "earlier_task_failed", "cancelled", "not_attached")

# (trace id, observed value, unix time) of the latest traced observation in one bucket.
Exemplar = tuple[str, float, float]


class LocalHistogram:
    """Bucket counts (not cumulative), their sum, and one exemplar per bucket at most."""

    __slots__ = ("bounds", "counts", "exemplars", "lock", "sum")

    def __init__(self, bounds: tuple[float, ...], lock: threading.RLock) -> None:
        self.bounds = bounds  # upper bounds, ascending, without +Inf
        self.lock = lock
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0
        self.exemplars: list[Exemplar | None] | None = None

    def observe(self, value: float) -> None:
        index = bisect_left(self.bounds, value)
        with self.lock:
            self.counts[index] += 1
            self.sum += value


class LocalSeries:
    """Every per-task value for one (task, origin, route)."""

    __slots__ = (
        "completed", "drops", "duration", "enqueued", "error_type", "failures", "head",
        "in_progress", "labels", "lock", "queue_length", "queue_wait", "tail", "text",
    )  # fmt: skip

    def __init__(
        self,
        labels: tuple[str, str, str],
        bounds: tuple[float, ...],
        lock: threading.RLock,
        error_type: Callable[[str], str],
    ) -> None:
        self.labels = labels
        self.lock = lock
        self.error_type = error_type
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

    def queued(self) -> None:
        with self.lock:
            self.enqueued += 1
            self.queue_length += 1

    def started(self, wait: float) -> None:
        histogram = self.queue_wait
        index = bisect_left(histogram.bounds, wait)
        with self.lock:
            self.queue_length -= 1
            self.in_progress += 1
            histogram.counts[index] += 1
            histogram.sum += wait

    def finished(
        self, elapsed: float, outcome: str, error_type: str | None, trace_id: str | None
    ) -> None:
        histogram = self.duration
        index = bisect_left(histogram.bounds, elapsed)
        exemplar: Exemplar | None = None
        if trace_id is not None:
            exemplar = (trace_id, elapsed, time())
            if histogram.exemplars is None:
                histogram.exemplars = [None] * len(histogram.counts)
        label = self.error_type(error_type) if error_type is not None else None
        with self.lock:
            self.in_progress -= 1
            histogram.counts[index] += 1
            histogram.sum += elapsed
            self.completed[outcome] += 1
            if label is not None:
                self.failures[label] = self.failures.get(label, 0) + 1
            if exemplar is not None and histogram.exemplars is not None:
                histogram.exemplars[index] = exemplar

    def dropped(self, reason: str) -> None:
        with self.lock:
            self.queue_length -= 1
            self.drops[reason] = self.drops.get(reason, 0) + 1


def escape(value: str) -> str:
    """A label value as the text formats quote it."""
    return value.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")
