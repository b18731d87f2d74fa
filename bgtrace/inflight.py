"""The tasks of this process that are queued or running now, and who is told as tasks move.

The diagnostics (stuck tasks, the oldest-age gauges, the live page, ``bgtrace.testing``) read
these at their own pace, never on the request path. A task pays one dict insert when it is
queued and one delete when it ends; an observer list that nobody joined costs one empty loop
per step.
"""

from __future__ import annotations

import asyncio
import os
import threading
import weakref
from typing import TYPE_CHECKING, Any

from . import logs

if TYPE_CHECKING:
    from .records import TaskRecord

# Queued or running records, oldest first (a dict keeps insertion order; records hash by
# identity). Only the GIL guards it: one insert or delete is atomic, and ``snapshot`` copies
# it in one C call.
_tasks: dict[TaskRecord, None] = {}


def add(record: TaskRecord) -> None:
    _tasks[record] = None


def discard(record: TaskRecord) -> None:
    _tasks.pop(record, None)


def snapshot() -> list[TaskRecord]:
    """The records queued or running now, in the order they were queued."""
    return list(_tasks)


# The event loops that ran async tasks, by id, weakly: a record keeps its loop's id (an int,
# no reference), so that a loop abandoned without closing it (its timers hold its tasks) is
# not kept alive by the tasks in flight; the stuck check finds the loop here.
_loops: dict[int, weakref.ref[asyncio.AbstractEventLoop]] = {}


def loop_key(loop: asyncio.AbstractEventLoop) -> int:
    """``loop``'s key for ``loop_of``: one dict lookup once it is known."""
    key = id(loop)
    if key not in _loops:

        def forget(_: object) -> None:
            # As the loop is freed: before any other object can have its id.
            _loops.pop(key, None)

        _loops[key] = weakref.ref(loop, forget)
    return key


def loop_of(key: int) -> asyncio.AbstractEventLoop | None:
    ref = _loops.get(key)
    return None if ref is None else ref()


class TaskObserver:
    """Told of every step of every task of this process, after bgtrace counted it.

    Called on the thread where the step happens (a ``def`` task starts and ends in its worker
    thread), outside bgtrace's locks. An observer that raises is logged once per step and never
    reaches the app or the task. Each step does nothing here: an observer overrides the steps
    it needs.
    """

    def queued(self, record: TaskRecord, task: Any) -> None:
        """``task`` is the ``BackgroundTask`` (its ``func``, ``args``, ``kwargs``)."""

    def started(self, record: TaskRecord) -> None:
        pass

    def finished(
        self,
        record: TaskRecord,
        elapsed: float,
        outcome: str,
        error_type: str | None,
        exc: BaseException | None,
    ) -> None:
        """``error_type``: the exception's name as bgtrace reports it (not capped)."""

    def dropped(self, record: TaskRecord, reason: str) -> None:
        pass


# A tuple, replaced whole: the task path iterates it without a lock. Writers take the lock:
# two threads replacing it at once (the watchdog joins and leaves at each loop block) would
# each drop the other's change.
observers: tuple[TaskObserver, ...] = ()
_observers_lock = threading.Lock()


def add_observer(observer: TaskObserver) -> None:
    global observers
    with _observers_lock:
        if observer not in observers:
            observers = (*observers, observer)


def remove_observer(observer: TaskObserver) -> None:
    global observers
    with _observers_lock:
        observers = tuple(o for o in observers if o is not observer)


def observer_failed(step: str) -> None:
    logs.internal_error(f"task observer ({step})")


def _forget_in_child() -> None:
    # A forked child runs none of its parent's tasks: they are the parent's to end.
    global _observers_lock
    _tasks.clear()
    _observers_lock = threading.Lock()


os.register_at_fork(after_in_child=_forget_in_child)
