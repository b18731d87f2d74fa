"""Private names of prometheus_client and Starlette that bgtrace uses: each faked missing, the
app and its tasks go on unharmed and the counts stay right, by a slower public path, with one
warning. (The FastAPI scope keys bgtrace reads: tests/test_routes.py.)"""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.samples import Sample
from prometheus_client.utils import floatToGoString
from starlette import background

from bgtrace import multiprocess, private, worker_files
from bgtrace.metrics import TaskMetrics
from tests import apps
from tests.conftest import Samples
from tests.servers import ROOT
from tests.test_multiprocess import LABELS, samples, some_tasks
from tests.test_worker_files import collector, fast, run_worker


@pytest.fixture(autouse=True)
def _warnings_afresh(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(private, "_warned", set())


def missing_warnings(caplog: pytest.LogCaptureFixture, name: str) -> int:
    return sum(name in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)


def test_import_bgtrace_with_every_private_name_gone() -> None:
    script = (
        "import starlette.background as b, prometheus_client.multiprocess as m\n"
        "del b.run_in_threadpool\n"
        "del m.MultiProcessCollector._accumulate_metrics\n"
        "import bgtrace\n"
        "print('imported')\n"
    )
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "imported"


def test_def_tasks_run_and_count_without_starlettes_run_in_threadpool_in_its_module(
    registry: CollectorRegistry,
    samples: Samples,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.delattr(background, "run_in_threadpool")
    client = TestClient(apps.tutorial_app(registry=registry))
    with caplog.at_level(logging.WARNING, logger="bgtrace"):
        for n in range(3):
            assert client.post(f"/send-notification/{n}@example.com").status_code == 200
    assert samples("bgtask_completed_total", task="tests.apps.write_notification",
                   origin="handler", route="/send-notification/{email}",
                   outcome="success") == 3  # fmt: skip
    assert len(apps.done) == 3
    assert missing_warnings(caplog, "starlette.background.run_in_threadpool") == 1


class _MovedHistogram(Histogram):
    """A prometheus_client release that keeps a histogram's values under other names."""

    def _metric_init(self) -> None:
        super()._metric_init()
        self._counts = self.__dict__.pop("_buckets")
        self._total = self.__dict__.pop("_sum")

    def observe(self, amount: float, exemplar: Any = None) -> None:
        self._total.inc(amount)
        for value, bound in zip(self._counts, self._upper_bounds, strict=True):
            if amount <= bound:
                value.inc(1)
                break

    def _child_samples(self) -> Any:
        found, cumulative = [], 0.0
        for value, bound in zip(self._counts, self._upper_bounds, strict=True):
            cumulative += value.get()
            found.append(Sample("_bucket", {"le": floatToGoString(bound)}, cumulative))
        found.append(Sample("_count", {}, cumulative))
        found.append(Sample("_sum", {}, self._total.get()))
        return tuple(found)


@pytest.fixture
def multiprocess_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(multiprocess.MULTIPROC_ENV, str(tmp_path))


@pytest.mark.usefixtures("multiprocess_dir")
def test_histograms_reach_the_files_through_observe_when_their_layout_moved(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(multiprocess, "Histogram", _MovedHistogram)
    registry = CollectorRegistry()
    metrics = TaskMetrics(registry, "", (0.01, 1.0, 10.0), 200)
    with caplog.at_level(logging.WARNING, logger="bgtrace"):
        some_tasks(metrics)
        metrics.flush()
        some_tasks(metrics)  # a second batch adds to the first
        metrics.flush()
    monkeypatch.delenv(multiprocess.MULTIPROC_ENV)
    expected_registry = CollectorRegistry()
    expected = TaskMetrics(expected_registry, "", (0.01, 1.0, 10.0), 200)
    # The same two batches: the threadpool gauges hold the latest reading, not a sum.
    some_tasks(expected)
    some_tasks(expected)
    found, wanted = samples(registry), samples(expected_registry)
    assert found.keys() == wanted.keys()
    for key, value in wanted.items():
        # Bucket counts exact; sums of stand-in values, equal up to float rounding.
        assert found[key] == pytest.approx(value, rel=1e-9), key
    duration_sum = ("bgtask_duration_seconds_sum", frozenset(LABELS.items()))
    assert found[duration_sum] == pytest.approx(2 * (0.02 + 1.5))
    assert missing_warnings(caplog, "Histogram's _buckets and _sum") == 1


def test_other_metrics_are_summed_by_multiprocesscollector_when_its_helper_moved(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(worker_files, "_reader", None)
    monkeypatch.setattr(worker_files, "_unfit", set())
    run_worker(tmp_path, "app.mail,app.audit", rounds=2)
    # A release that renamed the summing helper: prometheus_client's own collector works on.
    renamed = MultiProcessCollector.__dict__["_accumulate_metrics"]
    monkeypatch.delattr(MultiProcessCollector, "_accumulate_metrics")
    monkeypatch.setattr(MultiProcessCollector, "_sum_samples", renamed, raising=False)

    def merge(files: Any, accumulate: bool = True) -> Any:
        metrics = MultiProcessCollector._read_metrics(files)
        return MultiProcessCollector._sum_samples(metrics, accumulate)

    monkeypatch.setattr(MultiProcessCollector, "merge", staticmethod(merge))
    with caplog.at_level(logging.WARNING, logger="bgtrace"):
        assert fast(tmp_path) == collector(tmp_path)
        assert fast(tmp_path, openmetrics=True) == collector(tmp_path, openmetrics=True)
    assert "bgtask_enqueued_total" in fast(tmp_path)
    assert missing_warnings(caplog, "_accumulate_metrics") == 1


@pytest.mark.parametrize(
    "observed",
    [[0.0, 0.01, 0.01], [0.5, 1.0, 9.0, 10.0], [11.0, 0.005], [1e6], [0.002, 1e6, 3.0]],
)
def test_stand_in_values_fall_in_the_real_buckets_and_add_up(observed: list[float]) -> None:
    bounds = (0.01, 1.0, 10.0)
    real = Histogram("h", "h", buckets=bounds, registry=None)
    for value in observed:
        real.observe(value)
    replayed = Histogram("h", "h", buckets=bounds, registry=None)
    counts = [int(v.get()) for v in real._buckets]
    multiprocess._replay(replayed, bounds, counts, sum(observed))
    assert [v.get() for v in replayed._buckets] == counts
    assert replayed._sum.get() == pytest.approx(sum(observed), rel=1e-12)
