"""The life of one queued task: queued, then started and ended, or dropped. Exactly once each.

A ``TaskRecord`` is attached to the ``BackgroundTask`` object when it is created. Every
transition updates the metrics and the task's span; every one is guarded so that an error in
bgtrace's own bookkeeping is logged and never reaches the app or the task.
"""

from __future__ import annotations

import asyncio
import copy
import sys
import threading
import types
import weakref
from asyncio import current_task
from asyncio.events import _get_running_loop
from collections.abc import Awaitable, Callable
from time import perf_counter
from typing import Any, Literal

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.util.types import AttributeValue
from starlette import background, concurrency
from starlette.requests import ClientDisconnect

from . import inflight, logs, private
from .accumulators import exemplar
from .config import Config, default_config
from .metrics import Series
from .naming import error_type, task_names
from .origin import DEPENDENCY, OTHER, detect
from .request import ENDED, RequestState, current, forget
from .routes import NO_ROUTE
from .spans import (
    ATTR_DEPENDENCY,
    ATTR_FUNCTION,
    ATTR_ORIGIN,
    ATTR_ROUTE,
    ATTR_WAIT,
    EVENT_ENQUEUED,
    FASTAPI_TELEMETRY_SCOPE_KEY,
    OTEL_SAVED_CALL,
    SPAN_PREFIX,
    foreign_task_span,
    is_foreign_task_span,
    outer_context,
    owner_records_exception,
    record_failure,
    task_parent,
)  # fmt: skip

# Where the record lives on a BackgroundTask instance.
RECORD_ATTR = "_bgtrace_record"
# Starlette's own BackgroundTask.__call__, captured before anything patches it.
STARLETTE_TASK_CALL = background.BackgroundTask.__call__

QUEUED, CLAIMED, RUNNING, DONE, DROPPED = range(5)
# Whose span a task has: bgtrace's own, or another instrumentation's (TaskRecord.adopted),
# which records the task's exception itself or does not.
OWN, ADOPTED, ADOPTED_RECORDING = range(3)

SUCCESS, FAILURE, CANCELLED = "success", "failure", "cancelled"
REQUEST_ERROR = "request_error"
EARLIER_TASK_FAILED = "earlier_task_failed"
NOT_ATTACHED = "not_attached"


def is_cancellation(exc: BaseException) -> bool:
    """Whether ``exc`` is the event loop's cancellation: asyncio's (or a coroutine closed
    unfinished), or trio's under anyio's
    trio backend. Decided by the exception alone, not by asking anyio for the running
    backend: a def task ends in a worker thread, where no backend runs. trio is looked up
    among the imported modules, never imported: an app running on trio imported it."""
    if isinstance(exc, (asyncio.CancelledError, GeneratorExit)):
        # GeneratorExit: the coroutine was closed unfinished (a loop closed without
        # cancelling its tasks, then the collector): stopped from outside, not failed.
        return True
    trio = sys.modules.get("trio")
    cancelled = getattr(trio, "Cancelled", None)
    return isinstance(cancelled, type) and isinstance(exc, cancelled)


