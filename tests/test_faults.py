"""Faults and bad input, in-process: exotic tasks, hostile requests, cardinality, secrets."""

from __future__ import annotations

import asyncio
import functools
import itertools
import logging
import math
import random
import tracemalloc
from collections.abc import Callable
from typing import Any

import pytest
from fastapi import BackgroundTasks, FastAPI, Request
from fastapi.testclient import TestClient
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client import CollectorRegistry

from bgtrace import BackgroundTaskMiddleware
from tests import apps
from tests.asgi import call, status
from tests.conftest import Samples

ROUTE = "/exotic/{kind}"


class Mailer:
    def send(self) -> str:
        return "sent"

    @staticmethod
    def static() -> None: ...

    async def __call__(self) -> int:
        return 42


class Hostile:
    """A callable whose repr raises and whose name lookups fail.

    (Attribute lookups raise AttributeError: Starlette itself calls getattr(func, "__name__",
    None) when queuing, which only tolerates that.)
    """

    def __call__(self) -> None: ...

    def __repr__(self) -> str:
        raise RuntimeError("repr")

    @property
    def __name__(self) -> str:
        raise AttributeError("no name")

    def __getattr__(self, item: str) -> Any:
        raise AttributeError(item)


class Abort(BaseException):
    pass


def abort() -> None:
    raise Abort


def _partial_target(a: int, b: int) -> int:
    return a + b


EXOTIC: dict[str, tuple[Callable[..., Any], tuple[Any, ...], str]] = {
    "partial": (functools.partial(_partial_target, 1), (2,), "tests.test_faults._partial_target"),
    "bound": (Mailer().send, (), "tests.test_faults.Mailer.send"),
    "static": (Mailer.static, (), "tests.test_faults.Mailer.static"),
    "callable": (Mailer(), (), "tests.test_faults.Mailer"),
    "lambda": (lambda: None, (), "tests.test_faults.<lambda>"),
    "print": (print, ("from a task",), "builtins.print"),
    "c-function": (math.sqrt, (2.0,), "math.sqrt"),
    "hostile": (Hostile(), (), "tests.test_faults.Hostile"),
}


@pytest.fixture
def exotic_app(registry: CollectorRegistry) -> FastAPI:
    app = FastAPI()
    app.add_middleware(BackgroundTaskMiddleware, registry=registry)

    @app.post(ROUTE)
    async def exotic(kind: str, background_tasks: BackgroundTasks) -> None:
        func, args, _ = EXOTIC[kind]
        background_tasks.add_task(func, *args)

    return app


@pytest.mark.parametrize("kind", sorted(EXOTIC))
def test_exotic_callables_are_named_and_accounted(
    exotic_app: FastAPI, samples: Samples, kind: str
) -> None:
    assert TestClient(exotic_app).post(f"/exotic/{kind}").status_code == 200
    name = EXOTIC[kind][2]
    labels = {"task": name, "origin": "handler", "route": ROUTE}
    assert samples("bgtask_enqueued_total", **labels) == 1
    assert samples("bgtask_completed_total", outcome="success", **labels) == 1
    assert samples.total("bgtask_queue_length") == samples.total("bgtask_in_progress") == 0


def test_task_raising_a_base_exception_propagates_and_counts_as_failure(
    registry: CollectorRegistry, samples: Samples
) -> None:
    app = FastAPI()
    app.add_middleware(BackgroundTaskMiddleware, registry=registry)

    @app.post("/abort")
    async def endpoint(background_tasks: BackgroundTasks) -> None:
        background_tasks.add_task(abort)
        background_tasks.add_task(apps.write_log, "never")

    with pytest.raises(Abort):
        TestClient(app).post("/abort")
    labels = {"origin": "handler", "route": "/abort"}
    assert samples("bgtask_failures_total", task="tests.test_faults.abort",
                   error_type="tests.test_faults.Abort", **labels) == 1  # fmt: skip
    assert samples("bgtask_dropped_total", task="tests.apps.write_log",
                   reason="earlier_task_failed", **labels) == 1  # fmt: skip


