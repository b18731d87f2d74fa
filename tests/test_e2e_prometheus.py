"""The example app under two uvicorn worker processes, scraped by a real Prometheus.

What the shipped dashboard and alert rules promise, checked on real data: every dashboard
expression answers, the counts Prometheus stores are the requests sent (summed over both
workers), the alert rules load and fire, and the demo's quantile estimate is PromQL's.
"""

from __future__ import annotations

import math
import re
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import httpx
import pytest
import yaml

from bgtrace.demo.app import MAX_IMPORT_ROWS, receipt_fails
from bgtrace.demo.table import histogram_quantile, read_rows
from tests.servers import ROOT, free_port, prometheus_tool, serve_process, stop_group, wait_for
from tests.test_dashboards import GRAFANA_SUBSTITUTIONS, dashboard_exprs, load_dashboard

COMPOSE_CONFIG = ROOT / "examples" / "compose" / "prometheus.yml"
ALERTS = ROOT / "dashboards" / "alerts.yml"
JOB = yaml.safe_load(COMPOSE_CONFIG.read_text())["scrape_configs"][0]["job_name"]

EMAIL = "bgtrace.demo.app.send_welcome_email"
AUDIT = "bgtrace.demo.app.write_audit"
RECEIPT = "bgtrace.demo.app.render_receipt"
IMPORT = "bgtrace.demo.app.import_contacts"
REPORT = "bgtrace.demo.app.build_report"
REFRESH = "bgtrace.demo.app.refresh_recommendations"
TASKS = (EMAIL, AUDIT, RECEIPT, IMPORT, REPORT, REFRESH)
# The app's threadpool, small enough that a burst of reports (a def task holding a thread for a
# second) keeps callers waiting for a thread at a few scrapes; the refresh task blocks the event
# loop on one call in five.
SLOWNESS = 0.2
REPORT_SECONDS = 5.0 * SLOWNESS  # build_report's
THREADS = 4
REPORT_BURST = 3 * THREADS
BLOCKING_EVERY = 5
WHY_RULES = ("BgtaskEventLoopBlocked", "BgtaskThreadpoolSaturated")


@contextmanager
def running_prometheus(binary: str, app_port: int, workdir: Path) -> Iterator[str]:
    """A Prometheus scraping 127.0.0.1:``app_port`` every second with the compose example's
    configuration and bgtrace's alert rules; yields its URL, and always stops it."""
    config = yaml.safe_load(COMPOSE_CONFIG.read_text())
    config["global"].update(scrape_interval="1s", scrape_timeout="1s", evaluation_interval="1s")
    config["rule_files"] = [str(ALERTS)]  # mounted from there in the compose example
    config["scrape_configs"][0]["static_configs"] = [{"targets": [f"127.0.0.1:{app_port}"]}]
    config_path = workdir / "prometheus.yml"
    config_path.write_text(yaml.safe_dump(config))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log_path = workdir / "prometheus.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [binary, f"--config.file={config_path}", f"--storage.tsdb.path={workdir / 'data'}",
             f"--web.listen-address=127.0.0.1:{port}", "--enable-feature=exemplar-storage",
             "--log.level=warn"],
            cwd=workdir, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        try:

            def ready() -> bool:
                if process.poll() is not None:
                    raise AssertionError(f"prometheus exited early:\n{log_path.read_text()}")
                try:
                    return httpx.get(f"{url}/-/ready", timeout=1).status_code == 200
                except httpx.HTTPError:
                    return False

            wait_for(ready, timeout=30, what="prometheus to be ready")
            yield url
        finally:
            stop_group(process)


class Drain:
    """Reads a server's output as it comes, so that a full pipe never blocks the server
    (each failed receipt logs a traceback), and keeps it for failure messages."""

    def __init__(self, stream: IO[bytes] | None) -> None:
        self.chunks: list[bytes] = []
        self.thread = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self.thread.start()

    def _read(self, stream: IO[bytes] | None) -> None:
        if stream is None:
            return
        try:
            for line in stream:
                self.chunks.append(line)
        except (OSError, ValueError):
            pass  # closed by stop_group

    def tail(self, lines: int = 40) -> str:
        return b"".join(self.chunks[-lines:]).decode(errors="replace")


