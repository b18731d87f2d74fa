from __future__ import annotations

import logging

import pytest
from fastapi import BackgroundTasks, FastAPI
from fastapi.testclient import TestClient
from prometheus_client import CollectorRegistry

from bgtrace import BackgroundTaskMiddleware
from bgtrace.metrics import DEFAULT_BUCKETS, task_metrics
from tests.conftest import Samples


def test_label_values_are_capped_with_one_warning(
    registry: CollectorRegistry, samples: Samples, caplog: pytest.LogCaptureFixture
) -> None:
    app = FastAPI()
    app.add_middleware(BackgroundTaskMiddleware, registry=registry, max_label_values=3)

    @app.post("/many/{n}")
    async def many(n: int, background_tasks: BackgroundTasks) -> None:
        namespace: dict[str, object] = {}
        exec(f"def task_{n}():\n    pass", namespace)  # a new callable each time
        background_tasks.add_task(namespace[f"task_{n}"])  # type: ignore[arg-type]

    client = TestClient(app)
    with caplog.at_level(logging.WARNING, logger="bgtrace"):
        for n in range(20):
            client.post(f"/many/{n}")
    tasks = samples.label_values("bgtask_enqueued_total", "task")
    assert len(tasks) == 4 and "other" in tasks
    assert samples("bgtask_enqueued_total", task="other", origin="handler",
                   route="/many/{n}") == 17  # fmt: skip
    warnings = [r for r in caplog.records if "max_label_values" in r.getMessage()]
    assert len(warnings) == 1


def test_default_buckets_span_milliseconds_to_minutes() -> None:
    assert DEFAULT_BUCKETS[0] <= 0.005 and DEFAULT_BUCKETS[-1] >= 300


def test_custom_buckets(registry: CollectorRegistry, samples: Samples) -> None:
    task_metrics(registry, buckets=[0.1, 1.0])
    from tests import apps

    app = apps.tutorial_app(registry=registry, buckets=[0.1, 1.0])
    TestClient(app).post("/send-notification/x")
    labels = {"task": "tests.apps.write_notification", "origin": "handler",
              "route": "/send-notification/{email}"}  # fmt: skip
    assert samples("bgtask_duration_seconds_bucket", le="0.1", **labels) == 1
    assert samples("bgtask_duration_seconds_bucket", le="0.025", **labels) == 0


def test_same_registry_same_metrics_other_config_is_a_precise_error(
    registry: CollectorRegistry,
) -> None:
    assert task_metrics(registry) is task_metrics(registry)
    assert task_metrics(registry, "a") is not task_metrics(registry)
    with pytest.raises(ValueError, match="buckets"):
        task_metrics(registry, buckets=[1.0])
    with pytest.raises(ValueError, match="max_label_values"):
        task_metrics(registry, max_label_values=0)


def test_buckets_ending_in_inf_give_one_inf_bucket(registry: CollectorRegistry) -> None:
    from prometheus_client import Histogram, generate_latest

    metrics = task_metrics(registry, buckets=Histogram.DEFAULT_BUCKETS)
    series = metrics.series("app.send", "handler", "/send")
    with series.lock:
        series.queued()
        series.started(0.2)
    text = generate_latest(registry).decode()
    inf_lines = [line for line in text.splitlines() if "queue_wait" in line and "+Inf" in line]
    assert len(inf_lines) == 1 and inf_lines[0].endswith(" 1.0")


@pytest.mark.parametrize("buckets", [[], [1.0, 0.5], [0.5, 0.5], [float("nan")], [float("inf")]])
def test_buckets_that_make_no_histogram_are_a_precise_error(
    registry: CollectorRegistry, buckets: list[float]
) -> None:
    with pytest.raises(ValueError, match="buckets must be finite and ascending"):
        task_metrics(registry, buckets=buckets)
