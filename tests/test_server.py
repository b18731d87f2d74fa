"""What only a real server shows: when tasks run relative to the response, across processes."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest
from fastapi import BackgroundTasks, FastAPI
from prometheus_client import CollectorRegistry

from bgtrace import BackgroundTaskMiddleware
from tests import apps
from tests.servers import free_port, scrape, serve_in_thread, serve_process, total, wait_for

HOLD = "tests.apps.Gate.hold"
LOG = "tests.apps.write_log"


def test_response_arrives_before_background_work_and_gauges_follow_it(
    registry: CollectorRegistry,
) -> None:
    gate = apps.Gate()
    app = FastAPI()
    app.add_middleware(BackgroundTaskMiddleware, registry=registry)

    @app.post("/slow")
    async def slow(background_tasks: BackgroundTasks) -> dict[str, str]:
        background_tasks.add_task(gate.hold)  # an async task that runs until released
        background_tasks.add_task(apps.write_log, "second")
        return {"status": "accepted"}

    with serve_in_thread(app) as url:
        try:
            response = httpx.post(f"{url}/slow", timeout=10)
            # The response is complete while the first task still holds.
            assert response.json() == {"status": "accepted"}
            assert not gate.release.is_set()
            wait_for(gate.entered.is_set, what="the task to start")
            during = scrape(url)
            assert total(during, "bgtask_in_progress", task=HOLD) == 1
            assert total(during, "bgtask_queue_length", task=LOG) == 1
            assert total(during, "bgtask_queue_length", task=HOLD) == 0
            assert apps.done == []
        finally:
            gate.release.set()

        def drained() -> bool:
            after = scrape(url)
            return total(after, "bgtask_completed_total", outcome="success") == 2

        wait_for(drained, what="both tasks to complete")
        after = scrape(url)
        assert total(after, "bgtask_in_progress") == 0
        assert total(after, "bgtask_queue_length") == 0
        assert total(after, "bgtask_queue_wait_seconds_count", task=LOG) == 1
        assert total(after, "bgtask_post_response_seconds_count", route="/slow") == 1
        assert apps.done == ["second"]


def test_one_second_task_does_not_delay_the_response(registry: CollectorRegistry) -> None:
    import asyncio

    async def one_second() -> None:
        await asyncio.sleep(1)

    app = FastAPI()
    app.add_middleware(BackgroundTaskMiddleware, registry=registry)

    @app.post("/sleepy")
    async def sleepy(background_tasks: BackgroundTasks) -> None:
        background_tasks.add_task(one_second)

    with serve_in_thread(app) as url:
        started = time.monotonic()
        httpx.post(f"{url}/sleepy", timeout=10)
        answered = time.monotonic() - started
        in_progress = total(scrape(url), "bgtask_in_progress")
        wait_for(lambda: total(scrape(url), "bgtask_completed_total", outcome="success") == 1)
        finished = time.monotonic() - started
    # The task was measurably running after the response: the scrape saw it in progress,
    # and the whole took at least the task's second.
    assert in_progress == 1
    assert finished >= 1.0 > answered


def test_worker_processes_aggregate_in_metrics(tmp_path: Path) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    multiproc = tmp_path / "prom"
    multiproc.mkdir()
    args = ["-m", "uvicorn", "tests.server_app:app", "--host", "127.0.0.1",
            "--port", str(port), "--workers", "2", "--log-level", "warning"]  # fmt: skip
    with serve_process(args, {"PROMETHEUS_MULTIPROC_DIR": str(multiproc)}, f"{url}/metrics"):
        pids: set[int] = set()
        sent = 0
        with httpx.Client(timeout=10) as client:
            # Fresh connections, so the kernel spreads them over both workers.
            while len(pids) < 2 or sent < 40:
                assert sent < 2000, f"only workers {pids} answered"
                pids.add(client.post(f"{url}/work", headers={"connection": "close"}).json()["pid"])
                sent += 1

        def all_done() -> bool:
            return total(scrape(url), "bgtask_completed_total", outcome="success") == 2 * sent

        wait_for(all_done, what="every task of both workers to be counted")
        samples = scrape(url)
        assert total(samples, "bgtask_enqueued_total") == 2 * sent
        assert total(samples, "bgtask_enqueued_total", task=LOG, origin="handler",
                     route="/work") == sent  # fmt: skip
        assert total(samples, "bgtask_queue_length") == 0
        assert total(samples, "bgtask_in_progress") == 0
        gauges = [ls for (n, ls) in samples if n in ("bgtask_queue_length", "bgtask_in_progress")]
        assert gauges and all("pid" not in dict(ls) for ls in gauges)


SERVERS = {
    "uvicorn": ["-m", "uvicorn", "tests.server_app:app", "--host", "127.0.0.1", "--port"],
    "hypercorn": ["-m", "hypercorn", "tests.server_app:app", "--bind"],
    "granian": ["-m", "granian", "--interface", "asgi", "--host", "127.0.0.1",
                "tests.server_app:app", "--port"],
}  # fmt: skip


@pytest.mark.parametrize("server", sorted(SERVERS))
def test_each_server_answers_before_tasks_and_gauges_return_to_zero(server: str) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    address = f"127.0.0.1:{port}" if server == "hypercorn" else str(port)
    with serve_process([*SERVERS[server], address], {}, f"{url}/metrics"):
        response = httpx.post(f"{url}/slow", timeout=10)
        assert response.json() == {"status": "accepted"}  # while the first task holds

        def holding() -> bool:
            return total(scrape(url), "bgtask_in_progress", task="tests.server_app.hold") == 1

        wait_for(holding, what="the first task to run")
        assert total(scrape(url), "bgtask_queue_length", task=LOG) == 1
        httpx.post(f"{url}/release", timeout=10)

        def drained() -> bool:
            samples = scrape(url)
            return (
                total(samples, "bgtask_completed_total", outcome="success") == 2
                and total(samples, "bgtask_in_progress") == 0
                and total(samples, "bgtask_queue_length") == 0
            )

        wait_for(drained, what="both tasks to complete and the gauges to return to 0")


def test_a_slow_scrape_does_not_stall_the_app(registry: CollectorRegistry) -> None:
    """/metrics renders in a thread: the event loop serves requests while it runs."""
    import threading

    from prometheus_client.core import GaugeMetricFamily

    collecting = threading.Event()
    release = threading.Event()

    class Slow:
        def collect(self) -> list[GaugeMetricFamily]:
            collecting.set()
            release.wait(timeout=30)
            return [GaugeMetricFamily("slow_thing", "A collector that takes its time.", 1)]

    registry.register(Slow())  # type: ignore[arg-type]
    app = FastAPI()
    app.add_middleware(BackgroundTaskMiddleware, registry=registry)

    @app.get("/ping")
    async def ping() -> str:
        return "pong"

    with serve_in_thread(app) as url:
        scrape_result: list[httpx.Response] = []
        scraper = threading.Thread(
            target=lambda: scrape_result.append(httpx.get(f"{url}/metrics", timeout=30))
        )
        scraper.start()
        try:
            wait_for(collecting.is_set, what="the scrape to start rendering")
            # The render is blocked; the app must still answer.
            assert httpx.get(f"{url}/ping", timeout=10).json() == "pong"
        finally:
            release.set()
            scraper.join(timeout=30)
        assert scrape_result and "slow_thing 1.0" in scrape_result[0].text
