"""``BackgroundTaskMiddleware``: the one thing a user adds to an app."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from opentelemetry import trace
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
from .page import tasks_app
from .records import finish_request, release
from .request import RequestState, current
from .request_spans import InstrumentationLookup, RequestSpan, left_to_others
from .routes import find_router_app
from .stuck import DEFAULT_STUCK_AFTER, watch
from .watchdog import DEFAULT_THRESHOLD, check_threshold, ensure_watched

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
        tasks_path: str | None = None,
        trace_url: str | None = None,
        stuck_after: float | None = DEFAULT_STUCK_AFTER,
        loop_block_threshold: float | None = DEFAULT_THRESHOLD,
        meter_provider: MeterProvider | None = None,
    ) -> None:
        if request_spans not in REQUEST_SPAN_MODES:
            raise ValueError(
                f"request_spans must be one of {REQUEST_SPAN_MODES}, got {request_spans!r}"
            )
        if stuck_after is not None and not stuck_after > 0:
            raise ValueError(
                f"stuck_after must be a positive number of seconds or None, got {stuck_after!r}"
            )
        for name, path in (("metrics_path", metrics_path), ("tasks_path", tasks_path)):
            if path is not None and not path.startswith("/"):
                raise ValueError(f"{name} must start with '/', got {path!r}")
        self._loop_block_threshold = check_threshold(loop_block_threshold)
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
        # bgtrace's own endpoints, by path below root_path: /metrics and the live page.
        self._endpoints: dict[str, ASGIApp] = {}
        if tasks_path is not None:
            self._endpoints[tasks_path] = tasks_app(
                metrics, token=metrics_token, trace_url=trace_url
            )
        if metrics_path is not None:
            self._endpoints[metrics_path] = metrics_app(registry, token=metrics_token)
        self._request_spans = request_spans == "auto"
        self._router_app = find_router_app(app)
        self._instrumentations = InstrumentationLookup(app)
        instrument()
        check_multiprocess_dir()
        forget_process_at_exit()
        watch(self._config, stuck_after)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            if scope["type"] == "lifespan" and multiprocess_mode():
                await self.app(scope, receive, _forgetting_at_shutdown(send))
                return
            await self.app(scope, receive, send)
            return
        if self._endpoints:
            endpoint = self._endpoints.get(_route_path(scope))
            if endpoint is not None:
                await endpoint(scope, receive, send)
                return
        outer = current.get()
        if outer is not None and outer.live_scope is scope and not outer.closed:
            # A bgtrace middleware further out (around a mount) already records this request,
            # with the whole route template: one request, one record.
            await self.app(scope, receive, send)
            return

        ensure_instrumented()
        config = self._config
        if self._loop_block_threshold is not None:
            ensure_watched(config.metrics, self._loop_block_threshold)
        # Starlette puts the application in the scope before its middleware stack runs; a
        # middleware wrapped around the app by hand finds the routes through self.app.
        router_app = scope.get("app")
        if getattr(router_app, "routes", None) is None:
            router_app = self._router_app
        state = RequestState(config, scope, router_app, _STOP_CODE)
        request_span: RequestSpan | None = None
        if self._request_spans and state.tracing:
            try:
                if not left_to_others(scope, self._instrumentations):
                    request_span = RequestSpan(config, scope)
                    state.on_response_sent = request_span.end
                    state.own_span = request_span.span
            except Exception:
                logs.internal_error("request span start")

        async def send_wrapper(message: Message) -> None:
            kind = message["type"]
            if kind == "http.response.start":
                state.status = message["status"]
            try:
                await send(message)
            except OSError:
                # ASGI 2.4: the server's send raises OSError once the client is gone (Starlette
                # turns it into ClientDisconnect where it streams; a file, or a middleware's
                # own streaming, lets it out as it is, or in an exception group).
                if _send_error_is_client_gone(scope):
                    state.client_gone = True
                raise
            if (
                kind == "http.response.body" and not message.get("more_body", False)
            ) or kind == "http.response.pathsend":
                # The response is out: what follows is background work, not request latency.
                state.response_sent()

        async def receive_wrapper() -> Message:
            message = await receive()
            if message["type"] == "http.disconnect" and state.status is None:
                # The client went away before the response started (the handler reading the
                # body). Not once it started: a server may hand over the disconnect while the
                # last body is sent (hypercorn closes the stream in that send), a
                # BaseHTTPMiddleware further out makes one up after its own response, and a
                # client leaving mid-response still gets the background run under ASGI 2.3
                # (2.4 tells by the send's OSError, and Starlette's ClientDisconnect).
                state.client_gone = True
            return message

        token = current.set(state)
        raised: BaseException | None = None
        try:
            await self.app(scope, receive_wrapper, send_wrapper)
        except BaseException as exc:
            raised = exc
            raise
        finally:
            # Closed by the collector in another context (its loop was closed without
            # cancelling it): that context's variable is not ours to reset.
            # try/except, not contextlib.suppress: no context manager object per request.
            try:  # noqa: SIM105
                current.reset(token)
            except ValueError:
                pass
            finish_request(state, raised)
            if request_span is not None:
                if state.response_done_at is None:
                    state.on_response_sent = None
                    request_span.end(state, raised)
                request_span.detach()
            # Last: the request span's end above still reads the route from the scope.
            release(state)
            # The exception's traceback holds this frame: keeping the exception here would be a
            # cycle, and whatever else it keeps lives as long as that traceback.
            raised = request_span = None


def _forgetting_at_shutdown(send: Send) -> Send:
    async def send_wrapper(message: Message) -> None:
        await send(message)
        if message["type"] == "lifespan.shutdown.complete":
            # uvicorn ends a worker by re-raising SIGTERM, so atexit hooks never run: drop
            # this process's live-sum gauges here, after its tasks were cancelled.
            forget_process()

    return send_wrapper


def _send_error_is_client_gone(scope: Scope) -> bool:
    """Whether an ``OSError`` from the server's send means the client is gone: ASGI spec 2.4
    says so; before it, the error is something else's (a full disk, a timeout)."""
    try:
        version = tuple(map(int, scope["asgi"]["spec_version"].split(".")))
    except Exception:
        return False
    return version >= (2, 4)


def _route_path(scope: Scope) -> str:
    """The path below ``root_path``: servers put the root path in front of ``path``. As
    Starlette routes it: the root path ends where the path ends or a ``/`` follows (a root
    path of ``/``, or ``/api`` in front of ``/apis``, is no prefix)."""
    path: str = scope["path"]
    root_path: str = scope.get("root_path", "")
    if root_path and path.startswith(root_path):
        rest = path[len(root_path) :]
        if not rest:
            return "/"
        if rest[0] == "/":
            return rest
    return path


# Frames past the middleware's own belong to the server: the origin walk stops here.
_STOP_CODE = BackgroundTaskMiddleware.__call__.__code__
