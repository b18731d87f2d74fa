"""Each way a task ends: completed by outcome, or dropped by reason, exactly once.

On both of anyio's backends: a cancellation is trio's own exception under trio."""

from __future__ import annotations

import gc
import inspect
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import anyio.abc
import pytest
from fastapi import BackgroundTasks, FastAPI, Request
from fastapi.testclient import TestClient
from prometheus_client import REGISTRY, CollectorRegistry
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.middleware import Middleware
from starlette.responses import StreamingResponse

import bgtrace
from bgtrace import BackgroundTaskMiddleware
from tests import apps
from tests.asgi import call
from tests.conftest import Samples

LOG = "tests.apps.write_log"
# Before 0.39 Starlette has no ASGI 2.4 branch in its streaming responses.
OLD_STARLETTE = "spec_version" not in inspect.getsource(StreamingResponse.__call__)


@pytest.fixture(params=["asyncio", "trio"])
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def run(backend: str, scenario: Callable[[], Awaitable[Any]]) -> Any:
    return anyio.run(scenario, backend=backend)


@pytest.fixture
def client(registry: CollectorRegistry, backend: str) -> TestClient:
    return TestClient(
        apps.dropping_app(registry=registry), raise_server_exceptions=False, backend=backend
    )


def test_http_exception_after_queuing_drops_as_request_error(
    client: TestClient, samples: Samples
) -> None:
    assert client.post("/raise-http").status_code == 409
    assert samples("bgtask_dropped_total", task=LOG, origin="handler", route="/raise-http",
                   reason="request_error") == 1  # fmt: skip
    assert samples.total("bgtask_completed_total") == 0


def test_unhandled_exception_after_queuing_drops_as_request_error(
    client: TestClient, samples: Samples
) -> None:
    assert client.post("/raise").status_code == 500
    assert samples("bgtask_dropped_total", task=LOG, origin="handler", route="/raise",
                   reason="request_error") == 1  # fmt: skip
    assert samples.total("bgtask_queue_length") == 0


def _http_scope(path: str, spec_version: str, method: str = "POST") -> dict[str, Any]:
    """An HTTP scope as a server of ``spec_version`` gives it."""
    return {
        "type": "http", "asgi": {"version": "3.0", "spec_version": spec_version},
        "http_version": "1.1", "method": method, "scheme": "http", "path": path,
        "raw_path": path.encode(), "root_path": "", "query_string": b"",
        "headers": [(b"host", b"test")], "server": ("test", 80), "client": ("127.0.0.1", 1),
    }  # fmt: skip


async def _call_with_client_gone(app: Any, path: str, spec_version: str) -> Exception | None:
    """One request whose client goes away, as uvicorn serves it: the body read gets
    ``http.disconnect`` (on ``/stream-read`` once the response has started); from the second
    body message on, the send raises ``OSError`` under ASGI spec 2.4 and drops the message
    before it (the client is gone). Returns what the app raised."""
    scope = _http_scope(path, spec_version)
    bodies = 0
    started = anyio.Event()

    async def receive() -> dict[str, Any]:
        if path == "/stream-read":
            await started.wait()  # the client leaves once the response has started
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        nonlocal bodies
        if message["type"] == "http.response.start":
            started.set()
        if message["type"] == "http.response.body":
            bodies += 1
            if bodies >= 2 and spec_version == "2.4":
                raise OSError("client gone")

    try:
        await app(scope, receive, send)
    except Exception as exc:
        return exc
    return None


