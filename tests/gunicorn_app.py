"""The app tests/test_gunicorn.py runs under gunicorn's uvicorn workers."""

from __future__ import annotations

import os
import time

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


async def block_the_loop(seconds: float) -> None:
    # A task that blocks its worker's event loop (a sync call in an async task): gunicorn
    # hears no heartbeat from the worker and kills it after its --timeout.
    time.sleep(seconds)


@app.post("/block")
async def block(background_tasks: BackgroundTasks) -> dict[str, int]:
    background_tasks.add_task(block_the_loop, 120)
    return {"pid": os.getpid()}