class TaskRecord:
    __slots__ = (
        "__weakref__", "adopted", "asyncio_task", "claimed_at", "config", "dependency",
        "enqueued_at", "loop", "may_adopt", "name", "origin", "parent", "qualname", "route",
        "series", "span", "started_at", "status", "thread", "token", "tracing", "waiting_at",
    )  # fmt: skip

    def __init__(
        self,
        config: Config,
        series: Series,
        name: str,
        qualname: str,
        origin: str,
        dependency: str | None,
        route: str,
        parent: Context | None,
        tracing: bool,
    ) -> None:
        self.config = config
        self.tracing = tracing
        self.series = series
        self.name = name
        self.qualname = qualname
        self.origin = origin
        self.dependency = dependency
        self.route = route
        self.parent = parent
        self.status = QUEUED
        self.enqueued_at = perf_counter()
        self.started_at = 0.0
        self.claimed_at = 0.0  # a def task: when it could start, and began waiting for a thread
        self.span: trace.Span | None = None
        # Whether another instrumentation may open a span around this task's call, to be
        # adopted (see _start_span and where _queued sets it).
        self.may_adopt = True
        self.adopted = OWN
        self.token: object = None
        # The thread the task runs on (the event loop's for an async task), once started.
        self.thread = 0
        # An async task on an asyncio loop: its loop's key (inflight.loop_of) and the id of the
        # asyncio Task running it, by which the stuck check finds where it waits. Ids, not the
        # loop or the Task: an abandoned loop must let the Task, its frames and arguments go.
        self.loop = 0
        self.asyncio_task = 0
        # Where a stuck task was last seen waiting (``file:line in function``), for the page.
        self.waiting_at: str | None = None

    # A def task starts and ends in its worker thread while the event loop may drop it
    # (cancelled waiting for a thread) or end it (cancelled while the thread runs on): each
    # step happens exactly once, whichever thread gets there first. The step and its metric
    # updates happen under the series' lock, in one go.

    def claim(self) -> bool:
        """Take a def task for running in a thread; it runs instrumented at most once."""
        with self.series.lock:
            if self.status != QUEUED:
                return False
            self.status = CLAIMED
            self.claimed_at = perf_counter()
            return True

    def start(self, claimed: bool = True, on_loop: bool = False) -> bool:
        """Count the start (of a claimed task, or straight from the queue); ``False`` when
        the task was already taken, dropped or ended. ``on_loop``: a claimed async task, on
        its event loop (see run_through)."""
        now = perf_counter()
        series = self.series
        try:
            # bgtask_thread_wait_seconds: a def task's wait for a threadpool thread.
            thread_wait = (
                self.config.metrics.thread_wait_for(series.labels)
                if claimed and not on_loop
                else None
            )
            with series.lock:
                if self.status != (CLAIMED if claimed else QUEUED):
                    return False
                # The start time first: a finish from another thread reads it once it sees
                # RUNNING.
                self.started_at = now
                if on_loop:
                    # Claimed only to start once (run_through): an async task, which
                    # claimed_at tells from a def task (the stuck check, OpenTelemetry's
                    # thread wait).
                    self.claimed_at = 0.0
                self.thread = threading.get_ident()
                self.status = RUNNING
                series.started(now - self.enqueued_at)
                if thread_wait is not None:
                    thread_wait.add(now - self.claimed_at)
                    thread_wait.dirty = True
        except Exception:
            logs.internal_error("task start metrics")
        if on_loop or not claimed:
            # On its event loop's thread (a claimed def task starts in a worker's): where the
            # stuck check looks for it.
            try:
                loop = _get_running_loop()
                if loop is not None:
                    task = current_task(loop)
                    self.asyncio_task = 0 if task is None else id(task)
                    self.loop = inflight.loop_key(loop)
            except Exception:
                logs.internal_error("task start loop")
        for observer in inflight.observers:
            try:
                observer.started(self)
            except Exception:
                inflight.observer_failed("started")
        try:
            self._start_span(now - self.enqueued_at)
        except Exception:
            logs.internal_error("task span start")
        return True

    def _start_span(self, wait: float) -> None:
        foreign = None
        if self.config.trace_mode == "child" or not self.tracing or self.parent is None:
            # Also without a provider of bgtrace's own: FastAPI's telemetry or OpenTelemetry's
            # instrumentor may have one, and their task span takes bgtrace's attributes; in link
            # mode only where there is nothing to link to (their span is a root then). Where
            # neither can have opened one (see may_adopt, _others_trace_now), the lookup (most
            # of a task's span work without tracing) is skipped.
            if self.may_adopt or _others_trace_now():
                foreign = foreign_task_span()
            if foreign is None and not self.tracing:
                return
        attributes: dict[str, AttributeValue] = {
            ATTR_FUNCTION: self.name,
            ATTR_ORIGIN: self.origin,
        }
        if self.dependency is not None:
            attributes[ATTR_DEPENDENCY] = self.dependency
        if self.route != NO_ROUTE:
            attributes[ATTR_ROUTE] = self.route
        attributes[ATTR_WAIT] = wait
        if foreign is not None:
            # One span per task: theirs, already current and in the request's trace, named
            # like every other task span so that tasks tell apart in a trace view.
            self.adopted = ADOPTED_RECORDING if owner_records_exception(foreign) else ADOPTED
            foreign.update_name(SPAN_PREFIX + self.qualname)
            foreign.set_attributes(attributes)
            self.span = foreign
            return
        ctx, links = task_parent(self.parent, self.config.trace_mode)
        span = self.config.tracer.start_span(
            SPAN_PREFIX + self.qualname,
            context=ctx,
            kind=trace.SpanKind.INTERNAL,
            attributes=attributes,
            links=links,
        )
        self.span = span
        # The task's own spans (HTTP clients, DB calls) nest under its span.
        self.token = otel_context.attach(trace.set_span_in_context(span))

    def finish(self, exc: BaseException | None, *, same_thread: bool = True) -> None:
        """Count the end. ``same_thread=False``: ended from another thread than the start
        (whose context cannot be detached from here); a later end is then ignored."""
        elapsed = perf_counter() - self.started_at
        if exc is None:
            outcome, etype = SUCCESS, None
        elif is_cancellation(exc):
            outcome, etype = CANCELLED, None
        else:
            outcome, etype = FAILURE, error_type(exc)
        span = self.span
        trace_id = sampled_trace_id(span) if span is not None else None
        label = sample = None
        try:
            # Made before taking the lock: they log or allocate (see accumulators).
            label = self.config.metrics.error_type(etype) if etype is not None else None
            sample = exemplar(trace_id, elapsed) if trace_id is not None else None
        except Exception:
            logs.internal_error("task end labels")
        series = self.series
        failed = False
        with series.lock:
            if self.status != RUNNING:
                return
            self.status = DONE
            try:
                series.finished(elapsed, outcome, label, sample)
            except Exception:
                failed = True
        inflight.discard(self)
        if failed:
            logs.internal_error("task end metrics")
        for observer in inflight.observers:
            try:
                observer.finished(self, elapsed, outcome, etype, exc)
            except Exception:
                inflight.observer_failed("finished")
        if span is not None:
            # Not kept past its end: a failing task's traceback keeps this record alive.
            self.span = None
            self._end_span(span, exc, etype, same_thread)
        if etype is not None:
            logs.task_failed(self.name, self.origin, self.route, etype, trace_id or "-")

    def _end_span(
        self, span: trace.Span, exc: BaseException | None, etype: str | None, same_thread: bool
    ) -> None:
        try:
            if self.token is not None and same_thread:
                otel_context.detach(self.token)  # type: ignore[arg-type]
                self.token = None
            if etype is not None and exc is not None:
                # Exactly one exception event per span: not where its owner records one.
                record_failure(span, exc, etype, event=self.adopted != ADOPTED_RECORDING)
            if self.adopted == OWN:
                span.end()  # an adopted span is ended by whoever opened it
        except Exception:
            logs.internal_error("task span end")

    def drop(self, reason: str) -> None:
        """Count a task that will never start. No-op once it started or was dropped."""
        try:
            with self.series.lock:
                if self.status != QUEUED and self.status != CLAIMED:
                    return
                self.status = DROPPED
                self.series.dropped(reason)
        except Exception:
            logs.internal_error("task drop metrics")
        inflight.discard(self)
        for observer in inflight.observers:
            try:
                observer.dropped(self, reason)
            except Exception:
                inflight.observer_failed("dropped")


