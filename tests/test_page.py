"""The live page's HTML and JSON (the browser test shows them in chromium)."""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi import BackgroundTasks, FastAPI
from fastapi.testclient import TestClient
from prometheus_client import CollectorRegistry

from bgtrace import BackgroundTaskMiddleware, page, watchdog
from bgtrace.demo.table import histogram_quantile
from bgtrace.metrics import task_metrics
from bgtrace.testing import BackgroundTaskRecorder
from tests import apps
from tests.servers import wait_for

JSON = {"accept": "application/json"}


def page_client(registry: CollectorRegistry, **options: Any) -> TestClient:
    options.setdefault("tasks_path", "/bgtasks")
    return TestClient(
        apps.dropping_app(registry=registry, **options), raise_server_exceptions=False
    )


@pytest.fixture(autouse=True)
def _empty_rings() -> Iterator[None]:
    recent = page.recent_ends()
    recent.failures.clear()
    recent.drops.clear()
    yield
    page.diagnostics_provider = watchdog.diagnostics


def test_no_page_unless_tasks_path_is_set(registry: CollectorRegistry) -> None:
    client = TestClient(apps.dropping_app(registry=registry))
    assert client.get("/bgtasks", headers=JSON).status_code == 404


def test_json_when_asked_by_accept_or_format_and_versioned(registry: CollectorRegistry) -> None:
    client = page_client(registry)
    for response in (client.get("/bgtasks", headers=JSON), client.get("/bgtasks?format=json")):
        assert response.headers["content-type"] == "application/json"
        data = response.json()
        assert data["version"] == 1
        assert set(data) == {"version", "pid", "time", "running", "queued", "failures",
                             "dropped", "tasks", "diagnostics"}  # fmt: skip
    assert client.get("/bgtasks").headers["content-type"] == "text/html; charset=utf-8"


def test_html_allows_only_its_own_script_by_a_fresh_nonce(registry: CollectorRegistry) -> None:
    client = page_client(registry)
    first, second = client.get("/bgtasks"), client.get("/bgtasks")
    csp = first.headers["content-security-policy"]
    nonce = re.search(r"script-src 'nonce-([^']+)'", csp)
    assert nonce is not None and "unsafe-inline" not in csp and "default-src 'none'" in csp
    assert first.text.count(f'nonce="{nonce.group(1)}"') == 2  # the script and the style
    assert nonce.group(1) not in second.headers["content-security-policy"]
    assert first.headers["x-content-type-options"] == "nosniff"
    assert not re.search(r"(src|href)=|//[a-z]", first.text)  # nothing loaded from anywhere


def test_data_needs_the_metrics_token_and_the_page_itself_holds_none(
    registry: CollectorRegistry,
) -> None:
    client = page_client(registry, metrics_token="s3cret")
    assert client.get("/bgtasks", headers=JSON).status_code == 401
    assert client.get("/bgtasks?format=json&token=s3cret").status_code == 401  # header only
    ok = client.get("/bgtasks", headers={**JSON, "authorization": "Bearer s3cret"})
    assert ok.status_code == 200 and ok.json()["version"] == 1
    html = client.get("/bgtasks")
    assert html.status_code == 200 and "s3cret" not in html.text


