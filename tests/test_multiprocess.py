"""Multiprocess mode: bgtrace's own values reach prometheus_client's metrics in batches.

prometheus_client chooses file-backed values when it is imported, so in this process its
metrics stay in memory even with ``PROMETHEUS_MULTIPROC_DIR`` set; what bgtrace copies into
them is the same either way. Real files and worker processes: tests/test_server.py,
tests/test_faults_server.py and tests/test_e2e_prometheus.py.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.exposition import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from bgtrace.accumulators import exemplar
from bgtrace.metrics import TaskMetrics, task_metrics
from bgtrace.multiprocess import MULTIPROC_ENV, flush_all
from tests.servers import in_forked_child, wait_for

LABELS = {"task": "app.send", "origin": "handler", "route": "/send"}
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


@pytest.fixture
def multiprocess(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(MULTIPROC_ENV, str(tmp_path))


def some_tasks(metrics: TaskMetrics, rounds: int = 1) -> None:
    """Every kind of update: queued, started, succeeded, failed, dropped, post_response."""
    for _ in range(rounds):
        series = metrics.series("app.send", "handler", "/send")
        other = metrics.series("app.audit", "dependency", "/send")
        with series.lock:
            for _ in range(5):
                series.queued()
            series.started(0.003)
            series.started(0.7)
            series.started(42.0)
            series.finished(0.02, "success", None, exemplar("ab" * 16, 0.02))
            series.finished(1.5, "failure", "app.MailError", None)
            series.dropped("request_error")
            other.queued()
        metrics.post_response_for("/send").observe(0.4)
        metrics.loop_blocked("app.send", "handler", "/send", 0.5)
        metrics.loop_heartbeat(1, 0.002, (40.0, float(rounds), 0.0))


def samples(registry: CollectorRegistry) -> Samples:
    text = generate_latest(registry).decode()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if not s.name.endswith("_created")  # prometheus_client's own metrics have these
        # At 0 for every series in one process; in files only once a task was in flight at a
        # flush (see FileValues.flush_why): tests/test_stuck.py pins both.
        and "_oldest_" not in s.name
    }


@pytest.mark.usefixtures("multiprocess")
def test_values_reach_prometheus_client_in_batches_equal_to_one_process(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    registry = CollectorRegistry()
    metrics = TaskMetrics(registry, "", (0.01, 1.0, 10.0), 200)
    assert not metrics.local
    some_tasks(metrics)
    # Not written per update: a task's updates cost no prometheus_client values.
    assert registry.get_sample_value("bgtask_enqueued_total", LABELS) is None

    metrics.flush()
    monkeypatch.delenv(MULTIPROC_ENV)
    expected_registry = CollectorRegistry()
    expected = TaskMetrics(expected_registry, "", (0.01, 1.0, 10.0), 200)
    some_tasks(expected)
    assert samples(registry) == samples(expected_registry)
    assert registry.get_sample_value("bgtask_enqueued_total", LABELS) == 5
    assert registry.get_sample_value("bgtask_queue_length", LABELS) == 1
    assert registry.get_sample_value("bgtask_in_progress", LABELS) == 1

    # Each flush adds what changed since the last one; nothing changed, nothing is added.
    some_tasks(metrics, rounds=2)
    metrics.flush()
    metrics.flush()
    some_tasks(expected, rounds=2)
    assert samples(registry) == samples(expected_registry)
    assert registry.get_sample_value("bgtask_enqueued_total", LABELS) == 15
    failures = dict(LABELS, error_type="app.MailError")
    assert registry.get_sample_value("bgtask_failures_total", failures) == 3
    wait = registry.get_sample_value("bgtask_queue_wait_seconds_bucket", dict(LABELS, le="1.0"))
    assert wait == 6
    assert registry.get_sample_value("bgtask_loop_blocked_seconds_total", LABELS) == 1.5
    assert registry.get_sample_value("bgtrace_event_loop_lag_seconds_count") == 3
    assert registry.get_sample_value("bgtrace_threadpool_borrowed") == 2


@pytest.mark.usefixtures("multiprocess")
def test_a_thread_writes_the_values_within_a_second() -> None:
    registry = CollectorRegistry()
    metrics = task_metrics(registry)
    some_tasks(metrics)

    def written() -> bool:
        return registry.get_sample_value("bgtask_enqueued_total", LABELS) == 5

    wait_for(written, timeout=5, what="the flush thread")


@pytest.fixture
def flush_thread_paused(monkeypatch: pytest.MonkeyPatch) -> None:
    """The flush thread an earlier test started in this process holds still, so what the
    parent counted stays unwritten until the fork (it would be the child's starting value:
    here prometheus_client's values are in memory, inherited, not in files of each pid)."""
    from bgtrace import multiprocess

    monkeypatch.setattr(multiprocess, "flush_all", lambda: None)


@pytest.mark.usefixtures("multiprocess", "flush_thread_paused")
def test_a_forked_child_does_not_write_its_parents_values() -> None:
    registry = CollectorRegistry()
    metrics = TaskMetrics(registry, "", (0.01, 1.0), 200)
    some_tasks(metrics)  # not flushed yet: these are the parent's to write

    def child() -> bool:
        flush_all()
        some_tasks(metrics)
        metrics.flush()
        # Its own tasks, once; none of the parent's.
        return registry.get_sample_value("bgtask_enqueued_total", LABELS) == 5

    assert in_forked_child(child)
    metrics.flush()
    assert registry.get_sample_value("bgtask_enqueued_total", LABELS) == 5


@pytest.mark.parametrize("held", ["values", "flush", "published", "flusher"])
@pytest.mark.usefixtures("multiprocess", "flush_thread_paused")
def test_a_fork_waits_for_a_thread_holding_a_lock_and_the_child_carries_on(held: str) -> None:
    from bgtrace import multiprocess

    registry = CollectorRegistry()
    metrics = TaskMetrics(registry, "", (0.01, 1.0), 200)
    other = TaskMetrics(CollectorRegistry(), "other", (0.01, 1.0), 200)  # a second set
    some_tasks(metrics)
    lock = {
        "values": metrics.lock,  # a task changing state in a threadpool thread, say
        "flush": multiprocess._flush_lock,  # the flush thread writing
        "published": multiprocess._flushed_lock,
        "flusher": multiprocess._flusher_lock,  # a first series starting the flush thread
    }[held]
    holding, release = threading.Event(), threading.Event()

    def hold() -> None:
        with lock:
            holding.set()
            release.wait(10)

    holder = threading.Thread(target=hold)
    holder.start()
    holding.wait(10)
    # Free the lock only once the fork is under way: without the fork hooks the child would
    # start with the lock held by a thread it does not have.
    threading.Timer(0.2, release.set).start()

    def child() -> bool:
        some_tasks(metrics)
        some_tasks(other)
        flush_all()
        return registry.get_sample_value("bgtask_enqueued_total", LABELS) == 5

    assert in_forked_child(child)
    holder.join(10)


@pytest.mark.usefixtures("multiprocess")
def test_buckets_ending_in_inf_are_written_like_prometheus_client_takes_them() -> None:
    registry = CollectorRegistry()
    metrics = task_metrics(registry, buckets=Histogram.DEFAULT_BUCKETS)
    some_tasks(metrics)
    metrics.flush()
    labels = dict(LABELS, le="+Inf")
    assert registry.get_sample_value("bgtask_duration_seconds_bucket", labels) == 2
    assert registry.get_sample_value("bgtask_queue_wait_seconds_bucket", labels) == 3


@pytest.mark.usefixtures("multiprocess")
def test_a_set_taken_out_of_its_registry_still_writes_its_tasks() -> None:
    registry = CollectorRegistry()
    metrics = TaskMetrics(registry, "", (0.01, 1.0), 200)
    enqueued = metrics._files.enqueued if metrics._files is not None else None
    assert enqueued is not None
    some_tasks(metrics)
    series = metrics.series("app.send", "handler", "/send")
    metrics.unregister()
    # A task queued on it before still reaches the files as it goes on.
    with series.lock:
        series.queued()
    flush_all()
    [family] = enqueued.collect()
    counts = {s.labels["task"]: s.value for s in family.samples if s.name.endswith("_total")}
    assert counts == {"app.send": 6, "app.audit": 1}


@pytest.mark.usefixtures("multiprocess")
def test_the_worker_answering_a_scrape_writes_its_own_values_first() -> None:
    from prometheus_client import generate_latest

    from bgtrace.exposition import _render

    registry = CollectorRegistry()
    metrics = TaskMetrics(registry, "", (0.01, 1.0), 200)
    some_tasks(metrics)
    _render(registry, generate_latest, openmetrics=False, zipped=False)
    assert registry.get_sample_value("bgtask_enqueued_total", LABELS) == 5


@pytest.mark.usefixtures("multiprocess")
def test_a_flush_thread_that_cannot_start_is_logged_and_tried_again(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from bgtrace import multiprocess

    def refuse(self: threading.Thread) -> None:
        raise RuntimeError("can't create new thread at interpreter shutdown")

    monkeypatch.setattr(multiprocess, "_flusher_pid", 0)
    monkeypatch.setattr(threading.Thread, "start", refuse)
    metrics = TaskMetrics(CollectorRegistry(), "", (0.01, 1.0), 200)
    with caplog.at_level("DEBUG", logger="bgtrace"):
        series = metrics.series("app.send", "handler", "/send")  # the task goes on
    assert series.labels == ("app.send", "handler", "/send")
    assert "multiprocess flush thread" in caplog.text
    assert multiprocess._flusher_pid == 0
    monkeypatch.undo()
    monkeypatch.setenv(MULTIPROC_ENV, "unused")
    monkeypatch.setattr(multiprocess, "_flusher_pid", 0)
    metrics.series("app.audit", "handler", "/send")
    assert multiprocess._flusher_pid == os.getpid()


@pytest.mark.usefixtures("multiprocess")
def test_oldest_ages_are_live_maximums_written_at_each_flush(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import bgtrace.stuck

    registry = CollectorRegistry()
    metrics = TaskMetrics(registry, "", (0.01, 1.0, 10.0), 200)
    some_tasks(metrics)
    labels = ("app.send", "handler", "/send")
    monkeypatch.setattr(bgtrace.stuck, "oldest_ages", lambda _: {labels: (7.5, 2.0)})
    metrics.flush()
    assert metrics._files is not None
    assert metrics._files.oldest_running._multiprocess_mode == "livemax"
    assert registry.get_sample_value("bgtask_oldest_running_seconds", LABELS) == 7.5
    assert registry.get_sample_value("bgtask_oldest_queued_seconds", LABELS) == 2.0
    # A series never in flight at a flush has none (see FileValues.flush_why).
    other = {"task": "app.audit", "origin": "dependency", "route": "/send"}
    assert registry.get_sample_value("bgtask_oldest_running_seconds", other) is None
    monkeypatch.setattr(bgtrace.stuck, "oldest_ages", lambda _: {})
    metrics.flush()
    assert registry.get_sample_value("bgtask_oldest_running_seconds", LABELS) == 0
    assert registry.get_sample_value("bgtask_oldest_queued_seconds", LABELS) == 0


@pytest.mark.usefixtures("multiprocess")
def test_thread_waits_reach_the_files_in_batches() -> None:
    registry = CollectorRegistry()
    metrics = TaskMetrics(registry, "", (0.01, 1.0, 10.0), 200)
    labels = ("app.send", "handler", "/send")
    for rounds in (2, 3):
        for _ in range(rounds):
            with metrics.lock:
                histogram = metrics.thread_wait_for(labels)
                histogram.add(0.5)
                histogram.dirty = True
        metrics.flush()
        metrics.flush()
    assert registry.get_sample_value("bgtask_thread_wait_seconds_count", LABELS) == 5
    assert registry.get_sample_value("bgtask_thread_wait_seconds_sum", LABELS) == 2.5


@pytest.mark.usefixtures("multiprocess", "flush_thread_paused")
def test_a_flush_visits_only_the_series_that_changed(monkeypatch: pytest.MonkeyPatch) -> None:
    """A worker with thousands of quiet series pays nothing for them at each flush (it holds
    the lock every task takes while it looks)."""
    from bgtrace import multiprocess

    visited: list[int] = []
    original = multiprocess.FileValues.flush

    def counting(self: Any, series: Any, *args: Any) -> None:
        visited.append(len(list(series)))
        original(self, series, *args)

    monkeypatch.setattr(multiprocess.FileValues, "flush", counting)
    registry = CollectorRegistry()
    metrics = TaskMetrics(registry, "", (0.01, 1.0), 200)
    quiet = [metrics.series(f"app.task{i}", "handler", "/send") for i in range(150)]
    with metrics.lock:
        for series in quiet:
            series.queued()
    metrics.flush()
    assert visited == [150]

    busy = quiet[:3]
    with metrics.lock:
        for series in busy:
            series.queued()
            series.started(0.002)
    metrics.flush()
    metrics.flush()  # nothing changed since
    assert visited[1:] == [3, 0]
    labels = {"task": "app.task0", "origin": "handler", "route": "/send"}
    assert registry.get_sample_value("bgtask_enqueued_total", labels) == 2
    assert registry.get_sample_value("bgtask_in_progress", labels) == 1
