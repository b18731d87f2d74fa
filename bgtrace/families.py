"""bgtrace's metric families: their names and help, and both ways of exposing local values.

``collect`` builds prometheus_client metric families, so that anything reading a registry
(``generate_latest``, ``get_sample_value``, other exporters) sees bgtrace's metrics. ``render``
writes the same samples straight to the text formats for bgtrace's own ``/metrics``: with
thousands of series, building a sample object per line takes seconds; formatting prepared
templates takes milliseconds.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from itertools import accumulate

from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.samples import Exemplar
from prometheus_client.utils import floatToGoString

from .accumulators import LAG_BUCKETS, LocalHistogram, LocalSeries, LoopValues, escape

TASK_LABELS = ("task", "origin", "route")
_NAME = re.compile(r"^[a-zA-Z_:][a-zA-Z0-9_:]*$")


@dataclass(frozen=True)
class Family:
    name: str
    help: str
    type: str  # "counter", "gauge" or "histogram"


ENQUEUED = Family("bgtask_enqueued", "Background tasks queued.", "counter")
COMPLETED = Family(
    "bgtask_completed", "Background tasks that ran to an end, by outcome.", "counter"
)
FAILURES = Family("bgtask_failures", "Background tasks that raised, by exception type.", "counter")
DROPPED = Family(
    "bgtask_dropped", "Background tasks queued but never started, by reason.", "counter"
)
DURATION = Family("bgtask_duration_seconds", "Background task run time, start to end.", "histogram")
QUEUE_WAIT = Family(
    "bgtask_queue_wait_seconds", "Time from queuing a background task to its start.", "histogram"
)
QUEUE_LENGTH = Family(
    "bgtask_queue_length", "Background tasks queued and not yet started.", "gauge"
)
IN_PROGRESS = Family("bgtask_in_progress", "Background tasks running now.", "gauge")
POST_RESPONSE = Family(
    "bgtask_post_response_seconds",
    "Time from the last response byte to the end of the request's background work.",
    "histogram",
)
ALL_FAMILIES = (
    ENQUEUED, COMPLETED, FAILURES, DROPPED, DURATION, QUEUE_WAIT, QUEUE_LENGTH, IN_PROGRESS,
    POST_RESPONSE,
)  # fmt: skip
# Why tasks are late (bgtrace.stuck). Not in ALL_FAMILIES: in multiprocess mode the oldest
# ages are the maximum over live workers, which worker_files does not add up; prometheus_client
# sums these few series itself.
OLDEST_RUNNING = Family(
    "bgtask_oldest_running_seconds",
    "Age of the oldest background task of the series running now; 0 when none runs.",
    "gauge",
)
OLDEST_QUEUED = Family(
    "bgtask_oldest_queued_seconds",
    "Age of the oldest background task of the series waiting to start now; 0 when none waits.",
    "gauge",
)
THREAD_WAIT = Family(
    "bgtask_thread_wait_seconds",
    "Time a def background task waited for a threadpool thread once it could start.",
    "histogram",
)
WHY_FAMILIES = (OLDEST_RUNNING, OLDEST_QUEUED, THREAD_WAIT)

# The event-loop watchdog's (``watchdog``): one process's values, written after the rest. In
# multiprocess mode they are plain prometheus_client metrics in the files, which the reader
# adds up with the app's own (``worker_files`` reads only ``ALL_FAMILIES`` itself).
LOOP_BLOCKED = Family(
    "bgtask_loop_blocked_seconds",
    "Event loop time blocked, by the background task (or else the route) that blocked it.",
    "counter",
)
LOOP_LAG = Family(
    "bgtrace_event_loop_lag_seconds",
    "How late the event loop ran the watchdog's heartbeat.",
    "histogram",
)
THREADPOOL_TOKENS = Family(
    "bgtrace_threadpool_tokens", "Tokens (threads) of anyio's default thread limiter.", "gauge"
)
THREADPOOL_BORROWED = Family(
    "bgtrace_threadpool_borrowed", "Tokens of anyio's default thread limiter in use.", "gauge"
)
THREADPOOL_WAITING = Family(
    "bgtrace_threadpool_waiting", "Callers waiting for a token of anyio's default thread limiter.",
    "gauge",
)  # fmt: skip
THREADPOOL_FAMILIES = (THREADPOOL_TOKENS, THREADPOOL_BORROWED, THREADPOOL_WAITING)
LOOP_FAMILIES = (LOOP_BLOCKED, LOOP_LAG, *THREADPOOL_FAMILIES)


def full_name(namespace: str, family: Family) -> str:
    """The exported name, joined as prometheus_client joins it; a bad namespace fails early."""
    name = f"{namespace}_{family.name}" if namespace else family.name
    if not _NAME.match(name):
        raise ValueError(f"namespace {namespace!r} does not make a valid metric name: {name!r}")
    return name


@dataclass(frozen=True)
class LocalValues:
    """What one metrics set exposes: its names and its current values."""

    namespace: str
    bounds: tuple[float, ...]
    series: Iterable[LocalSeries]
    post_response: Mapping[str, LocalHistogram]
    # The WHY_FAMILIES, or None where they are not these values' to write (multiprocess: the
    # files carry them). Oldest ages by label set (running, queued); absent series read 0.
    oldest: Mapping[tuple[str, str, str], tuple[float, float]] | None = None
    thread_wait: Mapping[tuple[str, str, str], LocalHistogram] | None = None
    # The watchdog's values; ``None`` where they are not rendered with the rest (the
    # multiprocess reader: see ``LOOP_FAMILIES``).
    loop: LoopValues | None = None


# --- prometheus_client families ------------------------------------------------------------


def describe(namespace: str) -> list[Metric]:
    """The families without samples: what the registry needs to refuse duplicate names."""
    return [
        *_families(namespace, (), {}, (), LoopValues(_NO_LOCK)),
        *_why(namespace, (), {}, {}, ()),
    ]


def collect(values: LocalValues) -> Iterator[Metric]:
    series = list(values.series)
    yield from _families(
        values.namespace, series, dict(values.post_response), values.bounds, values.loop
    )
    if values.oldest is not None:
        thread_wait = dict(values.thread_wait or {})
        yield from _why(values.namespace, series, values.oldest, thread_wait, values.bounds)


def _why(
    namespace: str,
    series: list[LocalSeries] | tuple[()],
    oldest: Mapping[tuple[str, str, str], tuple[float, float]],
    thread_wait: dict[tuple[str, str, str], LocalHistogram],
    bounds: tuple[float, ...],
) -> Iterator[Metric]:
    for index, family in enumerate((OLDEST_RUNNING, OLDEST_QUEUED)):
        gauge = GaugeMetricFamily(full_name(namespace, family), family.help, labels=TASK_LABELS)
        for one in series:
            # Every series, at 0 when it has no task now: max by (task) and alerts resolve.
            gauge.add_metric(one.labels, oldest.get(one.labels, _NO_AGE)[index])
        yield gauge
    histogram = HistogramMetricFamily(
        full_name(namespace, THREAD_WAIT), THREAD_WAIT.help, labels=TASK_LABELS
    )
    les = _les(bounds)
    for labels, values in thread_wait.items():
        _add_histogram(histogram, labels, values, les)
    yield histogram


_NO_AGE = (0.0, 0.0)


def _families(
    namespace: str,
    series: list[LocalSeries] | tuple[()],
    post_response: dict[str, LocalHistogram],
    bounds: tuple[float, ...],
    loop: LoopValues | None = None,
) -> Iterator[Metric]:
    def name(family: Family) -> str:
        return full_name(namespace, family)

    enqueued = CounterMetricFamily(name(ENQUEUED), ENQUEUED.help, labels=TASK_LABELS)
    completed = CounterMetricFamily(
        name(COMPLETED), COMPLETED.help, labels=(*TASK_LABELS, "outcome")
    )
    failures = CounterMetricFamily(
        name(FAILURES), FAILURES.help, labels=(*TASK_LABELS, "error_type")
    )
    dropped = CounterMetricFamily(name(DROPPED), DROPPED.help, labels=(*TASK_LABELS, "reason"))
    les = _les(bounds)  # once per collection, not per series
    for one in series:
        enqueued.add_metric(one.labels, one.enqueued)
        for outcome, count in list(one.completed.items()):
            completed.add_metric((*one.labels, outcome), count)
        for error_type, count in list(one.failures.items()):
            failures.add_metric((*one.labels, error_type), count)
        for reason, count in list(one.drops.items()):
            dropped.add_metric((*one.labels, reason), count)
    yield from (enqueued, completed, failures, dropped)
    for family, attr in ((DURATION, "duration"), (QUEUE_WAIT, "queue_wait")):
        histogram = HistogramMetricFamily(name(family), family.help, labels=TASK_LABELS)
        for one in series:
            _add_histogram(histogram, one.labels, getattr(one, attr), les)
        yield histogram
    for family, attr in ((QUEUE_LENGTH, "queue_length"), (IN_PROGRESS, "in_progress")):
        gauge = GaugeMetricFamily(name(family), family.help, labels=TASK_LABELS)
        for one in series:
            gauge.add_metric(one.labels, getattr(one, attr))
        yield gauge
    post = HistogramMetricFamily(name(POST_RESPONSE), POST_RESPONSE.help, labels=("route",))
    for route, values in post_response.items():
        _add_histogram(post, (route,), values, les)
    yield post
    if loop is not None:
        yield from _loop_families(name, loop)


def _loop_families(name: Callable[[Family], str], loop: LoopValues) -> Iterator[Metric]:
    with loop.lock:
        blocked = list(loop.blocked.items())
        counts, total = list(loop.lag.counts), loop.lag.sum
        threadpool = loop.threadpool()
    family = CounterMetricFamily(name(LOOP_BLOCKED), LOOP_BLOCKED.help, labels=TASK_LABELS)
    for labels, seconds in blocked:
        family.add_metric(labels, seconds)
    yield family
    lag = HistogramMetricFamily(name(LOOP_LAG), LOOP_LAG.help)
    buckets = list(zip(_les(LAG_BUCKETS), accumulate(counts), strict=True))
    lag.add_metric([], buckets, total)
    yield lag
    for index, gauge_family in enumerate(THREADPOOL_FAMILIES):
        gauge = GaugeMetricFamily(name(gauge_family), gauge_family.help)
        gauge.add_metric([], threadpool[index])
        yield gauge


def _add_histogram(
    family: HistogramMetricFamily,
    labels: tuple[str, ...],
    histogram: LocalHistogram,
    les: list[str],
) -> None:
    cumulative = list(accumulate(histogram.counts))
    exemplars = histogram.exemplars or [None] * len(cumulative)
    buckets: list[tuple[str, float] | tuple[str, float, Exemplar]] = []
    for le, count, exemplar in zip(les, cumulative, exemplars, strict=True):
        if exemplar is None:
            buckets.append((le, count))
        else:
            trace_id, value, at = exemplar
            buckets.append((le, count, Exemplar({"trace_id": trace_id}, value, at)))
    family.add_metric(labels, buckets, histogram.sum)


def _les(bounds: tuple[float, ...]) -> list[str]:
    return [*(floatToGoString(b) for b in bounds), "+Inf"]  # type: ignore[no-untyped-call]


# --- the text formats, written directly ----------------------------------------------------


def render(values: LocalValues, openmetrics: bool) -> list[bytes]:
    """Every family in Prometheus text format 0.0.4, or OpenMetrics 1.0 (without ``# EOF``),
    in encoded pieces, for the caller to join into the body."""
    series = list(values.series)
    post_response = list(values.post_response.items())
    ns = values.namespace
    out: list[bytes] = []

    def counter(family: Family, lines: list[str]) -> None:
        name = full_name(ns, family)
        header = name if openmetrics else f"{name}_total"
        out.append(f"# HELP {header} {_help(family)}\n# TYPE {header} counter\n".encode())
        out.append("".join(lines).encode())

    name = full_name(ns, ENQUEUED) + "_total"
    counter(ENQUEUED, [f"{name}{{{s.text}}} {s.enqueued}.0\n" for s in series])
    name = full_name(ns, COMPLETED) + "_total"
    counter(
        COMPLETED,
        [
            f'{name}{{{s.head},outcome="{outcome}",{s.tail}}} {count}.0\n'
            for s in series
            for outcome, count in list(s.completed.items())
        ],
    )
    name = full_name(ns, FAILURES) + "_total"
    counter(
        FAILURES,
        [
            f'{name}{{error_type="{escape(error_type)}",{s.text}}} {count}.0\n'
            for s in series
            if s.failures
            for error_type, count in list(s.failures.items())
        ],
    )
    name = full_name(ns, DROPPED) + "_total"
    counter(
        DROPPED,
        [
            f'{name}{{{s.head},reason="{reason}",{s.tail}}} {count}.0\n'
            for s in series
            if s.drops
            for reason, count in list(s.drops.items())
        ],
    )
    for family, attr in ((DURATION, "duration"), (QUEUE_WAIT, "queue_wait")):
        _histogram(
            out,
            ns,
            family,
            values.bounds,
            [(s.text.encode(), getattr(s, attr)) for s in series],
            openmetrics,
        )
    for family in (QUEUE_LENGTH, IN_PROGRESS):
        name = full_name(ns, family)
        out.append(f"# HELP {name} {_help(family)}\n# TYPE {name} gauge\n".encode())
        if family is QUEUE_LENGTH:
            lines = [f"{name}{{{s.text}}} {s.queue_length}.0\n" for s in series]
        else:
            lines = [f"{name}{{{s.text}}} {s.in_progress}.0\n" for s in series]
        out.append("".join(lines).encode())
    _histogram(
        out,
        ns,
        POST_RESPONSE,
        values.bounds,
        [(f'route="{escape(route)}"'.encode(), h) for route, h in post_response],
        openmetrics,
    )
    if values.loop is not None:
        _render_loop(out, ns, values.loop, openmetrics)
    if values.oldest is not None:
        _render_why(out, values, series, values.oldest, openmetrics)
    return out


def _render_why(
    out: list[bytes],
    values: LocalValues,
    series: list[LocalSeries],
    oldest: Mapping[tuple[str, str, str], tuple[float, float]],
    openmetrics: bool,
) -> None:
    ns = values.namespace
    for index, family in enumerate((OLDEST_RUNNING, OLDEST_QUEUED)):
        name = full_name(ns, family)
        out.append(f"# HELP {name} {_help(family)}\n# TYPE {name} gauge\n".encode())
        lines = []
        for s in series:
            age = oldest.get(s.labels, _NO_AGE)[index]
            value = floatToGoString(age) if age else "0.0"  # type: ignore[no-untyped-call]
            lines.append(f"{name}{{{s.text}}} {value}\n")
        out.append("".join(lines).encode())
    by_labels = {s.labels: s.text for s in series}
    members = []
    for labels, histogram in list((values.thread_wait or {}).items()):
        text = by_labels.get(labels)
        if text is None:
            text = LocalSeries(labels, (), histogram.lock).text
        members.append((text.encode(), histogram))
    _histogram(out, ns, THREAD_WAIT, values.bounds, members, openmetrics)


def _render_loop(out: list[bytes], ns: str, loop: LoopValues, openmetrics: bool) -> None:
    """The watchdog's families, as prometheus_client writes them: few samples, no templates."""
    with loop.lock:
        blocked = list(loop.blocked.items())
        counts, total = list(loop.lag.counts), loop.lag.sum
        threadpool = loop.threadpool()
    name = full_name(ns, LOOP_BLOCKED)
    header = name if openmetrics else f"{name}_total"
    lines = [f"# HELP {header} {_help(LOOP_BLOCKED)}\n# TYPE {header} counter\n"]
    for (task, origin, route), seconds in blocked:
        labels = f'origin="{escape(origin)}",route="{escape(route)}",task="{escape(task)}"'
        lines.append(f"{name}_total{{{labels}}} {_number(seconds)}\n")
    name = full_name(ns, LOOP_LAG)
    lines.append(f"# HELP {name} {_help(LOOP_LAG)}\n# TYPE {name} histogram\n")
    cumulative = list(accumulate(counts))
    for le, count in zip(_les(LAG_BUCKETS), cumulative, strict=True):
        lines.append(f'{name}_bucket{{le="{le}"}} {count}.0\n')
    lines.append(f"{name}_count {cumulative[-1]}.0\n{name}_sum {_number(total)}\n")
    for index, family in enumerate(THREADPOOL_FAMILIES):
        name = full_name(ns, family)
        lines.append(f"# HELP {name} {_help(family)}\n# TYPE {name} gauge\n")
        lines.append(f"{name} {_number(threadpool[index])}\n")
    out.append("".join(lines).encode())


def _number(value: float) -> str:
    return floatToGoString(value)  # type: ignore[no-untyped-call,no-any-return]


def _histogram(
    out: list[bytes],
    namespace: str,
    family: Family,
    bounds: tuple[float, ...],
    members: list[tuple[bytes, LocalHistogram]],
    openmetrics: bool,
) -> None:
    name = full_name(namespace, family)
    out.append(f"# HELP {name} {_help(family)}\n# TYPE {name} histogram\n".encode())
    # One template per family: the label set is put in once per series by replace(), and the
    # numbers by a single %-format, in bytes (most of the body: no encoding pass after). Names
    # are checked against _NAME, so they hold no "%". Counts are written as prometheus_client
    # writes them, as floats.
    les = _les(bounds)
    tail = [f"{name}_count{{\0}} %d.0\n", f"{name}_sum{{\0}} %r\n"]
    template = "".join([f'{name}_bucket{{le="{le}",\0}} %d.0\n' for le in les] + tail).encode()
    # OpenMetrics with exemplars: one more %s per bucket line, empty where it has none.
    with_exemplars = "".join(
        [f'{name}_bucket{{le="{le}",\0}} %d.0%s\n' for le in les] + tail
    ).encode()
    slots: list[object] = [0, b""] * len(les)
    append = out.append
    for text, histogram in members:
        cumulative = [*accumulate(histogram.counts)]
        exemplars = histogram.exemplars if openmetrics else None
        # The count is the +Inf bucket, read once: the two always agree.
        if exemplars is None:
            chunk = template % (*cumulative, cumulative[-1], histogram.sum)
        else:
            values = slots[:]
            values[0::2] = cumulative
            for index, exemplar in enumerate(list(exemplars)):
                if exemplar is not None:
                    trace_id, value, at = exemplar
                    values[2 * index + 1] = (
                        f' # {{trace_id="{trace_id}"}} {value!r} {at!r}'.encode()
                    )
            chunk = with_exemplars % (*values, cumulative[-1], histogram.sum)
        append(chunk.replace(b"\0", text))


def join_encoded(rest: bytes, pieces: list[bytes], openmetrics: bool) -> bytes:
    """An encoder's output with bgtrace's families (``render``) after it, and one ``# EOF``."""
    end = b""
    if openmetrics and rest.endswith(_EOF):
        rest, end = rest[: -len(_EOF)], _EOF
    return b"".join([rest, *pieces, end])


_EOF = b"# EOF\n"
# describe() builds families without values: no update ever takes this.
_NO_LOCK = threading.RLock()


def _help(family: Family) -> str:
    return family.help.replace("\\", r"\\").replace("\n", r"\n")