def _client_gone_app(
    registry: CollectorRegistry | None, *, answer_gone: bool = False, inner_middleware: bool = True
) -> FastAPI:
    from fastapi.responses import FileResponse, PlainTextResponse
    from starlette.middleware.base import BaseHTTPMiddleware
    from starlette.requests import ClientDisconnect

    app = FastAPI()
    if inner_middleware:
        # Inside bgtrace: its own streaming lets the send's OSError out as it is.
        app.add_middleware(
            BaseHTTPMiddleware, dispatch=lambda request, call_next: call_next(request)
        )
    if registry is not None:
        app.add_middleware(BackgroundTaskMiddleware, registry=registry)
    if answer_gone:

        @app.exception_handler(ClientDisconnect)
        async def gone(request: Request, exc: ClientDisconnect) -> PlainTextResponse:
            return PlainTextResponse("client closed request", status_code=499)

    async def chunks() -> Any:
        for _ in range(3):
            yield b"chunk"

    @app.post("/read")
    async def read(request: Request, background_tasks: BackgroundTasks) -> Any:
        background_tasks.add_task(apps.write_log, "queued")
        await request.body()
        return {}

    @app.post("/stream")
    async def stream(background_tasks: BackgroundTasks) -> Any:
        background_tasks.add_task(apps.write_log, "queued")
        return StreamingResponse(chunks())

    @app.post("/file")
    async def file(background_tasks: BackgroundTasks) -> Any:
        background_tasks.add_task(apps.write_log, "queued")
        response = FileResponse(__file__)
        response.chunk_size = 1024  # several body messages: the send fails on the second
        return response

    @app.post("/stream-read")
    async def stream_read(request: Request, background_tasks: BackgroundTasks) -> Any:
        background_tasks.add_task(apps.write_log, "queued")

        async def reading() -> Any:
            yield b"started"
            yield await request.body()  # the body is read once the response has started

        return StreamingResponse(reading())

    @app.post("/plain")
    async def plain(background_tasks: BackgroundTasks) -> Any:
        background_tasks.add_task(apps.write_log, "queued")
        return PlainTextResponse("one body message")

    @app.post("/late-read")
    async def late_read(request: Request, background_tasks: BackgroundTasks) -> Any:
        # The response's own background reads the body after the response: the server
        # answers with a disconnect then, the client still there.
        background_tasks.add_task(apps.write_log, "queued")
        return PlainTextResponse("", background=BackgroundTask(request.body))

    return app


@pytest.mark.parametrize(
    ("path", "spec_version", "answer_gone", "inner_middleware", "reason"),
    [
        ("/read", "2.3", False, False, "cancelled"),
        ("/read", "2.4", False, False, "cancelled"),
        ("/read", "2.3", True, False, "cancelled"),
        ("/stream", "2.4", False, False, "cancelled"),
        ("/stream", "2.4", False, True, "cancelled"),
        ("/stream", "2.4", True, False, "cancelled"),
        ("/file", "2.4", False, True, "cancelled"),
        ("/stream-read", "2.4", False, False, "cancelled"),
        ("/late-read", "2.3", False, False, "not_attached"),
    ],
)
def test_tasks_of_a_request_whose_client_went_away_drop_as_cancelled(
    registry: CollectorRegistry,
    samples: Samples,
    path: str,
    spec_version: str,
    answer_gone: bool,
    inner_middleware: bool,
    reason: str,
) -> None:
    """The client went away before the response was over: the body read got a disconnect
    (Starlette raises ``ClientDisconnect``), or, on servers of ASGI spec 2.4, the response's
    send raised ``OSError`` (Starlette's streaming turns it into ``ClientDisconnect``; a file,
    or a middleware's own streaming, lets it out as it is, in an exception group before
    Starlette 0.39). The tasks were dropped by the client, not by an error of the request:
    ``cancelled``, as for a request the server cancels, also where an exception handler
    answers the disconnect. A disconnect read after the response (servers answer every
    receive so then) is no client gone."""
    options = {"answer_gone": answer_gone, "inner_middleware": inner_middleware}
    apps.done.clear()
    bare = anyio.run(_call_with_client_gone, _client_gone_app(None, **options), path, spec_version)
    ran = apps.done == ["queued"]
    apps.done.clear()
    app = _client_gone_app(registry, **options)
    raised = anyio.run(_call_with_client_gone, app, path, spec_version)
    assert type(raised) is type(bare)  # the app's exception (or none), unchanged
    assert (apps.done == ["queued"]) is ran
    if ran:
        # Starlette before 0.39 streams under ASGI 2.4 as under 2.3: it listens for the
        # disconnect, stops the stream and runs the background all the same.
        assert OLD_STARLETTE and path.startswith(("/stream", "/file")), (path, spec_version)
        assert samples.total("bgtask_completed_total", task=LOG, outcome="success") == 1
        return
    assert samples("bgtask_dropped_total", task=LOG, origin="handler", route=path,
                   reason=reason) == 1  # fmt: skip
    assert samples.total("bgtask_dropped_total", task=LOG) == 1
    assert samples.total("bgtask_completed_total", task=LOG) == 0
    assert samples.total("bgtask_queue_length") == 0


