"""Apps and tasks the tests share: FastAPI's background-tasks tutorial and a few variants.

Tasks live at module level so that their ``task`` label is stable: ``tests.apps.<name>``.
"""

from __future__ import annotations

import threading
from typing import Any

import anyio
from fastapi import BackgroundTasks, Depends, FastAPI, HTTPException
from fastapi.responses import JSONResponse
from starlette.background import BackgroundTask

from bgtrace import BackgroundTaskMiddleware

EMAIL = "alice.secret@example.com"

done: list[str] = []


def write_notification(email: str, message: str = "") -> None:
    done.append(f"notification to {email}: {message}")


def write_log(message: str) -> None:
    done.append(message)


async def async_log(message: str) -> None:
    done.append(message)


def fail(message: str) -> None:
    raise ValueError(message)


class NotificationError(Exception):
    pass


async def fail_custom() -> None:
    raise NotificationError("smtp down")


def get_query(background_tasks: BackgroundTasks, q: str | None = None) -> str | None:
    if q:
        background_tasks.add_task(write_log, f"found query: {q}\n")
    return q


def tutorial_app(**middleware: Any) -> FastAPI:
    """FastAPI's docs: one task from the handler, one from a dependency when ``q`` is given."""
    app = FastAPI()
    app.add_middleware(BackgroundTaskMiddleware, **middleware)

    @app.post("/send-notification/{email}")
    async def send_notification(
        email: str, background_tasks: BackgroundTasks, q: str | None = Depends(get_query)
    ) -> dict[str, str]:
        background_tasks.add_task(write_notification, email, message="some notification")
        return {"message": "Notification sent in the background"}

    return app


def dropping_app(**middleware: Any) -> FastAPI:
    """Every way a queued task can end without running."""
    app = FastAPI()
    app.add_middleware(BackgroundTaskMiddleware, **middleware)

    @app.post("/raise-http")
    async def raise_http(background_tasks: BackgroundTasks) -> None:
        background_tasks.add_task(write_log, "never")
        raise HTTPException(status_code=409, detail="conflict")

    @app.post("/raise")
    def raise_unhandled(background_tasks: BackgroundTasks) -> None:
        background_tasks.add_task(write_log, "never")
        raise RuntimeError("handler broke")

    @app.post("/fail-first")
    async def fail_first(background_tasks: BackgroundTasks) -> dict[str, str]:
        background_tasks.add_task(fail, "boom")
        background_tasks.add_task(write_log, "skipped")
        return {}

    @app.post("/own-background")
    async def own_background(q: str | None = Depends(get_query)) -> JSONResponse:
        # FastAPI discards the dependency's tasks: the response carries its own background.
        return JSONResponse({}, background=BackgroundTask(async_log, "own"))

    return app


class Gate:
    """Holds a task until the test lets it go (bounded, so nothing hangs)."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()

    async def hold(self) -> None:
        self.entered.set()
        for _ in range(1000):
            if self.release.is_set():
                return
            await anyio.sleep(0.01)
