"""Where ``/metrics`` is rendered: in a thread of bgtrace's own, one render at a time.

Not on the event loop (rendering thousands of series takes a while, and so does gzip), and
not in anyio's worker threads either: their default limiter (40 tokens) is shared with the
app's sync endpoints, sync dependencies and ``def`` tasks, which exhaust it exactly when
someone needs the metrics. The thread is started by a process's first scrape (a forked
child starts its own) and waits for the next one from then on: starting a thread at every
scrape would stall the event loop until the new thread first runs, milliseconds on a busy
machine.

A scrape asking for a render that is already queued or running (same registry, format and
encoding) waits for that one and gets its result: scrapes that pile up on a slow render
add no work, and at most one render per kind of output is ever waiting.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import threading
from collections import deque
from collections.abc import Callable, Hashable
from typing import Any, Generic, TypeVar

import anyio

from . import forks

T = TypeVar("T")

THREAD_NAME = "bgtrace-metrics"


class _Render(Generic[T]):
    __slots__ = ("error", "key", "result", "wakers", "work")

    def __init__(self, key: Hashable, work: Callable[[], T]) -> None:
        self.key = key
        self.work = work
        self.wakers: list[Callable[[], None]] = []
        self.result: T | None = None
        self.error: BaseException | None = None


# Renders queued or running, by what they make; the queue holds the ones not started yet.
_lock = threading.Lock()
forks.guard(_lock, forks.RENDERS)
_queued = threading.Condition(_lock)
_pending: dict[Hashable, _Render[Any]] = {}
_queue: deque[_Render[Any]] = deque()
_thread_pid = 0  # the process whose render thread runs


async def rendered(key: Hashable, work: Callable[[], T]) -> T:
    """``work()``'s result, made in bgtrace's render thread, or shared with the render for
    ``key`` already queued or running. Its exception is raised here."""
    event = anyio.Event()
    job: _Render[T] = _submit(key, work, _waker(event))
    await event.wait()
    result, error = job.result, job.error
    del job
    if error is not None:
        # A new exception for each waiter: raising the shared one in every scrape that
        # waited would add each one's frames to its traceback, and tie them in a cycle.
        raise RenderFailed(type(error).__qualname__) from error
    return result  # type: ignore[return-value]


class RenderFailed(Exception):
    """The render this scrape waited for raised (the cause)."""


def _waker(event: anyio.Event) -> Callable[[], None]:
    """A function the render thread calls to set ``event`` in this event loop's thread."""
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        # anyio's other backend: trio, imported by the app that runs on it.
        trio: Any = sys.modules["trio"]
        token = trio.lowlevel.current_trio_token()

        def wake_trio() -> None:
            token.run_sync_soon(event.set)

        return wake_trio

    def wake_asyncio() -> None:
        loop.call_soon_threadsafe(event.set)

    return wake_asyncio


def _submit(key: Hashable, work: Callable[[], T], wake: Callable[[], None]) -> _Render[T]:
    global _thread_pid
    pid = os.getpid()
    with _lock:
        job = _pending.get(key)
        if job is None:
            job = _pending[key] = _Render(key, work)
            _queue.append(job)
            _queued.notify()
        job.wakers.append(wake)
        start = _thread_pid != pid
        _thread_pid = pid
    if start:
        # A daemon: a render still running when the process exits is of no use to anyone.
        thread = threading.Thread(target=_render_queued, name=THREAD_NAME, daemon=True)
        try:
            thread.start()
        except RuntimeError as exc:  # at interpreter shutdown: no new threads
            _fail_queued(exc)
    return job


def _render_queued() -> None:
    while True:
        with _lock:
            while not _queue:
                _queued.wait()
            job = _queue.popleft()
        try:
            job.result = job.work()
        except BaseException as exc:  # handed to every scrape waiting for it
            job.error = exc
        _done(job)


def _done(job: _Render[Any]) -> None:
    with _lock:
        # From here on a scrape asking for the same output queues a render of its own.
        _pending.pop(job.key, None)
        wakers = job.wakers
    for wake in wakers:
        # An error: that event loop has ended, and nobody is waiting there any more.
        with contextlib.suppress(Exception):
            wake()


def _fail_queued(exc: BaseException) -> None:
    global _thread_pid
    with _lock:
        failed = list(_queue)
        _queue.clear()
        _thread_pid = 0
    for job in failed:
        job.error = exc
        _done(job)


def _forget_after_fork() -> None:
    # The parent's scrapes are the parent's, and so is its render thread: the child's first
    # scrape starts one of its own. (forks' hook, registered first, has freed the lock.)
    global _queued
    _queued = threading.Condition(_lock)
    _pending.clear()
    _queue.clear()


os.register_at_fork(after_in_child=_forget_after_fork)
