"""The apps under test: FastAPI's background-tasks tutorial, bare and under each tool.

Every tool that patches something process-wide (bgtrace's class-level patch, OpenTelemetry's
patch of ``BackgroundTask.__call__``) is switched on only while its own variant runs, so the
variants can be interleaved in one process. ``switch_to`` does that and checks that between
variants the patched methods are Starlette's and FastAPI's own again.
"""

from __future__ import annotations

import itertools
import os
import sys
import threading
import time
from collections.abc import Callable, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Annotated, Any, ClassVar

import fastapi.background
from fastapi import BackgroundTasks, Depends, FastAPI
from opentelemetry.context import Context
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from prometheus_client import CollectorRegistry
from starlette import background

import bgtrace

SHAPES = ("async", "def")
# (name, what it is): the order of the results table.
VARIANTS: tuple[tuple[str, str], ...] = (
    ("bare", "FastAPI app, no instrumentation"),
    ("bgtrace", "bgtrace, metrics only (no tracer provider)"),
    ("bgtrace+tracing", "bgtrace, SDK tracer provider, batch processor, null exporter"),
    ("bgtrace-no-watchdog", "bgtrace, metrics only, event-loop watchdog off"),
    (
        "bgtrace+otel-metrics",
        "bgtrace, metrics also through an SDK meter provider (in-memory reader, never read)",
    ),
    ("instrumentator", "prometheus-fastapi-instrumentator, defaults, /metrics exposed"),
    ("starlette-exporter", "starlette-exporter PrometheusMiddleware, /metrics route"),
    ("otel-fastapi", "opentelemetry-instrumentation-fastapi, same SDK set-up"),
    ("fastapi-telemetry", "FastAPI's native telemetry, same SDK set-up"),
    (
        "fastapi-telemetry+bgtrace",
        "FastAPI's native telemetry and bgtrace (metrics and tracing) on one SDK provider",
    ),
    (
        "otel-fastapi+bgtrace",
        "opentelemetry-instrumentation-fastapi and bgtrace (metrics and tracing), one provider",
    ),
    ("span-floor", "reference: bgtrace's span contract alone, same SDK set-up (see below)"),
    (
        "count-floor",
        "reference: a middleware that only counts and times tasks per task, "
        "route and caller (no origin walk, drop reasons, post-response time)",
    ),
)
VARIANT_NAMES = tuple(name for name, _ in VARIANTS)
# On the real server these run under a global tracer provider, as their users run them.
GLOBAL_PROVIDER_VARIANTS = frozenset(("fastapi-telemetry+bgtrace", "otel-fastapi+bgtrace"))
PATH = "/send-notification/alice@example.com"
QUERY = b"q=hello"

# What Starlette and FastAPI shipped, before anything patched them.
_PRISTINE = (
    background.BackgroundTask.__init__,
    background.BackgroundTask.__call__,
    background.BackgroundTasks.__call__,
    fastapi.background.BackgroundTasks.__dict__.get("__call__"),
)


def _current_methods() -> tuple[Any, ...]:
    return (
        background.BackgroundTask.__init__,
        background.BackgroundTask.__call__,
        background.BackgroundTasks.__call__,
        fastapi.background.BackgroundTasks.__dict__.get("__call__"),
    )


# Ticked by every task: the only work they do, so the benchmark can check that they ran.
tasks_run = itertools.count()


# The tasks: module-level so that their names (bgtrace's task label) are stable.
async def notify(message: str) -> None:
    next(tasks_run)


def write_log(message: str) -> None:
    next(tasks_run)


async def get_query(background_tasks: BackgroundTasks, q: str | None = None) -> str | None:
    # The tutorial's dependency is a def; an async def keeps the threadpool out of the async
    # shape, so that every ratio is taken against the cheapest possible request.
    if q:
        background_tasks.add_task(notify, f"found query: {q}\n")
    return q


def tutorial_app(shape: str, **fastapi_kwargs: Any) -> FastAPI:
    """FastAPI's background-tasks tutorial: the handler queues one task, the dependency one
    more when ``q`` is given. ``def`` shape: the handler's task is a ``def`` (threadpool)."""
    if shape not in SHAPES:
        raise ValueError(f"shape must be one of {SHAPES}, got {shape!r}")
    handler_task: Callable[[str], Any] = notify if shape == "async" else write_log
    app = FastAPI(**fastapi_kwargs)

    @app.post("/send-notification/{email}")
    async def send_notification(
        email: str,
        background_tasks: BackgroundTasks,
        q: Annotated[str | None, Depends(get_query)] = None,
    ) -> dict[str, str]:
        background_tasks.add_task(handler_task, f"message to {email}\n")
        return {"message": "Message sent"}

    return app


class NullExporter(SpanExporter):
    """Drops every span; counts them so the report can show spans per request."""

    def __init__(self) -> None:
        self.spans = 0

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        self.spans += len(spans)
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        return None