def _others_trace_now() -> bool:
    """Whether another instrumentation may open a span around the task starting now, where
    none of theirs was current when it was queued: OpenTelemetry's class patch wrapping
    bgtrace's (installed whenever the instrumentor instruments any app; it also traces the
    URLs its middleware excludes, as traces of their own; bgtrace's wrapper outside it calls
    Starlette's method past it), or FastAPI's telemetry serving the request the task runs in
    (its ``BackgroundTasks`` open a span around each task, wherever it was queued)."""
    saved = background.BackgroundTask.__dict__.get(OTEL_SAVED_CALL, STARLETTE_TASK_CALL)
    if saved is not STARLETTE_TASK_CALL:
        return True
    state = current.get()
    return (
        state is None
        or state.closed
        or state.live_scope.get(FASTAPI_TELEMETRY_SCOPE_KEY) is not None
    )


def sampled_trace_id(span: trace.Span) -> str | None:
    """The span's trace id when it is sampled: for the exemplar and the failure log."""
    global _last_trace_id
    try:
        context = span.get_span_context()
        if not context.trace_flags.sampled:
            return None
        trace_id = context.trace_id
        last = _last_trace_id
        if last[0] == trace_id:  # the tasks of one request share their trace
            return last[1]
        text = format(trace_id, "032x")
        _last_trace_id = (trace_id, text)
        return text
    except Exception:
        logs.internal_error("task span context")
        return None


