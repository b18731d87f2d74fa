"""The event-loop watchdog: notices when the event loop stops running, and who stopped it.

A thread of bgtrace's own (``bgtrace-watchdog``, one per process, started at the first
request) sends the loop a heartbeat every half ``loop_block_threshold``: a callback that notes
when it ran, and reads anyio's default thread limiter there (it belongs to the loop). How late
it ran is the loop's lag. While a heartbeat is overdue by more than the threshold the loop is
blocked: the thread samples the loop thread's stack every ``SAMPLE_INTERVAL`` and puts each
stretch of blocked time on what the sample shows running:

* a background task: the running record (``inflight``) of the request whose middleware call is
  on the stack (``request.live``), else the one whose function is on it;
* else the route whose handler or dependency (or middleware) runs there, as ``task="none"``;
* else nothing known: ``task="none", origin="other", route="none"``.

When the heartbeat comes back, the block is counted, logged and put on the task's span. The
request path pays one thread-local lookup (``ensure_watched``); tasks pay nothing.
"""

from __future__ import annotations

import atexit
import logging
import math
import os
import sys
import sysconfig
import threading
import time
import types
from collections import Counter
from collections.abc import Callable, Container
from time import perf_counter
from typing import TYPE_CHECKING, Any

from . import inflight, logs, request
from .accumulators import LAG_BUCKETS, Threadpool, quantile_of
from .origin import OTHER, detect
from .records import RUNNING, TaskRecord
from .routes import NO_ROUTE

if TYPE_CHECKING:
    from .metrics import TaskMetrics

DEFAULT_THRESHOLD = 0.1
# How often a blocked loop's stack is sampled: each stretch between two samples is put on what
# the later one shows, so a block is shared out to within this much per change of culprit.
SAMPLE_INTERVAL = 0.005
# The same blocking place (task or route, file and line) is logged at most this often.
LOG_INTERVAL = 60.0
_MAX_LOGGED_PLACES = 1024
# Deeper than any real stack under an event loop; bounds a sample's cost.
MAX_FRAMES = 256

NONE = "none"
EVENT_LOOP_BLOCKED = "bgtask.loop_blocked"
ATTR_BLOCKED_DURATION = "bgtask.loop_blocked.duration"
ATTR_FILE_PATH = "code.file.path"
ATTR_LINE_NUMBER = "code.line.number"
ATTR_FUNCTION_NAME = "code.function.name"

logger = logs.logger

# A code location: (file, line, function).
Location = tuple[str, int, str]


def check_threshold(threshold: float | None) -> float | None:
    """The option as given, or a precise error when the middleware is built."""
    if threshold is None:
        return None
    if isinstance(threshold, bool) or not isinstance(threshold, int | float):
        raise ValueError(f"loop_block_threshold must be seconds or None, got {threshold!r}")
    if not math.isfinite(threshold) or threshold <= 0:
        raise ValueError(f"loop_block_threshold must be a positive number, got {threshold!r}")
    return float(threshold)


def diagnostics(metrics: TaskMetrics) -> dict[str, object] | None:
    """What the live page shows of the event loop and the threadpool, from the values the
    watchdog keeps for ``metrics``; ``None`` before its first heartbeat came back (and so
    always with ``loop_block_threshold=None``). This process only, since it started."""
    loop = metrics.loop
    with loop.lock:
        counts = list(loop.lag.counts)
        if not sum(counts) and not loop.threadpools:
            return None
        found: dict[str, object] = {
            "loop_lag_last_seconds": loop.last_lag,
            "loop_lag_p99_seconds": quantile_of(0.99, LAG_BUCKETS, counts),
            "loop_blocked_seconds": sum(loop.blocked.values()),
        }
        if loop.threadpools:
            tokens, borrowed, waiting = loop.threadpool()
            found["threadpool_tokens"] = tokens
            found["threadpool_borrowed"] = borrowed
            found["threadpool_waiting"] = waiting
    return found


# --- on the request path ---------------------------------------------------------------------

_local = threading.local()


def ensure_watched(metrics: TaskMetrics, threshold: float) -> None:
    """Watch the event loop running this request, for ``metrics``. Called on every request:
    once the loop is watched for these metrics, one thread-local lookup."""
    watch = getattr(_local, "watch", None)
    if watch is not None and not watch.ended and metrics in watch.metrics:
        return
    try:
        _start_watching(metrics, threshold)
    except Exception:
        logs.internal_error("watchdog start")
        _local.watch = _UNWATCHABLE


class _Everything(Container[Any]):
    def __contains__(self, item: object) -> bool:
        return True


