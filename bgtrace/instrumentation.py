"""Class-level instrumentation of Starlette's ``BackgroundTask`` and ``BackgroundTasks``.

FastAPI's ``BackgroundTasks`` subclasses Starlette's, and ``Response(background=...)`` takes
Starlette's ``BackgroundTask``, so patching these two classes sees every task. The patch is
reversible: ``uninstrument()`` puts back the very same function objects.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, ParamSpec

from starlette import background

from . import forks
from .records import (
    CLAIMED,
    STARLETTE_TASK_CALL,
    background_starting,
    replaces_their_span,
    run_in_thread,
    run_through,
    task_starting,
    tasks_interrupted,
    track,
)
from .spans import OTEL_SAVED_CALL

P = ParamSpec("P")

# Starlette's own method, captured at import: our own BackgroundTasks runs tasks through it
# whether or not the classes are patched.
_TASK_CALL = STARLETTE_TASK_CALL

_lock = threading.Lock()
forks.guard(_lock, forks.INSTRUMENTATION)
_factories: dict[tuple[type, str], Callable[[Any], Any]] = {}
_installed: tuple[tuple[type, str, Any], ...] = ()
_originals: dict[tuple[type, str], Any] = {}
_wrappers: dict[tuple[type, str], Any] = {}
_enabled = False
# bgtrace.testing's hold mode: told of each task about to run; ``True`` keeps it from running
# (it stays queued until the test runs it). ``None`` outside such a test: one global read.
task_hold: Callable[[Any], bool] | None = None


def _wrap_init(original: Callable[..., None]) -> Callable[..., None]:
    def __init__(self: Any, func: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        original(self, func, *args, **kwargs)
        if _enabled:
            # Where the task was made (add_task, or the app itself): the origin walk starts
            # there, not at bgtrace's own frames.
            track(self, sys._getframe(1))

    return __init__


def _wrap_task_call(
    original: Callable[[Any], Awaitable[None]], always: bool = False
) -> Callable[[Any], Awaitable[None]]:
    # The wrapper does the bookkeeping itself: one coroutine per task, no helper coroutine.
    async def __call__(self: Any) -> None:
        if not (_enabled or always):
            await original(self)
            return
        if task_hold is not None and task_hold(self):
            return
        # When OpenTelemetry's wrapper sits between us and Starlette's method, call Starlette's
        # directly where bgtrace's own task span replaces theirs (child mode, in the same
        # trace), so each task has one span. Elsewhere theirs runs and the task starts inside
        # it: bgtrace opens no span (no provider of its own or global: theirs is the
        # instrumentor's alone) and takes theirs over, or, in link mode, opens its own in a
        # trace of its own, theirs staying in the request's trace.
        call = original
        through = False
        saved = background.BackgroundTask.__dict__.get(OTEL_SAVED_CALL)
        if saved is _TASK_CALL and original is not saved:
            if replaces_their_span(self):
                call = saved
            else:
                through = True
        record = task_starting(self, threaded="through" if through else call is _TASK_CALL)
        if record is None:
            await call(self)
        elif through and record.status == CLAIMED:
            await run_through(self, record, call)
        elif record.status == CLAIMED:
            await run_in_thread(self, record)
        else:
            try:
                await call(self)
            except BaseException as exc:
                record.finish(exc)
                raise
            record.finish(None)

    return __call__


def _wrap_tasks_call(
    original: Callable[[Any], Awaitable[None]], always: bool = False
) -> Callable[[Any], Awaitable[None]]:
    async def __call__(self: Any) -> None:
        if not (_enabled or always):
            await original(self)
            return
        background_starting()
        try:
            await original(self)
        except BaseException as exc:
            tasks_interrupted(self, exc)
            raise

    return __call__


# The code every wrapper of ours runs, whatever it wraps: bgtrace never wraps itself.
_WRAPPER_CODES = frozenset(
    (
        _wrap_init(background.BackgroundTask.__init__).__code__,
        _wrap_task_call(_TASK_CALL).__code__,
        _wrap_tasks_call(_TASK_CALL).__code__,
    )
)


def _targets() -> list[tuple[type, str, Callable[[Any], Any]]]:
    """(class, method, wrapper factory) for everything we patch.

    FastAPI's ``BackgroundTasks`` overrides ``__call__`` in recent releases (to trace each
    task), so a container class is patched wherever it defines its own ``__call__``.
    """
    targets: list[tuple[type, str, Callable[[Any], Any]]] = [
        (background.BackgroundTask, "__init__", _wrap_init),
        (background.BackgroundTask, "__call__", _wrap_task_call),
        (background.BackgroundTasks, "__call__", _wrap_tasks_call),
    ]
    try:
        from fastapi import background as fastapi_background
    except ImportError:
        return targets
    containers = getattr(fastapi_background, "BackgroundTasks", None)
    if isinstance(containers, type) and "__call__" in containers.__dict__:
        targets.append((containers, "__call__", _wrap_tasks_call))
    return targets


def instrument() -> None:
    """Measure every Starlette/FastAPI background task. Safe to call any number of times."""
    global _enabled
    with _lock:
        for cls, name, factory in _targets():
            target = (cls, name)
            if target in _wrappers and not _lost(cls, name, _wrappers[target]):
                # Still in place (maybe under another instrumentation's wrapper): reuse it.
                continue
            _install(cls, name, factory)
        _enabled = True


def _install(cls: type, name: str, factory: Callable[[Any], Any]) -> None:
    target = (cls, name)
    original = cls.__dict__[name]
    wrapper = factory(original)
    wrapper.__qualname__ = f"{cls.__qualname__}.{name}"
    wrapper.__wrapped__ = original
    _originals[target] = original
    _wrappers[target] = wrapper
    _factories[target] = factory
    setattr(cls, name, wrapper)
    _snapshot()


def _snapshot() -> None:
    # ensure_instrumented() runs per request: give it a tuple of just the method another
    # library is known to put back (BackgroundTask.__call__), not a dict to copy.
    global _installed, _holding
    _holding = None
    _installed = tuple(
        (cls, name, wrapper)
        for (cls, name), wrapper in _wrappers.items()
        if cls is background.BackgroundTask and name == "__call__"
    )


def ensure_instrumented() -> None:
    """Wrap again where another library's uninstrument dropped our wrapper from the chain.

    OpenTelemetry's ``uninstrument_app()`` restores the method it found, dropping a wrapper
    installed after it (and its next ``instrument_app()`` wraps that method alone); without
    this, queued tasks would run unmeasured and be counted dropped. Cheap: a dict lookup and
    an identity check or two, called once per request.
    """
    global _holding
    if not _enabled:
        return
    for cls, name, wrapper in _installed:
        current = cls.__dict__.get(name)
        if current is wrapper or current is _holding:
            continue
        if _lost(cls, name, wrapper):
            with _lock:
                # Again under the lock, against the wrapper installed now: another thread may
                # have wrapped again since this one read the snapshot.
                target = (cls, name)
                now = _wrappers.get(target)
                if _enabled and now is not None and _lost(cls, name, now):
                    _install(cls, name, _factories[target])
        else:
            # Another library's wrapper over ours (what it calls cannot change while it is in
            # place): not walked again on every request.
            _holding = current


# The method last found to hold our wrapper under it, see ensure_instrumented.
_holding: object = None


# OpenTelemetry's task wrapper is defined in this module; it keeps what it wraps on the class
# (spans.OTEL_SAVED_CALL), having no ``__wrapped__``.
_OTEL_FASTAPI_MODULE = "opentelemetry.instrumentation.fastapi"
# Wrappers followed down at most (a guard against a chain that loops).
_MAX_DEPTH = 16


def _lost(cls: type, name: str, wrapper: Any) -> bool:
    """Whether ``wrapper`` is known to be out of what ``cls.name`` calls: another library's
    uninstrument put back the method it found under ours (OpenTelemetry's ``uninstrument_app``
    restores Starlette's own, dropping a wrapper of ours installed after its own, and its next
    ``instrument_app`` wraps Starlette's method alone). Followed down through ``__wrapped__``
    and OpenTelemetry's saved method to the framework's own; a wrapper whose inside is unknown
    counts as holding ours: wrapping again there would count each task twice."""
    method = cls.__dict__.get(name)
    for _ in range(_MAX_DEPTH):
        if method is wrapper or getattr(method, "__code__", None) in _WRAPPER_CODES:
            # Ours (or an earlier wrapper of ours, which measures as well): never wrapped again.
            return False
        if getattr(method, "__module__", None) == cls.__module__:
            return True  # the framework's own method, with nothing of ours above it
        inner = getattr(method, "__wrapped__", None)
        if inner is None and getattr(method, "__module__", None) == _OTEL_FASTAPI_MODULE:
            # Looked up here, each time: the instrumentor's private name, absent when none.
            inner = cls.__dict__.get(OTEL_SAVED_CALL)
        if inner is None or inner is method:
            return False
        method = inner
    return False


def uninstrument() -> None:
    """Undo ``instrument()``: the original methods are restored, identity-equal.

    Where another library wrapped a method after us (OpenTelemetry's FastAPI instrumentation
    does), removing ours would drop theirs too; ours then stays in place, switched off.
    """
    global _enabled
    with _lock:
        _enabled = False
        for target in list(_wrappers):
            cls, name = target
            wrapper = _wrappers[target]
            if wrapper is not None and cls.__dict__.get(name) is wrapper:
                setattr(cls, name, _originals.pop(target))
                del _wrappers[target]
            elif _lost(cls, name, wrapper):
                # Already dropped by another library's uninstrument: nothing to put back.
                _originals.pop(target, None)
                del _wrappers[target]
        _snapshot()


def is_instrumented() -> bool:
    return _enabled


class BackgroundTasks(background.BackgroundTasks):
    """A drop-in for Starlette's ``BackgroundTasks`` whose tasks are measured even without
    ``instrument()``, for code that builds its own."""

    def __init__(self, tasks: Sequence[background.BackgroundTask] | None = None) -> None:
        super().__init__(tasks)
        for task in self.tasks:
            track(task)

    def add_task(self, func: Callable[P, Any], *args: P.args, **kwargs: P.kwargs) -> None:
        task = background.BackgroundTask(func, *args, **kwargs)
        track(task)  # a no-op when the class patch already recorded it
        self.tasks.append(task)

    async def __call__(self) -> None:
        await _run_all(self)


# bgtrace's BackgroundTasks measures its tasks whether or not the classes are patched.
_run_one = _wrap_task_call(_TASK_CALL, always=True)


async def _run_each(container: BackgroundTasks) -> None:
    for task in container.tasks:
        await _run_one(task)


_run_all = _wrap_tasks_call(_run_each, always=True)
