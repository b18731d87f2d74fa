"""Stuck and long-running background tasks: how old the oldest ones are, and where a stuck one
waits.

Everything here reads the tasks in flight (``inflight``) at its own pace: the oldest-age gauges
at each scrape (or multiprocess flush), the stuck check from a daemon thread of its own, the
shutdown report when the server says it waits for background work. A task pays nothing here:
an async task's record keeps the ids of its event loop and of the asyncio ``Task`` running it,
by which the coroutine chain it is suspended in is found when it is looked for.

Locations are ``file:line in function`` of code objects only: never a local variable, never an
argument.
"""

from __future__ import annotations

import asyncio
import atexit
import logging
import os
import sys
import threading
import types
import weakref
from time import perf_counter
from typing import TYPE_CHECKING, Any

from . import inflight, logs
from .records import CLAIMED, QUEUED, RUNNING, TaskRecord, sampled_trace_id

if TYPE_CHECKING:
    from .config import Config
    from .metrics import TaskMetrics

DEFAULT_STUCK_AFTER = 300.0
# Innermost frames named in a location: enough to show the app's line under a library's wait.
STACK_DEPTH = 5
EVENT_STUCK = "bgtask.stuck"
ATTR_RUNNING = "bgtask.running_seconds"
ATTR_WAITING_AT = "bgtask.waiting_at"
STUCK = "background task stuck"
AT_SHUTDOWN = "background task still running at shutdown"
UNKNOWN = "unknown"
# The checker wakes at a tenth of the shortest stuck_after, within these bounds.
_MIN_INTERVAL, _MAX_INTERVAL = 0.05, 5.0

Labels = tuple[str, str, str]


# --- the oldest-age gauges -----------------------------------------------------------------


def oldest_ages(metrics: TaskMetrics) -> dict[Labels, tuple[float, float]]:
    """(oldest running, oldest queued) age in seconds per label set of ``metrics``, for the
    series with a task in flight now. A claimed def task waiting for a thread is queued."""
    now = perf_counter()
    ages: dict[Labels, tuple[float, float]] = {}
    for record in inflight.snapshot():
        if record.config.metrics is not metrics:
            continue
        status = record.status
        if status == RUNNING:
            running, queued = now - record.started_at, 0.0
        elif status in (QUEUED, CLAIMED):
            running, queued = 0.0, now - record.enqueued_at
        else:
            continue  # ended between the snapshot and here
        labels = record.series.labels
        was = ages.get(labels)
        if was is not None:
            running, queued = max(running, was[0]), max(queued, was[1])
        ages[labels] = (running, queued)
    return ages


# --- settings, per middleware --------------------------------------------------------------

_after: weakref.WeakKeyDictionary[Config, float | None] = weakref.WeakKeyDictionary()
# For tasks outside any middleware's requests: the last middleware's setting.
_default_after: float | None = DEFAULT_STUCK_AFTER
_lock = threading.Lock()


def watch(config: Config, stuck_after: float | None) -> None:
    """Check ``config``'s tasks against ``stuck_after`` (``None``: never), and name running
    tasks at a server's graceful shutdown. Called when a middleware is made."""
    global _default_after, _checker_wanted
    with _lock:
        _after[config] = stuck_after
        _default_after = stuck_after
        _checker_wanted = _checker_wanted or stuck_after is not None
    if stuck_after is not None and _checker is None:
        inflight.add_observer(_OBSERVER)
    _install_shutdown_hook()


def _stuck_after(config: Config) -> float | None:
    try:
        return _after.get(config, _default_after)
    except TypeError:  # not hashable: cannot be one of ours
        return _default_after


def _interval() -> float:
    with _lock:
        afters = [a for a in (*_after.values(), _default_after) if a is not None]
    if not afters:
        return _MAX_INTERVAL
    return min(max(min(afters) / 10, _MIN_INTERVAL), _MAX_INTERVAL)


# --- starting the checker -------------------------------------------------------------------


class _Starter(inflight.TaskObserver):
    """Starts the checker thread at the first task after a middleware asked for it (in each
    process: a thread started before a fork does not exist in the child), then leaves: tasks
    pay nothing for the stuck check after that."""

    def started(self, record: TaskRecord) -> None:
        if _checker is None and _checker_wanted:
            _start_checker()
        if _checker is not None:
            inflight.remove_observer(self)


