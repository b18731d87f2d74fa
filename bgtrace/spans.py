"""OpenTelemetry spans: one per task, and the request span bgtrace opens when nobody else did."""

from __future__ import annotations

import traceback

from opentelemetry import trace
from opentelemetry.context import Context

SPAN_PREFIX = "bgtask "
ATTR_FUNCTION = "code.function.name"
ATTR_ORIGIN = "bgtask.origin"
ATTR_DEPENDENCY = "bgtask.dependency"
ATTR_WAIT = "bgtask.queue.wait_duration"
ATTR_ROUTE = "http.route"
ATTR_ERROR_TYPE = "error.type"
EVENT_ENQUEUED = "bgtask.enqueued"

# Spans other instrumentations open around each task's call: FastAPI's own telemetry, and
# opentelemetry-instrumentation-fastapi (0.63b0+). bgtrace adds its attributes to such a span
# instead of opening a second span for the same task.
_FOREIGN_TASK_SPAN = "fastapi.background_task"
_FOREIGN_TASK_SPAN_PREFIX = "BackgroundTask "

# opentelemetry-instrumentation-fastapi replaces BackgroundTask.__call__ by hand, keeping the
# method it replaced under this class attribute, and puts it back on uninstrument_app().
OTEL_SAVED_CALL = "_otel_original_call"
# Where FastAPI's telemetry keeps its per-request state in the scope (None for a request it
# excludes).
FASTAPI_TELEMETRY_SCOPE_KEY = "fastapi.telemetry"

_KNOWN_METHODS = frozenset(
    ("GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH")
)


def task_parent(parent: Context | None, mode: str) -> tuple[Context, list[trace.Link]]:
    """The context to start a task span in, and its links, for ``trace_mode``; ``parent`` is
    the context current when the task was queued, when a span was current then."""
    if parent is None:
        return Context(), []
    if mode == "link":
        return Context(), [trace.Link(trace.get_current_span(parent).get_span_context())]
    return parent, []


def foreign_task_span() -> trace.Span | None:
    """The span another instrumentation opened around this task's call, if one is current."""
    span = trace.get_current_span()
    return span if is_foreign_task_span(span) else None


def is_foreign_task_span(span: trace.Span) -> bool:
    """Whether ``span`` is one another instrumentation opened around a task's call."""
    if not span.is_recording():
        return False
    name = getattr(span, "name", None)
    return isinstance(name, str) and (
        name == _FOREIGN_TASK_SPAN or name.startswith(_FOREIGN_TASK_SPAN_PREFIX)
    )


def outer_context(span: trace.Span) -> Context | None:
    """A context whose span is ``span``'s parent (the SDK's ``parent``: a span context), or
    ``None`` for a root span or a span that does not tell."""
    parent = getattr(span, "parent", None)
    if not isinstance(parent, trace.SpanContext) or not parent.is_valid:
        return None
    return trace.set_span_in_context(trace.NonRecordingSpan(parent), Context())


def owner_records_exception(span: trace.Span) -> bool:
    """Whether the instrumentation that opened a task span adds an ``exception`` event of its
    own when the task raises: opentelemetry-instrumentation-fastapi does (with the message),
    FastAPI's telemetry does not. Asked before bgtrace renames the span."""
    return getattr(span, "name", None) != _FOREIGN_TASK_SPAN


def record_failure(
    span: trace.Span, exc: BaseException, error_type: str, *, event: bool = True
) -> None:
    """Mark ``span`` failed without the exception's message, which may quote task arguments."""
    span.set_status(trace.Status(trace.StatusCode.ERROR, error_type))
    span.set_attribute(ATTR_ERROR_TYPE, error_type)
    if not event:
        return
    stack = "".join(traceback.format_tb(exc.__traceback__)) + error_type
    span.add_event(
        "exception",
        {"exception.type": error_type, "exception.stacktrace": stack, "exception.escaped": "True"},
    )


def http_method(raw: object) -> str:
    """The method for attributes and span names; unknown ones become ``_OTHER`` (bounded)."""
    return raw if isinstance(raw, str) and raw in _KNOWN_METHODS else "_OTHER"