# The last trace id formatted: (number, text). A tuple, replaced whole from any thread.
_last_trace_id: tuple[int, str] = (-1, "")


def track(task: Any, caller: types.FrameType | None = None) -> None:
    """Record ``task`` as queued now. Called right after a ``BackgroundTask`` is created;
    ``caller`` is the frame that created it, where the walk for its origin starts."""
    try:
        if RECORD_ATTR not in task.__dict__:
            task.__dict__[RECORD_ATTR] = _queued(task, caller, register=True)
    except Exception:
        logs.internal_error("task queued")


def replaces_their_span(task: Any) -> bool:
    """Whether the task span of bgtrace's own replaces the one OpenTelemetry's class patch
    would open around the run of ``task`` starting now: bgtrace traces, in child mode (one
    span per task, in the request's trace). Where it was queued, or, for a run queued as it
    starts (a task made while bgtrace was off, or run again), where it starts. In link mode
    bgtrace's span starts a trace of its own: theirs stays in the request's trace, as
    FastAPI's telemetry's does."""
    try:
        record: TaskRecord | None = task.__dict__.get(RECORD_ATTR)
        if record is not None and record.status == QUEUED:
            config, tracing = record.config, record.tracing
        else:
            state = current.get()
            if state is not None and not state.closed:
                config, tracing = state.config, state.tracing
            else:
                config, tracing = _config_outside(state)
        # In link mode theirs runs, also where there is nothing to link to (a URL the
        # instrumentor excludes): bgtrace takes their root span over then (_start_span).
        return tracing and config.trace_mode == "child"
    except Exception:
        logs.internal_error("task span check")
        return False


def _config_outside(state: RequestState | None) -> tuple[Config, bool]:
    """The config and tracing of a task queued outside a live request: its request's, once
    over; outside any, the default one."""
    config = state.config if state is not None else default_config()
    return config, config.tracing()