_OBSERVER = _Starter()


# --- the checker thread --------------------------------------------------------------------

_checker: threading.Thread | None = None
# Whether any middleware asked for a stuck_after: read without the lock by the starter.
_checker_wanted = False
# Set at interpreter exit: the thread ends before the modules it uses are torn down.
_stop = threading.Event()
_reported: weakref.WeakSet[TaskRecord] = weakref.WeakSet()


def _start_checker() -> None:
    global _checker
    with _lock:
        if _checker is not None or _stop.is_set():
            return
        if _default_after is None and not any(a is not None for a in _after.values()):
            return  # nothing to check: started by the first task after a middleware wants it
        thread = threading.Thread(target=_check_forever, name="bgtrace-stuck", daemon=True)
        try:
            thread.start()
        except RuntimeError:  # at interpreter shutdown
            return
        _checker = thread


def _check_forever() -> None:
    while not _stop.wait(_interval()):
        try:
            check()
        except Exception:
            logs.internal_error("stuck task check")


def check() -> None:
    """Log each task running longer than its ``stuck_after``, once, and keep where every such
    task waits now in ``record.waiting_at``."""
    now = perf_counter()
    tasks = _Tasks()
    for record in inflight.snapshot():
        if record.status != RUNNING:
            continue
        after = _stuck_after(record.config)
        running = now - record.started_at
        if after is None or running < after:
            continue
        where = location(record, tasks)
        record.waiting_at = where
        if record in _reported:
            continue
        _reported.add(record)
        report(STUCK, record, running, where)
        span = record.span
        if span is not None:
            try:
                if span.is_recording():
                    span.add_event(EVENT_STUCK, {ATTR_RUNNING: running, ATTR_WAITING_AT: where})
            except Exception:
                logs.internal_error("stuck task span event")


def report(lead: str, record: TaskRecord, running: float, where: str) -> None:
    span = record.span
    trace_id = sampled_trace_id(span) if span is not None else None
    logs.logger.warning(
        "%s: task=%s origin=%s route=%s trace_id=%s running=%.1fs waiting_at=%s",
        lead,
        record.name,
        record.origin,
        record.route,
        trace_id or "-",
        running,
        where,
    )


def report_running(lead: str = AT_SHUTDOWN) -> None:
    """One line per task running now in this process, with where it waits."""
    now = perf_counter()
    tasks = _Tasks()
    for record in inflight.snapshot():
        if record.status == RUNNING:
            where = record.waiting_at = location(record, tasks)
            report(lead, record, now - record.started_at, where)


# --- where a task waits --------------------------------------------------------------------


def location(record: TaskRecord, tasks: _Tasks | None = None) -> str:
    """The innermost frames of the task, innermost first: ``file:line in function <- ...``.
    ``tasks``: the asyncio Tasks read for the other records of the same pass."""
    try:
        if not record.claimed_at:
            # An async task: where its coroutine is suspended, never the loop thread's stack
            # (that shows whatever runs on the loop now).
            task = (tasks or _Tasks()).find(record)
            if task is None:
                return UNKNOWN
            frames = _coroutine_frames(task.get_coro())
        else:
            frames = _thread_frames(record.thread)
        frames = _task_frames(frames)
        if not frames:
            return UNKNOWN
        prefixes = _path_prefixes()
        return " <- ".join(_describe(frame, prefixes) for frame in reversed(frames[-STACK_DEPTH:]))
    except Exception:
        logs.internal_error("stuck task location")
        return UNKNOWN


class _Tasks:
    """The asyncio Tasks of each event loop by id, read once per pass over the records.

    A running async task's record keeps the id of the asyncio Task running it (taken as it
    started). While the record is running its Task is alive (a freed Task closes its coroutine,
    which ends the record), so the id names no other Task; ``None`` under trio, or once the
    loop is gone."""

    __slots__ = ("_by_loop",)

    def __init__(self) -> None:
        self._by_loop: dict[int, dict[int, asyncio.Task[Any]]] = {}

    def find(self, record: TaskRecord) -> asyncio.Task[Any] | None:
        by_id = self._by_loop.get(record.loop)
        if by_id is None:
            loop = inflight.loop_of(record.loop)
            by_id = {}
            if loop is not None and not loop.is_closed():
                # all_tasks copies asyncio's set of live tasks (of every loop), retrying while
                # another thread changes it, and keeps this loop's.
                by_id = {id(task): task for task in asyncio.all_tasks(loop)}
            self._by_loop[record.loop] = by_id
        return by_id.get(record.asyncio_task) if record.asyncio_task else None