class _Unwatchable:
    """What a thread whose loop cannot be watched remembers: never try again."""

    ended = False
    metrics = _Everything()


_UNWATCHABLE = _Unwatchable()


def _start_watching(metrics: TaskMetrics, threshold: float) -> None:
    watch = getattr(_local, "watch", None)
    if watch is None or watch.ended:
        found = _Watch.here()
        _local.watch = found
        if not isinstance(found, _Watch):
            return
        watch = found
    with _lock:
        if metrics not in watch.metrics:
            watch.metrics = (*watch.metrics, metrics)
        watch.threshold = min(watch.threshold, threshold)
        if watch not in _watches:
            _watches.append(watch)
        _ensure_thread()
        _wake.set()


# --- one watched event loop ------------------------------------------------------------------


class _Watch:
    """One event loop: its heartbeat, and the block being sampled on it."""

    def __init__(
        self,
        ident: int,
        schedule: Callable[[Callable[[], None]], object],
        running: Callable[[], bool],
        closed: Callable[[], bool],
        limiter: Any,
    ) -> None:
        self.ident = ident  # the loop's thread
        self.schedule = schedule
        self.running = running
        self.closed = closed
        self.limiter = limiter
        self.metrics: tuple[TaskMetrics, ...] = ()
        self.threshold = math.inf
        self.ended = False
        # Written by the loop thread (``beat``), read by the watchdog's.
        self.pending = False
        self.ran_at = 0.0
        self.threadpool: Threadpool | None = None
        # The watchdog thread's own.
        self.sent_at = 0.0
        self.returned = True  # the last heartbeat came back and was counted
        self.next_send = 0.0
        self.stalled = False  # the loop stopped (not blocked) while a heartbeat was out
        self.block: _Block | None = None
        self.observer: _TaskEnds | None = None

    @classmethod
    def here(cls) -> _Watch | _Unwatchable:
        """A watch of the event loop running the caller, or ``_UNWATCHABLE``."""
        ident = threading.get_ident()
        limiter = _default_limiter()
        try:
            import asyncio

            loop = asyncio.get_running_loop()
        except RuntimeError:
            pass
        else:
            return cls(ident, loop.call_soon_threadsafe, loop.is_running, loop.is_closed, limiter)
        trio = sys.modules.get("trio")
        if trio is not None:
            token = trio.lowlevel.current_trio_token()
            finished = trio.RunFinishedError

            def alive() -> bool:
                # Trio has no "is running" to ask from another thread: a callback is refused
                # once its run is over.
                try:
                    token.run_sync_soon(_nothing)
                except finished:
                    return False
                return True

            return cls(ident, token.run_sync_soon, alive, lambda: not alive(), limiter)
        return _UNWATCHABLE

    def beat(self) -> None:
        """The heartbeat, on the loop thread: note when it ran, read the threadpool."""
        limiter = self.limiter
        if limiter is not None:
            try:
                stats = limiter.statistics()
                self.threadpool = (
                    float(stats.total_tokens),
                    float(stats.borrowed_tokens),
                    float(stats.tasks_waiting),
                )
            except Exception:
                self.limiter = None
                logs.internal_error("watchdog threadpool reading")
        self.ran_at = perf_counter()
        self.pending = False

    def check(self, now: float) -> float:
        """Look at the loop now; how long until it needs looking at again."""
        tick = self.threshold / 2
        if not self.pending:
            if not self.returned:
                self._came_back()
            if now < self.next_send:
                return self.next_send - now
            self.sent_at = now
            self.next_send = now + tick
            self.returned = False
            self.pending = True  # before sending: the heartbeat may run at once
            try:
                self.schedule(self.beat)
            except Exception:  # the loop is closed (asyncio) or its run over (trio)
                self.end()
                return math.inf
            return tick
        overdue = now - self.sent_at
        if overdue < self.threshold:
            return self.threshold - overdue
        # At every sample: a loop that stopped or closed with a heartbeat out is not blocked,
        # and its thread's ident may be another thread's by now. (Asyncio's check reads an
        # attribute; trio's sends a callback.)
        if not self.running():
            self.stalled = True
            self.block = None
            self._stop_observing()
            if self.closed():
                self.end()
                return math.inf
            return 0.1
        self._sample(now)
        return SAMPLE_INTERVAL

    def _came_back(self) -> None:
        self.returned = True
        lag = self.ran_at - self.sent_at
        stalled, self.stalled = self.stalled, False
        block, self.block = self.block, None
        self._stop_observing()
        if stalled:
            return
        for metrics in self.metrics:
            try:
                metrics.loop_heartbeat(id(self), lag, self.threadpool)
            except Exception:
                logs.internal_error("watchdog metrics")
        if block is not None:
            block.end(self.ran_at)
            block.report()
        elif lag > self.threshold:
            # Late, and never sampled: the watchdog thread could not run meanwhile (code that
            # holds the GIL, a starved process). The time still counts, on nobody.
            unknown = _Block(self.sent_at)
            unknown.parts[_UNKNOWN_KEY] = _Part(_Culprit.unknown(self.metrics), lag)
            unknown.report()

    def _sample(self, now: float) -> None:
        block = self.block
        if block is None:
            block = self.block = _Block(self.sent_at)
        frames = getattr(sys, "_current_frames", None)
        frame = frames().get(self.ident) if frames is not None else None
        if frame is None:
            culprit, places = _Culprit.unknown(self.metrics), list[Location]()
        else:
            culprit, places = _attribute(frame, self.ident, self.metrics)
        block.add(culprit, places, now)
        if culprit.record is not None and self.observer is None:
            # A task that blocks usually ends as the block does, and its span with it, before
            # the heartbeat runs: told of its end, the span gets its event while still open.
            self.observer = _TaskEnds(self)
            inflight.add_observer(self.observer)

    def _stop_observing(self) -> None:
        if self.observer is not None:
            inflight.remove_observer(self.observer)
            self.observer = None

    def end(self) -> None:
        self.ended = True
        self._stop_observing()
        for metrics in self.metrics:
            try:
                metrics.loop.set_threadpool(id(self), None)
            except Exception:
                logs.internal_error("watchdog metrics")