def sdk_tracer_provider() -> tuple[TracerProvider, NullExporter]:
    exporter = NullExporter()
    provider = TracerProvider(shutdown_on_exit=False)
    # A queue that holds a whole batch of requests' spans: the default 2,048 overflowed at
    # 1,000 requests (5 or 6 spans each) and dropped spans ("Queue full"), sparing every tracing
    # variant part of its export work.
    provider.add_span_processor(BatchSpanProcessor(exporter, max_queue_size=16384))
    return provider, exporter


@dataclass
class Variant:
    name: str
    shape: str
    app: Any
    activate: Callable[[], None] = field(default=lambda: None)
    deactivate: Callable[[], None] = field(default=lambda: None)
    provider: TracerProvider | None = None
    exporter: NullExporter | None = None
    registry: CollectorRegistry | None = None

    def spans_exported(self) -> int:
        if self.provider is None or self.exporter is None:
            return 0
        self.provider.force_flush()
        return self.exporter.spans

    def close(self) -> None:
        if self.provider is not None:
            self.provider.shutdown()


def bgtrace_variant(shape: str, tracing: bool, name: str = "", **options: Any) -> Variant:
    """bgtrace around the tutorial app; ``options`` go to the middleware."""
    registry = CollectorRegistry()
    provider, exporter = sdk_tracer_provider() if tracing else (None, None)
    app = tutorial_app(shape)
    app.add_middleware(
        bgtrace.BackgroundTaskMiddleware, registry=registry, tracer_provider=provider, **options
    )
    name = name or ("bgtrace+tracing" if tracing else "bgtrace")
    return Variant(
        name, shape, app, bgtrace.instrument, bgtrace.uninstrument, provider, exporter, registry
    )


def _otel_metrics(shape: str) -> Variant:
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader

    from bgtrace import otel_metrics

    provider = MeterProvider(metric_readers=[InMemoryMetricReader()], shutdown_on_exit=False)
    variant = bgtrace_variant(shape, tracing=False, meter_provider=provider)
    variant.name = "bgtrace+otel-metrics"

    def recorders() -> list[Any]:
        return [r for r in otel_metrics._recorders.values() if r.provider is provider]

    # The recorder observes every task of the process: on only while this variant runs, so
    # that the other variants' rows show bgtrace with OpenTelemetry metrics off.
    def activate() -> None:
        bgtrace.instrument()
        for recorder in recorders():
            recorder.start()

    def deactivate() -> None:
        for recorder in recorders():
            recorder.stop()
        bgtrace.uninstrument()

    variant.activate, variant.deactivate = activate, deactivate
    return variant


def _instrumentator(shape: str) -> Variant:
    from prometheus_fastapi_instrumentator import Instrumentator

    registry = CollectorRegistry()
    app = tutorial_app(shape)
    Instrumentator(registry=registry).instrument(app).expose(app)
    return Variant("instrumentator", shape, app, registry=registry)


def _starlette_exporter(shape: str) -> Variant:
    from starlette_exporter import PrometheusMiddleware, handle_metrics

    # starlette-exporter only knows prometheus_client's default registry and keeps its
    # metrics on the class: a prefix of its own is the only isolation it offers.
    app = tutorial_app(shape)
    app.add_middleware(PrometheusMiddleware, prefix="bench_starlette_exporter")
    app.add_route("/metrics", handle_metrics)
    return Variant("starlette-exporter", shape, app)


def _otel_fastapi(shape: str) -> Variant:
    from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor

    provider, exporter = sdk_tracer_provider()
    app = tutorial_app(shape)

    def activate() -> None:
        # instrument_app patches BackgroundTask.__call__ for the whole process, and only
        # takes effect on a middleware stack built afterwards.
        FastAPIInstrumentor.instrument_app(app, tracer_provider=provider)
        app.middleware_stack = None

    def deactivate() -> None:
        FastAPIInstrumentor.uninstrument_app(app)

    return Variant("otel-fastapi", shape, app, activate, deactivate, provider, exporter)


def _fastapi_telemetry(shape: str, with_bgtrace: bool = False) -> Variant | None:
    try:
        import fastapi.telemetry  # noqa: F401
    except ImportError:
        return None
    provider, exporter = sdk_tracer_provider()
    # An explicit provider, never the global one: a global SDK provider would switch FastAPI's
    # telemetry on in every other variant's app too. Metrics and logs stay off because their
    # global providers are unconfigured: tracing alone, as in the other tracing variants.
    # With bgtrace, both get the same provider: what a user's global provider gives both.
    app = tutorial_app(shape, telemetry={"tracer_provider": provider})
    if not with_bgtrace:
        return Variant("fastapi-telemetry", shape, app, provider=provider, exporter=exporter)
    registry = CollectorRegistry()
    app.add_middleware(
        bgtrace.BackgroundTaskMiddleware, registry=registry, tracer_provider=provider
    )
    return Variant(
        "fastapi-telemetry+bgtrace", shape, app, bgtrace.instrument, bgtrace.uninstrument,
        provider, exporter, registry,
    )  # fmt: skip