class Prometheus:
    """Prometheus's HTTP API."""

    def __init__(self, client: httpx.Client) -> None:
        self.client = client

    def query(self, expr: str, at: float | None = None) -> list[dict[str, Any]]:
        """``expr`` evaluated now, or at the unix time ``at``."""
        params: dict[str, str | float] = {"query": expr}
        if at is not None:
            params["time"] = at
        body = self.client.get("/api/v1/query", params=params).json()
        assert body["status"] == "success", (expr, body)
        return list(body["data"]["result"])

    def value(self, expr: str) -> float | None:
        """The single value of ``expr``, or ``None`` when it has no data."""
        result = self.query(expr)
        assert len(result) <= 1, (expr, result)
        return float(result[0]["value"][1]) if result else None

    def get(self, path: str) -> Any:
        body = self.client.get(path).json()
        assert body["status"] == "success", (path, body)
        return body["data"]


def poll(check: Callable[[], dict[str, Any]], timeout: float, what: str) -> None:
    """Poll until ``check`` returns no mismatch; fail with the last ones after ``timeout``."""
    deadline = time.monotonic() + timeout
    while (mismatches := check()) != {}:
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}: {mismatches}")
        time.sleep(0.1)


class Traffic:
    """Requests to the example app, counted; one connection each, so both workers answer."""

    def __init__(self, client: httpx.Client) -> None:
        self.client = client
        self.signups = self.receipts = self.failures = self.imports = self.oversized = 0
        self.reports = 0
        self.pids: set[int] = set()
        self.next_order = 1

    def signup(self) -> None:
        response = self.client.post(f"/signup/{self.signups + 1}")
        assert response.status_code == 202, response.text
        self.pids.add(response.json()["pid"])
        self.signups += 1

    def receipt(self) -> None:
        order, self.next_order = self.next_order, self.next_order + 1
        assert self.client.post(f"/orders/{order}/receipt").status_code == 202
        self.receipts += 1
        self.failures += receipt_fails(order)

    def import_(self, rows: int) -> None:
        expected = 413 if rows > MAX_IMPORT_ROWS else 202
        assert self.client.post("/import", params={"rows": rows}).status_code == expected
        self.imports += 1
        self.oversized += rows > MAX_IMPORT_ROWS

    def report(self) -> None:
        assert self.client.post(f"/reports/{self.reports + 1}").status_code == 202
        self.reports += 1

    def burst(self, signups: int, receipts: int, imports: int) -> None:
        for _ in range(signups):
            self.signup()
        for _ in range(receipts):
            self.receipt()
        for n in range(imports):
            self.import_(100 if n % 2 else MAX_IMPORT_ROWS + 1)

    def expected(self) -> dict[str, float]:
        """PromQL expression -> the value it must reach once every task has ended."""
        failed = "bgtrace.demo.app.ReceiptRenderError"
        reports = {
            total("bgtask_thread_wait_seconds_count", task=REPORT): self.reports,
            total("bgtask_completed_total", task=REPORT, outcome="success"): self.reports,
            # Back to 0 once every task has ended, on every worker. (In files from the first
            # flush that found a task of the series in flight: a report was seen running.)
            total("bgtask_oldest_running_seconds", task=REPORT): 0,
            total("bgtask_oldest_queued_seconds", task=REPORT): 0,
        }
        return {
            **(reports if self.reports else {}),
            total("bgtask_enqueued_total", task=EMAIL, origin="handler"): self.signups,
            total("bgtask_enqueued_total", task=AUDIT, origin="dependency"): self.signups,
            total("bgtask_completed_total", task=EMAIL, outcome="success"): self.signups,
            total("bgtask_completed_total", task=AUDIT, outcome="success"): self.signups,
            total("bgtask_completed_total", task=REFRESH, outcome="success"): self.signups,
            total("bgtask_enqueued_total", task=RECEIPT): self.receipts,
            total("bgtask_completed_total", task=RECEIPT, outcome="failure"): self.failures,
            total("bgtask_failures_total", task=RECEIPT, error_type=failed): self.failures,
            total("bgtask_completed_total", task=RECEIPT, outcome="success"):
                self.receipts - self.failures,
            total("bgtask_enqueued_total", task=IMPORT): self.imports,
            total("bgtask_dropped_total", task=IMPORT, reason="request_error"): self.oversized,
            total("bgtask_completed_total", task=IMPORT): self.imports - self.oversized,
            total("bgtask_post_response_seconds_count", route="/signup/{user_id}"): self.signups,
            total("bgtask_queue_length"): 0,
            total("bgtask_in_progress"): 0,
            # Every def task's wait for a thread, summed over both workers.
            total("bgtask_thread_wait_seconds_count", task=AUDIT): self.signups,
        }  # fmt: skip


