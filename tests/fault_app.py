"""The app the fault tests run under uvicorn in a subprocess: every way a queued task can end.

Tasks live at module level so that their ``task`` label is stable: ``tests.fault_app.<name>``.
``app`` reports to no tracer; ``traced_app`` (a ``--factory``) exports its spans over OTLP/HTTP
to wherever the standard ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` points.
"""

from __future__ import annotations

import asyncio
import gc
import os
import sys
import time
from collections.abc import AsyncIterator

from fastapi import BackgroundTasks, Depends, FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.background import BackgroundTask

from bgtrace import BackgroundTaskMiddleware

# A "slow" task: long enough that tasks of concurrent requests overlap.
SLOW_SECONDS = 0.003
# The task /long queues first: far beyond any graceful-shutdown timeout a test uses.
LONG_SECONDS = 30.0
STREAM_CHUNKS = 50
STREAM_INTERVAL = 0.05


class TaskFailed(Exception):
    """The deliberate failure of the failing tasks."""


def sync_fast() -> None:
    pass


async def async_fast() -> None:
    pass


def sync_slow() -> None:
    time.sleep(SLOW_SECONDS)


async def async_slow() -> None:
    await asyncio.sleep(SLOW_SECONDS)


def sync_failing() -> None:
    raise TaskFailed("sync task failed")


async def async_failing() -> None:
    raise TaskFailed("async task failed")


def audit() -> None:
    pass


async def long_running() -> None:
    await asyncio.sleep(LONG_SECONDS)


def long_running_sync() -> None:
    time.sleep(LONG_SECONDS)


# Holds /held's task until POST /release: a test closes the connection while the task runs.
_released = asyncio.Event()


async def held() -> None:
    await asyncio.wait_for(_released.wait(), timeout=LONG_SECONDS)


def queue_audit(background_tasks: BackgroundTasks) -> None:
    background_tasks.add_task(audit)


def routes(app: FastAPI) -> FastAPI:
    @app.post("/sync-fast")
    async def sync_fast_route(background_tasks: BackgroundTasks) -> None:
        background_tasks.add_task(sync_fast)

    @app.post("/async-fast")
    async def async_fast_route(background_tasks: BackgroundTasks) -> None:
        background_tasks.add_task(async_fast)

    @app.post("/sync-slow")
    def sync_slow_route(background_tasks: BackgroundTasks) -> None:
        background_tasks.add_task(sync_slow)

    @app.post("/async-slow")
    async def async_slow_route(background_tasks: BackgroundTasks) -> None:
        background_tasks.add_task(async_slow)

    @app.post("/fail-async")
    async def fail_async(background_tasks: BackgroundTasks) -> None:
        background_tasks.add_task(async_failing)
        background_tasks.add_task(async_fast)  # never starts: the first task raised

    @app.post("/fail-sync")
    async def fail_sync(background_tasks: BackgroundTasks) -> None:
        background_tasks.add_task(sync_failing)
        background_tasks.add_task(sync_fast)  # never starts: the first task raised

    @app.post("/dependency", dependencies=[Depends(queue_audit)])
    async def dependency(background_tasks: BackgroundTasks) -> None:
        background_tasks.add_task(async_fast)

    @app.post("/raise")
    async def raise_after_queuing(background_tasks: BackgroundTasks) -> None:
        background_tasks.add_task(sync_fast)
        raise RuntimeError("handler broke after queuing")

    @app.post("/http-error")
    async def http_error(background_tasks: BackgroundTasks) -> None:
        background_tasks.add_task(sync_fast)
        raise HTTPException(status_code=409, detail="conflict")

    @app.post("/own-background", dependencies=[Depends(queue_audit)])
    async def own_background() -> JSONResponse:
        # FastAPI discards the dependency's tasks: the response carries its own background.
        return JSONResponse({}, background=BackgroundTask(async_fast))

    @app.post("/long")
    async def long(background_tasks: BackgroundTasks) -> dict[str, int]:
        background_tasks.add_task(long_running)
        background_tasks.add_task(sync_fast)  # queued behind a task that never ends in time
        return {"pid": os.getpid()}

    @app.post("/long-sync")
    async def long_sync(background_tasks: BackgroundTasks) -> dict[str, int]:
        background_tasks.add_task(long_running_sync)
        background_tasks.add_task(sync_fast)
        return {"pid": os.getpid()}

    @app.post("/held")
    async def held_route(background_tasks: BackgroundTasks) -> None:
        _released.clear()
        background_tasks.add_task(held)
        background_tasks.add_task(sync_fast)

    @app.post("/release")
    async def release() -> None:
        _released.set()

    @app.get("/stream")
    async def stream(background_tasks: BackgroundTasks) -> StreamingResponse:
        background_tasks.add_task(async_fast)
        background_tasks.add_task(sync_fast)
        return StreamingResponse(_chunks(), media_type="text/plain")

    @app.post("/read-body")
    async def read_body(request: Request, background_tasks: BackgroundTasks) -> None:
        background_tasks.add_task(async_fast)
        await request.body()  # the client leaves before sending it all

    @app.get("/pid")
    async def pid() -> int:
        return os.getpid()

    @app.get("/debug/memory")
    def memory() -> dict[str, int]:
        # RSS, and pymalloc's block count: RSS also moves with what the C allocator and
        # the threads keep, the block count only with live Python objects.
        gc.collect()
        return {"rss_kib": _rss_kib(), "blocks": sys.getallocatedblocks()}

    return app


async def _chunks() -> AsyncIterator[bytes]:
    for n in range(STREAM_CHUNKS):
        yield b"chunk %d\n" % n
        await asyncio.sleep(STREAM_INTERVAL)


def _rss_kib() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS in /proc/self/status")


def _app(**middleware: object) -> FastAPI:
    app = FastAPI()
    app.add_middleware(BackgroundTaskMiddleware, **middleware)  # type: ignore[arg-type]
    return routes(app)


app = _app()


def traced_app() -> FastAPI:
    """The same app, its spans batched and exported over OTLP/HTTP (uvicorn ``--factory``)."""
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    provider = TracerProvider()
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    return _app(tracer_provider=provider)
