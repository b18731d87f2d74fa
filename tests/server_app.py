"""The app the real-server tests run under uvicorn, in-process or as worker processes."""

from __future__ import annotations

import asyncio
import os

from fastapi import BackgroundTasks, FastAPI

from bgtrace import BackgroundTaskMiddleware
from tests import apps

app = FastAPI()
app.add_middleware(BackgroundTaskMiddleware)


@app.post("/work")
async def work(background_tasks: BackgroundTasks) -> dict[str, int]:
    background_tasks.add_task(apps.async_log, "async")
    background_tasks.add_task(apps.write_log, "sync")
    return {"pid": os.getpid()}


# A task that holds until POST /release, so a test can look at the gauges while it runs.
_released = asyncio.Event()


async def hold() -> None:
    await asyncio.wait_for(_released.wait(), timeout=30)


@app.post("/slow")
async def slow(background_tasks: BackgroundTasks) -> dict[str, str]:
    _released.clear()
    background_tasks.add_task(hold)
    background_tasks.add_task(apps.write_log, "second")
    return {"status": "accepted"}


@app.post("/release")
async def release() -> None:
    _released.set()