def _queued(task: Any, caller: types.FrameType | None, *, register: bool) -> TaskRecord:
    """A new record for ``task``, counted as queued now."""
    state = current.get()
    live = state is not None and not state.closed
    name, qualname = task_names(getattr(task, "func", None))
    if state is not None and live:
        config, tracing = state.config, state.tracing
        route, route_obj = state.route()
        origin, dependency = detect(route_obj, state.stop_code, caller)
    else:
        config, tracing = _config_outside(state)
        route = state.route()[0] if state is not None else NO_ROUTE
        origin, dependency = OTHER, None
    parent: Context | None = None
    under_span = under_own_span = False
    try:
        current_context = otel_context.get_current()
        # An empty context holds no span (no OpenTelemetry in this request): nothing to look up.
        if current_context:
            span = trace.get_current_span(current_context)
            if tracing and span.get_span_context().is_valid:
                # The context as it is now: its span is the task span's parent in child mode,
                # the target of its link in link mode. Kept as it is: no span or context made
                # per task.
                parent = current_context
                if not register and is_foreign_task_span(span):
                    # A run queued as it starts, inside another instrumentation's span around
                    # this very task: the task's parent is what theirs has (a root of theirs:
                    # nothing to link to), as where their wrapper is inside bgtrace's.
                    parent = outer_context(span)
            # Also without a provider of bgtrace's own: the span may be another
            # instrumentation's.
            under_span = span.is_recording()
            if under_span:
                span.add_event(EVENT_ENQUEUED, {ATTR_FUNCTION: name, ATTR_ORIGIN: origin})
                under_own_span = state is not None and span is state.own_span
    except Exception:
        logs.internal_error("task queued span")
    series = config.metrics.series(name, origin, route)
    record = TaskRecord(
        config,
        series,
        name,
        qualname,
        origin,
        dependency if origin == DEPENDENCY else None,
        series.labels[2],
        parent,
        tracing,
    )
    # Whether another instrumentation's span was current where the task was queued: it may
    # open a span around the task's call too. Not bgtrace's own request span: bgtrace opens it
    # only where no HTTP instrumentation is seen, and an instrumentation that traces inside the
    # app (FastAPI's telemetry, also inside a middleware bgtrace wraps by hand) makes a span of
    # its own current there, so a task queued right under bgtrace's span was queued outside
    # any of theirs. What can still open a span around the task without one current here is
    # checked as the task starts (_others_trace_now). Outside a live request nothing is known.
    record.may_adopt = (under_span and not under_own_span) or state is None or not live
    with series.lock:
        series.queued()
    inflight.add(record)
    for observer in inflight.observers:
        try:
            observer.queued(record, task)
        except Exception:
            inflight.observer_failed("queued")
    if register:
        # Read again: the request may have ended on the event loop while this thread (one
        # running a copy of its context) got here.
        records = state.records if state is not None and not state.closed else ENDED
        if records is not ENDED:
            records.append(record)
        if records is ENDED or (state is not None and state.closed):
            # Outside a request (or after its end: a task spawned by the request queued this)
            # nobody sees the end of the task's life: count it dropped if it is garbage
            # collected without having run. Also when the request ended just after the read
            # above: its end sets ``closed`` before it reads the records, so one of the two
            # drops the record (a drop happens once).
            weakref.finalize(task, record.drop, NOT_ATTACHED)
    return record


def _run_again(task: Any, *, claim: bool) -> TaskRecord | None:
    """A record for one more run of a ``task`` already run or dropped: a ``BackgroundTask``
    object shared by many responses. Each run is a task of its own, queued as it starts."""
    try:
        record = _queued(task, None, register=False)
    except Exception:
        logs.internal_error("task run again")
        return None
    if claim:
        record.claim()
    else:
        record.start(claimed=False)
    return record


def task_starting(task: Any, *, threaded: bool | Literal["through"]) -> TaskRecord | None:
    """The record of the run of ``task`` about to start, or ``None`` to run it unmeasured.
    The record is started, or only claimed (``CLAIMED``) where the caller starts it later:
    a def task that ``run_in_thread`` starts in its thread (``threaded``), any task that
    ``run_through`` starts inside another instrumentation's span (``threaded="through"``)."""
    background_starting()
    record: TaskRecord | None = task.__dict__.get(RECORD_ATTR)
    in_thread = threaded == "through" or (threaded and not getattr(task, "is_async", True))
    if record is None:
        # Made while bgtrace was off (one built at import, before the middleware was built,
        # and handed to every response): each run is queued as it starts, where it starts.
        return _run_again(task, claim=in_thread)
    if in_thread:
        return record if record.claim() else _run_again(task, claim=True)
    return record if record.start(claimed=False) else _run_again(task, claim=False)