def _never_attached_app(registry: CollectorRegistry, *, replaced: bool = False) -> Starlette:
    """A Starlette app whose handler builds a task and never hands it to its response (an app
    bug, counted ``not_attached``), streaming its response; ``replaced``: a BaseHTTPMiddleware
    outside bgtrace answers with a response of its own instead."""
    from starlette.middleware.base import BaseHTTPMiddleware
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route

    async def chunks() -> Any:
        for _ in range(3):
            await anyio.sleep(0)
            yield b"chunk"

    async def stream(request: Request) -> StreamingResponse:
        BackgroundTask(apps.write_log, "never attached")
        return StreamingResponse(chunks())

    async def replace(request: Request, call_next: Any) -> PlainTextResponse:
        response = await call_next(request)
        return PlainTextResponse("replaced", status_code=response.status_code)

    middleware = [Middleware(BackgroundTaskMiddleware, registry=registry)]
    if replaced:
        middleware.insert(0, Middleware(BaseHTTPMiddleware, dispatch=replace))
    return Starlette(routes=[Route("/stream", stream)], middleware=middleware)


@pytest.mark.parametrize("server", ["hypercorn", "base_http_middleware"])
def test_a_disconnect_handed_over_once_the_response_started_is_no_client_gone(
    registry: CollectorRegistry, samples: Samples, server: str
) -> None:
    """Review: hypercorn (ASGI 2.1) closes the stream inside the last body's send, handing the
    disconnect to Starlette's listener before the send returns; a BaseHTTPMiddleware further
    out makes one up after its own response. The client did not leave: a task never handed to
    the response stays ``not_attached`` (it read ``cancelled``)."""
    import asyncio

    if server == "hypercorn":
        app = _never_attached_app(registry)

        async def serve() -> None:
            queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
            queue.put_nowait({"type": "http.request", "body": b"", "more_body": False})
            scope = _http_scope("/stream", "2.1", method="GET")

            async def send(message: dict[str, Any]) -> None:
                if message["type"] == "http.response.body" and not message.get("more_body"):
                    queue.put_nowait({"type": "http.disconnect"})  # the stream closed
                    await asyncio.sleep(0)

            await app(scope, queue.get, send)

        asyncio.run(serve())
    else:
        response = TestClient(_never_attached_app(registry, replaced=True)).get("/stream")
        assert response.text == "replaced"
    assert samples("bgtask_dropped_total", task=LOG, origin="other", route="/stream",
                   reason="not_attached") == 1  # fmt: skip
    assert samples.total("bgtask_dropped_total") == 1


@pytest.mark.parametrize(
    ("spec_version", "reason"), [("2.3", "request_error"), ("2.4", "cancelled")]
)
def test_an_oserror_from_the_last_send_is_a_client_gone_only_under_asgi_2_4(
    registry: CollectorRegistry, samples: Samples, spec_version: str, reason: str
) -> None:
    """ASGI spec 2.4 makes an OSError from the send the client's leaving, also for a
    response's only (and last) body message. Before 2.4 it is something else's (a full disk
    in a middleware's log, a timeout; review): the request's error, as before."""
    import errno

    app = _client_gone_app(registry, inner_middleware=False)

    async def call() -> None:
        scope = _http_scope("/plain", spec_version)

        async def receive() -> dict[str, Any]:
            return {"type": "http.request", "body": b"", "more_body": False}

        async def send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.body":
                assert not message.get("more_body")
                raise OSError(errno.ENOSPC, "gone or full")

        with pytest.raises(OSError, match="gone or full"):
            await app(scope, receive, send)

    anyio.run(call)
    assert samples("bgtask_dropped_total", task=LOG, origin="handler", route="/plain",
                   reason=reason) == 1  # fmt: skip