def _otel_fastapi_with_bgtrace(shape: str) -> Variant:
    from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor

    provider, exporter = sdk_tracer_provider()
    registry = CollectorRegistry()
    app = tutorial_app(shape)
    app.add_middleware(
        bgtrace.BackgroundTaskMiddleware, registry=registry, tracer_provider=provider
    )

    def activate() -> None:
        # As users install them: bgtrace's middleware (patching at construction), then the
        # instrumentor, whose task span bgtrace adopts.
        bgtrace.instrument()
        FastAPIInstrumentor.instrument_app(app, tracer_provider=provider)
        app.middleware_stack = None

    def deactivate() -> None:
        FastAPIInstrumentor.uninstrument_app(app)
        bgtrace.uninstrument()

    return Variant(
        "otel-fastapi+bgtrace", shape, app, activate, deactivate, provider, exporter, registry
    )


class _SpanFloor:
    """The OpenTelemetry SDK work that bgtrace's span contract asks for, and nothing else: a
    SERVER span continuing an incoming ``traceparent`` (method at start; route and status at
    the end), one ``bgtask.enqueued`` event
    per task on it, and per task an INTERNAL child span with bgtrace's attributes, made
    current while it runs. Done around the request, with no task tracking, labels or
    metrics: a floor for any implementation of the same spans."""

    def __init__(self, app: Any, provider: TracerProvider) -> None:
        self.app = app
        self.tracer = provider.get_tracer("span-floor")

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        from opentelemetry import context, trace

        # The contract continues an incoming trace: the least that asks is a look for the
        # header (W3C, the default propagator), extracting only when it is there.
        incoming = Context()
        if any(name == b"traceparent" for name, _ in scope["headers"]):
            from opentelemetry import propagate

            headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
            incoming = propagate.extract(headers)
        request = self.tracer.start_span(
            "POST", context=incoming, kind=trace.SpanKind.SERVER,
            attributes={"http.request.method": "POST"},
        )  # fmt: skip
        token = context.attach(trace.set_span_in_context(request))
        try:
            await self.app(scope, receive, send)
        finally:
            context.detach(token)
        parent = trace.set_span_in_context(request, Context())
        for name, origin in (("app.get_query", "dependency"), ("app.send_notification", "handler")):
            request.add_event(
                "bgtask.enqueued", {"code.function.name": name, "bgtask.origin": origin}
            )
        request.update_name("POST /send-notification/{email}")
        request.set_attributes({"http.route": "/send-notification/{email}",
                                "http.response.status_code": 200})  # fmt: skip
        request.end()
        for name, origin in (("app.get_query", "dependency"), ("app.send_notification", "handler")):
            attributes: dict[str, Any] = {
                "code.function.name": name, "bgtask.origin": origin,
                "http.route": "/send-notification/{email}", "bgtask.queue.wait_duration": 0.0001,
            }  # fmt: skip
            if origin == "dependency":
                attributes["bgtask.dependency"] = "app.get_query"
            span = self.tracer.start_span(
                f"bgtask {name}", context=parent, kind=trace.SpanKind.INTERNAL,
                attributes=attributes,
            )  # fmt: skip
            task_token = context.attach(trace.set_span_in_context(span))
            context.detach(task_token)
            span.end()


_NO_SCOPE: dict[str, Any] = {}