def test_task_that_cancels_itself(registry: CollectorRegistry, samples: Samples) -> None:
    async def cancel_self() -> None:
        task = asyncio.current_task()
        assert task is not None
        task.cancel()
        await asyncio.sleep(0)

    app = FastAPI()
    app.add_middleware(BackgroundTaskMiddleware, registry=registry)

    @app.post("/cancel")
    async def endpoint(background_tasks: BackgroundTasks) -> None:
        background_tasks.add_task(cancel_self)
        background_tasks.add_task(apps.write_log, "never")

    async def scenario() -> None:
        with pytest.raises(asyncio.CancelledError):
            await asyncio.ensure_future(call(app, "/cancel"))

    asyncio.run(scenario())
    assert samples.total("bgtask_completed_total", outcome="cancelled") == 1
    assert samples.total("bgtask_dropped_total", reason="cancelled") == 1
    assert samples.total("bgtask_failures_total") == 0
    assert samples.total("bgtask_queue_length") == samples.total("bgtask_in_progress") == 0


def test_task_return_values_are_untouched() -> None:
    from starlette.background import BackgroundTask

    from bgtrace.instrumentation import _run_one

    results: list[Any] = []

    def returns() -> str:
        results.append("ran")
        return "value"

    task = BackgroundTask(returns)
    task.func = functools.partial(lambda f: results.append(f()) or "x", task.func)  # type: ignore[misc]
    asyncio.run(_run_one(task))
    assert results == ["ran", "value"]


def test_hostile_requests_add_no_label_values_and_never_raise(
    registry: CollectorRegistry,
    samples: Samples,
    tracer_provider: TracerProvider,
    exporter: InMemorySpanExporter,
) -> None:
    app = apps.tutorial_app(registry=registry, tracer_provider=tracer_provider)

    @app.api_route("/{anything:path}", methods=["GET", "POST", "PUT", "DELETE", "PATCH"])
    async def catch_all(anything: str, background_tasks: BackgroundTasks) -> None:
        background_tasks.add_task(apps.write_log, "caught")

    rng = random.Random(6)
    methods = [b"GET", b"POST", b"PUT", b"DELETE", b"PATCH", b"BREW", b"M-SEARCH", b"\xff\x00"]

    async def hostile_traffic() -> None:
        for i in range(10_000):
            # Raw bytes, as a server passes them on: what no HTTP client would send.
            path = b"/" + bytes(rng.choices(range(33, 256), k=rng.randint(0, 60)))
            headers = [(b"traceparent", bytes(rng.choices(range(256), k=rng.randint(0, 80))))]
            if i % 500 == 0:
                headers += [(b"x-huge", b"h" * 65_536), (b"\x00odd name", b"\xff" * 100)]
            method = rng.choice(methods).decode("latin-1")
            assert status(await call(app, path, method=method, headers=headers)) < 500

    asyncio.run(hostile_traffic())
    assert samples.label_values("bgtask_enqueued_total", "route") <= {"/{anything:path}", "none"}
    assert samples.label_values("bgtask_post_response_seconds_count", "route") <= {
        "/{anything:path}",
        "none",
    }
    names = {span.name for span in exporter.get_finished_spans()}
    known = [m.decode() for m in methods[:5]]
    assert names <= {"bgtask write_log", "HTTP", "HTTP /{anything:path}"} | set(known) | {
        f"{m} /{{anything:path}}" for m in known
    }
    assert len(names) > 3  # the traffic did reach the app and its tasks


