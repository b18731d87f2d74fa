"""The event-loop watchdog on real uvicorn servers: who blocked the loop, for how long, where.

Blocks last 0.5 s under a 0.2 s threshold: the heartbeat goes out every 0.1 s, so a block is
counted from 0.4 s (it began up to one heartbeat before the one it delayed) to a little over
0.5 s (the server's own scheduling on a busy machine).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import gc
import http.server
import logging
import math
import selectors
import socket
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
from fastapi import BackgroundTasks, Depends, FastAPI
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client import CollectorRegistry

import bgtrace.request
import bgtrace.watchdog
from bgtrace import BackgroundTaskMiddleware
from bgtrace.metrics import task_metrics
from tests.asgi import call, status
from tests.conftest import Samples
from tests.servers import in_forked_child, serve_in_thread, wait_for

THRESHOLD = 0.2
BLOCK = 0.5
LOW, HIGH = BLOCK - THRESHOLD / 2 - 0.02, BLOCK + 0.3
HERE = Path(__file__).resolve()
BLOCKED = "bgtask_loop_blocked_seconds_total"


def line_of(marker: str) -> int:
    """The line of this file that carries ``marker`` in a comment."""
    lines = HERE.read_text().splitlines()
    return next(n for n, text in enumerate(lines, 1) if f"# {marker}" in text)


async def sleeps_in_async_task() -> None:
    time.sleep(BLOCK)  # marker: sleep in task


def spin(seconds: float) -> int:
    deadline = time.perf_counter() + seconds
    turns = 0
    while time.perf_counter() < deadline:  # marker: spin
        turns += 1
    return turns


async def computes_in_async_task() -> None:
    spin(BLOCK)


SLOW_URL: list[str] = []


async def calls_http_synchronously() -> None:
    with urllib.request.urlopen(SLOW_URL[0], timeout=10) as answer:  # marker: urlopen
        answer.read()


async def waits_politely() -> None:
    await asyncio.sleep(0.01)


def blocking_dependency() -> None:
    return None


async def sleeping_dependency() -> None:
    time.sleep(BLOCK)  # marker: sleep in dependency


def make_app(
    registry: CollectorRegistry, threshold: float | None = THRESHOLD, **options: object
) -> FastAPI:
    app = FastAPI()
    app.add_middleware(
        BackgroundTaskMiddleware,
        registry=registry,
        loop_block_threshold=threshold,
        **options,  # type: ignore[arg-type]
    )

    @app.post("/task/sleep")
    async def task_sleep(background: BackgroundTasks) -> dict[str, str]:
        background.add_task(sleeps_in_async_task)
        return {}

    @app.post("/task/cpu")
    async def task_cpu(background: BackgroundTasks) -> dict[str, str]:
        background.add_task(computes_in_async_task)
        return {}

    @app.post("/task/http")
    async def task_http(background: BackgroundTasks) -> dict[str, str]:
        background.add_task(calls_http_synchronously)
        return {}

    @app.post("/task/polite")
    async def task_polite(background: BackgroundTasks) -> dict[str, str]:
        background.add_task(waits_politely)
        return {}

    @app.get("/endpoint/sleep")
    async def endpoint_sleep() -> dict[str, str]:
        time.sleep(BLOCK)  # marker: sleep in endpoint
        return {}

    @app.get("/dependency/sleep", dependencies=[Depends(sleeping_dependency)])
    async def dependency_sleep() -> dict[str, str]:
        return {}

    @app.get("/fast")
    async def fast() -> dict[str, str]:
        return {}

    return app


@contextmanager
def slow_http_server(delay: float) -> Iterator[str]:
    """A plain HTTP server on 127.0.0.1 that answers after ``delay`` seconds."""

    class Slow(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            time.sleep(delay)
            self.send_response(200)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"ok")

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Slow)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/slow"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def watched(url: str, samples: Samples) -> str:
    """Start the server's watchdog (it starts with the first request) and wait for a heartbeat:
    a block in that first request would be seen from when the watchdog got going."""
    assert httpx.get(f"{url}/fast").status_code == 200
    wait_for(lambda: samples("bgtrace_event_loop_lag_seconds_count") > 0, what="a heartbeat")
    return url


def blocked_by(samples: Samples, **labels: str) -> float:
    return samples.total(BLOCKED, **labels)


def warnings_of(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "bgtrace" and r.levelno == logging.WARNING
        and r.getMessage().startswith("event loop blocked")
    ]  # fmt: skip


@pytest.fixture(autouse=True)
def _fresh_log_limits() -> None:
    bgtrace.watchdog._logged.clear()


@pytest.fixture
def caplog_bgtrace(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.WARNING, logger="bgtrace")
    return caplog


def test_async_task_that_sleeps_is_blamed_with_its_line(
    registry: CollectorRegistry, samples: Samples, caplog_bgtrace: pytest.LogCaptureFixture
) -> None:
    task = f"{__name__}.sleeps_in_async_task"
    with serve_in_thread(make_app(registry)) as server:
        url = watched(server, samples)
        assert httpx.post(f"{url}/task/sleep").status_code == 200
        wait_for(lambda: blocked_by(samples, task=task) > 0, what="the block to be counted")
    seconds = blocked_by(samples, task=task, origin="handler", route="/task/sleep")
    assert LOW <= seconds <= HIGH
    assert blocked_by(samples, task="none") < 0.05  # nothing put on the route or on nobody
    place = f"{HERE}:{line_of('marker: sleep in task')} in sleeps_in_async_task"
    assert any(f"by task={task} origin=handler route=/task/sleep at {place}" in m
               for m in warnings_of(caplog_bgtrace)), warnings_of(caplog_bgtrace)  # fmt: skip


def test_async_task_that_computes_is_blamed(
    registry: CollectorRegistry, samples: Samples, caplog_bgtrace: pytest.LogCaptureFixture
) -> None:
    task = f"{__name__}.computes_in_async_task"
    with serve_in_thread(make_app(registry)) as server:
        url = watched(server, samples)
        httpx.post(f"{url}/task/cpu")
        wait_for(lambda: blocked_by(samples, task=task) > 0, what="the block to be counted")
    assert LOW <= blocked_by(samples, task=task, route="/task/cpu") <= HIGH
    # The innermost frame of the app's own: the loop in spin(), its condition or its body.
    spin_lines = {line_of("marker: spin"), line_of("marker: spin") + 1}
    assert any(f"{HERE}:{n} in spin" in m for m in warnings_of(caplog_bgtrace) for n in spin_lines)


def test_async_task_with_a_blocking_http_call_is_blamed_at_the_call(
    registry: CollectorRegistry, samples: Samples, caplog_bgtrace: pytest.LogCaptureFixture
) -> None:
    task = f"{__name__}.calls_http_synchronously"
    with slow_http_server(BLOCK) as slow, serve_in_thread(make_app(registry)) as server:
        url = watched(server, samples)
        SLOW_URL[:] = [slow]
        httpx.post(f"{url}/task/http")
        wait_for(lambda: blocked_by(samples, task=task) > 0, what="the block to be counted")
    assert LOW <= blocked_by(samples, task=task, route="/task/http") <= HIGH
    # Not a frame of http.client or socket: the app's line that made the call.
    place = f"{HERE}:{line_of('marker: urlopen')} in calls_http_synchronously"
    assert any(place in m for m in warnings_of(caplog_bgtrace)), warnings_of(caplog_bgtrace)


def test_async_endpoint_that_blocks_is_counted_on_its_route(
    registry: CollectorRegistry, samples: Samples, caplog_bgtrace: pytest.LogCaptureFixture
) -> None:
    with serve_in_thread(make_app(registry)) as server:
        url = watched(server, samples)
        assert httpx.get(f"{url}/endpoint/sleep").status_code == 200
        wait_for(lambda: blocked_by(samples) > 0, what="the block to be counted")
    seconds = blocked_by(samples, task="none", origin="handler", route="/endpoint/sleep")
    assert LOW <= seconds <= HIGH
    place = f"{HERE}:{line_of('marker: sleep in endpoint')} in "
    assert any(
        "by task=none origin=handler route=/endpoint/sleep at " + place in m
        for m in warnings_of(caplog_bgtrace)
    ), warnings_of(caplog_bgtrace)


def test_async_dependency_that_blocks_is_counted_as_dependency(
    registry: CollectorRegistry, samples: Samples
) -> None:
    with serve_in_thread(make_app(registry)) as server:
        url = watched(server, samples)
        assert httpx.get(f"{url}/dependency/sleep").status_code == 200
        wait_for(lambda: blocked_by(samples) > 0, what="the block to be counted")
    seconds = blocked_by(samples, task="none", origin="dependency", route="/dependency/sleep")
    assert LOW <= seconds <= HIGH


def test_blocking_task_span_gets_an_event_with_duration_and_place(
    registry: CollectorRegistry,
    tracer_provider: TracerProvider,
    exporter: InMemorySpanExporter,
    samples: Samples,
) -> None:
    app = make_app(registry, tracer_provider=tracer_provider)
    task = f"{__name__}.sleeps_in_async_task"
    with serve_in_thread(app) as server:
        url = watched(server, samples)
        httpx.post(f"{url}/task/sleep")
        wait_for(lambda: blocked_by(samples, task=task) > 0, what="the block to be counted")
    span = next(s for s in exporter.get_finished_spans() if s.name.startswith("bgtask "))
    events = [e for e in span.events if e.name == "bgtask.loop_blocked"]
    assert len(events) == 1
    attributes = dict(events[0].attributes or {})
    assert LOW - 0.1 <= float(attributes.pop("bgtask.loop_blocked.duration")) <= HIGH  # type: ignore[arg-type]
    assert attributes == {
        "code.file.path": str(HERE),
        "code.line.number": line_of("marker: sleep in task"),
        "code.function.name": "sleeps_in_async_task",
    }


def test_healthy_app_under_load_reports_no_block(
    registry: CollectorRegistry, samples: Samples, caplog_bgtrace: pytest.LogCaptureFixture
) -> None:
    # A heavier threshold than the others: the machine's 2 cores are shared with other work.
    app = make_app(registry, threshold=0.5)
    with serve_in_thread(app) as url:

        def client(n: int) -> int:
            with httpx.Client(base_url=url, timeout=30) as http:
                return sum(
                    http.request(
                        "POST" if i % 2 else "GET", "/task/polite" if i % 2 else "/fast"
                    ).status_code
                    == 200
                    for i in range(n)
                )

        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            assert sum(pool.map(client, [40] * 8)) == 320
        wait_for(
            lambda: samples("bgtrace_event_loop_lag_seconds_count") >= 5,
            what="heartbeats",
        )
    assert samples.label_values(BLOCKED, "task") == set()
    assert warnings_of(caplog_bgtrace) == []
    assert samples("bgtrace_event_loop_lag_seconds_bucket", le="0.25") == samples(
        "bgtrace_event_loop_lag_seconds_count"
    )


def test_no_watchdog_when_the_threshold_is_none(
    registry: CollectorRegistry, samples: Samples
) -> None:
    app = make_app(registry, threshold=None)
    with serve_in_thread(app) as url:
        assert httpx.get(f"{url}/endpoint/sleep").status_code == 200
        time.sleep(THRESHOLD)  # a heartbeat would have come back by now
    assert samples("bgtrace_event_loop_lag_seconds_count") == 0
    assert samples.total(BLOCKED) == 0


@pytest.mark.parametrize("bad", [0, -1, math.nan, math.inf, "0.1", True])
def test_a_threshold_that_is_not_a_positive_number_is_a_precise_error(bad: object) -> None:
    with pytest.raises(ValueError, match="loop_block_threshold"):
        BackgroundTaskMiddleware(FastAPI(), loop_block_threshold=bad)  # type: ignore[arg-type]


def test_without_stack_sampling_a_block_still_counts_on_nobody(
    registry: CollectorRegistry, samples: Samples, monkeypatch: pytest.MonkeyPatch
) -> None:
    # sys._current_frames is CPython's; elsewhere the loop's lag is all there is to go on.
    monkeypatch.delattr(sys, "_current_frames")
    with serve_in_thread(make_app(registry)) as server:
        url = watched(server, samples)
        httpx.post(f"{url}/task/sleep")
        wait_for(lambda: blocked_by(samples) > 0, what="the block to be counted")
    assert LOW <= blocked_by(samples, task="none", origin="other", route="none") <= HIGH


@contextmanager
def saturated_threadpool(url: str, callers: int) -> Iterator[None]:
    """``callers`` requests to ``/hold`` (a ``def`` endpoint) held until the block ends."""
    with concurrent.futures.ThreadPoolExecutor(callers) as pool:
        held = [pool.submit(httpx.get, f"{url}/hold", timeout=60) for _ in range(callers)]
        try:
            yield
        finally:
            RELEASE.set()
        assert all(f.result().status_code == 200 for f in held)


RELEASE = threading.Event()


def holding_app(registry: CollectorRegistry) -> FastAPI:
    RELEASE.clear()
    app = make_app(registry)

    @app.get("/hold")
    def hold() -> dict[str, str]:
        RELEASE.wait(60)
        return {}

    return app


def test_threadpool_gauges_follow_sync_endpoints_holding_threads(
    registry: CollectorRegistry, samples: Samples
) -> None:
    callers = 50  # 40 threads busy, 10 waiting for one
    with serve_in_thread(holding_app(registry)) as url:
        httpx.get(f"{url}/fast")
        wait_for(lambda: samples("bgtrace_threadpool_tokens") == 40, what="a first reading")
        assert samples("bgtrace_threadpool_borrowed") == 0
        with saturated_threadpool(url, callers):
            wait_for(
                lambda: (
                    samples("bgtrace_threadpool_borrowed") == 40
                    and samples("bgtrace_threadpool_waiting") == callers - 40
                ),
                timeout=30,
                what="a saturated threadpool",
            )
        wait_for(
            lambda: (
                samples("bgtrace_threadpool_borrowed") == 0
                and samples("bgtrace_threadpool_waiting") == 0
            ),
            what="the threadpool at rest",
        )
    assert samples("bgtrace_threadpool_tokens") == 40


def test_metrics_answer_while_the_threadpool_is_saturated(
    registry: CollectorRegistry, samples: Samples
) -> None:
    with serve_in_thread(holding_app(registry)) as url, saturated_threadpool(url, 45):
        wait_for(lambda: samples("bgtrace_threadpool_waiting") > 0, what="saturation")
        scrape = httpx.get(f"{url}/metrics", timeout=5)
        assert scrape.status_code == 200
        assert "bgtrace_threadpool_borrowed 40.0" in scrape.text


def test_requests_leave_the_live_registry_and_no_cycle_behind(registry: CollectorRegistry) -> None:
    """Regression guard for request.live: one entry per request in flight, none after (also
    when the handler raises), and the state kept by the id of its frame, not the frame (a state
    holding its frame is a cycle, left to the cyclic collector)."""
    app = make_app(registry, threshold=None)

    @app.get("/raises")
    async def raises() -> None:
        raise RuntimeError("boom")

    async def requests(raising: bool) -> None:
        for _ in range(20):
            assert status(await call(app, "/fast", method="GET")) == 200
            if raising:
                with pytest.raises(RuntimeError):
                    await call(app, "/raises", method="GET")

    asyncio.run(requests(raising=True))
    assert bgtrace.request.live == {}
    gc.collect()
    gc.disable()
    try:
        asyncio.run(requests(raising=False))
        assert gc.collect() == 0
    finally:
        gc.enable()


def test_a_loop_waiting_for_events_is_starved_not_blocked() -> None:
    """A late heartbeat while the loop thread waits in its selector: the process did not get
    the CPU or the GIL (found with 50 busy client threads); no code is to blame."""
    selector = selectors.DefaultSelector()
    wake, woken = socket.socketpair()
    selector.register(woken, selectors.EVENT_READ)
    waiting = threading.Thread(target=selector.select, args=(30,), daemon=True)
    waiting.start()
    try:
        ident = waiting.ident or 0
        wait_for(
            lambda: sys._current_frames()[ident].f_code.co_name == "select",
            what="the thread to wait in select",
        )
        culprit, _ = bgtrace.watchdog._attribute(sys._current_frames()[ident], ident, ())
        assert culprit.key is bgtrace.watchdog._IDLE_KEY
    finally:
        wake.send(b"x")
        waiting.join(timeout=10)
        selector.close()
        wake.close()
        woken.close()


def test_a_loop_that_stopped_with_a_heartbeat_out_is_not_sampled(
    registry: CollectorRegistry,
) -> None:
    """Regression guard: a closed loop's thread ident may belong to another thread by now;
    sampling it put a sync endpoint's wait in another server's counts."""
    sampled: list[float] = []
    watch = bgtrace.watchdog._Watch(
        threading.get_ident(), lambda beat: None, lambda: False, lambda: True, None
    )
    watch.metrics = (task_metrics(registry),)
    watch.threshold = 0.1
    watch._sample = sampled.append  # type: ignore[method-assign,assignment]
    assert watch.check(100.0) == 0.05  # the heartbeat goes out (and never runs)
    assert watch.check(100.5) == math.inf  # long overdue, but the loop is closed
    assert watch.ended and sampled == []
    assert Samples(registry).total(BLOCKED) == 0


def test_a_forked_child_starts_without_its_parents_watches(registry: CollectorRegistry) -> None:
    metrics = task_metrics(registry)

    async def watched_then_forked() -> bool:
        bgtrace.watchdog.ensure_watched(metrics, THRESHOLD)
        assert bgtrace.watchdog._watches

        def fresh() -> bool:
            watch = bgtrace.watchdog._local.watch
            return watch.ended and not bgtrace.watchdog._watches and not _thread_started()

        return in_forked_child(fresh)

    assert asyncio.run(watched_then_forked())


def _thread_started() -> bool:
    return bgtrace.watchdog._thread_pid != 0