def total(metric: str, **labels: str) -> str:
    """``sum(metric{job="...", label="value", ...})``"""
    matchers = ", ".join(f'{k}="{v}"' for k, v in {"job": JOB, **labels}.items())
    return f"sum({metric}{{{matchers}}})"


def without_threshold(expr: str) -> str:
    """An alert rule's expression without its final ``> threshold``: what it measures."""
    stripped = re.sub(r"\s*>\s*[0-9.]+\s*$", "", expr)
    assert stripped != expr, expr
    return stripped


def stored_counts(prometheus: Prometheus, expected: dict[str, float]) -> dict[str, Any]:
    """Expression -> (stored, expected) for every expression not (yet) at its value."""
    stored = {expr: prometheus.value(expr) for expr in expected}
    return {expr: (stored[expr], want) for expr, want in expected.items() if stored[expr] != want}


def test_prometheus_scrapes_two_workers_and_every_dashboard_query_answers(
    tmp_path: Path,
) -> None:
    binary = prometheus_tool("prometheus")
    multiproc = tmp_path / "multiproc"
    multiproc.mkdir()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    args = ["-m", "uvicorn", "bgtrace.demo.app:app", "--host", "127.0.0.1", "--port", str(port),
            "--workers", "2", "--log-level", "warning"]  # fmt: skip
    env = {
        "PROMETHEUS_MULTIPROC_DIR": str(multiproc),
        "BGTRACE_DEMO_SLOWNESS": str(SLOWNESS),
        "BGTRACE_DEMO_THREADS": str(THREADS),
        "BGTRACE_DEMO_BLOCKING_EVERY": str(BLOCKING_EVERY),
    }
    with (
        running_prometheus(binary, port, tmp_path) as prometheus_url,
        httpx.Client(base_url=prometheus_url, timeout=10) as prometheus_client,
        serve_process(args, env, f"{url}/metrics") as app,
        httpx.Client(base_url=url, timeout=10, headers={"connection": "close"}) as app_client,
    ):
        output = Drain(app.stdout)
        try:
            check_scraped_app(Prometheus(prometheus_client), Traffic(app_client))
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n--- app output ---\n{output.tail()}") from None


