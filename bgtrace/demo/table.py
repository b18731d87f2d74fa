"""The demo's summary: one row per task and origin, read back from a ``/metrics`` text."""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from prometheus_client.parser import text_string_to_metric_families

# (upper bound ``le``, cumulative count) pairs, as in a histogram's ``_bucket`` samples.
Buckets = dict[float, float]


@dataclass
class TaskRow:
    task: str
    origin: str
    enqueued: float = 0.0
    completed: float = 0.0  # every run that ended, like bgtask_completed_total
    failed: float = 0.0
    dropped: float = 0.0
    run_time: Buckets = field(default_factory=dict)
    queue_wait: Buckets = field(default_factory=dict)
    loop_blocked: float = 0.0  # seconds of event loop the task blocked


def histogram_quantile(q: float, buckets: Buckets) -> float | None:
    """Estimate the ``q`` quantile from cumulative buckets as PromQL's ``histogram_quantile``
    does: linear interpolation inside the bucket holding the rank, the first bucket starting
    at 0, and the highest finite bound when the rank falls in ``+Inf``.

    ``None`` where Prometheus would answer NaN: no observation, or no ``+Inf`` bucket.
    """
    bounds = sorted(buckets)
    if len(bounds) < 2 or bounds[-1] != math.inf:
        return None
    counts = [buckets[bound] for bound in bounds]
    if counts[-1] <= 0:
        return None
    rank = q * counts[-1]
    b = next((i for i, count in enumerate(counts[:-1]) if count >= rank), len(bounds) - 1)
    if b == len(bounds) - 1:
        return bounds[-2]
    if b == 0 and bounds[0] <= 0:
        return bounds[0]
    start, end, count = 0.0, bounds[b], counts[b]
    if b > 0:
        start, count, rank = bounds[b - 1], count - counts[b - 1], rank - counts[b - 1]
    if count <= 0:
        return None
    return start + (end - start) * rank / count


def read_rows(metrics_text: str) -> list[TaskRow]:
    """Sum every bgtrace series over routes into one row per (task, origin), sorted."""
    rows: dict[tuple[str, str], TaskRow] = {}

    def row(labels: dict[str, str]) -> TaskRow:
        key = (labels["task"], labels["origin"])
        found = rows.get(key)
        if found is None:
            found = rows[key] = TaskRow(*key)
        return found

    run_time: defaultdict[tuple[str, str], Buckets] = defaultdict(lambda: defaultdict(float))
    queue_wait: defaultdict[tuple[str, str], Buckets] = defaultdict(lambda: defaultdict(float))
    for family in text_string_to_metric_families(metrics_text):
        for sample in family.samples:
            name, labels, value = sample.name, sample.labels, sample.value
            if "task" not in labels or "origin" not in labels:
                continue
            if name == "bgtask_enqueued_total":
                row(labels).enqueued += value
            elif name == "bgtask_completed_total":
                found = row(labels)
                found.completed += value
                if labels.get("outcome") == "failure":
                    found.failed += value
            elif name == "bgtask_dropped_total":
                row(labels).dropped += value
            elif name == "bgtask_loop_blocked_seconds_total" and labels["task"] != "none":
                row(labels).loop_blocked += value
            elif name == "bgtask_duration_seconds_bucket":
                run_time[row(labels).task, labels["origin"]][float(labels["le"])] += value
            elif name == "bgtask_queue_wait_seconds_bucket":
                queue_wait[row(labels).task, labels["origin"]][float(labels["le"])] += value
    for key, found in rows.items():
        found.run_time = dict(run_time.get(key, {}))
        found.queue_wait = dict(queue_wait.get(key, {}))
    return [rows[key] for key in sorted(rows)]


COLUMNS = (
    "task", "origin", "enqueued", "completed", "failed", "dropped",
    "run p50", "run p95", "wait p50", "wait p95", "loop blocked",
)  # fmt: skip
NOTE = (
    "completed: runs that ended, failed ones included. run / wait: run time and queue wait in "
    "milliseconds,\nestimated from the histogram buckets like PromQL's histogram_quantile(). "
    "loop blocked: milliseconds of event\nloop the task kept for itself (blocking calls in an "
    "async task), seen by bgtrace's watchdog."
)


def format_table(rows: Sequence[TaskRow]) -> str:
    """A plain-text table, one line per row: names left-aligned, figures right-aligned."""
    cells = [list(COLUMNS)] + [_cells(row) for row in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(COLUMNS))]
    lines = [_line(line, widths) for line in cells]
    return "\n".join([*lines, "", NOTE])


def _cells(row: TaskRow) -> list[str]:
    counts = [f"{value:.0f}" for value in (row.enqueued, row.completed, row.failed, row.dropped)]
    times = [
        _milliseconds(histogram_quantile(q, buckets))
        for buckets in (row.run_time, row.queue_wait)
        for q in (0.5, 0.95)
    ]
    return [row.task, row.origin, *counts, *times, f"{row.loop_blocked * 1000:.0f}"]


def _milliseconds(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.1f}"


def _line(cells: Iterable[str], widths: Sequence[int]) -> str:
    parts = [
        cell.ljust(width) if i < 2 else cell.rjust(width)
        for i, (cell, width) in enumerate(zip(cells, widths, strict=True))
    ]
    return "  ".join(parts).rstrip()


def pending(metrics_text: str) -> float:
    """Tasks queued or running now, summed over every series."""
    return sum(
        sample.value
        for family in text_string_to_metric_families(metrics_text)
        for sample in family.samples
        if sample.name in ("bgtask_queue_length", "bgtask_in_progress")
    )
