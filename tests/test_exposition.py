from __future__ import annotations

import pytest
from fastapi.testclient import TestClient
from opentelemetry.sdk.trace import TracerProvider
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families
from starlette.applications import Starlette
from starlette.routing import Mount

from bgtrace import metrics_app
from tests import apps

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
