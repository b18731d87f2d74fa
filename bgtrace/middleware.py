"""``BackgroundTaskMiddleware``: the one thing a user adds to an app."""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import Literal

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.context import Context
from opentelemetry.metrics import MeterProvider
from prometheus_client import REGISTRY, CollectorRegistry
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from . import logs
from .config import Config, TraceMode
from .exposition import metrics_app
from .instrumentation import ensure_instrumented, instrument
from .metrics import DEFAULT_MAX_LABEL_VALUES, task_metrics
from .multiprocess import (
    check_multiprocess_dir,
    forget_process,
    forget_process_at_exit,
    multiprocess_mode,
)
from .otel_metrics import recorder_for, resolve_provider, unexposed_metrics
from .records import finish_request
from .request import RequestState, current
from .routes import NO_ROUTE, find_router_app
from .spans import ATTR_ROUTE, carrier_getter, http_method, propagation_carrier

RequestSpans = Literal["auto", "never"]
REQUEST_SPAN_MODES = ("auto", "never")


class BackgroundTaskMiddleware:
    """Measures and traces every background task of the wrapped app, and serves ``/metrics``.

    Pure ASGI: websocket and lifespan scopes pass straight through; per-request state lives in
    a ``RequestState`` and the closures of one call, never on the middleware.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        metrics_path: str | None = "/metrics",
        registry: CollectorRegistry | None = None,
        tracer_provider: trace.TracerProvider | None = None,
        namespace: str = "",
        trace_mode: TraceMode = "child",
        request_spans: RequestSpans = "auto",
        buckets: Sequence[float] | None = None,
        max_label_values: int = DEFAULT_MAX_LABEL_VALUES,
        metrics_token: str | None = None,
        meter_provider: MeterProvider | None = None,
    ) -> None:
        if request_spans not in REQUEST_SPAN_MODES:
            raise ValueError(
                f"request_spans must be one of {REQUEST_SPAN_MODES}, got {request_spans!r}"
            )
        if metrics_path is not None and not metrics_path.startswith("/"):
            raise ValueError(f"metrics_path must start with '/', got {metrics_path!r}")
        self.app = app
        provider = resolve_provider(meter_provider)
        if provider is not None and metrics_path is None and registry is None:
            # Nothing scrapes this app: OpenTelemetry alone reads bgtrace's values.
            metrics = unexposed_metrics(provider, namespace, buckets, max_label_values)
        else:
            registry = REGISTRY if registry is None else registry
            metrics = task_metrics(registry, namespace, buckets, max_label_values)
        if provider is not None:
            recorder_for(metrics, provider)
        self._config = Config.create(metrics, tracer_provider, trace_mode)
        self._metrics_path = metrics_path
        self._metrics_app = metrics_app(registry, token=metrics_token)
        self._request_spans = request_spans == "auto"
        self._router_app = find_router_app(app)
        instrument()
        check_multiprocess_dir()
        forget_process_at_exit()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            if scope["type"] == "lifespan" and multiprocess_mode():
                await self.app(scope, receive, _forgetting_at_shutdown(send))
                return
            await self.app(scope, receive, send)
            return
        if self._metrics_path is not None and _route_path(scope) == self._metrics_path:
            await self._metrics_app(scope, receive, send)
            return
        outer = current.get()
        if outer is not None and outer.live_scope is scope and not outer.closed:
            # A bgtrace middleware further out (around a mount) already records this request,
            # with the whole route template: one request, one record.
            await self.app(scope, receive, send)
            return

        ensure_instrumented()
        config = self._config
        # Starlette puts the application in the scope before its middleware stack runs; a
        # middleware wrapped around the app by hand finds the routes through self.app.
        router_app = scope.get("app")
        if getattr(router_app, "routes", None) is None:
            router_app = self._router_app
        state = RequestState(config, scope, router_app, _STOP_CODE)
        span: trace.Span | None = None
        span_token: object = None
        if self._request_spans and state.tracing:
            try:
                method = http_method(scope.get("method"))
                span, span_token = _start_request_span(config, scope, method)
                if span is not None:
                    state.on_response_sent = partial(_end_request_span, span, method, state, None)
            except Exception:
                logs.internal_error("request span start")

        async def send_wrapper(message: Message) -> None:
            kind = message["type"]
            if kind == "http.response.start":
                state.status = message["status"]
            elif (
                kind == "http.response.body" and not message.get("more_body", False)
            ) or kind == "http.response.pathsend":
                await send(message)
                # The response is out: what follows is background work, not request latency.
                state.response_sent()
                return
            await send(message)

        token = current.set(state)
        raised: BaseException | None = None
        try:
            await self.app(scope, receive, send_wrapper)
        except BaseException as exc:
            raised = exc
            raise
        finally:
            current.reset(token)
            finish_request(state, raised)
            if span is not None:
                if state.response_done_at is None:
                    _end_request_span(span, method, state, raised)
                if span_token is not None:
                    otel_context.detach(span_token)  # type: ignore[arg-type]


def _forgetting_at_shutdown(send: Send) -> Send:
    async def send_wrapper(message: Message) -> None:
        await send(message)
        if message["type"] == "lifespan.shutdown.complete":
            # uvicorn ends a worker by re-raising SIGTERM, so atexit hooks never run: drop
            # this process's live-sum gauges here, after its tasks were cancelled.
            forget_process()

    return send_wrapper


def _route_path(scope: Scope) -> str:
    """The path below ``root_path``: servers put the root path in front of ``path``."""
    path: str = scope["path"]
    root_path: str = scope.get("root_path", "")
    if root_path and path.startswith(root_path):
        return path[len(root_path) :] or "/"
    return path


# Frames past the middleware's own belong to the server: the origin walk stops here.
_STOP_CODE = BackgroundTaskMiddleware.__call__.__code__


def _start_request_span(
    config: Config, scope: Scope, method: str
) -> tuple[trace.Span | None, object]:
    if trace.get_current_span().get_span_context().is_valid:
        # An HTTP instrumentation already opened the request's span (perhaps unsampled, then
        # its sampling decision stands): tasks go in its trace.
        return None, None
    carrier = propagation_carrier(scope.get("headers") or ())
    parent = Context() if carrier is None else propagate.extract(carrier, getter=carrier_getter)
    span = config.tracer.start_span(
        "HTTP" if method == "_OTHER" else method,
        context=parent,
        kind=trace.SpanKind.SERVER,
        attributes={"http.request.method": method},
    )
    return span, otel_context.attach(trace.set_span_in_context(span, parent))


def _end_request_span(
    span: trace.Span, method: str, state: RequestState, exc: BaseException | None
) -> None:
    try:
        route = state.route()[0]
        attributes: dict[str, str | int] = {}
        if route != NO_ROUTE:
            attributes[ATTR_ROUTE] = route
            span.update_name(f"{'HTTP' if method == '_OTHER' else method} {route}")
        if state.status is not None:
            attributes["http.response.status_code"] = state.status
            if state.status >= 500:
                span.set_status(trace.Status(trace.StatusCode.ERROR))
        span.set_attributes(attributes)
        if exc is not None:
            span.set_status(trace.Status(trace.StatusCode.ERROR))
            span.set_attribute("error.type", type(exc).__qualname__)
        span.end()
    except Exception:
        logs.internal_error("request span end")