def _nothing() -> None:
    pass


def _default_limiter() -> Any:
    """anyio's default thread limiter of the running loop (one object per loop, so kept), or
    ``None``: the threadpool gauges then stay empty."""
    try:
        import anyio.to_thread

        return anyio.to_thread.current_default_thread_limiter()
    except Exception:
        return None


# --- what blocked it ---------------------------------------------------------------------------


class _Culprit:
    """Whom a stretch of blocked time goes to: its labels, its metrics sets, its task."""

    __slots__ = ("key", "labels", "metrics", "record")

    def __init__(
        self,
        key: object,
        labels: tuple[str, str, str],
        metrics: tuple[TaskMetrics, ...],
        record: TaskRecord | None,
    ) -> None:
        self.key = key
        self.labels = labels
        self.metrics = metrics
        self.record = record

    @classmethod
    def unknown(cls, metrics: tuple[TaskMetrics, ...]) -> _Culprit:
        return cls(_UNKNOWN_KEY, (NONE, OTHER, NO_ROUTE), metrics, None)


_UNKNOWN_KEY = ("unknown",)
# The loop thread waits for events: the heartbeat is late because the process did not get the
# CPU or the GIL (many busy threads), not because code blocked the loop. Counted in the lag
# only.
_IDLE_KEY = ("idle",)
_IDLE_CODES = {
    ("selectors.py", "select"),  # asyncio's own loop
    ("runners.py", "run"),  # uvloop: it waits in C, under asyncio.Runner.run
    ("_io_epoll.py", "get_events"), ("_io_kqueue.py", "get_events"),  # trio
    ("_io_windows.py", "get_events"),
}  # fmt: skip


def _idle(frame: types.FrameType) -> bool:
    code = frame.f_code
    return (os.path.basename(code.co_filename), code.co_name) in _IDLE_CODES


def _attribute(
    frame: types.FrameType, ident: int, watched: tuple[TaskMetrics, ...]
) -> tuple[_Culprit, list[Location]]:
    """What one sample of the loop thread's stack shows running, and the stack's places
    (innermost first)."""
    stack: list[types.FrameType] = []
    state: request.RequestState | None = None
    live = request.live
    current: types.FrameType | None = frame
    while current is not None and len(stack) < MAX_FRAMES:
        stack.append(current)
        if state is None:
            state = live.get(id(current))
        current = current.f_back
    places = [_place(f) for f in stack]
    if _idle(frame):
        return _Culprit(_IDLE_KEY, (NONE, OTHER, NO_ROUTE), (), None), places
    record = _running_task(stack, ident, state)
    if record is not None:
        series = record.series
        return _Culprit(id(record), series.labels, (record.config.metrics,), record), places
    if state is not None:
        route, route_obj = state.route()
        origin = detect(route_obj, state.stop_code, frame)[0] if route != NO_ROUTE else OTHER
        metrics = state.config.metrics
        return _Culprit((route, origin), (NONE, origin, route), (metrics,), None), places
    return _Culprit.unknown(watched), places


