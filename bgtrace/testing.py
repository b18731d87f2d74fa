"""``bgtrace.testing``: assert in your own tests which background tasks were queued and what
became of them.

A pytest plugin (entry point ``pytest11``): the ``bgtasks`` fixture records every background
task queued while the test runs, whatever the app (with or without
``BackgroundTaskMiddleware``; TestClient or a real server in the same process). Nothing is
instrumented until a test asks for the fixture, and the fixture puts things back as it found
them. Outside pytest, ``record_tasks()`` gives the same recorder as a context manager.

Task arguments are held in memory for the assertions only: they reach no metric, span or log.
"""

from __future__ import annotations

import asyncio
import contextvars
import inspect
import reprlib
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import anyio
import pytest

from . import inflight, instrumentation
from .naming import task_names
from .records import CANCELLED, QUEUED, RECORD_ATTR, TaskRecord, background_starting
from .request import current

__all__ = ["BackgroundTaskRecorder", "RecordedTask", "bgtasks", "record_tasks"]

# What became of a recorded task.
STATE_QUEUED = "queued"  # queued, not started yet
STATE_HELD = "held"  # queued, kept from running by hold(): run_held() runs it
STATE_RUNNING = "running"
STATE_COMPLETED = "completed"  # ran to its end without raising
STATE_FAILED = "failed"  # raised
STATE_CANCELLED = "cancelled"  # cancelled while running
STATE_DROPPED = "dropped"  # never started: see ``reason``

_OUTCOME_STATES = {
    "success": STATE_COMPLETED,
    "failure": STATE_FAILED,
    "cancelled": STATE_CANCELLED,
}

# Arguments in a failure message: long enough to recognise, short enough to read.
_repr = reprlib.Repr()
_repr.maxstring = 60
_repr.maxother = 60
_repr.maxlist = _repr.maxtuple = _repr.maxdict = _repr.maxset = 6

# Set while run_held() runs a held task, so that it is not held again.
_releasing: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "bgtrace_releasing", default=False
)


@dataclass(eq=False)
class RecordedTask:
    """One queued background task and what became of it."""

    func: Callable[..., Any]
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    #: ``module.qualname``, as in the ``task`` label.
    name: str
    origin: str
    route: str
    #: The dependency's qualified name, when ``origin`` is ``"dependency"``.
    dependency: str | None
    state: str = STATE_QUEUED
    #: Why it never started, when ``dropped`` (``request_error``, ``not_attached``, ...).
    reason: str | None = None
    #: The exception it raised (``failed``), or the cancellation (``cancelled``).
    error: BaseException | None = None
    #: As the ``error_type`` label writes it.
    error_type: str | None = None
    #: Seconds from start to end, once it ended.
    run_time: float | None = None

    def call_text(self) -> str:
        """``module.func(arg, key=value)``, arguments shortened."""
        parts = [_repr.repr(a) for a in self.args]
        parts += [f"{k}={_repr.repr(v)}" for k, v in self.kwargs.items()]
        return f"{self.name}({', '.join(parts)})"

    def __str__(self) -> str:
        end = self.state
        if self.state == STATE_DROPPED:
            end += f" ({self.reason})"
        elif self.state == STATE_FAILED:
            end += f" ({self.error_type})"
        return f"{self.call_text()}  origin={self.origin} route={self.route}  {end}"


