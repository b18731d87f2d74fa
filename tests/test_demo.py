"""The example app, ``python -m bgtrace.demo``, and the compose example's wiring."""

from __future__ import annotations

import math
import os
import queue
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from fastapi.testclient import TestClient
from prometheus_client import CollectorRegistry

from bgtrace.demo.app import MAX_IMPORT_ROWS, create_app, receipt_fails
from bgtrace.demo.table import histogram_quantile
from tests.conftest import Samples
from tests.servers import ROOT, free_port, stop_group

COMPOSE = ROOT / "examples" / "compose"
EMAIL = "bgtrace.demo.app.send_welcome_email"
AUDIT = "bgtrace.demo.app.write_audit"
RECEIPT = "bgtrace.demo.app.render_receipt"
IMPORT = "bgtrace.demo.app.import_contacts"
REFRESH = "bgtrace.demo.app.refresh_recommendations"
# Every task of the example app, with the origin that queues it.
TASK_ORIGINS = {(EMAIL, "handler"), (AUDIT, "dependency"), (RECEIPT, "handler"),
                (IMPORT, "handler"), (REFRESH, "handler")}  # fmt: skip
COUNT_COLUMNS = ("enqueued", "completed", "failed", "dropped")
TIME_COLUMNS = ("run p50", "run p95", "wait p50", "wait p95", "loop blocked")


def demo_env() -> dict[str, str]:
    """This environment without what would send the demo's spans or metrics elsewhere."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    return env


def parse_table(stdout: str) -> dict[tuple[str, str], dict[str, float]]:
    """{(task, origin): {column: figure}} from the demo's table; '-' reads as NaN."""
    lines = stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("task "))
    rows: dict[tuple[str, str], dict[str, float]] = {}
    for line in lines[header + 1 :]:
        if not line.strip():
            break
        task, origin, *figures = line.split()
        columns = COUNT_COLUMNS + TIME_COLUMNS
        assert len(figures) == len(columns), line
        rows[task, origin] = {
            column: math.nan if figure == "-" else float(figure)
            for column, figure in zip(columns, figures, strict=True)
        }
    return rows


# --------------------------------------------------------------------------
# The example app, in-process
# --------------------------------------------------------------------------


@pytest.fixture
def client(registry: CollectorRegistry, monkeypatch: pytest.MonkeyPatch) -> TestClient:
    monkeypatch.setenv("BGTRACE_DEMO_SLOWNESS", "0")
    # Failing receipt tasks re-raise into the server, as they should; the client just goes on.
    return TestClient(create_app(registry=registry), raise_server_exceptions=False)


def test_signup_queues_the_email_from_the_handler_and_the_audit_from_a_dependency(
    client: TestClient, samples: Samples
) -> None:
    response = client.post("/signup/7")
    assert response.status_code == 202
    assert response.json() == {"user_id": 7, "pid": os.getpid()}
    route = "/signup/{user_id}"
    assert samples("bgtask_completed_total", task=EMAIL, origin="handler", route=route,
                   outcome="success") == 1  # fmt: skip
    assert samples("bgtask_completed_total", task=AUDIT, origin="dependency", route=route,
                   outcome="success") == 1  # fmt: skip


def test_receipts_fail_for_the_orders_receipt_fails_names(
    client: TestClient, samples: Samples
) -> None:
    orders = range(1, 41)
    failing = [order for order in orders if receipt_fails(order)]
    assert 0 < len(failing) < len(orders)
    for order in orders:
        assert client.post(f"/orders/{order}/receipt").status_code == 202
    error_type = "bgtrace.demo.app.ReceiptRenderError"
    assert samples.total("bgtask_failures_total", task=RECEIPT, error_type=error_type) == len(
        failing
    )
    succeeded = len(orders) - len(failing)
    assert samples.total("bgtask_completed_total", task=RECEIPT, outcome="success") == succeeded


def test_an_oversized_import_answers_413_and_its_task_is_dropped(
    client: TestClient, samples: Samples
) -> None:
    assert client.post(f"/import?rows={MAX_IMPORT_ROWS}").status_code == 202
    assert client.post(f"/import?rows={MAX_IMPORT_ROWS + 1}").status_code == 413
    assert samples.total("bgtask_enqueued_total", task=IMPORT) == 2
    assert samples.total("bgtask_completed_total", task=IMPORT, outcome="success") == 1
    assert samples("bgtask_dropped_total", task=IMPORT, origin="handler", route="/import",
                   reason="request_error") == 1  # fmt: skip


