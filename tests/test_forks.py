"""A fork while another thread holds one of bgtrace's locks: the child carries on.

Single-process mode here (multiprocess mode's shared locks: tests/test_multiprocess.py).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import anyio
import pytest
from prometheus_client import CollectorRegistry

import bgtrace
from bgtrace import forks, instrumentation, metrics_app, rendering
from bgtrace import metrics as metrics_module
from bgtrace.metrics import TaskMetrics, task_metrics
from tests.asgi import call, status
from tests.servers import in_forked_child

# Python 3.12+ warns at every fork of a process with threads: these tests fork on purpose.
pytestmark = pytest.mark.filterwarnings("ignore:.*multi-threaded.*:DeprecationWarning")

LOCKS = ["values", "label limiter", "instrumentation", "registries", "renders"]


def _lock(held: str, metrics: TaskMetrics) -> Any:
    return {
        "values": metrics.lock,  # a task changing state in a worker thread
        "label limiter": metrics.task._lock,  # a first task of a new name
        "instrumentation": instrumentation._lock,  # instrument() in another thread
        "registries": metrics_module._by_registry_lock,  # a middleware being built
        "renders": rendering._lock,  # a scrape queueing its render
    }[held]


def _child_work(held: str, metrics: TaskMetrics, registry: CollectorRegistry) -> bool:
    """What the child does with the lock it inherited."""
    if held == "values":
        series = metrics.series("app.send", "handler", "/send")
        with series.lock:
            series.queued()
        return registry.get_sample_value("bgtask_enqueued_total", _labels()) == 2
    if held == "label limiter":
        return metrics.task("a.task.first.seen.in.the.child") == "a.task.first.seen.in.the.child"
    if held == "instrumentation":
        bgtrace.uninstrument()
        bgtrace.instrument()
        return instrumentation.is_instrumented()
    if held == "registries":
        return task_metrics(CollectorRegistry()) is not None
    sent = anyio.run(lambda: call(metrics_app(registry), "/metrics", method="GET"))
    return status(sent) == 200


def _labels() -> dict[str, str]:
    return {"task": "app.send", "origin": "handler", "route": "/send"}


@contextmanager
def _held_by_another_thread(lock: Any) -> Iterator[Callable[[], None]]:
    """``lock`` held by another thread until the caller lets it go (or the block ends)."""
    holding, release = threading.Event(), threading.Event()

    def hold() -> None:
        with lock:
            holding.set()
            release.wait(30)

    holder = threading.Thread(target=hold)
    holder.start()
    try:
        assert holding.wait(10)
        yield release.set
    finally:
        release.set()
        holder.join(10)


def _counted_set() -> tuple[TaskMetrics, CollectorRegistry]:
    registry = CollectorRegistry()
    metrics = TaskMetrics(registry, "", (0.01, 1.0), 200)
    series = metrics.series("app.send", "handler", "/send")
    with series.lock:
        series.queued()
    return metrics, registry


@pytest.mark.parametrize("held", LOCKS)
def test_a_child_forked_while_a_thread_holds_a_lock_can_take_it(
    held: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Regression: the lock stayed held in the child, by a thread the child does not have,
    and the child's first task (or scrape, or instrument()) hung for ever."""
    monkeypatch.setattr(forks, "FORK_WAIT", 0.2)  # the holder lets go only after the fork
    metrics, registry = _counted_set()
    with _held_by_another_thread(_lock(held, metrics)):
        assert in_forked_child(lambda: _child_work(held, metrics, registry))


@pytest.mark.parametrize("held", LOCKS)
def test_a_fork_waits_for_a_thread_to_let_go_of_a_lock(held: str) -> None:
    """A thread that lets go soon is waited for: the child copies values no thread is
    halfway through changing, and starts with the lock free."""
    metrics, registry = _counted_set()
    with _held_by_another_thread(_lock(held, metrics)) as let_go:
        # Let go only once the fork is under way.
        timer = threading.Timer(0.3, let_go)
        timer.start()
        try:
            assert in_forked_child(lambda: _child_work(held, metrics, registry))
        finally:
            timer.cancel()


def test_a_fork_waits_at_most_fork_wait_for_a_lock(monkeypatch: pytest.MonkeyPatch) -> None:
    """A lock held for good (or by a thread waiting for one the fork took first) delays the
    fork by ``FORK_WAIT`` at most, then the child re-initialises it."""
    import time

    monkeypatch.setattr(forks, "FORK_WAIT", 0.3)
    metrics, registry = _counted_set()
    with _held_by_another_thread(metrics.lock):
        started = time.monotonic()
        assert in_forked_child(lambda: _child_work("values", metrics, registry))
        assert time.monotonic() - started < 5
        # The parent's lock is still the holder's: released by the fork only if taken.
        assert not metrics.lock.acquire(timeout=0.05)
