"""The example app: a small notifications service whose background tasks bgtrace measures.

* ``POST /signup/{user_id}`` queues ``send_welcome_email`` (async, from the handler),
  ``refresh_recommendations`` (async, from the handler; its 20th call and one in
  ``BLOCKING_EVERY`` after (``BGTRACE_DEMO_BLOCKING_EVERY``) make a blocking call by mistake
  and freeze the event loop for at least 0.2 s, which ``bgtask_loop_blocked_seconds_total``
  puts on it) and ``write_audit`` (a ``def``, run in the threadpool, queued by the
  ``audit_trail`` dependency).
* ``POST /orders/{order_id}/receipt`` queues ``render_receipt``, which raises
  ``ReceiptRenderError`` for about one order in four: which ones is fixed by the order id.
* ``POST /import?rows=N`` queues ``import_contacts`` *before* checking ``rows``: a too-large
  import answers 413 and its task never runs, counted in ``bgtask_dropped_total`` with
  ``reason="request_error"``.
* ``POST /reports/{report_id}`` queues ``build_report``, a ``def`` task that runs for seconds:
  long enough to show in ``bgtask_oldest_running_seconds``, and to hold threadpool threads.

Serve it with ``uvicorn bgtrace.demo.app:app``. ``BGTRACE_DEMO_THREADS=N`` sets the limit of
anyio's default threadpool (40) in the lifespan, so that a few reports saturate it and
``bgtrace_threadpool_waiting`` shows callers waiting for a thread. Spans go to an OTLP/HTTP
endpoint when the standard ``OTEL_EXPORTER_OTLP_ENDPOINT`` is set (see ``configure_tracing``).
"""

from __future__ import annotations

import asyncio
import itertools
import os
import random
import sys
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

import anyio.to_thread
from fastapi import BackgroundTasks, Depends, FastAPI, HTTPException, Request
from opentelemetry import trace
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter

from bgtrace import BackgroundTaskMiddleware

# Multiplies every task's simulated work; the defaults keep tasks at tens of milliseconds.
SLOWNESS_ENV = "BGTRACE_DEMO_SLOWNESS"
DEFAULT_SERVICE_NAME = "bgtrace-demo"
MAX_IMPORT_ROWS = 1000
RECEIPT_FAILURE_RATE = 0.25
BLOCKING_EVERY = 200
BLOCKING_EVERY_ENV = "BGTRACE_DEMO_BLOCKING_EVERY"
# The block lasts at least this long, whatever the slowness: above the watchdog's default
# loop_block_threshold (0.1 s), so that it is counted.
BLOCKING_SECONDS = 0.2
THREADS_ENV = "BGTRACE_DEMO_THREADS"

OTLP_ENDPOINT_ENVS = ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")


class ReceiptRenderError(Exception):
    """The receipt template could not be rendered: the demo's deliberate task failure."""


def _work(seconds: float) -> float:
    """``seconds`` scaled by ``BGTRACE_DEMO_SLOWNESS`` (read on every call, so it can change)."""
    try:
        factor = float(os.environ.get(SLOWNESS_ENV, "1"))
    except ValueError:
        factor = 1.0
    return seconds * max(factor, 0.0)


async def send_welcome_email(user_id: int, address: str) -> None:
    # An SMTP hand-off: mostly waiting on the network, 20-60 ms.
    await asyncio.sleep(_work(0.02 + 0.04 * random.Random(user_id).random()))


_refreshes = itertools.count(1)


def _blocking_every() -> int:
    try:
        return max(int(os.environ.get(BLOCKING_EVERY_ENV, BLOCKING_EVERY)), 1)
    except ValueError:
        return BLOCKING_EVERY


async def refresh_recommendations(user_id: int) -> None:
    await asyncio.sleep(_work(0.005))
    every = _blocking_every()
    if next(_refreshes) % every == 20 % every:
        # The bug the watchdog exists to show: a synchronous client call (here a sleep) in an
        # async task stops the event loop, and every request of this process waits.
        time.sleep(max(_work(BLOCKING_SECONDS), BLOCKING_SECONDS))


def write_audit(action: str, subject: str) -> None:
    # A blocking write (a file, a synchronous driver): Starlette runs def tasks in a thread.
    time.sleep(_work(0.005))


def receipt_fails(order_id: int) -> bool:
    """Whether ``render_receipt(order_id)`` raises: seeded by the order id, so tests can know."""
    return random.Random(order_id).random() < RECEIPT_FAILURE_RATE


async def render_receipt(order_id: int) -> None:
    await asyncio.sleep(_work(0.01 + 0.02 * random.Random(-order_id).random()))
    if receipt_fails(order_id):
        raise ReceiptRenderError(f"receipt template failed for order {order_id}")