class _CountFloor:
    """The least a tool that counts tasks per (task, route, caller) must do, and nothing else:
    a pure ASGI middleware (a request state in a context variable, a send wrapper that sees
    the response end) and two class patches (``BackgroundTask.__init__``: a timestamp, the
    key and one counter under a lock; ``__call__``: two more counters and the wait and run
    times). No origin walk through the dependency tree, label bounds, drop reasons, def tasks
    started in their thread, post-response time, error types or exception safety: a floor
    for any implementation of bgtrace's metrics, far from all of them."""

    state: ContextVar[list[Any] | None] = ContextVar("count_floor", default=None)
    counts: ClassVar[dict[tuple[str, str, str], list[float]]] = {}
    lock = threading.Lock()
    init, call = background.BackgroundTask.__init__, background.BackgroundTask.__call__

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        state: list[Any] = [scope, None]

        async def send_wrapper(message: Any) -> None:
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body"):
                state[1] = time.perf_counter()

        token = self.state.set(state)
        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            self.state.reset(token)
            # Copies of the request's context (uvicorn's keep-alive timer) outlive it: holding
            # the scope there keeps the app's request objects alive, as bgtrace's state did.
            state[0] = _NO_SCOPE

    @staticmethod
    def patched_init(task: Any, func: Any, *args: Any, **kwargs: Any) -> None:
        _CountFloor.init(task, func, *args, **kwargs)
        state = _CountFloor.state.get()
        if state is None:
            return
        route = state[0].get("route")
        caller = sys._getframe(2).f_code.co_name  # add_task's caller
        key = (getattr(func, "__qualname__", "?"), getattr(route, "path", ""), caller)
        task.__dict__["_floor"] = (time.perf_counter(), key)
        with _CountFloor.lock:
            found = _CountFloor.counts.get(key)
            if found is None:
                found = _CountFloor.counts[key] = [0, 0, 0, 0.0, 0.0]
            found[0] += 1

    @staticmethod
    async def patched_call(task: Any) -> None:
        record = task.__dict__.get("_floor")
        if record is None:
            await _CountFloor.call(task)
            return
        queued, key = record
        started = time.perf_counter()
        found = _CountFloor.counts[key]
        with _CountFloor.lock:
            found[1] += 1
            found[3] += started - queued
        try:
            await _CountFloor.call(task)
        finally:
            ended = time.perf_counter()
            with _CountFloor.lock:
                found[2] += 1
                found[4] += ended - started


def _count_floor(shape: str) -> Variant:
    app = tutorial_app(shape)
    app.add_middleware(_CountFloor)

    def activate() -> None:
        setattr(background.BackgroundTask, "__init__", _CountFloor.patched_init)  # noqa: B010
        setattr(background.BackgroundTask, "__call__", _CountFloor.patched_call)  # noqa: B010

    def deactivate() -> None:
        setattr(background.BackgroundTask, "__init__", _CountFloor.init)  # noqa: B010
        setattr(background.BackgroundTask, "__call__", _CountFloor.call)  # noqa: B010

    return Variant("count-floor", shape, app, activate, deactivate)


def _span_floor(shape: str) -> Variant:
    provider, exporter = sdk_tracer_provider()
    app = tutorial_app(shape)
    app.add_middleware(_SpanFloor, provider=provider)
    return Variant("span-floor", shape, app, provider=provider, exporter=exporter)


def build(name: str, shape: str) -> Variant | None:
    """One variant of one shape; ``None`` where the installed packages lack the tool."""
    if name == "bare":
        return Variant("bare", shape, tutorial_app(shape))
    if name == "bgtrace":
        return bgtrace_variant(shape, tracing=False)
    if name == "bgtrace+tracing":
        return bgtrace_variant(shape, tracing=True)
    if name == "bgtrace-no-watchdog":
        return bgtrace_variant(shape, False, name, loop_block_threshold=None)
    if name == "bgtrace+otel-metrics":
        return _otel_metrics(shape)
    if name == "instrumentator":
        return _instrumentator(shape)
    if name == "starlette-exporter":
        return _starlette_exporter(shape)
    if name == "otel-fastapi":
        return _otel_fastapi(shape)
    if name == "fastapi-telemetry":
        return _fastapi_telemetry(shape)
    if name == "fastapi-telemetry+bgtrace":
        return _fastapi_telemetry(shape, with_bgtrace=True)
    if name == "otel-fastapi+bgtrace":
        return _otel_fastapi_with_bgtrace(shape)
    if name == "span-floor":
        return _span_floor(shape)
    if name == "count-floor":
        return _count_floor(shape)
    raise ValueError(f"unknown variant {name!r}")


_active: Variant | None = None


def switch_to(variant: Variant) -> None:
    """Turn the previous variant's process-wide patches off and this variant's on."""
    global _active
    if _active is variant:
        return
    if _active is not None:
        _active.deactivate()
    # bgtrace's middleware instruments on construction; make sure nothing is left over.
    bgtrace.uninstrument()
    if _current_methods() != _PRISTINE:
        raise RuntimeError(f"a patch outlived its variant ({_active and _active.name})")
    _active = None
    variant.activate()
    _active = variant


def switch_off() -> None:
    """Leave no variant's patches behind."""
    global _active
    if _active is not None:
        _active.deactivate()
        _active = None
    bgtrace.uninstrument()


def server_app() -> Any:
    """uvicorn ``--factory`` entry point: the variant named by ``BENCH_VARIANT``."""
    variant = build(os.environ.get("BENCH_VARIANT", "bare"), os.environ.get("BENCH_SHAPE", "async"))
    if variant is None:
        raise SystemExit("variant not available")
    if variant.name in GLOBAL_PROVIDER_VARIANTS and variant.provider is not None:
        # As users set these up: one global SDK provider (each server is its own process).
        from opentelemetry import trace

        trace.set_tracer_provider(variant.provider)
    switch_to(variant)
    import collector

    collector.watch_from_env()
    return variant.app
