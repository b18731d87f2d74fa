"""The live page in a real browser (Debian's chromium, headless) against a real uvicorn."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest
from fastapi import BackgroundTasks, FastAPI
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client import CollectorRegistry

from bgtrace import BackgroundTaskMiddleware
from tests.browser import Page, browser_page
from tests.servers import serve_in_thread, wait_for

TOKEN = "page-test-token"
HOSTILE = '<script>window.__pwned=1</script><img src=x onerror="window.__pwned=2">'

release = threading.Event()


async def slow_report() -> None:
    while not release.is_set():
        await asyncio.sleep(0.02)


class ReceiptError(Exception):
    pass


def render_receipt(order: int) -> None:
    raise ReceiptError(f"order {order} has no address")  # the message must never show


def hostile() -> None:
    raise RuntimeError("hostile")


hostile.__qualname__ = HOSTILE


def page_app(exporter: InMemorySpanExporter) -> FastAPI:
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    app = FastAPI()
    app.add_middleware(
        BackgroundTaskMiddleware,
        registry=CollectorRegistry(),
        tracer_provider=provider,
        metrics_token=TOKEN,
        tasks_path="/bgtasks",
        trace_url="/trace/{trace_id}",
    )

    @app.post("/slow")
    async def slow(background_tasks: BackgroundTasks) -> None:
        background_tasks.add_task(slow_report)

    @app.post("/receipt/{order}")
    async def receipt(order: int, background_tasks: BackgroundTasks) -> None:
        background_tasks.add_task(render_receipt, order)

    @app.post("/hostile")
    async def queue_hostile(background_tasks: BackgroundTasks) -> None:
        background_tasks.add_task(hostile)

    @app.get("/trace/{trace_id}")
    async def trace_view(trace_id: str) -> dict[str, str]:
        return {"trace": trace_id}  # stands in for Jaeger's trace view

    return app


@dataclass
class Live:
    url: str
    page: Page
    exporter: InMemorySpanExporter

    def rows(self, table: str) -> list[list[str]]:
        script = f"""Array.from(document.querySelectorAll('#{table} tbody tr'))
            .filter(tr => !tr.querySelector('td.empty'))
            .map(tr => Array.from(tr.cells).map(td => td.textContent))"""
        found: list[list[str]] = self.page.evaluate(script)
        return found

    def post(self, path: str) -> None:
        response = httpx.post(self.url + path, timeout=10, trust_env=False)
        assert response.status_code in (200, 500)


@pytest.fixture(scope="module")
def live() -> Iterator[Live]:
    exporter = InMemorySpanExporter()
    release.clear()
    with serve_in_thread(page_app(exporter)) as url, browser_page() as page:
        page.goto(f"{url}/bgtasks#token={TOKEN}")
        yield Live(url, page, exporter)
        release.set()


def test_token_from_the_fragment_is_kept_in_memory_and_taken_off_the_address(live: Live) -> None:
    status = "document.getElementById('status').textContent"
    wait_for(lambda: "worker pid" in live.page.evaluate(status), what="the page's first data")
    assert live.page.evaluate("window.location.href") == f"{live.url}/bgtasks"
    # Without the token the data is refused, exactly like /metrics.
    assert httpx.get(f"{live.url}/bgtasks?format=json", trust_env=False).status_code == 401


def test_slow_task_appears_under_running_now_then_leaves_it(live: Live) -> None:
    release.clear()
    live.post("/slow")
    name = "tests.test_page_browser.slow_report"
    wait_for(lambda: [r[0] for r in live.rows("running")] == [name], what="the running task")
    [row] = live.rows("running")
    assert row[1:3] == ["handler", "/slow"]
    release.set()
    wait_for(lambda: live.rows("running") == [], what="the task to leave running now")
    wait_for(lambda: any(r[0] == name and r[2] == "1" for r in live.rows("tasks")),
             what="its completed count")  # fmt: skip


def test_failure_row_links_to_the_failed_task_trace(live: Live) -> None:
    live.post("/receipt/7")
    name = "tests.test_page_browser.render_receipt"
    wait_for(lambda: any(r[1] == name for r in live.rows("failures")), what="the failure row")
    row = next(r for r in live.rows("failures") if r[1] == name)
    assert row[2:5] == ["/receipt/{order}", "handler", "tests.test_page_browser.ReceiptError"]
    [span] = [s for s in live.exporter.get_finished_spans() if s.name == "bgtask render_receipt"]
    trace_id = format(span.context.trace_id, "032x")
    href = live.page.evaluate(
        "Array.from(document.querySelectorAll('#failures a.trace-link')).map(a => a.href)"
    )
    assert f"{live.url}/trace/{trace_id}" in href
    assert httpx.get(f"{live.url}/trace/{trace_id}", trust_env=False).json() == {"trace": trace_id}
    body = live.page.evaluate("document.body.textContent")
    assert "no address" not in body  # never the message


def test_hostile_task_name_is_shown_as_text_and_runs_no_script(live: Live) -> None:
    live.post("/hostile")
    name = f"tests.test_page_browser.{HOSTILE}"
    wait_for(lambda: any(r[1] == name for r in live.rows("failures")), what="the hostile row")
    assert any(r[0] == name for r in live.rows("tasks"))
    assert live.page.evaluate("document.querySelectorAll('table img, table script').length") == 0
    assert live.page.evaluate("typeof window.__pwned") == "undefined"
    # The JSON carries it escaped for any reader, too.
    raw = httpx.get(
        f"{live.url}/bgtasks", headers={"accept": "application/json",
                                        "authorization": f"Bearer {TOKEN}"}, trust_env=False
    ).text  # fmt: skip
    assert "<script>" not in raw
    assert name in [f["task"] for f in json.loads(raw)["failures"]]
