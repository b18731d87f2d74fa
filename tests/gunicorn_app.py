"""The app tests/test_gunicorn.py runs under gunicorn's uvicorn workers."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

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


async def block_the_loop(release: Path, seconds: float) -> None:
    # Running without blocking until the test has seen the task in the gauge (the worker keeps
    # sending its heartbeat meanwhile, so its timeout cannot fall first). Then a sync call in
    # an async task blocks the worker's event loop: gunicorn hears no heartbeat and kills it
    # after its --timeout.
    while not release.exists():
        await asyncio.sleep(0.05)
    time.sleep(seconds)


@app.post("/block")
async def block(background_tasks: BackgroundTasks, release: str) -> dict[str, int]:
    background_tasks.add_task(block_the_loop, Path(release), 120)
    return {"pid": os.getpid()}
