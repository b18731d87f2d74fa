from __future__ import annotations

import hmac
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import anyio
import anyio.to_thread
import httpx
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from opentelemetry.sdk.trace import TracerProvider
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Mount, Route

from bgtrace import BackgroundTaskMiddleware, metrics_app
from bgtrace.metrics import task_metrics
from tests import apps
from tests.asgi import call, status
from tests.servers import serve_in_thread, wait_for

OPENMETRICS = "application/openmetrics-text; version=1.0.0; charset=utf-8"


@pytest.fixture
def client(registry: CollectorRegistry) -> TestClient:
    client = TestClient(apps.tutorial_app(registry=registry))
    client.post("/send-notification/x?q=1")
    return client


def test_get_serves_prometheus_text(client: TestClient) -> None:
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    names = {family.name for family in text_string_to_metric_families(response.text)}
    assert {
        "bgtask_enqueued", "bgtask_completed", "bgtask_failures", "bgtask_dropped",
        "bgtask_duration_seconds", "bgtask_queue_wait_seconds", "bgtask_queue_length",
        "bgtask_in_progress", "bgtask_post_response_seconds",
    } <= names  # fmt: skip


def test_head_has_headers_and_no_body(client: TestClient) -> None:
    response = client.head("/metrics")
    assert response.status_code == 200
    assert int(response.headers["content-length"]) > 0
    assert response.content == b""


def test_other_methods_are_refused(client: TestClient) -> None:
    response = client.post("/metrics", content=b"x" * 1000)
    assert response.status_code == 405
    assert response.headers["allow"] == "GET, HEAD"


@pytest.mark.parametrize("accept", ["", "*/*", "garbage;;;=", "text/html", "\x7f" * 300])
def test_odd_accept_headers_get_text_format(client: TestClient, accept: str) -> None:
    response = client.get("/metrics", headers={"accept": accept})
    assert response.status_code == 200
    assert "bgtask_enqueued_total" in response.text


def test_gzip_when_accepted(client: TestClient) -> None:
    response = client.get("/metrics", headers={"accept-encoding": "gzip"})
    assert response.headers["content-encoding"] == "gzip"
    assert "bgtask_enqueued_total" in response.text  # the client decodes it


def test_openmetrics_with_trace_id_exemplar(
    registry: CollectorRegistry, tracer_provider: TracerProvider
) -> None:
    client = TestClient(apps.tutorial_app(registry=registry, tracer_provider=tracer_provider))
    client.post("/send-notification/x")
    response = client.get("/metrics", headers={"accept": OPENMETRICS})
    assert response.headers["content-type"].startswith("application/openmetrics-text")
    exemplars = [
        line for line in response.text.splitlines()
        if line.startswith("bgtask_duration_seconds_bucket") and " # " in line
    ]  # fmt: skip
    assert len(exemplars) == 1
    assert '# {trace_id="' in exemplars[0]
    assert response.text.rstrip().endswith("# EOF")


def test_registry_that_fails_to_collect_answers_500_and_app_carries_on(
    registry: CollectorRegistry,
) -> None:
    class Broken:
        def collect(self) -> list[object]:
            raise RuntimeError("collector broke")

    registry.register(Broken())  # type: ignore[arg-type]
    client = TestClient(apps.tutorial_app(registry=registry))
    assert client.get("/metrics").status_code == 500
    assert client.post("/send-notification/x").status_code == 200


def test_metrics_app_mounts_anywhere(registry: CollectorRegistry) -> None:
    app = Starlette(routes=[Mount("/ops/metrics", app=metrics_app(registry))])
    TestClient(apps.tutorial_app(registry=registry)).post("/send-notification/x")
    body = TestClient(app).get("/ops/metrics").text
    assert 'bgtask_enqueued_total{origin="handler"' in body


@pytest.mark.parametrize("source", ["argument", "environment"])
def test_bearer_token_guards_metrics(
    registry: CollectorRegistry, monkeypatch: pytest.MonkeyPatch, source: str
) -> None:
    token = "s3cr3t-token"
    if source == "environment":
        monkeypatch.setenv("BGTRACE_METRICS_TOKEN", token)
        app = apps.tutorial_app(registry=registry)
    else:
        app = apps.tutorial_app(registry=registry, metrics_token=token)
    client = TestClient(app)
    refused = [
        {},
        {"authorization": "Bearer wrong"},
        {"authorization": token},
        {"authorization": f"Basic {token}"},
        {"authorization": "Bearer " + "x" * 9000},
    ]
    for headers in refused:
        response = client.get("/metrics", headers=headers)
        assert response.status_code == 401
        assert response.headers["www-authenticate"].startswith("Bearer")
        assert "bgtask" not in response.text
    ok = client.get("/metrics", headers={"authorization": f"Bearer {token}"})
    assert ok.status_code == 200 and "bgtask_" in ok.text
    assert client.post("/send-notification/x").status_code == 200  # the app is untouched