def test_ten_thousand_distinct_task_callables_stay_bounded(
    registry: CollectorRegistry, samples: Samples, caplog: pytest.LogCaptureFixture
) -> None:
    from bgtrace.metrics import task_metrics

    app = FastAPI()
    app.add_middleware(BackgroundTaskMiddleware, registry=registry, max_label_values=50)
    made = itertools.count()

    @app.post("/dynamic")
    async def dynamic(background_tasks: BackgroundTasks) -> None:
        for _ in range(100):
            # A new callable each time, alive only as long as its task: what the test keeps
            # alive itself must not count as bgtrace's growth.
            namespace: dict[str, Any] = {}
            exec(f"def task_{next(made)}():\n    pass", namespace)
            background_tasks.add_task(namespace.popitem()[1])

    client = TestClient(app)
    tracemalloc.start()
    try:
        with caplog.at_level(logging.WARNING, logger="bgtrace"):
            for _ in range(50):  # 5,000 callables: every bounded cache is full by now
                client.post("/dynamic")
            before = tracemalloc.take_snapshot()
            for _ in range(50):  # 5,000 more
                client.post("/dynamic")
            after = tracemalloc.take_snapshot()
    finally:
        tracemalloc.stop()
    assert len(samples.label_values("bgtask_enqueued_total", "task")) == 51  # 50 + "other"
    assert samples.total("bgtask_enqueued_total") == 10_000
    assert len(task_metrics(registry, max_label_values=50)._series) <= 4096
    growth = sum(
        stat.size_diff
        for stat in after.compare_to(before, "traceback")
        if any("/bgtrace/" in frame.filename for frame in stat.traceback)
    )
    assert growth < 256 * 1024, f"bgtrace grew by {growth} bytes for 5,000 new callables"
    assert sum("max_label_values" in r.getMessage() for r in caplog.records) == 1


SECRETS = {
    "body": "BODY-SECRET-7f3a",
    "header": "HEADER-SECRET-91bc",
    "query": "QUERY-SECRET-44de",
    "argument": "ARG-SECRET-0a1b",
    "cookie": "COOKIE-SECRET-55aa",
}


def test_planted_secrets_reach_no_label_attribute_or_log(
    registry: CollectorRegistry,
    tracer_provider: TracerProvider,
    exporter: InMemorySpanExporter,
    caplog: pytest.LogCaptureFixture,
) -> None:
    app = FastAPI()
    app.add_middleware(BackgroundTaskMiddleware, registry=registry, tracer_provider=tracer_provider)

    def deliver(secret: str, **kwargs: str) -> None:
        raise ValueError(f"could not deliver {secret}")  # a message quoting its argument

    @app.post("/submit/{item}")
    async def submit(item: str, request: Request, background_tasks: BackgroundTasks) -> None:
        await request.body()
        background_tasks.add_task(apps.write_log, SECRETS["argument"])
        background_tasks.add_task(deliver, SECRETS["argument"], token=SECRETS["argument"])

    client = TestClient(app, raise_server_exceptions=False, cookies={"s": SECRETS["cookie"]})
    with caplog.at_level(logging.DEBUG, logger="bgtrace"):
        client.post(
            f"/submit/{SECRETS['argument']}?q={SECRETS['query']}",
            content=SECRETS["body"],
            headers={"x-api-key": SECRETS["header"], "authorization": SECRETS["header"]},
        )
        exposition = client.get("/metrics", headers={"accept": "application/openmetrics-text"})
    texts = [exposition.text]
    for span in exporter.get_finished_spans():
        texts.append(span.name)
        texts += [f"{k}={v}" for k, v in (span.attributes or {}).items()]
        for event in span.events:
            texts += [f"{k}={v}" for k, v in (event.attributes or {}).items()]
        texts += [str(span.status.description)]
    texts += [r.getMessage() for r in caplog.records if r.name.startswith("bgtrace")]
    assert len(exporter.get_finished_spans()) == 3
    for where, secret in SECRETS.items():
        leaks = [text for text in texts if secret in text]
        assert not leaks, f"{where} secret leaked: {leaks[:3]}"