def test_histogram_quantile_interpolates_like_promql() -> None:
    buckets = {0.005: 0.0, 0.01: 10.0, 0.025: 30.0, math.inf: 40.0}
    # Rank 20 lies halfway through the (0.01, 0.025] bucket's 20 observations.
    assert histogram_quantile(0.5, buckets) == pytest.approx(0.0175)
    # Rank 38 lies in +Inf: the highest finite bound.
    assert histogram_quantile(0.95, buckets) == 0.025
    # The first bucket starts at 0.
    assert histogram_quantile(0.5, {0.005: 4.0, math.inf: 4.0}) == pytest.approx(0.0025)
    assert histogram_quantile(0.5, {0.005: 0.0, math.inf: 0.0}) is None
    assert histogram_quantile(0.5, {0.005: 3.0}) is None  # no +Inf bucket: NaN in PromQL


# --------------------------------------------------------------------------
# python -m bgtrace.demo
# --------------------------------------------------------------------------


def test_demo_prints_a_row_per_task_with_its_figures() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "bgtrace.demo", "--duration", "2"],
        cwd=ROOT,
        env=demo_env(),
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "100%" in result.stderr  # the progress bar ran to its end
    rows = parse_table(result.stdout)
    assert set(rows) == TASK_ORIGINS, result.stdout
    for key, row in rows.items():
        # The demo waits for the queue to drain: every task ended one way or the other.
        assert row["enqueued"] == row["completed"] + row["dropped"] > 0, key
        for column in TIME_COLUMNS:
            assert row[column] >= 0, (key, column)  # NaN (a '-') fails too
    assert rows[EMAIL, "handler"]["completed"] > 0
    assert rows[AUDIT, "dependency"]["completed"] == rows[EMAIL, "handler"]["completed"]
    assert rows[RECEIPT, "handler"]["failed"] > 0
    assert rows[IMPORT, "handler"]["dropped"] > 0
    assert rows[EMAIL, "handler"]["failed"] == rows[EMAIL, "handler"]["dropped"] == 0
    # The 20th refresh blocks the event loop for 0.2 s; the watchdog puts it on that task.
    assert rows[REFRESH, "handler"]["loop blocked"] > 0
    assert rows[EMAIL, "handler"]["loop blocked"] == 0