def test_token_comes_from_the_environment_like_metrics(
    registry: CollectorRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BGTRACE_METRICS_TOKEN", "from-env")
    client = page_client(registry)
    assert client.get("/bgtasks", headers=JSON).status_code == 401
    headers = {**JSON, "authorization": "Bearer from-env"}
    assert client.get("/bgtasks", headers=headers).status_code == 200


def test_only_get_and_head(registry: CollectorRegistry) -> None:
    client = page_client(registry)
    assert client.post("/bgtasks").status_code == 405
    assert client.head("/bgtasks").content == b""


def test_failures_and_drops_newest_first_without_message_or_arguments(
    registry: CollectorRegistry,
) -> None:
    client = page_client(registry, trace_url="http://jaeger:16686/trace/{trace_id}")
    client.post("/fail-first")
    data = client.get("/bgtasks", headers=JSON).json()
    [failure] = data["failures"]
    assert {k: failure[k] for k in ("task", "origin", "route", "error_type", "trace_id")} == {
        "task": "tests.apps.fail", "origin": "handler", "route": "/fail-first",
        "error_type": "ValueError", "trace_id": None,
    }  # fmt: skip
    assert failure["trace_url"] is None  # no sampled trace: shown as text
    [drop] = data["dropped"]
    assert (drop["task"], drop["reason"]) == ("tests.apps.write_log", "earlier_task_failed")
    text = client.get("/bgtasks", headers=JSON).text
    assert "boom" not in text and "skipped" not in text


def test_failures_ring_keeps_the_last_hundred(registry: CollectorRegistry) -> None:
    client = page_client(registry)
    for _ in range(page.RECENT_FAILURES + 5):
        client.post("/fail-first")
    data = client.get("/bgtasks", headers=JSON).json()
    assert len(data["failures"]) == page.RECENT_FAILURES
    times = [f["time"] for f in data["failures"]]
    assert times == sorted(times, reverse=True)


def test_trace_links_are_formatted_from_trace_url(
    registry: CollectorRegistry, tracer_provider: Any
) -> None:
    client = page_client(
        registry, tracer_provider=tracer_provider, trace_url="http://jaeger/trace/{trace_id}"
    )
    client.post("/fail-first")
    [failure] = client.get("/bgtasks", headers=JSON).json()["failures"]
    assert re.fullmatch(r"[0-9a-f]{32}", failure["trace_id"])
    assert failure["trace_url"] == f"http://jaeger/trace/{failure['trace_id']}"


def test_trace_url_comes_from_the_environment_and_must_name_trace_id(
    registry: CollectorRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(ValueError, match="trace_id"):
        BackgroundTaskMiddleware(
            FastAPI(), registry=registry, tasks_path="/t", trace_url="http://x"
        )
    with pytest.raises(ValueError, match="http"):
        BackgroundTaskMiddleware(
            FastAPI(), registry=registry, tasks_path="/t", trace_url="javascript:{trace_id}"
        )
    with pytest.raises(ValueError, match="tasks_path"):
        BackgroundTaskMiddleware(FastAPI(), registry=registry, tasks_path="bgtasks")
    monkeypatch.setenv("BGTRACE_TRACE_URL", "http://x/{trace_id}")
    with pytest.raises(ValueError, match="trace_id"):
        BackgroundTaskMiddleware(FastAPI(), registry=registry, tasks_path="/t", trace_url="/t")


def test_running_task_shows_its_age_and_waiting_location(registry: CollectorRegistry) -> None:
    seen: list[dict[str, Any]] = []
    metrics = task_metrics(registry)

    def inspect_page() -> None:
        for record in page.inflight.snapshot():
            record.waiting_at = "app.py:12 in inspect_page"
        seen.append(page.snapshot(metrics, None))

    app = FastAPI()
    app.add_middleware(BackgroundTaskMiddleware, registry=registry, tasks_path="/bgtasks")

    @app.post("/look")
    def look(background_tasks: BackgroundTasks) -> None:
        background_tasks.add_task(inspect_page)
        background_tasks.add_task(apps.write_log, "after")

    TestClient(app).post("/look")
    [data] = seen
    [running] = data["running"]
    assert running["task"].endswith("inspect_page") and running["age_seconds"] >= 0
    assert running["waiting_at"] == "app.py:12 in inspect_page"
    [queued] = data["queued"]
    assert queued["task"] == "tests.apps.write_log" and queued["waiting_seconds"] >= 0


def test_held_tasks_are_listed_as_queued(
    registry: CollectorRegistry, bgtasks: BackgroundTaskRecorder
) -> None:
    client = page_client(registry)
    bgtasks.hold()
    client.post("/raise-http")  # dropped: the page lists it under dropped, not queued
    TestClient(apps.tutorial_app(registry=registry, tasks_path="/bgtasks")).post(
        "/send-notification/x"
    )
    data = client.get("/bgtasks", headers=JSON).json()
    assert [q["task"] for q in data["queued"]] == ["tests.apps.write_notification"]
    assert [d["reason"] for d in data["dropped"]] == ["request_error"]
    bgtasks.run_held()
    assert client.get("/bgtasks", headers=JSON).json()["queued"] == []


def test_per_task_counts_and_quantiles_since_start(registry: CollectorRegistry) -> None:
    client = page_client(registry)
    client.post("/fail-first")
    client.post("/fail-first")
    rows = {r["task"]: r for r in client.get("/bgtasks", headers=JSON).json()["tasks"]}
    fail, log = rows["tests.apps.fail"], rows["tests.apps.write_log"]
    assert (fail["enqueued"], fail["completed"], fail["failed"], fail["dropped"]) == (2, 2, 2, 0)
    assert (log["enqueued"], log["dropped"], log["run_p50_seconds"]) == (2, 2, None)
    assert 0 < fail["run_p50_seconds"] <= 0.005 and 0 < fail["wait_p95_seconds"] <= 0.005


@pytest.mark.parametrize(
    "counts", [[0, 4, 0, 0], [1, 1, 1, 1], [0, 0, 0, 3], [5, 0, 0, 0], [2, 0, 7, 1]]
)
@pytest.mark.parametrize("q", [0.5, 0.95, 0.99])
def test_quantiles_match_promql_histogram_quantile(counts: list[int], q: float) -> None:
    bounds = (0.1, 1.0, 10.0)
    cumulative, running = {}, 0
    for bound, count in zip((*bounds, math.inf), counts, strict=True):
        running += count
        cumulative[bound] = float(running)
    assert page.quantile_of(q, bounds, counts) == pytest.approx(histogram_quantile(q, cumulative))


def test_diagnostics_from_the_watchdog_loop_lag_threadpool_and_blocked_time(
    registry: CollectorRegistry,
) -> None:
    client = page_client(registry, loop_block_threshold=0.05)
    seen: list[dict[str, Any]] = []
    with client:
        client.post("/fail-first")  # the first request starts the watchdog on the app's loop

        def diagnostics() -> bool:
            seen.append(client.get("/bgtasks", headers=JSON).json()["diagnostics"] or {})
            return "threadpool_tokens" in seen[-1]

        wait_for(diagnostics, timeout=30, what="the watchdog's diagnostics on the page")
    found = seen[-1]
    assert set(found) == {
        "loop_lag_last_seconds", "loop_lag_p99_seconds", "loop_blocked_seconds",
        "threadpool_tokens", "threadpool_borrowed", "threadpool_waiting",
    }  # fmt: skip
    assert found["loop_lag_last_seconds"] >= 0 and found["loop_lag_p99_seconds"] >= 0
    assert found["threadpool_tokens"] == 40  # anyio's default limiter
    assert found["threadpool_borrowed"] >= 0 and found["threadpool_waiting"] == 0


def test_diagnostics_not_available_when_the_watchdog_is_off(registry: CollectorRegistry) -> None:
    client = page_client(registry, loop_block_threshold=None)
    with client:
        client.post("/fail-first")
        assert client.get("/bgtasks", headers=JSON).json()["diagnostics"] is None


def test_loop_blocked_seconds_per_task_row_from_the_watchdog_values(
    registry: CollectorRegistry,
) -> None:
    client = page_client(registry, loop_block_threshold=None)
    client.post("/fail-first")
    metrics = task_metrics(registry, "", None)
    metrics.loop_blocked("tests.apps.fail", "handler", "/fail-first", 0.25)
    metrics.loop_blocked("none", "handler", "/fail-first", 1.0)  # an endpoint's: no task row
    rows = {r["task"]: r for r in client.get("/bgtasks", headers=JSON).json()["tasks"]}
    assert rows["tests.apps.fail"]["loop_blocked_seconds"] == 0.25
    assert rows["tests.apps.write_log"]["loop_blocked_seconds"] == 0
    assert "none" not in rows


def test_diagnostics_from_a_replaced_provider_and_a_failing_one_is_not_available(
    registry: CollectorRegistry, caplog: pytest.LogCaptureFixture
) -> None:
    client = page_client(registry, loop_block_threshold=None)
    assert client.get("/bgtasks", headers=JSON).json()["diagnostics"] is None
    page.diagnostics_provider = lambda metrics: {"loop_lag_seconds": 0.25, "busy": "3/40"}
    diagnostics = client.get("/bgtasks", headers=JSON).json()["diagnostics"]
    assert diagnostics == {"loop_lag_seconds": 0.25, "busy": "3/40"}

    def broken(metrics: object) -> dict[str, object]:
        raise RuntimeError("watchdog broke")

    page.diagnostics_provider = broken
    with caplog.at_level(logging.DEBUG, logger="bgtrace"):
        response = client.get("/bgtasks", headers=JSON)
    assert response.status_code == 200 and response.json()["diagnostics"] is None
    assert any("live page diagnostics" in r.getMessage() for r in caplog.records)
