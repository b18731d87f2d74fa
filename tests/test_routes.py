"""The ``route`` label: the matched template with mount prefixes, never the raw path."""

from __future__ import annotations

import random
import string
from pathlib import Path

import pytest
from fastapi import APIRouter, BackgroundTasks, Depends, FastAPI
from fastapi.testclient import TestClient
from prometheus_client import CollectorRegistry
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Mount, Route

from bgtrace import BackgroundTaskMiddleware
from tests import apps
from tests.conftest import Samples


def _queue(background_tasks: BackgroundTasks) -> None:
    background_tasks.add_task(apps.write_log, "x")


def test_mounted_fastapi_app_and_router_prefixes(
    registry: CollectorRegistry, samples: Samples
) -> None:
    inner = FastAPI()
    router = APIRouter(prefix="/users")

    @router.post("/{user_id}/welcome")
    async def welcome(user_id: int, background_tasks: BackgroundTasks) -> None:
        _queue(background_tasks)

    inner.include_router(router, prefix="/v1")
    outer = FastAPI()
    outer.mount("/api", inner)
    outer.add_middleware(BackgroundTaskMiddleware, registry=registry)

    TestClient(outer).post("/api/v1/users/42/welcome")
    assert samples.label_values("bgtask_enqueued_total", "route") == {
        "/api/v1/users/{user_id}/welcome"
    }
    assert samples.label_values("bgtask_enqueued_total", "origin") == {"handler"}


def test_starlette_routes_and_nested_mounts(registry: CollectorRegistry, samples: Samples) -> None:
    async def endpoint(request: Request) -> Response:
        return PlainTextResponse("ok", background=BackgroundTask(apps.write_log, "x"))

    app = Starlette(
        routes=[
            Route("/items/{item_id:int}", endpoint),
            Mount("/admin", routes=[Mount("/reports", routes=[Route("/{name}", endpoint)])]),
        ]
    )
    app.add_middleware(BackgroundTaskMiddleware, registry=registry)
    client = TestClient(app)
    client.get("/items/7")
    client.get("/admin/reports/daily")
    client.get("/admin/reports/weekly")
    assert samples.label_values("bgtask_enqueued_total", "route") == {
        "/items/{item_id:int}",
        "/admin/reports/{name}",
    }


def test_random_unknown_paths_add_no_label_values(
    registry: CollectorRegistry, samples: Samples
) -> None:
    async def not_found(request: Request, exc: Exception) -> Response:
        # An app that queues work even for 404s: the label must stay bounded.
        return PlainTextResponse("nope", 404, background=BackgroundTask(apps.write_log, "404"))

    app = apps.tutorial_app(registry=registry)
    app.add_exception_handler(HTTPException, not_found)
    client = TestClient(app)
    client.post("/send-notification/x")
    rng = random.Random(1234)
    for _ in range(200):
        path = "/" + "/".join(
            "".join(
                rng.choices(string.ascii_letters + string.digits + "%-._~", k=rng.randint(1, 12))
            )
            for _ in range(rng.randint(1, 4))
        )
        method = rng.choice(["GET", "POST", "DELETE", "PROPFIND"])
        assert client.request(method, path).status_code in (404, 405)
    assert samples.label_values("bgtask_enqueued_total", "route") == {
        "/send-notification/{email}",
        "none",
    }
    assert samples.label_values("bgtask_post_response_seconds_count", "route") == {
        "/send-notification/{email}",
        "none",
    }
    assert samples("bgtask_completed_total", task="tests.apps.write_log", origin="other",
                   route="none", outcome="success") == 200  # fmt: skip


def test_middleware_wrapped_by_hand_finds_routes(
    registry: CollectorRegistry, samples: Samples
) -> None:
    inner = FastAPI()

    @inner.post("/hand/{x}")
    async def hand(x: str, background_tasks: BackgroundTasks) -> None:
        _queue(background_tasks)

    app = BackgroundTaskMiddleware(inner, registry=registry)
    TestClient(app).post("/hand/1")
    assert samples.label_values("bgtask_enqueued_total", "route") == {"/hand/{x}"}


# --- FastAPI's frontend() routes (0.13x+): kept apart from ``routes``, no ``route`` in scope --

needs_frontend = pytest.mark.skipif(
    not hasattr(FastAPI, "frontend"), reason="this FastAPI has no app.frontend()"
)


def frontend_app(registry: CollectorRegistry, build: Path) -> FastAPI:
    (build / "index.html").write_text("<html></html>")
    app = FastAPI(dependencies=[Depends(_queue)])
    app.add_middleware(BackgroundTaskMiddleware, registry=registry)
    app.frontend("/", directory=str(build))  # type: ignore[attr-defined]
    router = APIRouter()
    router.frontend("/ui", directory=str(build))  # type: ignore[attr-defined]
    app.include_router(router, prefix="/v1")
    return app


@needs_frontend
@pytest.mark.parametrize(
    ("path", "template"),
    [("/", "/{path}"), ("/docs/guide", "/{path}"), ("/v1/ui/settings", "/v1/ui/{path}")],
)
def test_a_frontend_routes_app_dependency_counts_with_its_route_and_origin(
    registry: CollectorRegistry, samples: Samples, tmp_path: Path, path: str, template: str
) -> None:
    client = TestClient(frontend_app(registry, tmp_path))
    assert client.get(path, headers={"accept": "text/html"}).status_code == 200
    assert samples("bgtask_completed_total", task="tests.apps.write_log", origin="dependency",
                   route=template, outcome="success") == 1  # fmt: skip


@needs_frontend
def test_a_frontend_route_without_fastapis_private_route_group_keeps_its_route(
    registry: CollectorRegistry, samples: Samples, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """FastAPI's route group is private: where a release moved it, the route stays right and
    the origin reads ``other`` (pinned: what is reported then)."""
    app = frontend_app(registry, tmp_path)
    monkeypatch.delattr(app.router, "_frontend_routes")
    TestClient(app).get("/docs/guide", headers={"accept": "text/html"})
    assert samples("bgtask_completed_total", task="tests.apps.write_log", origin="other",
                   route="/{path}", outcome="success") == 1  # fmt: skip