def test_a_client_seen_gone_stays_gone_whatever_the_send_raises_after(
    registry: CollectorRegistry, samples: Samples
) -> None:
    """The body read got the disconnect, an exception handler answers 499, and the send (a
    server before ASGI 2.4) raises an OSError of its own: still the client's leaving."""
    app = _client_gone_app(registry, answer_gone=True, inner_middleware=False)

    async def call() -> None:
        scope = _http_scope("/read", "2.3")

        async def receive() -> dict[str, Any]:
            return {"type": "http.disconnect"}

        async def send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.body":
                raise OSError("connection reset")

        with pytest.raises(OSError, match="reset"):
            await app(scope, receive, send)

    anyio.run(call)
    assert samples("bgtask_dropped_total", task=LOG, origin="handler", route="/read",
                   reason="cancelled") == 1  # fmt: skip


def test_a_stray_disconnect_before_a_whole_response_is_no_client_gone(
    registry: CollectorRegistry, samples: Samples
) -> None:
    """Review: granian may answer a receive with a disconnect right after a cancelled one
    (``request.is_disconnected()``) while the client waits; the response then goes out
    whole. A task the handler never attached stays ``not_attached``."""
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route

    async def early(request: Request) -> PlainTextResponse:
        BackgroundTask(apps.write_log, "never attached")
        await request.receive()  # the stray disconnect
        return PlainTextResponse("whole")

    app = Starlette(
        routes=[Route("/early", early, methods=["POST"])],
        middleware=[Middleware(BackgroundTaskMiddleware, registry=registry)],
    )
    sent = anyio.run(_call_with_client_gone, app, "/early", "2.3")
    assert sent is None
    assert samples("bgtask_dropped_total", task=LOG, origin="other", route="/early",
                   reason="not_attached") == 1  # fmt: skip


def test_failure_counts_by_error_type_and_drops_the_rest(
    client: TestClient, samples: Samples
) -> None:
    client.post("/fail-first")
    labels = {"origin": "handler", "route": "/fail-first"}
    assert samples("bgtask_completed_total", task="tests.apps.fail", outcome="failure",
                   **labels) == 1  # fmt: skip
    assert samples("bgtask_failures_total", task="tests.apps.fail", error_type="ValueError",
                   **labels) == 1  # fmt: skip
    assert samples("bgtask_dropped_total", task=LOG, reason="earlier_task_failed", **labels) == 1
    assert apps.done == []


def test_module_qualified_error_type(
    registry: CollectorRegistry, samples: Samples, backend: str
) -> None:
    app = FastAPI()
    app.add_middleware(BackgroundTaskMiddleware, registry=registry)

    @app.get("/custom")
    async def custom(background_tasks: BackgroundTasks) -> None:
        background_tasks.add_task(apps.fail_custom)

    TestClient(app, raise_server_exceptions=False, backend=backend).get("/custom")
    assert samples.label_values("bgtask_failures_total", "error_type") == {
        "tests.apps.NotificationError"
    }


def test_response_with_own_background_drops_dependency_tasks_as_not_attached(
    client: TestClient, samples: Samples
) -> None:
    client.post("/own-background?q=x")
    assert samples("bgtask_dropped_total", task=LOG, origin="dependency",
                   route="/own-background", reason="not_attached") == 1  # fmt: skip
    assert samples("bgtask_completed_total", task="tests.apps.async_log", origin="handler",
                   route="/own-background", outcome="success") == 1  # fmt: skip