async def import_contacts(rows: int) -> None:
    await asyncio.sleep(_work(0.00005 * rows))


def build_report(report_id: int) -> None:
    # A slow synchronous export: it holds a threadpool thread while it runs.
    time.sleep(_work(5.0))


async def audit_trail(request: Request, background_tasks: BackgroundTasks) -> None:
    """A dependency that records who did what, after the response."""
    background_tasks.add_task(write_audit, request.method, request.url.path)


def create_app(**middleware_options: Any) -> FastAPI:
    """The example app under ``BackgroundTaskMiddleware(**middleware_options)``.

    Sets up no tracing: pass a ``tracer_provider``, or call ``configure_tracing()``.
    """
    return _build(None, middleware_options)


Lifespan = Callable[[FastAPI], AbstractAsyncContextManager[None]]


def _build(lifespan: Lifespan | None, middleware_options: dict[str, Any]) -> FastAPI:
    app = FastAPI(title="bgtrace demo: notifications", lifespan=lifespan)
    app.add_middleware(BackgroundTaskMiddleware, **middleware_options)

    @app.post("/signup/{user_id}", status_code=202, dependencies=[Depends(audit_trail)])
    async def signup(user_id: int, background_tasks: BackgroundTasks) -> dict[str, int]:
        background_tasks.add_task(send_welcome_email, user_id, f"user{user_id}@example.com")
        background_tasks.add_task(refresh_recommendations, user_id)
        # The pid shows which worker process answered, when several serve the app.
        return {"user_id": user_id, "pid": os.getpid()}

    @app.post("/orders/{order_id}/receipt", status_code=202)
    async def receipt(order_id: int, background_tasks: BackgroundTasks) -> dict[str, int]:
        background_tasks.add_task(render_receipt, order_id)
        return {"order_id": order_id, "pid": os.getpid()}

    @app.post("/import", status_code=202)
    async def import_(rows: int, background_tasks: BackgroundTasks) -> dict[str, int]:
        # Queued before the check on purpose: the bug bgtask_dropped_total exists to show.
        background_tasks.add_task(import_contacts, rows)
        if rows > MAX_IMPORT_ROWS:
            raise HTTPException(413, f"at most {MAX_IMPORT_ROWS} rows per import")
        return {"rows": rows, "pid": os.getpid()}

    @app.post("/reports/{report_id}", status_code=202)
    async def report(report_id: int, background_tasks: BackgroundTasks) -> dict[str, int]:
        background_tasks.add_task(build_report, report_id)
        return {"report_id": report_id, "pid": os.getpid()}

    return app


def configure_tracing(*, console: bool = False) -> TracerProvider | None:
    """Set a global SDK tracer provider exporting spans, if there is anywhere to send them.

    OTLP/HTTP when ``OTEL_EXPORTER_OTLP_ENDPOINT`` (or ``..._TRACES_ENDPOINT``) is set, the
    exporter reading every other ``OTEL_*`` variable itself; the console (stderr) when
    ``console``. Returns the provider, to shut down (flush) on exit, or ``None``.
    """
    exporters: list[SpanExporter] = []
    if any(os.environ.get(name) for name in OTLP_ENDPOINT_ENVS):
        # Imported here: the exporter and its protobuf code take ~0.1 s to import.
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        exporters.append(OTLPSpanExporter())
    if console:
        exporters.append(ConsoleSpanExporter(out=sys.stderr))
    if not exporters:
        return None
    resource = Resource.create()  # OTEL_SERVICE_NAME, OTEL_RESOURCE_ATTRIBUTES
    if str(resource.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
        resource = resource.merge(Resource({SERVICE_NAME: DEFAULT_SERVICE_NAME}))
    provider = TracerProvider(resource=resource)
    for exporter in exporters:
        provider.add_span_processor(BatchSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    return provider


def _limit_threads() -> None:
    # The default limiter belongs to the running event loop: set in the lifespan, it holds for
    # every request and def task of this worker.
    threads = os.environ.get(THREADS_ENV)
    if threads:
        anyio.to_thread.current_default_thread_limiter().total_tokens = int(threads)


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    # Set up in the lifespan, not at import: each worker process of the server gets its own
    # exporter thread, importing this module for create_app() configures nothing, and
    # shutdown flushes the spans still buffered.
    _limit_threads()
    provider = configure_tracing()
    try:
        yield
    finally:
        if provider is not None:
            provider.shutdown()


# What `uvicorn bgtrace.demo.app:app` serves. FastAPI builds the middleware (and so the
# metrics) on the first ASGI call, not here.
app = _build(_lifespan, {})
