"""bgtrace's locks across ``os.fork()``: the child never starts with one held.

A fork copies a lock as it is, and the child has only the forking thread: a lock another
thread held at that moment (a worker thread ending a task, the flush thread writing, a scrape
rendering) would stay held for ever, and the child's next task or scrape would hang. Every
lock of bgtrace, the ones made per metrics set or per label included, is registered here
with its rank. Before a fork the forking thread takes them all, lowest rank first, which is
the order every other path takes them in, so the child copies values no thread is halfway
through changing; after the fork the parent releases them and the child re-initialises them.

Taking them waits at most ``FORK_WAIT`` seconds in all: a thread may hold one lock and wait
for another that the forking thread took first (a garbage collection running, under one
metrics set's lock, the drop of a task of another set). A lock not taken in time is
re-initialised in the child all the same: free, with the values it guards as they were.
"""

from __future__ import annotations

import os
import threading
import time
import weakref
from typing import Any

from . import logs

# Ranks: a path holding a lock takes only locks of a higher rank (garbage collection runs a
# dropped task's count, which takes its set's VALUES lock, under any of them).
INSTRUMENTATION = 10  # instrumentation: installing and removing the class patches
REGISTRIES = 20  # metrics: the metrics sets by registry (a new set publishes itself)
EXIT_HOOK = 30  # multiprocess
FLUSHER = 40  # multiprocess: starting the flush thread
PUBLISHED = 50  # multiprocess: the sets whose values go to the files
FLUSH = 60  # multiprocess: one flush at a time (takes VALUES)
RENDERS = 70  # rendering: the renders queued or running
LABELS = 80  # metrics: one per label limiter (a collection may take VALUES under it)
VALUES = 90  # metrics: the values of one metrics set (one for all in multiprocess mode)

# How long a fork waits, in all, for other threads to let go of bgtrace's locks.
FORK_WAIT = 2.0

_guarded: weakref.WeakKeyDictionary[Any, int] = weakref.WeakKeyDictionary()
# Taken last before a fork: the registry itself may be changing in another thread.
_guarded_lock = threading.Lock()
_held: list[Any] = []


def guard(lock: Any, rank: int) -> None:
    """Take ``lock`` around every fork from now on, in ``rank`` order (see above)."""
    with _guarded_lock:
        _guarded[lock] = rank


def _before_fork() -> None:
    deadline = time.monotonic() + FORK_WAIT
    try:
        with _guarded_lock:
            # sorted() is stable: same rank, registration order.
            locks = [lock for lock, _ in sorted(_guarded.items(), key=lambda item: item[1])]
        for lock in [*locks, _guarded_lock]:
            wait = deadline - time.monotonic()
            if lock.acquire(True, wait) if wait > 0 else lock.acquire(False):
                _held.append(lock)
    except Exception:
        logs.internal_error("fork")


def _after_fork_in_parent() -> None:
    while _held:
        try:
            _held.pop().release()
        except Exception:
            logs.internal_error("fork")


def _after_fork_in_child() -> None:
    # The only thread left is the one that forked: every lock is free from here on, taken
    # before the fork or not.
    _reinit(_guarded_lock)
    for lock in list(_guarded):
        _reinit(lock)
    _held.clear()


def _reinit(lock: Any) -> None:
    try:
        # CPython's own way to free a lock in a forked child (threading and logging use it).
        reinit = getattr(lock, "_at_fork_reinit", None)
        if reinit is not None:
            reinit()
        elif lock in _held:
            lock.release()
    except Exception:
        logs.internal_error("fork")


os.register_at_fork(
    before=_before_fork, after_in_parent=_after_fork_in_parent, after_in_child=_after_fork_in_child
)