def test_demo_serves_until_ctrl_c_and_drives_a_running_app() -> None:
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "bgtrace.demo", "--duration", "1", "--serve", "--port", str(port)],
        cwd=ROOT,
        env=demo_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        start_new_session=True,
    )
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=pump, args=(server.stdout, lines), daemon=True).start()
    try:
        printed = read_until(lines, f"http://127.0.0.1:{port}/metrics", timeout=60)
        served_alone = parse_table(printed)[EMAIL, "handler"]["enqueued"]
        # The live page is on, at the URL the demo printed, with the tasks the table counted.
        assert f"live page at http://127.0.0.1:{port}/bgtasks" in printed
        live = httpx.get(f"http://127.0.0.1:{port}/bgtasks?format=json", timeout=10).json()
        assert EMAIL in {row["task"] for row in live["tasks"]}

        other = subprocess.run(
            [sys.executable, "-m", "bgtrace.demo", "--duration", "1",
             "--target", f"http://127.0.0.1:{port}"],
            cwd=ROOT, env=demo_env(), capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert other.returncode == 0, other.stdout + other.stderr
        # The second demo's table is the first one's server: its count plus the new traffic.
        assert parse_table(other.stdout)[EMAIL, "handler"]["enqueued"] > served_alone > 0

        server.send_signal(signal.SIGINT)
        assert server.wait(timeout=30) == 0
    finally:
        stop_group(server)


def pump(stream: Iterable[str], lines: queue.Queue[str]) -> None:
    try:
        for line in stream:
            lines.put(line)
    except (OSError, ValueError):
        pass  # closed by stop_group


def read_until(lines: queue.Queue[str], marker: str, timeout: float) -> str:
    """Lines from ``lines`` up to the one containing ``marker``, joined."""
    deadline = time.monotonic() + timeout
    seen: list[str] = []
    while not seen or marker not in seen[-1]:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise AssertionError(f"no {marker!r} in {timeout}s; printed:\n{''.join(seen)}")
        try:
            seen.append(lines.get(timeout=remaining))
        except queue.Empty:
            continue
    return "".join(seen)


# --------------------------------------------------------------------------
# examples/compose: what Docker would need, checked without Docker
# --------------------------------------------------------------------------


def load(path: Path) -> Any:
    with path.open(encoding="utf-8") as f:
        return yaml.safe_load(f)


def bind_mounts(service: dict[str, Any]) -> dict[str, Path]:
    """{container path: host path} of a service's ``./``- or ``../``-relative volumes."""
    mounts = {}
    for volume in service.get("volumes", []):
        source, target, *_ = volume.split(":")
        if source.startswith("."):
            mounts[target] = (COMPOSE / source).resolve()
    return mounts


def test_compose_has_every_service_with_its_ports_and_files() -> None:
    services = load(COMPOSE / "docker-compose.yml")["services"]
    assert set(services) == {"app", "traffic", "prometheus", "jaeger", "grafana"}
    ports = {name: {p.split(":")[0] for p in s.get("ports", [])} for name, s in services.items()}
    assert ports == {"app": {"8000"}, "traffic": set(), "prometheus": {"9090"},
                     "jaeger": {"16686", "4317", "4318"}, "grafana": {"3000"}}  # fmt: skip
    for name, service in services.items():
        for target, source in bind_mounts(service).items():
            assert source.exists(), f"{name}: {source} (mounted on {target}) is missing"
        if "build" in service:
            context = (COMPOSE / service["build"]["context"]).resolve()
            assert context == ROOT, name
            assert (context / service["build"]["dockerfile"]).is_file(), name

    app = services["app"]
    assert app["environment"]["PROMETHEUS_MULTIPROC_DIR"] in app["tmpfs"]
    assert app["environment"]["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://jaeger:4318"
    assert app["environment"]["OTEL_SERVICE_NAME"]
    assert services["jaeger"]["environment"]["COLLECTOR_OTLP_ENABLED"] == "true"
    assert "http://app:8000" in " ".join(services["traffic"]["command"])
    assert "--enable-feature=exemplar-storage" in services["prometheus"]["command"]


def test_dockerfile_installs_the_demo_extra_and_serves_two_workers() -> None:
    instructions = [
        line.split(maxsplit=1)
        for line in (COMPOSE / "Dockerfile").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    for word, rest in instructions:
        if word == "COPY":
            *sources, _ = shlex.split(rest)
            assert all((ROOT / source).exists() for source in sources), rest
    runs = " ".join(rest for word, rest in instructions if word == "RUN")
    assert "pip install" in runs and ".[demo]" in runs
    cmd = yaml.safe_load(next(rest for word, rest in instructions if word == "CMD"))
    assert cmd[:2] == ["uvicorn", "bgtrace.demo.app:app"]
    assert cmd[cmd.index("--workers") + 1] == "2"
    assert cmd[cmd.index("--port") + 1] == "8000"


def test_compose_prometheus_scrapes_the_app_and_loads_the_alert_rules(tmp_path: Path) -> None:
    prometheus = load(COMPOSE / "docker-compose.yml")["services"]["prometheus"]
    mounts = bind_mounts(prometheus)
    config_flag = next(f for f in prometheus["command"] if f.startswith("--config.file="))
    assert mounts[config_flag.split("=", 1)[1]] == COMPOSE / "prometheus.yml"

    config = load(COMPOSE / "prometheus.yml")
    assert config["global"]["scrape_interval"] == "5s"
    [job] = config["scrape_configs"]
    assert job["static_configs"] == [{"targets": ["app:8000"]}]
    [rules] = config["rule_files"]
    assert mounts[rules] == ROOT / "dashboards" / "alerts.yml"

    # promtool checks the configuration and the rules it loads, at their paths on this host.
    promtool = shutil.which("promtool")
    if promtool is None:
        hint = "promtool missing: apt-get install -y prometheus"
        if os.environ.get("CI") == "true":
            pytest.fail(hint)
        pytest.skip(hint)
    local = tmp_path / "prometheus.yml"
    local.write_text(yaml.safe_dump({**config, "rule_files": [str(mounts[rules])]}))
    result = subprocess.run(
        [promtool, "check", "config", str(local)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 8 rules found" in result.stdout + result.stderr


def test_grafana_links_exemplars_to_jaeger_and_provisions_the_dashboard() -> None:
    grafana = load(COMPOSE / "docker-compose.yml")["services"]["grafana"]
    mounts = bind_mounts(grafana)
    provisioning = mounts["/etc/grafana/provisioning"]
    datasources = {
        ds["type"]: ds
        for ds in load(provisioning / "datasources" / "datasources.yml")["datasources"]
    }
    assert datasources["prometheus"]["url"] == "http://prometheus:9090"
    assert datasources["prometheus"]["isDefault"] is True
    assert datasources["jaeger"]["url"] == "http://jaeger:16686"
    assert datasources["prometheus"]["jsonData"]["exemplarTraceIdDestinations"] == [
        {"name": "trace_id", "datasourceUid": datasources["jaeger"]["uid"]}
    ]

    [provider] = load(provisioning / "dashboards" / "dashboards.yml")["providers"]
    dashboards = {
        target: source
        for target, source in mounts.items()
        if Path(target).parent == Path(provider["options"]["path"])
    }
    assert list(dashboards.values()) == [ROOT / "dashboards" / "bgtrace.json"]
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home in dashboards


def test_single_process_override_serves_one_worker_without_multiprocess_mode() -> None:
    services = load(COMPOSE / "docker-compose.yml")["services"]
    override = load(COMPOSE / "single-process.yml")["services"]
    assert set(override) <= set(services)
    command = override["app"]["command"]
    assert command[:3] == ["env", "-u", "PROMETHEUS_MULTIPROC_DIR"]
    assert "bgtrace.demo.app:app" in command and "--workers" not in command
