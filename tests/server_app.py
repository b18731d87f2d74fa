"""The app the real-server tests run under uvicorn, in-process or as worker processes."""

from __future__ import annotations

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