def test_multiprocess_variable_that_is_no_directory_is_reported_at_start(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from bgtrace.multiprocess import check_multiprocess_dir, multiprocess_mode

    # Empty still switches prometheus_client to multiprocess mode: bgtrace must agree.
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", "")
    assert multiprocess_mode()
    with caplog.at_level("ERROR", logger="bgtrace"):
        check_multiprocess_dir()
    assert "not a directory" in caplog.text
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR")
    assert not multiprocess_mode()


@pytest.mark.parametrize("header", ["bearer s3cr3t", "BEARER s3cr3t", "Bearer   s3cr3t"])
def test_bearer_scheme_is_case_insensitive(registry: CollectorRegistry, header: str) -> None:
    """Regression: ``bearer <token>`` (RFC 7235: the scheme is case-insensitive, then one or
    more spaces) got 401."""
    client = TestClient(
        Starlette(routes=[Route("/metrics", metrics_app(registry, token="s3cr3t"))])
    )
    assert client.get("/metrics", headers={"authorization": header}).status_code == 200
    for refused in ("bearer s3cr3", "bearers3cr3t", "Basic s3cr3t", "s3cr3t", "bearer"):
        assert client.get("/metrics", headers={"authorization": refused}).status_code == 401


def test_token_is_compared_in_constant_time(
    registry: CollectorRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:

    compared: list[tuple[bytes, bytes]] = []
    original = hmac.compare_digest

    def compare_digest(given: bytes, expected: bytes) -> bool:
        compared.append((given, expected))
        return original(given, expected)

    monkeypatch.setattr(hmac, "compare_digest", compare_digest)
    client = TestClient(Starlette(routes=[Route("/metrics", metrics_app(registry, token="tok"))]))
    assert client.get("/metrics", headers={"authorization": "bearer guess"}).status_code == 401
    assert compared == [(b"guess", b"tok")]


@pytest.mark.parametrize("framework", ["starlette", "fastapi"])
def test_metrics_app_served_by_add_route(registry: CollectorRegistry, framework: str) -> None:
    """Regression: ``app.add_route("/metrics", metrics_app())`` raised a TypeError at the
    first scrape: Starlette wraps a function endpoint as ``request -> response``."""
    task_metrics(registry)  # bgtrace's families, for the page to show
    app = Starlette() if framework == "starlette" else FastAPI()
    # Typed for function endpoints; at run time Starlette takes an instance for ASGI.
    app.add_route("/metrics", metrics_app(registry))  # type: ignore[arg-type]
    client = TestClient(app, follow_redirects=False)
    response = client.get("/metrics")
    assert response.status_code == 200 and "bgtask_" in response.text
    assert client.head("/metrics").status_code == 200
    assert client.post("/metrics").status_code == 405


@pytest.mark.parametrize("framework", ["starlette", "fastapi"])
def test_metrics_app_mounted_at_metrics_answers_under_the_slash_only(
    registry: CollectorRegistry, framework: str
) -> None:
    """Pins what the README says: a ``Mount`` matches only below its path (Starlette's
    ``Mount`` pattern is ``/metrics/{path}``), so ``/metrics`` itself gets the router's
    307 to ``/metrics/``; ``add_route`` serves ``/metrics`` directly."""
    app = Starlette() if framework == "starlette" else FastAPI()
    app.mount("/metrics", metrics_app(registry))
    client = TestClient(app, follow_redirects=False)
    redirect = client.get("/metrics")
    assert redirect.status_code == 307
    assert redirect.headers["location"].endswith("/metrics/")
    assert client.get("/metrics/").status_code == 200


def _blocking_registry(
    registry: CollectorRegistry,
) -> tuple[threading.Event, threading.Event, list[int]]:
    """A collector that blocks each collection until released; the number of collections
    running at each entry."""
    entered, release = threading.Event(), threading.Event()
    running = [0]
    concurrent: list[int] = []
    lock = threading.Lock()

    class Slow:
        def collect(self) -> list[object]:
            with lock:
                running[0] += 1
                concurrent.append(running[0])
            entered.set()
            release.wait(30)
            with lock:
                running[0] -= 1
            return []

    registry.register(Slow())  # type: ignore[arg-type]
    return entered, release, concurrent


def _waiting_scrapes() -> int:
    from bgtrace import rendering

    with rendering._lock:
        return sum(len(job.wakers) for job in rendering._pending.values())


async def _until(check: Callable[[], bool], timeout: float = 10.0) -> None:
    """Poll ``check`` on the event loop for up to ``timeout`` seconds (no failure: the
    assertions after it say what went wrong)."""
    with anyio.move_on_after(timeout):
        while not check():
            await anyio.sleep(0.01)


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_concurrent_scrapes_of_one_page_share_one_render(
    registry: CollectorRegistry, backend: str
) -> None:
    entered, release, collections = _blocking_registry(registry)
    app = metrics_app(registry)
    statuses: list[int] = []

    async def scrape() -> None:
        statuses.append(status(await call(app, "/metrics", method="GET")))

    async def scenario() -> None:
        async with anyio.create_task_group() as group:
            for _ in range(5):
                group.start_soon(scrape)
            await _until(lambda: entered.is_set() and _waiting_scrapes() == 5)
            release.set()

    try:
        anyio.run(scenario, backend=backend)
    finally:
        release.set()
    assert statuses == [200] * 5
    assert len(collections) == 1


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_renders_of_different_pages_run_one_at_a_time(
    registry: CollectorRegistry, backend: str
) -> None:
    _, release, collections = _blocking_registry(registry)
    app = metrics_app(registry)
    statuses: list[int] = []

    async def scrape(accept: str) -> None:
        sent = await call(app, "/metrics", method="GET", headers=[(b"accept", accept.encode())])
        statuses.append(status(sent))

    async def scenario() -> None:
        async with anyio.create_task_group() as group:
            group.start_soon(scrape, "text/plain")
            group.start_soon(scrape, OPENMETRICS)
            # The second waits for its turn (or, rendered alongside, enters the collector).
            await _until(lambda: _waiting_scrapes() == 2 or len(collections) == 2)
            release.set()

    try:
        anyio.run(scenario, backend=backend)
    finally:
        release.set()
    assert statuses == [200, 200]
    assert collections == [1, 1]  # each render alone in the collector


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_metrics_answer_while_the_default_thread_limiter_is_exhausted(
    registry: CollectorRegistry, backend: str
) -> None:
    """Regression: /metrics rendered on anyio's default thread limiter, which the app's
    sync endpoints and def tasks exhaust: it answered only once one of them let go."""
    app = metrics_app(registry)

    async def scenario() -> int:
        limiter = anyio.to_thread.current_default_thread_limiter()
        borrowers = [object() for _ in range(int(limiter.total_tokens))]
        for borrower in borrowers:
            limiter.acquire_on_behalf_of_nowait(borrower)
        try:
            with anyio.fail_after(10):
                return status(await call(app, "/metrics", method="GET"))
        finally:
            for borrower in borrowers:
                limiter.release_on_behalf_of(borrower)

    assert anyio.run(scenario, backend=backend) == 200


def test_gzip_runs_off_the_event_loop(
    registry: CollectorRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Regression: the page was compressed on the event loop, which a large page stalls."""
    import gzip

    threads: list[threading.Thread] = []
    compress = gzip.compress

    def spy(data: bytes, compresslevel: int = 9) -> bytes:
        threads.append(threading.current_thread())
        return compress(data, compresslevel=compresslevel)

    monkeypatch.setattr(gzip, "compress", spy)
    app = metrics_app(registry)
    gzip_accepted = [(b"accept-encoding", b"gzip")]
    sent = anyio.run(lambda: call(app, "/metrics", method="GET", headers=gzip_accepted))
    assert status(sent) == 200
    assert threads and threading.main_thread() not in threads


def test_metrics_answer_while_sync_endpoints_hold_every_default_thread(
    registry: CollectorRegistry,
) -> None:
    """Regression, on a real server: 60 requests to a sync endpoint held anyio's 40 default
    threads, and /metrics answered only once one of them let go (4.5 s in the report)."""
    release = threading.Event()
    inside: list[int] = []

    def blocked(request: Request) -> PlainTextResponse:
        inside.append(1)
        release.wait(60)
        return PlainTextResponse("done")

    app = Starlette(routes=[Route("/blocked", blocked)])
    app.add_middleware(BackgroundTaskMiddleware, registry=registry)
    with serve_in_thread(app) as url, ThreadPoolExecutor(60) as pool:
        try:
            held = [pool.submit(httpx.get, f"{url}/blocked", timeout=90) for _ in range(60)]
            wait_for(lambda: len(inside) >= 40, what="sync requests holding every thread")
            try:
                response = httpx.get(f"{url}/metrics", timeout=10)
            except httpx.TimeoutException:
                pytest.fail("/metrics did not answer while the default threads were held")
            assert response.status_code == 200 and "bgtask_" in response.text
            assert len(inside) == 40  # the other 20 still wait for a thread
        finally:
            release.set()
        assert [future.result().status_code for future in held] == [200] * 60


def test_scrapes_render_in_one_thread_of_bgtraces_own(registry: CollectorRegistry) -> None:
    """Started once per process: starting a thread per scrape would hold the event loop
    until the new thread first runs."""
    threads: list[threading.Thread] = []

    class Where:
        def collect(self) -> list[object]:
            threads.append(threading.current_thread())
            return []

    registry.register(Where())  # type: ignore[arg-type]
    app = metrics_app(registry)

    async def scenario() -> None:
        for _ in range(3):
            assert status(await call(app, "/metrics", method="GET")) == 200

    anyio.run(scenario)
    assert len(set(threads)) == 1
    assert threads[0].name == "bgtrace-metrics" and threads[0] is not threading.main_thread()