class _Log(inflight.TaskObserver):
    """The observer bgtrace tells of each step (on the thread where the step happens)."""

    def __init__(self) -> None:
        self.lock = threading.Condition()
        self.by_record: dict[TaskRecord, RecordedTask] = {}
        self.tasks: list[RecordedTask] = []

    def queued(self, record: TaskRecord, task: Any) -> None:
        entry = RecordedTask(
            func=task.func,
            args=tuple(task.args),
            kwargs=dict(task.kwargs),
            name=record.name,
            origin=record.origin,
            route=record.route,
            dependency=record.dependency,
        )
        with self.lock:
            self.by_record[record] = entry
            self.tasks.append(entry)

    def started(self, record: TaskRecord) -> None:
        with self.lock:
            entry = self.by_record.get(record)
            if entry is not None:
                entry.state = STATE_RUNNING

    def finished(
        self,
        record: TaskRecord,
        elapsed: float,
        outcome: str,
        error_type: str | None,
        exc: BaseException | None,
    ) -> None:
        with self.lock:
            entry = self.by_record.pop(record, None)
            if entry is not None:
                entry.state = _OUTCOME_STATES.get(outcome, outcome)
                entry.run_time = elapsed
                entry.error = exc
                entry.error_type = error_type
                self.lock.notify_all()

    def dropped(self, record: TaskRecord, reason: str) -> None:
        with self.lock:
            entry = self.by_record.pop(record, None)
            if entry is not None:
                entry.state = STATE_DROPPED
                entry.reason = reason
                self.lock.notify_all()