def check_scraped_app(prometheus: Prometheus, traffic: Traffic, workers: int = 2) -> None:
    # Fresh connections, so the kernel spreads them over both workers.
    while len(traffic.pids) < workers:
        assert traffic.signups < 2000, f"only workers {traffic.pids} answered"
        traffic.signup()
    # Two bursts, with a scrape between them: failures and drops then exist in Prometheus
    # before they grow, as increase() over the dashboard's time range needs to see them.
    traffic.burst(signups=10, receipts=20, imports=6)
    poll(lambda: stored_counts(prometheus, traffic.expected()), 30, "the first burst")
    traffic.burst(signups=10, receipts=20, imports=6)
    assert traffic.failures > 0 and traffic.oversized > 0
    # The Why row's signals, each seen in Prometheus: a running report's age (a def task running
    # for a second), callers waiting for one of the few threads (bursts of reports), and the
    # loop time the refresh task blocked (one call in BLOCKING_EVERY sleeps on the loop).
    why = {
        "report age": f'max(max_over_time(bgtask_oldest_running_seconds{{job="{JOB}", '
                      f'task="{REPORT}"}}[5m]))',
        "waiting": f'max(max_over_time(bgtrace_threadpool_waiting{{job="{JOB}"}}[5m]))',
        "blocked": total("bgtask_loop_blocked_seconds_total", task=REFRESH),
    }  # fmt: skip
    least = {"report age": 0.2, "waiting": 0.5, "blocked": 0.1}
    last_reports = [0.0]

    def why_seen() -> dict[str, Any]:
        missing = {}
        for name, expr in why.items():
            if (value := prometheus.value(expr) or 0) < least[name]:
                missing[name] = value
        # A burst of reports keeps the threads busy for about three seconds: one at a time.
        wants_reports = "report age" in missing or "waiting" in missing
        if wants_reports and time.monotonic() - last_reports[0] > 3 * REPORT_SECONDS:
            last_reports[0] = time.monotonic()
            for _ in range(REPORT_BURST):
                traffic.report()
        if "blocked" in missing and traffic.signups < 400:
            for _ in range(BLOCKING_EVERY):
                traffic.signup()
        return missing

    poll(why_seen, 90, "the Why row's signals in Prometheus")
    poll(lambda: stored_counts(prometheus, traffic.expected()), 30, "the counts sent")

    # Every expression of every panel answers, with a number, on this traffic.
    substitutions = {**GRAFANA_SUBSTITUTIONS, "$job": JOB}
    unanswered = {}
    for where, expr in dashboard_exprs(load_dashboard()):
        for var in sorted(substitutions, key=len, reverse=True):
            expr = expr.replace(var, substitutions[var])
        values = [float(sample["value"][1]) for sample in prometheus.query(expr)]
        if not any(math.isfinite(value) for value in values):
            unanswered[where] = (expr, values)
    assert unanswered == {}

    # The demo's table estimates quantiles from /metrics exactly as PromQL does.
    rows = {row.task: row for row in read_rows(traffic.client.get("/metrics").text)}
    assert set(rows) == set(TASKS)
    for task in TASKS:
        for q in (0.5, 0.95):
            expr = (f"histogram_quantile({q}, sum by (le) "
                    f'(bgtask_duration_seconds_bucket{{job="{JOB}", task="{task}"}}))')  # fmt: skip
            ours = histogram_quantile(q, rows[task].run_time)
            assert ours == pytest.approx(prometheus.value(expr), rel=1e-9), (task, q)

    # The alert rules load, evaluate cleanly on real series, and the drops fire BgtaskDropped.
    def rules_and_alerts() -> dict[str, Any]:
        [group] = prometheus.get("/api/v1/rules")["groups"]
        unhealthy = {r["name"]: r["health"] for r in group["rules"] if r["health"] != "ok"}
        firing = {
            (a["labels"]["alertname"], a["labels"].get("task"), a["labels"].get("reason"))
            for a in prometheus.get("/api/v1/alerts")["alerts"]
            if a["state"] == "firing"
        }
        if ("BgtaskDropped", IMPORT, "request_error") not in firing:
            unhealthy["BgtaskDropped firing"] = sorted(firing, key=str)
        return unhealthy

    poll(rules_and_alerts, 30, "the alert rules to evaluate")

    # The Why rules need minutes of trouble to fire (their `for:`), but what they compare with
    # their threshold has data: a series per task that blocked the loop, one for the instance.
    # The threadpool rule's subquery steps on whole minutes, so evaluated now it has a point
    # only once a minute began after the first scrape: evaluated at the next whole minute
    # instead (from the samples stored now: the app keeps serving until then), not waited
    # for (up to a minute, each run).
    rules = {r["name"]: r["query"] for r in prometheus.get("/api/v1/rules")["groups"][0]["rules"]}
    measured: dict[str, list[dict[str, Any]]] = {}

    def why_rules_measure() -> dict[str, Any]:
        next_minute = math.ceil(time.time() / 60) * 60
        measured.update(
            {name: prometheus.query(without_threshold(rules[name]), at=next_minute)
             for name in WHY_RULES}
        )  # fmt: skip
        return {name: found for name, found in measured.items() if not found}

    poll(why_rules_measure, 90, "the Why rules' expressions to have data")
    blocked = {s["metric"].get("task"): float(s["value"][1]) for s in measured[WHY_RULES[0]]}
    assert blocked.get(REFRESH, 0) > 0, measured
    [waiting] = measured[WHY_RULES[1]]
    assert waiting["metric"]["job"] == JOB and math.isfinite(float(waiting["value"][1])), measured