async def run_in_thread(task: Any, record: TaskRecord) -> None:
    """A def task run as Starlette runs it, but started inside its worker thread, so that a
    saturated threadpool shows as queue wait. The task object itself is not touched: the same
    object may be running for another response right now."""
    # Looked up in Starlette's module at each call, as Starlette's own method does (so that
    # whoever replaces it there is obeyed); the public function where a release moved it.
    run_in_threadpool = getattr(background, "run_in_threadpool", None)
    if run_in_threadpool is None:
        private.missing(
            "starlette.background.run_in_threadpool",
            "def tasks run through starlette.concurrency.run_in_threadpool",
        )
        run_in_threadpool = concurrency.run_in_threadpool
    try:
        await run_in_threadpool(_ThreadStart(task.func, record), *task.args, **task.kwargs)
    except BaseException as exc:
        _interrupted(record, exc)
        raise


async def run_through(
    task: Any, record: TaskRecord, through: Callable[[Any], Awaitable[None]]
) -> None:
    """A claimed task run through another instrumentation's ``BackgroundTask.__call__``
    (OpenTelemetry's, wrapping Starlette's: its span opens around the task) and started
    inside it, as where theirs is outside bgtrace's: bgtrace takes their span over, or, in
    link mode, opens its own in a trace of its own.
    Called with a copy of the task whose function starts and ends the record (in its worker
    thread for a def task, as run_in_thread): Starlette's own method, under theirs, runs it.
    The task object itself is not touched."""
    # Their span opens around the task's start: looked for there, whatever was current where
    # the run was queued (a run queued as it starts, after the request span ended, saw none).
    record.may_adopt = True
    try:
        stand_in = copy.copy(task)
        if stand_in is task:
            raise TypeError("copy.copy returned the task itself")  # never touch the task
        is_async = getattr(task, "is_async", True)
        stand_in.func = (_LoopStart if is_async else _ThreadStart)(task.func, record)
    except Exception:
        logs.internal_error("task stand-in")
        stand_in = None
    if stand_in is None:
        # Theirs runs the task itself; bgtrace counts it from here, on the loop.
        record.start(on_loop=True)
    try:
        await through(task if stand_in is None else stand_in)
    except BaseException as exc:
        if stand_in is None:
            record.finish(exc)
        else:
            _interrupted(record, exc)
        raise
    if stand_in is None:
        record.finish(None)


def _interrupted(record: TaskRecord, exc: BaseException) -> None:
    """A claimed task's run ended in ``exc`` outside the task's own code (see _ThreadStart)."""
    if record.status == CLAIMED:
        # Cancelled while waiting for a thread: it never started.
        record.drop(CANCELLED if is_cancellation(exc) else EARLIER_TASK_FAILED)
    elif is_cancellation(exc) and record.status == RUNNING:
        # Cancelled while its thread runs on (a thread cannot be stopped; at shutdown the
        # process may die first): its request is over, count it cancelled now.
        record.finish(exc, same_thread=False)


class _Start:
    """A task's function, run so that its record starts and ends around it."""

    __slots__ = ("func", "record")

    def __init__(self, func: Callable[..., Any], record: TaskRecord) -> None:
        self.func = func
        self.record = record

    @property
    def __name__(self) -> str:
        # OpenTelemetry's wrapper names its span after the task's function (see run_through).
        func = self.func
        return str(getattr(func, "__name__", type(func).__name__))


class _LoopStart(_Start):
    """Runs a claimed async task on its event loop, recording start and end there."""

    __slots__ = ()

    async def __call__(self, *args: Any, **kwargs: Any) -> Any:
        record = self.record
        if not record.start(on_loop=True):
            return await self.func(*args, **kwargs)  # counted dropped already: unmeasured
        try:
            result = await self.func(*args, **kwargs)
        except BaseException as exc:
            record.finish(exc)
            raise
        record.finish(None)
        return result