class BackgroundTaskRecorder:
    """Records every background task queued while it is open (the ``bgtasks`` fixture)."""

    def __init__(self) -> None:
        self._log = _Log()
        self._lock = self._log.lock
        self._held: list[tuple[Any, TaskRecord]] = []
        self._holding = False
        self._open = False
        self._was_instrumented = False
        self._previous_hold: Callable[[Any], bool] | None = None

    # -- opening and closing ------------------------------------------------------------

    def open(self) -> None:
        self._was_instrumented = instrumentation.is_instrumented()
        instrumentation.instrument()
        self._previous_hold = instrumentation.task_hold
        inflight.add_observer(self._log)
        self._open = True

    def close(self) -> None:
        """Stop recording; tasks still held count as dropped (``cancelled``): they never ran."""
        if not self._open:
            return
        self._open = False
        self.stop_holding()
        held, self._held = self._held, []
        for _task, record in held:
            record.drop(CANCELLED)
        inflight.remove_observer(self._log)
        if not self._was_instrumented:
            instrumentation.uninstrument()
        with self._lock:
            self._log.by_record.clear()

    # -- reading ----------------------------------------------------------------------------

    def queued(
        self,
        *,
        task: Callable[..., Any] | str | None = None,
        route: str | None = None,
        origin: str | None = None,
    ) -> list[RecordedTask]:
        """Every task queued while the test ran, in order, whatever became of it."""
        return self._select(None, task=task, route=route, origin=origin)

    def completed(
        self,
        *,
        task: Callable[..., Any] | str | None = None,
        route: str | None = None,
        origin: str | None = None,
    ) -> list[RecordedTask]:
        """The tasks that ran to their end without raising."""
        return self._select(STATE_COMPLETED, task=task, route=route, origin=origin)

    def failed(
        self,
        *,
        task: Callable[..., Any] | str | None = None,
        route: str | None = None,
        origin: str | None = None,
        error: type[BaseException] | tuple[type[BaseException], ...] | None = None,
    ) -> list[RecordedTask]:
        """The tasks that raised; ``error``: only those whose exception is an instance."""
        found = self._select(STATE_FAILED, task=task, route=route, origin=origin)
        if error is not None:
            found = [t for t in found if isinstance(t.error, error)]
        return found

    def cancelled(
        self,
        *,
        task: Callable[..., Any] | str | None = None,
        route: str | None = None,
        origin: str | None = None,
    ) -> list[RecordedTask]:
        """The tasks cancelled while running."""
        return self._select(STATE_CANCELLED, task=task, route=route, origin=origin)

    def dropped(
        self,
        *,
        task: Callable[..., Any] | str | None = None,
        route: str | None = None,
        origin: str | None = None,
        reason: str | None = None,
    ) -> list[RecordedTask]:
        """The tasks queued but never started; ``reason`` as in ``bgtask_dropped_total``."""
        found = self._select(STATE_DROPPED, task=task, route=route, origin=origin)
        if reason is not None:
            found = [t for t in found if t.reason == reason]
        return found

    def held(
        self,
        *,
        task: Callable[..., Any] | str | None = None,
        route: str | None = None,
        origin: str | None = None,
    ) -> list[RecordedTask]:
        """The tasks kept from running by ``hold()`` and not run yet."""
        return self._select(STATE_HELD, task=task, route=route, origin=origin)

    def _select(
        self,
        state: str | None,
        *,
        task: Callable[..., Any] | str | None,
        route: str | None,
        origin: str | None,
    ) -> list[RecordedTask]:
        name = None if task is None else _name_of(task)
        with self._lock:
            return [
                t
                for t in self._log.tasks
                if (state is None or t.state == state)
                and (name is None or t.name == name)
                and (route is None or t.route == route)
                and (origin is None or t.origin == origin)
            ]

    # -- assertions -------------------------------------------------------------------------

    def assert_queued(
        self, task: Callable[..., Any] | str, /, *args: Any, **kwargs: Any
    ) -> RecordedTask:
        """Fail unless ``task`` (the callable or its ``module.qualname``) was queued with at
        least these arguments (positional or by name, as the function would receive them).
        Returns the first such task."""
        found = self._matching(task, args, kwargs)
        if not found:
            raise AssertionError(
                f"expected {_wanted(task, args, kwargs)} to be queued as a background task; "
                + self._listing()
            )
        return found[0]

    def assert_not_queued(
        self, task: Callable[..., Any] | str, /, *args: Any, **kwargs: Any
    ) -> None:
        """Fail if ``task`` was queued with at least these arguments."""
        found = self._matching(task, args, kwargs)
        if found:
            lines = "".join(f"\n  {t}" for t in found)
            raise AssertionError(
                f"expected {_wanted(task, args, kwargs)} not to be queued as a background task; "
                f"queued {len(found)} time(s):{lines}"
            )

    def _matching(
        self, task: Callable[..., Any] | str, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> list[RecordedTask]:
        return [t for t in self._select(None, task=task, route=None, origin=None)
                if _arguments_match(t, args, kwargs)]  # fmt: skip

    def _listing(self) -> str:
        tasks = self.queued()
        if not tasks:
            return (
                "no background task was queued while the test ran (tasks queued before the "
                "test started, or outside Starlette's BackgroundTask, are not seen)"
            )
        lines = "".join(f"\n  {t}" for t in tasks)
        return f"queued while the test ran ({len(tasks)}):{lines}"

    # -- waiting ----------------------------------------------------------------------------

    def _pending(self) -> int:
        return sum(t.state in (STATE_QUEUED, STATE_RUNNING) for t in self._log.tasks)

    def wait(self, timeout: float = 10.0) -> None:
        """Block until every recorded task ended (or is held): with a real server, tasks run
        after the response arrived. Fails after ``timeout`` seconds, listing the tasks."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while self._pending():
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(
                        f"background tasks still pending after {timeout:g} s; " + self._listing()
                    )
                self._lock.wait(min(left, 0.05))

    async def wait_async(self, timeout: float = 10.0) -> None:
        """``wait()`` for an async test whose server runs on the test's own event loop."""
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                if not self._pending():
                    return
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"background tasks still pending after {timeout:g} s; " + self._listing()
                )
            await anyio.sleep(0.01)

    # -- hold mode --------------------------------------------------------------------------

    def hold(self) -> _Holding:
        """Record tasks without running them, from now until the test ends (or the ``with``
        block ends, used as ``with bgtasks.hold():``). A held task stays queued, exactly as
        bgtrace's metrics and live page see it: ``bgtask_queue_length`` counts it, nothing
        counts it dropped. ``run_held()`` runs the held tasks; those still held when the test
        ends are counted dropped with reason ``cancelled``, like tasks a server shutdown
        cancelled before they started."""
        self._holding = True
        instrumentation.task_hold = self._hold
        return _Holding(self)

    def stop_holding(self) -> None:
        """Run tasks as usual again (those held so far stay held until ``run_held()``)."""
        self._holding = False
        if instrumentation.task_hold == self._hold:
            instrumentation.task_hold = self._previous_hold

    def _hold(self, task: Any) -> bool:
        """Called by the instrumentation for each task about to run."""
        if not self._holding or _releasing.get():
            return False
        record = getattr(task, "__dict__", {}).get(RECORD_ATTR)
        if not isinstance(record, TaskRecord) or record.status != QUEUED:
            return False
        with self._lock:
            entry = self._log.by_record.get(record)
            if entry is None:
                return False  # queued before this test: not ours to hold
            entry.state = STATE_HELD
        # The response is over, as when the task runs; the request no longer answers for the
        # task (it would count it dropped at its end): run_held() or close() ends it.
        background_starting()
        state = current.get()
        if state is not None and record in state.records:
            state.records.remove(record)
        self._held.append((task, record))
        return True

    async def run_held_async(self, *, raise_errors: bool = True) -> None:
        """Run the held tasks, oldest first, each through bgtrace as it would have run (its
        queue wait includes the hold). A failing task does not stop the others; with
        ``raise_errors`` the first exception is raised once all ran."""
        first: Exception | None = None
        token = _releasing.set(True)
        try:
            while self._held:
                task, record = self._held.pop(0)
                with self._lock:
                    entry = self._log.by_record.get(record)
                    if entry is not None:
                        entry.state = STATE_QUEUED
                try:
                    await task()
                except Exception as exc:
                    first = first or exc
        finally:
            _releasing.reset(token)
        if first is not None and raise_errors:
            raise first

    def run_held(self, *, raise_errors: bool = True) -> None:
        """``run_held_async()`` from a sync test, in an event loop of its own."""
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            anyio.run(lambda: self.run_held_async(raise_errors=raise_errors))
            return
        raise RuntimeError(
            "bgtasks.run_held() called inside a running event loop: "
            "use `await bgtasks.run_held_async()`"
        )