def _running_task(
    stack: list[types.FrameType], ident: int, state: request.RequestState | None
) -> TaskRecord | None:
    running = [r for r in inflight.snapshot() if r.status == RUNNING and r.thread == ident]
    if not running:
        return None
    if state is not None:
        # A request runs its tasks one after another: the one of them running now is it.
        own = [r for r in list(state.records) if r in running]
        if len(own) == 1:
            return own[0]
        running = own or running
    # Outside a request (or a task object run again): the task whose function is on the stack.
    for frame in stack:
        module = frame.f_globals.get("__name__")
        name = _function_name(frame.f_code)
        for record in running:
            if (record.qualname == name or f"{record.qualname}.__call__" == name
                    or record.qualname.endswith("." + name)) and record.name.startswith(
                        f"{module}."):  # fmt: skip
                return record
    return None


def _function_name(code: types.CodeType) -> str:
    return getattr(code, "co_qualname", code.co_name)  # co_qualname: Python 3.11+


def _place(frame: types.FrameType) -> Location:
    return frame.f_code.co_filename, frame.f_lineno or 0, _function_name(frame.f_code)


def _library_dirs() -> tuple[str, ...]:
    paths = sysconfig.get_paths()
    found = {paths[key] for key in ("stdlib", "platstdlib", "purelib", "platlib") if key in paths}
    for prefix in {sys.prefix, sys.base_prefix, sys.exec_prefix}:
        found.add(os.path.join(prefix, "lib"))
    return tuple(os.path.join(os.path.realpath(p), "") for p in found if p)


_LIBRARIES = _library_dirs()
_OWN_DIR = os.path.dirname(os.path.realpath(__file__))


_app_files: dict[str, bool] = {}


def _is_app(filename: str) -> bool:
    found = _app_files.get(filename)
    if found is None:
        if filename.startswith("<"):  # frozen modules, exec'd strings
            found = False
        else:
            path = filename if filename.startswith(_LIBRARIES) else os.path.realpath(filename)
            found = not path.startswith(_LIBRARIES) and os.path.dirname(path) != _OWN_DIR
        if len(_app_files) >= _MAX_LOGGED_PLACES:
            _app_files.clear()
        _app_files[filename] = found
    return found


def app_place(places: list[Location]) -> Location | None:
    """The innermost place that is the app's own code (not the standard library, an installed
    package, or bgtrace), else the innermost place."""
    for place in places:
        if _is_app(place[0]):
            return place
    return places[0] if places else None


def format_place(place: Location | None) -> str:
    if place is None:
        return "an unknown place (never sampled: code that holds the GIL, or a starved process)"
    return f"{place[0]}:{place[1]} in {place[2]}"


# --- one block ---------------------------------------------------------------------------------


class _TaskEnds(inflight.TaskObserver):
    """Told of task steps while a task blocks the loop (an ``inflight.TaskObserver``)."""

    def __init__(self, watch: _Watch) -> None:
        self.watch = watch

    def finished(
        self,
        record: TaskRecord,
        elapsed: float,
        outcome: str,
        error_type: str | None,
        exc: BaseException | None,
    ) -> None:
        # On the loop thread, the block over (the task's code returned), its span still open.
        block = self.watch.block
        part = block.parts.get(id(record)) if block is not None else None
        if block is not None and part is not None and part.culprit.record is record:
            so_far = part.seconds
            if block.last is part:
                so_far += max(perf_counter() - block.since, 0.0)
            _span_event(part, so_far)


class _Part:
    """The blocked time of one culprit in one block, and where its samples found it."""

    __slots__ = ("culprit", "places", "seconds", "span_told", "stack")

    def __init__(self, culprit: _Culprit, seconds: float = 0.0) -> None:
        self.culprit = culprit
        self.seconds = seconds
        self.span_told = False
        self.places: Counter[Location] = Counter()
        self.stack: list[Location] = []  # the first sample's, for the DEBUG line


class _Block:
    """One stretch of the loop not running, shared out among what the samples showed."""

    def __init__(self, since: float) -> None:
        self.since = since  # up to when the time is shared out
        self.parts: dict[object, _Part] = {}
        self.last: _Part | None = None

    def add(self, culprit: _Culprit, stack: list[Location], now: float) -> None:
        part = self.parts.get(culprit.key)
        if part is None:
            part = self.parts[culprit.key] = _Part(culprit)
            part.stack = stack
        part.seconds += max(now - self.since, 0.0)
        self.since = max(now, self.since)
        place = app_place(stack)
        if place is not None:
            part.places[place] += 1
        self.last = part

    def end(self, at: float) -> None:
        """The heartbeat ran at ``at``: the rest goes to the last culprit seen (the sample
        after the heartbeat, if any, gave back what it took)."""
        if self.last is not None:
            self.last.seconds = max(self.last.seconds + at - self.since, 0.0)

    def report(self) -> None:
        for key, part in self.parts.items():
            if part.seconds > 0 and key is not _IDLE_KEY:
                try:
                    _report(part)
                except Exception:
                    logs.internal_error("watchdog report")