class _ThreadStart(_Start):
    """Runs a def task in its worker thread, recording start and end there."""

    __slots__ = ()

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        record = self.record
        if not record.start():
            return self.func(*args, **kwargs)  # counted dropped already: run it unmeasured
        try:
            result = self.func(*args, **kwargs)
        except BaseException as exc:
            record.finish(exc)
            raise
        record.finish(None)
        return result


def background_starting() -> None:
    """A ``BackgroundTasks`` or a lone ``BackgroundTask`` starts: the response is over."""
    state = current.get()
    if state is not None and not state.background_ran:
        state.background_started()


def tasks_interrupted(container: Any, exc: BaseException) -> None:
    """A ``BackgroundTasks`` stopped at a failure: count the tasks it left unstarted."""
    reason = CANCELLED if is_cancellation(exc) else EARLIER_TASK_FAILED
    for task in list(getattr(container, "tasks", ())):
        record = getattr(task, "__dict__", {}).get(RECORD_ATTR)
        if record is not None:
            record.drop(reason)


def finish_request(state: RequestState, exc: BaseException | None) -> None:
    """At the end of a request: count its never-started tasks as dropped, time the tail."""
    state.closed = True
    forget(state)
    if not state.records and not state.background_ran:
        return
    try:
        end = perf_counter()
        reason = None
        for record in state.records:
            if record.status in (QUEUED, CLAIMED):
                reason = reason or _drop_reason(state, exc)
                record.drop(reason)
        if state.response_done_at is not None:
            route, seconds = state.route()[0], end - state.response_done_at
            state.config.metrics.post_response_for(route).observe(seconds)
            for observer in post_response_observers:
                try:
                    observer(state.config.metrics, route, seconds)
                except Exception:
                    inflight.observer_failed("post_response")
    except Exception:
        logs.internal_error("request end")


def release(state: RequestState) -> None:
    """The request's last step, after its span ended: its state lets the scope and the
    records go (see RequestState.release)."""
    try:
        state.release()
    except Exception:
        logs.internal_error("request end")


# Told of each request's post-response time: (its metrics set, its route, seconds). A tuple,
# replaced whole, as inflight's observers; empty unless OpenTelemetry metrics are on.
post_response_observers: tuple[Callable[[Any, str, float], None], ...] = ()


def add_post_response_observer(observer: Callable[[Any, str, float], None]) -> None:
    global post_response_observers
    if observer not in post_response_observers:
        post_response_observers = (*post_response_observers, observer)


def remove_post_response_observer(observer: Callable[[Any, str, float], None]) -> None:
    global post_response_observers
    post_response_observers = tuple(o for o in post_response_observers if o != observer)


def _drop_reason(state: RequestState, exc: BaseException | None) -> str:
    if exc is not None and is_cancellation(exc):
        return CANCELLED
    if state.background_ran:
        # The response ran a background of its own: ours were never handed to it. (Also when
        # that background raised ClientDisconnect: it read the body after the response.)
        return NOT_ATTACHED
    if exc is not None or state.status is None or state.status >= 400:
        if state.client_gone or isinstance(exc, ClientDisconnect):
            # The client went away before the response was over: while the body was read,
            # or, on servers of ASGI spec 2.4, while the response was sent (Starlette then
            # runs no background). Dropped by the client, as by a server cancelling the
            # request; also where an exception handler answered Starlette's ClientDisconnect.
            # The exception itself: a body read once the response started, which the
            # wrappers do not flag. Only where the request failed: a response that went out
            # whole after a stray disconnect (granian may hand one over after a cancelled
            # receive) left its tasks unattached, not dropped by the client.
            return CANCELLED
        return REQUEST_ERROR
    return NOT_ATTACHED