def _coroutine_frames(coroutine: Any) -> list[types.FrameType]:
    """The frames of a coroutine chain, outermost first: each coroutine or generator awaits
    the next (``cr_await``, ``gi_yieldfrom``, ``ag_await``) down to a future."""
    frames: list[types.FrameType] = []
    current = coroutine
    while current is not None and len(frames) < 1000:
        frame = None
        for prefix in ("cr", "gi", "ag"):
            frame = getattr(current, f"{prefix}_frame", None)
            if frame is not None:
                break
        if frame is None:
            break
        frames.append(frame)
        awaited = None
        for attribute in ("cr_await", "gi_yieldfrom", "ag_await"):
            awaited = getattr(current, attribute, None)
            if awaited is not None:
                break
        current = awaited
    return frames


def _thread_frames(ident: int) -> list[types.FrameType]:
    frame = sys._current_frames().get(ident)
    frames: list[types.FrameType] = []
    while frame is not None:
        frames.append(frame)
        frame = frame.f_back
    frames.reverse()
    return frames


_PACKAGE = os.path.dirname(os.path.abspath(__file__)) + os.sep


def _task_frames(frames: list[types.FrameType]) -> list[types.FrameType]:
    """The frames inside the task: below bgtrace's own and Starlette's task runner."""
    for index in range(len(frames) - 1, -1, -1):
        filename = frames[index].f_code.co_filename
        if filename.startswith(_PACKAGE) or filename.endswith(_STARLETTE_BACKGROUND):
            inner = frames[index + 1 :]
            return inner if inner else frames
    return frames


_STARLETTE_BACKGROUND = os.path.join("starlette", "background.py")


def _path_prefixes() -> list[str]:
    """``sys.path`` entries, longest first: a file is named relative to its import root."""
    entries = {os.path.abspath(p or os.curdir) for p in sys.path if isinstance(p, str)}
    return sorted((e.rstrip(os.sep) + os.sep for e in entries), key=len, reverse=True)


def _describe(frame: types.FrameType, prefixes: list[str]) -> str:
    code = frame.f_code
    filename = code.co_filename
    for prefix in prefixes:
        if filename.startswith(prefix):
            filename = filename[len(prefix) :]
            break
    return f"{filename}:{frame.f_lineno} in {code.co_name}"


# --- graceful shutdown ---------------------------------------------------------------------

# uvicorn logs these on "uvicorn.error" while it shuts down: the first once the connections are
# closed and only background work remains; the second when --timeout-graceful-shutdown runs
# out and it cancels what remains. The lifespan shutdown comes only after either.
SERVER_LOGGER = "uvicorn.error"
_SERVER_WAITING = ("Waiting for background tasks to complete", "Cancel %s running task(s)")


class _ShutdownWatch(logging.Filter):
    """Names the running tasks when the server says it waits for them. Lets every record
    through: the server's logging is unchanged."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.msg
            if isinstance(message, str) and message.startswith(_SERVER_WAITING):
                report_running()
        except Exception:
            logs.internal_error("shutdown report")
        return True


_SHUTDOWN_WATCH = _ShutdownWatch()


def _install_shutdown_hook() -> None:
    server_logger = logging.getLogger(SERVER_LOGGER)
    if _SHUTDOWN_WATCH not in server_logger.filters:
        server_logger.addFilter(_SHUTDOWN_WATCH)


def _stop_at_exit() -> None:
    _stop.set()
    checker = _checker
    if checker is not None and checker is not threading.current_thread():
        checker.join(timeout=1.0)


atexit.register(_stop_at_exit)


def _forget_in_child() -> None:
    # The parent's checker thread does not exist here, nor do its tasks.
    global _checker, _lock, _stop
    _checker = None
    _lock = threading.Lock()
    _stop = threading.Event()  # its lock may have been held by the parent's checker
    if _checker_wanted:
        inflight.add_observer(_OBSERVER)  # start this process's checker at its first task


os.register_at_fork(after_in_child=_forget_in_child)