def test_cancellation_counts_running_task_cancelled_and_queued_dropped(
    registry: CollectorRegistry, samples: Samples, backend: str
) -> None:
    """Regression (trio): trio.Cancelled was counted a failure of the running task, and the
    next task dropped as earlier_task_failed."""
    gate = apps.Gate()
    app = FastAPI()
    app.add_middleware(BackgroundTaskMiddleware, registry=registry)

    @app.post("/slow")
    async def slow(background_tasks: BackgroundTasks) -> dict[str, str]:
        background_tasks.add_task(gate.hold)
        background_tasks.add_task(apps.write_log, "after")
        return {}

    async def scenario() -> None:
        async with anyio.create_task_group() as group:
            group.start_soon(call, app, "/slow")
            for _ in range(500):
                if gate.entered.is_set():
                    break
                await anyio.sleep(0.01)
            assert samples("bgtask_in_progress", task="tests.apps.Gate.hold", origin="handler",
                           route="/slow") == 1  # fmt: skip
            group.cancel_scope.cancel()

    run(backend, scenario)
    labels = {"origin": "handler", "route": "/slow"}
    assert samples("bgtask_completed_total", task="tests.apps.Gate.hold", outcome="cancelled",
                   **labels) == 1  # fmt: skip
    assert samples("bgtask_dropped_total", task=LOG, reason="cancelled", **labels) == 1
    assert samples.total("bgtask_failures_total") == 0
    assert samples.total("bgtask_in_progress") == 0
    assert samples.total("bgtask_queue_length") == 0


def test_sync_task_waiting_for_a_thread_when_cancelled_is_dropped(
    registry: CollectorRegistry, samples: Samples, monkeypatch: pytest.MonkeyPatch, backend: str
) -> None:
    from starlette import background

    scopes: list[anyio.CancelScope] = []

    async def never_gets_a_thread(*args: object, **kwargs: object) -> None:
        scopes[0].cancel()  # as when shutdown cancels the wait for a thread
        await anyio.sleep_forever()

    monkeypatch.setattr(background, "run_in_threadpool", never_gets_a_thread)
    app = apps.tutorial_app(registry=registry)

    async def scenario() -> None:
        with anyio.CancelScope() as scope:
            scopes.append(scope)
            await call(app, "/send-notification/x")

    run(backend, scenario)
    assert samples("bgtask_dropped_total", task="tests.apps.write_notification",
                   origin="handler", route="/send-notification/{email}",
                   reason="cancelled") == 1  # fmt: skip
    assert samples.total("bgtask_queue_length") == 0


def test_sync_task_starts_in_its_worker_thread(
    registry: CollectorRegistry, samples: Samples, backend: str
) -> None:
    import threading

    threads: list[str] = []

    def where() -> None:
        threads.append(threading.current_thread().name)

    app = FastAPI()
    app.add_middleware(BackgroundTaskMiddleware, registry=registry)

    @app.get("/sync")
    async def endpoint(background_tasks: BackgroundTasks) -> None:
        background_tasks.add_task(where)

    TestClient(app, backend=backend).get("/sync")
    assert threads and threads[0] != "MainThread"
    assert samples.total("bgtask_completed_total", outcome="success") == 1


def test_task_outside_any_request_dropped_when_collected_unrun() -> None:
    samples = Samples(REGISTRY)
    labels = {"task": "tests.apps.async_log", "origin": "other", "route": "none"}
    before = samples("bgtask_dropped_total", reason="not_attached", **labels)
    BackgroundTask(apps.async_log, "never run")
    gc.collect()
    assert samples("bgtask_dropped_total", reason="not_attached", **labels) == before + 1