def _report(part: _Part) -> None:
    culprit = part.culprit
    task, origin, route = culprit.labels
    for metrics in culprit.metrics:
        metrics.loop_blocked(task, origin, route, part.seconds)
    place = _main_place(part)
    record = culprit.record
    _span_event(part, part.seconds)
    if _should_log((culprit.labels, place)):
        logger.warning(
            "event loop blocked %.2f s by task=%s origin=%s route=%s at %s",
            part.seconds,
            task if record is None else record.name,
            origin,
            route,
            format_place(place),
        )
    if part.stack and logger.isEnabledFor(logging.DEBUG):
        logger.debug(
            "event loop blocked by task=%s route=%s, stack (innermost first):\n  %s",
            task,
            route,
            "\n  ".join(format_place(p) for p in part.stack),
        )


def _main_place(part: _Part) -> Location | None:
    return part.places.most_common(1)[0][0] if part.places else None


def _span_event(part: _Part, seconds: float) -> None:
    """The ``bgtask.loop_blocked`` event on the blocking task's span, once per block."""
    record = part.culprit.record
    span = record.span if record is not None else None
    if part.span_told or span is None or not span.is_recording():
        return
    part.span_told = True
    try:
        attributes: dict[str, str | int | float] = {ATTR_BLOCKED_DURATION: seconds}
        place = _main_place(part)
        if place is not None:
            attributes[ATTR_FILE_PATH] = place[0]
            attributes[ATTR_LINE_NUMBER] = place[1]
            attributes[ATTR_FUNCTION_NAME] = place[2]
        span.add_event(EVENT_LOOP_BLOCKED, attributes)
    except Exception:
        logs.internal_error("watchdog span event")


_logged: dict[object, float] = {}


def _should_log(key: object) -> bool:
    now = time.monotonic()
    last = _logged.get(key)
    if last is not None and now - last < LOG_INTERVAL:
        return False
    if len(_logged) >= _MAX_LOGGED_PLACES:
        _logged.clear()
    _logged[key] = now
    return True


# --- the thread --------------------------------------------------------------------------------

_lock = threading.Lock()
_watches: list[_Watch] = []
_wake = threading.Event()
_thread_pid = 0
_thread: threading.Thread | None = None
_stopping = False
IDLE_CHECK = 1.0


def _ensure_thread() -> None:
    """Start this process's watchdog thread once (the caller holds ``_lock``)."""
    global _thread_pid, _thread
    if _thread_pid == os.getpid() or _stopping:
        return
    thread = threading.Thread(target=_run, name="bgtrace-watchdog", daemon=True)
    thread.start()
    _thread_pid = os.getpid()
    _thread = thread


def _run() -> None:
    while not _stopping:
        delay = IDLE_CHECK
        try:
            delay = _check_all()
        except Exception:
            logs.internal_error("watchdog")
        if _wake.wait(delay):
            _wake.clear()


def _check_all() -> float:
    now = perf_counter()
    delay = IDLE_CHECK
    with _lock:
        watches = list(_watches)
    for watch in watches:
        if not watch.ended:
            try:
                delay = min(delay, watch.check(now))
            except Exception:
                logs.internal_error("watchdog check")
        if watch.ended:
            with _lock:
                if watch in _watches:
                    _watches.remove(watch)
    return max(delay, 0.0)


def _stop_at_exit() -> None:
    # The thread ends before the interpreter tears down the modules it uses (a daemon thread
    # would otherwise be frozen mid-check, or wake up to a half-finalized interpreter).
    global _stopping
    _stopping = True
    _wake.set()
    thread = _thread
    if thread is not None and thread is not threading.current_thread():
        thread.join(timeout=1.0)


atexit.register(_stop_at_exit)


def _forget_in_child() -> None:
    # A forked child has no watchdog thread, and its parent's loops are not its own.
    global _thread_pid, _thread, _lock, _wake
    _lock = threading.Lock()
    _wake = threading.Event()  # its lock may have been held by the parent's watchdog thread
    for watch in _watches:
        watch.ended = True
    _watches.clear()
    _thread_pid = 0
    _thread = None


os.register_at_fork(after_in_child=_forget_in_child)