class _Holding:
    """Returned by ``hold()``: as a context manager, holding ends with the block."""

    def __init__(self, recorder: BackgroundTaskRecorder) -> None:
        self._recorder = recorder

    def __enter__(self) -> BackgroundTaskRecorder:
        return self._recorder

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._recorder.stop_holding()


def _name_of(task: Callable[..., Any] | str) -> str:
    return task if isinstance(task, str) else task_names(task)[0]


def _wanted(task: Callable[..., Any] | str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str:
    parts = [_repr.repr(a) for a in args] + [f"{k}={_repr.repr(v)}" for k, v in kwargs.items()]
    if parts:
        parts.append("...")
    return f"{_name_of(task)}({', '.join(parts)})"


def _arguments_match(recorded: RecordedTask, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    """Whether the task got at least ``args`` and ``kwargs``, bound as the function binds
    them (``send_email("a@x")`` matches ``to="a@x"``); compared as given where the function
    has no signature to bind against."""
    if not args and not kwargs:
        return True
    try:
        try:
            signature = inspect.signature(recorded.func)
            got = signature.bind(*recorded.args, **recorded.kwargs)
            want = signature.bind_partial(*args, **kwargs)
        except (TypeError, ValueError):
            return recorded.args[: len(args)] == args and all(
                k in recorded.kwargs and recorded.kwargs[k] == v for k, v in kwargs.items()
            )
        got.apply_defaults()
        for name, value in want.arguments.items():
            if name not in got.arguments:
                return False
            kind = signature.parameters[name].kind
            actual = got.arguments[name]
            if kind is inspect.Parameter.VAR_POSITIONAL:
                if tuple(actual[: len(value)]) != tuple(value):
                    return False
            elif kind is inspect.Parameter.VAR_KEYWORD:
                if any(k not in actual or actual[k] != v for k, v in value.items()):
                    return False
            elif actual != value:
                return False
        return True
    except Exception:
        return False  # an argument whose == raises (arrays) matches nothing


@contextmanager
def record_tasks() -> Iterator[BackgroundTaskRecorder]:
    """Record the background tasks queued inside the block (what the fixture uses)."""
    recorder = BackgroundTaskRecorder()
    recorder.open()
    try:
        yield recorder
    finally:
        recorder.close()


@pytest.fixture
def bgtasks() -> Iterator[BackgroundTaskRecorder]:
    """Every background task queued while the test runs, and what became of it."""
    with record_tasks() as recorder:
        yield recorder