def test_task_outside_any_request_counted_when_run(backend: str) -> None:
    samples = Samples(REGISTRY)
    labels = {"task": "tests.apps.async_log", "origin": "other", "route": "none"}
    before = samples("bgtask_completed_total", outcome="success", **labels)
    task = BackgroundTask(apps.async_log, "run by hand")
    run(backend, task)
    del task
    gc.collect()
    assert samples("bgtask_completed_total", outcome="success", **labels) == before + 1
    assert samples("bgtask_queue_length", **labels) == 0


def test_shared_task_object_run_by_concurrent_responses_counts_each_run(backend: str) -> None:
    """Regression: a module-level BackgroundTask reused by every response was counted twice,
    drove queue_length negative, and detached a span context in the wrong thread.

    Made outside any request, the object is queued in the default registry, so the app
    records there too here."""
    import time

    from starlette.applications import Starlette
    from starlette.responses import PlainTextResponse, Response
    from starlette.routing import Route

    runs: list[int] = []

    def flush_cache() -> None:
        time.sleep(0.05)
        runs.append(1)

    samples = Samples(REGISTRY)
    name = (
        "tests.test_records.test_shared_task_object_run_by_concurrent_responses_counts_each_run"
        ".<locals>.flush_cache"
    )
    # The default registry outlives the test: what the other backend's run counted stays.
    completed = samples.total("bgtask_completed_total", task=name, outcome="success")
    enqueued = samples.total("bgtask_enqueued_total", task=name)
    flush = BackgroundTask(flush_cache)  # built once, outside any request

    async def endpoint(request: Request) -> Response:
        return PlainTextResponse("ok", background=flush)

    app = Starlette(routes=[Route("/", endpoint)])
    app.add_middleware(BackgroundTaskMiddleware)

    async def scenario() -> None:
        async with anyio.create_task_group() as group:
            group.start_soon(lambda: call(app, "/", method="GET"))
            group.start_soon(lambda: call(app, "/", method="GET"))
        await call(app, "/", method="GET")

    run(backend, scenario)
    assert len(runs) == 3
    assert samples.total("bgtask_completed_total", task=name, outcome="success") == completed + 3
    assert samples.total("bgtask_enqueued_total", task=name) == enqueued + 3
    assert samples.total("bgtask_queue_length", task=name) == 0
    assert samples.total("bgtask_in_progress", task=name) == 0


def test_shared_task_object_built_before_bgtrace_was_on_counts_each_run_where_it_runs(
    registry: CollectorRegistry, samples: Samples
) -> None:
    """Regression: a module-level BackgroundTask built at import, before the middleware was
    built (which is when bgtrace patches the classes), carried no record: every run went
    unmeasured. Each run is now queued as it starts, in the request whose response runs it."""
    from starlette.applications import Starlette
    from starlette.responses import PlainTextResponse, Response
    from starlette.routing import Route

    bgtrace.uninstrument()
    flush = BackgroundTask(apps.async_log, "flush")  # "at import"
    bgtrace.instrument()

    async def endpoint(request: Request) -> Response:
        return PlainTextResponse("ok", background=flush)

    app = Starlette(routes=[Route("/", endpoint)])
    app.add_middleware(BackgroundTaskMiddleware, registry=registry)
    client = TestClient(app)
    for _ in range(3):
        client.get("/")
    labels = {"task": "tests.apps.async_log", "origin": "other", "route": "/"}
    assert samples("bgtask_enqueued_total", **labels) == 3
    assert samples("bgtask_completed_total", outcome="success", **labels) == 3
    assert samples.total("bgtask_queue_length") == 0
    assert samples.total("bgtask_dropped_total") == 0


