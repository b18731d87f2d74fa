from __future__ import annotations

import threading

import pytest

from bgtrace.accumulators import LocalHistogram, LocalSeries, exemplar

BOUNDS = (0.01, 0.1, 1.0)


@pytest.fixture
def series() -> LocalSeries:
    return LocalSeries(("app.tasks.t", "handler", "/r"), BOUNDS, threading.RLock())


def test_a_value_on_a_bound_counts_in_that_bucket(series: LocalSeries) -> None:
    # Prometheus buckets are "less than or equal".
    histogram = LocalHistogram(BOUNDS, series.lock)
    for value in (0.01, 0.0100001, 1.0, 7.0):
        histogram.observe(value)
    assert histogram.counts == [1, 1, 1, 1]


def test_the_latest_traced_run_is_each_buckets_exemplar(series: LocalSeries) -> None:
    with series.lock:
        series.finished(0.05, "success", None, exemplar("a" * 32, 0.05))
        series.finished(0.06, "success", None, exemplar("b" * 32, 0.06))
        series.finished(0.5, "success", None, None)  # untraced: no exemplar
    exemplars = series.duration.exemplars
    assert exemplars is not None
    assert [e and e[:2] for e in exemplars] == [None, ("b" * 32, 0.06), None, None]


def test_the_exposition_label_text_is_sorted_and_escaped() -> None:
    one = LocalSeries(('say_"hi"', "dependency", "/a\\b\nc"), BOUNDS, threading.RLock())
    assert one.text == 'origin="dependency",route="/a\\\\b\\nc",task="say_\\"hi\\""'