def test_task_queued_after_its_request_ended_is_not_left_queued(
    registry: CollectorRegistry, samples: Samples, backend: str
) -> None:
    """Regression: a task the request spawned (copying its context) queued a BackgroundTask
    after the request ended; it stayed in queue_length forever."""
    groups: list[anyio.abc.TaskGroup] = []
    ended: list[anyio.Event] = []  # made in the scenario: an event belongs to its loop

    async def later(ended: anyio.Event) -> None:
        await ended.wait()
        BackgroundTask(apps.async_log, "too late")  # created and thrown away

    app = FastAPI()
    app.add_middleware(BackgroundTaskMiddleware, registry=registry)

    @app.post("/spawn")
    async def spawn() -> None:
        groups[0].start_soon(later, ended[0])  # the new task copies the request's context

    async def scenario() -> None:
        ended.append(anyio.Event())
        async with anyio.create_task_group() as group:
            groups.append(group)
            await call(app, "/spawn")
            ended[0].set()

    run(backend, scenario)
    gc.collect()
    labels = {"task": "tests.apps.async_log", "origin": "other", "route": "/spawn"}
    assert samples("bgtask_enqueued_total", **labels) == 1
    assert samples("bgtask_dropped_total", reason="not_attached", **labels) == 1
    assert samples.total("bgtask_queue_length") == 0


def test_custom_buckets_keep_out_of_request_tasks_counted() -> None:
    """Regression: with buckets= on the default registry, tasks outside any request hit a
    bucket mismatch and went uncounted."""
    from prometheus_client import CollectorRegistry as Registry

    import bgtrace.config
    from bgtrace.metrics import task_metrics

    registry = Registry()
    implicit = task_metrics(registry, implicit=True)  # a task before the first request
    explicit = task_metrics(registry, buckets=[0.1, 1.0])  # then the middleware is built
    assert explicit is not implicit and explicit.buckets == (0.1, 1.0)
    assert task_metrics(registry, implicit=True) is explicit  # later implicit uses take it
    assert bgtrace.config.default_config().metrics is task_metrics(REGISTRY, implicit=True)


def test_request_span_ends_and_tail_is_timed_without_a_final_body_message(
    registry: CollectorRegistry, samples: Samples, backend: str
) -> None:
    """Regression: with http.response.pathsend (no final body message) the request span
    lasted as long as the background work and no post-response time was recorded."""
    import tempfile

    from fastapi.responses import FileResponse
    from opentelemetry import trace as otel_trace
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    with tempfile.NamedTemporaryFile(delete=False) as file:
        file.write(b"x" * 100)

    async def slow() -> None:
        await anyio.sleep(0.3)

    app = FastAPI()
    app.add_middleware(BackgroundTaskMiddleware, registry=registry, tracer_provider=provider)

    @app.get("/file")
    async def get_file(background_tasks: BackgroundTasks) -> FileResponse:
        background_tasks.add_task(slow)
        return FileResponse(file.name)

    sent = run(
        backend, lambda: call(app, "/file", method="GET", extensions={"http.response.pathsend": {}})
    )
    assert [m["type"] for m in sent][-1] in ("http.response.pathsend", "http.response.body")
    (request,) = [s for s in exporter.get_finished_spans() if s.kind is otel_trace.SpanKind.SERVER]
    (task,) = [s for s in exporter.get_finished_spans() if s.name.endswith(".slow")]
    assert request.end_time is not None and task.start_time is not None
    assert request.end_time <= task.start_time
    assert samples("bgtask_post_response_seconds_count", route="/file") == 1
    assert samples("bgtask_post_response_seconds_sum", route="/file") >= 0.3


def test_importing_bgtrace_does_not_import_trio() -> None:
    """trio's cancellation is recognised by looking among imported modules: an asyncio app
    never pays for importing trio, nor needs it installed."""
    import subprocess
    import sys

    check = "import sys, bgtrace, bgtrace.records; sys.exit('trio' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", check], timeout=60).returncode == 0


def test_the_span_check_before_a_task_starts_logs_bgtraces_error_and_answers_no(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Regression (review): run where another instrumentation's wrapper is inside bgtrace's,
    the check raised bgtrace's own error (a registry refusing bgtrace's metrics) into the app."""
    from bgtrace.records import replaces_their_span

    class NoDict:
        __slots__ = ()

    with caplog.at_level("ERROR", logger="bgtrace"):
        assert replaces_their_span(NoDict()) is False
    assert "task span check" in caplog.text
