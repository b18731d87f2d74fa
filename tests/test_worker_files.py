"""bgtrace's reader of every worker's files (``worker_files``): the sums prometheus_client's
``MultiProcessCollector`` gives, with each key read once per worker process.

The files are real: each is written by a worker stand-in (tests/worker_writer.py), a process
of its own with ``PROMETHEUS_MULTIPROC_DIR`` set, as prometheus_client decides at import.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import generate_latest
from prometheus_client.mmap_dict import MmapedDict
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead
from prometheus_client.openmetrics import exposition as openmetrics_exposition
from prometheus_client.openmetrics import parser as openmetrics_parser
from prometheus_client.parser import text_string_to_metric_families

from bgtrace import worker_files
from bgtrace.families import LOOP_FAMILIES, full_name
from bgtrace.multiprocess import MULTIPROC_ENV
from tests.servers import ROOT, in_forked_child

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]
WRITER = str(Path(__file__).with_name("worker_writer.py"))


@pytest.fixture
def directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty multiprocess directory, and a reader that knows nothing yet (and checks its
    sums at its first scrape, as in a new worker process)."""
    monkeypatch.setattr(worker_files, "_reader", None)
    monkeypatch.setattr(worker_files, "_unfit", set())
    monkeypatch.setattr(worker_files, "_checked_pid", 0)
    monkeypatch.setattr(worker_files, "_checks_left", 5)
    return tmp_path


@pytest.fixture
def keys_read(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every key the reader decodes, in order."""
    decoded: list[str] = []

    class Counting:
        @staticmethod
        def loads(text: str) -> Any:
            decoded.append(text)
            return json.loads(text)

    monkeypatch.setattr(worker_files, "json", Counting)
    return decoded


def run_worker(directory: Path, tasks: str, rounds: int = 1, buckets: str = "0.01,1.0") -> int:
    """One worker stand-in, run to its end; its pid (the name of its files)."""
    done = subprocess.run(
        [sys.executable, WRITER, tasks, str(rounds), buckets],
        env={**os.environ, MULTIPROC_ENV: str(directory)},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return int(done.stdout.strip())


def entries(directory: Path) -> int:
    """How many values (keys) the directory's files hold."""
    read = MmapedDict.read_all_values_from_file
    return sum(len(list(read(str(path)))) for path in directory.glob("*.db"))


def fast(directory: Path, openmetrics: bool = False) -> str:
    encoder = openmetrics_exposition.generate_latest if openmetrics else generate_latest
    return worker_files.render_directory(str(directory), encoder, openmetrics).decode()


def collector(directory: Path, openmetrics: bool = False) -> str:
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(directory))  # type: ignore[no-untyped-call]
    encoder = openmetrics_exposition.generate_latest if openmetrics else generate_latest
    return encoder(registry).decode()


def parse(text: str, openmetrics: bool) -> Any:
    if openmetrics:
        return openmetrics_parser.text_string_to_metric_families(text)  # type: ignore[no-untyped-call]
    return text_string_to_metric_families(text)


def write_extra_keys(path: Path, count: int) -> None:
    """``count`` new counter values in ``path``, as its worker would write them (a file that
    outgrows its size is doubled by its writer)."""
    written = MmapedDict(str(path))  # type: ignore[no-untyped-call]
    for n in range(count):
        key = json.dumps(["app_extra", "app_extra_total", {"n": str(n)}, "Extra."])
        written.write_value(key, 1.0, 0.0)  # type: ignore[no-untyped-call]
    written.close()  # type: ignore[no-untyped-call]


def samples(text: str, openmetrics: bool = False) -> Samples:
    """Every sample of one exposition; a repeated sample fails (as Prometheus refuses it)."""
    found: Samples = {}
    for family in parse(text, openmetrics):
        for sample in family.samples:
            key = (sample.name, frozenset(sample.labels.items()))
            assert key not in found, f"{key} twice"
            found[key] = sample.value
    return found


def families(text: str, openmetrics: bool = False) -> set[tuple[str, str]]:
    """Names and types of the families with samples (bgtrace writes the others' headers too,
    as in one process; prometheus_client leaves them out)."""
    return {(f.name, f.type) for f in parse(text, openmetrics) if f.samples}


def assert_same_as_prometheus_client(directory: Path) -> Samples:
    """Both formats: bgtrace's reader and ``MultiProcessCollector`` give the same samples."""
    text = fast(directory)
    expected = collector(directory)
    assert samples(text) == samples(expected)
    openmetrics = fast(directory, openmetrics=True)
    assert openmetrics.endswith("# EOF\n") and openmetrics.count("# EOF") == 1
    # Against the collector's text format: prometheus_client 0.20's collector writes
    # OpenMetrics that its own strict parser refuses (a histogram's _sum lines apart from its
    # buckets); bgtrace's passes it.
    assert samples(openmetrics, True) == samples(expected)
    assert families(openmetrics, True) == families(expected)
    return samples(text)


def bgtrace_value(found: Samples, name: str, **labels: str) -> float:
    return found[(name, frozenset(labels.items()))]


LABELS = {"origin": "handler", "route": "/orders/{id}"}


def test_two_workers_add_up_as_prometheus_client_adds_them(
    directory: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run_worker(directory, "app.mail,app.audit", rounds=2)
    run_worker(directory, "app.mail,app.report", rounds=3)
    summed: list[str] = []
    original = worker_files._accumulate

    def accumulate(metrics: dict[str, Any]) -> Any:
        summed.extend(metrics)
        return original(metrics)

    monkeypatch.setattr(worker_files, "_accumulate", accumulate)

    found = assert_same_as_prometheus_client(directory)

    # The shared task's values are the sum of both workers: 4 queued per round, 2 + 3 rounds.
    assert bgtrace_value(found, "bgtask_enqueued_total", task="app.mail", **LABELS) == 20
    assert bgtrace_value(found, "bgtask_queue_length", task="app.mail", **LABELS) == 5
    assert bgtrace_value(found, "shop_bgtask_enqueued_total", task="shop.bill", origin="handler",
                         route="/pay") == 5  # fmt: skip
    # bgtrace's task families never went through prometheus_client's summing; the app's did,
    # and so did the watchdog's few series (families.LOOP_FAMILIES) and the oldest ages (the
    # maximum over live workers, which the reader does not take).
    summed_too = {full_name("", family) for family in LOOP_FAMILIES}
    why = ("bgtask_oldest_running_seconds", "bgtask_oldest_queued_seconds")
    assert summed and not [
        n for n in summed if "bgtask" in n and n not in summed_too and not n.endswith(why)
    ]
    assert bgtrace_value(found, "bgtask_loop_blocked_seconds_total", task="app.mail",
                         **LABELS) == 0.25 * 5  # fmt: skip
    assert bgtrace_value(found, "bgtrace_threadpool_tokens") == 80
    assert bgtrace_value(found, "bgtrace_event_loop_lag_seconds_count") == 5
    assert {"app_logins", "app_upload_seconds", "app_pool_max"} <= set(summed)


def test_a_later_scrape_reads_only_the_keys_added_since(
    directory: Path, keys_read: list[str]
) -> None:
    run_worker(directory, "app.mail")
    assert_same_as_prometheus_client(directory)
    first = entries(directory)
    assert len(keys_read) == first  # every key of the worker's files, once
    keys_read.clear()
    assert_same_as_prometheus_client(directory)
    assert keys_read == []

    # A second worker: only its keys are read. Its files sort before the first one's: the
    # first worker's values, copied alone into the sums until now, are added from now on.
    pid = run_worker(directory, "app.report,app.mail")
    for path in directory.glob(f"*_{pid}.db"):
        path.rename(directory / path.name.replace(f"_{pid}.db", "_0.db"))
    assert_same_as_prometheus_client(directory)
    assert len(keys_read) == entries(directory) - first

    # A file that outgrows its first size is doubled by its writer: read past the old end.
    keys_read.clear()
    counter_file = next(directory.glob("counter_*.db"))
    size = counter_file.stat().st_size
    write_extra_keys(counter_file, 800)
    assert counter_file.stat().st_size > size
    found = assert_same_as_prometheus_client(directory)
    assert len(keys_read) == 800
    assert sum(v for (name, _), v in found.items() if name == "app_extra_total") == 800


def test_a_dead_workers_gauges_leave_the_sum(directory: Path) -> None:
    run_worker(directory, "app.mail", rounds=2)
    assert_same_as_prometheus_client(directory)
    pid = run_worker(directory, "app.mail,app.report", rounds=3)
    assert_same_as_prometheus_client(directory)

    mark_process_dead(pid, str(directory))  # type: ignore[no-untyped-call]
    found = samples(fast(directory))
    expected = samples(collector(directory))
    # One task left queued per round: the live worker's 2. The counters keep both workers'.
    assert bgtrace_value(found, "bgtask_queue_length", task="app.mail", **LABELS) == 2
    assert bgtrace_value(found, "bgtask_enqueued_total", task="app.mail", **LABELS) == 20
    # A task only the dead worker ran: its counts stay, its gauges read 0, where
    # prometheus_client's collector leaves them out (README, Several worker processes).
    assert bgtrace_value(found, "bgtask_enqueued_total", task="app.report", **LABELS) == 12
    extra = {key: value for key, value in found.items() if key not in expected}
    assert {key: found[key] for key in expected} == expected
    assert {name for name, _ in extra} == {"bgtask_queue_length", "bgtask_in_progress"}
    assert all(("task", "app.report") in labels for _, labels in extra)
    assert set(extra.values()) == {0.0}


def test_a_file_made_anew_under_a_known_name_is_read_anew(directory: Path) -> None:
    pid = run_worker(directory, "app.mail")
    assert_same_as_prometheus_client(directory)
    for path in directory.iterdir():
        path.unlink()
    # Another worker's files under the first one's names (a pid used again): other keys at
    # the places the reader kept.
    other = run_worker(directory, "app.report,app.audit")
    for path in directory.iterdir():
        path.rename(directory / path.name.replace(f"_{other}.db", f"_{pid}.db"))
    found = assert_same_as_prometheus_client(directory)
    assert not [labels for (_, labels) in found if ("task", "app.mail") in labels]


def test_what_the_reader_does_not_add_up_is_read_the_slow_way_for_good(
    directory: Path, keys_read: list[str], caplog: pytest.LogCaptureFixture
) -> None:
    run_worker(directory, "app.mail")
    # bgtrace's gauge name and help, in another gauge mode: only prometheus_client knows
    # how to add that up.
    odd = MmapedDict(str(directory / "gauge_max_4242.db"))  # type: ignore[no-untyped-call]
    key = json.dumps(
        ["bgtask_in_progress", "bgtask_in_progress",
         {"origin": "handler", "route": "/x", "task": "t"}, "Background tasks running now."],
        sort_keys=True,
    )  # fmt: skip
    odd.write_value(key, 7.0, 0.0)  # type: ignore[no-untyped-call]
    odd.close()  # type: ignore[no-untyped-call]

    with caplog.at_level(logging.WARNING, logger="bgtrace"):
        assert fast(directory) == collector(directory)
        keys_read.clear()
        assert fast(directory, openmetrics=True) == collector(directory, openmetrics=True)
    assert keys_read == []  # not tried again
    warnings = [r for r in caplog.records if "MultiProcessCollector" in r.getMessage()]
    assert len(warnings) == 1


def test_an_error_in_the_reader_is_logged_and_the_scrape_still_answered(
    directory: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from bgtrace import logs

    monkeypatch.setattr(logs, "_reported", set())
    run_worker(directory, "app.mail")

    def broken(metrics: dict[str, Any]) -> Any:
        raise RuntimeError("prometheus_client changed")

    monkeypatch.setattr(worker_files, "_accumulate", broken)
    with caplog.at_level(logging.ERROR, logger="bgtrace"):
        assert fast(directory) == collector(directory)
    assert any("multiprocess read" in r.getMessage() for r in caplog.records)
    monkeypatch.undo()
    monkeypatch.setattr(worker_files, "_unfit", set())
    # Tried again at the next scrape.
    assert_same_as_prometheus_client(directory)
    assert worker_files._reader is not None


def test_a_directory_that_is_not_there_is_an_error_as_in_prometheus_client(
    directory: Path,
) -> None:
    with pytest.raises(ValueError, match="not a directory"):
        fast(directory / "missing")


def test_a_child_forked_during_a_scrape_can_scrape(directory: Path) -> None:
    run_worker(directory, "app.mail")
    expected = samples(collector(directory))
    holding, release = threading.Event(), threading.Event()

    def scrape_slowly() -> None:
        # A scrape in another thread holds the reader at the moment of the fork.
        with worker_files._reader_lock:
            holding.set()
            release.wait(10)

    holder = threading.Thread(target=scrape_slowly)
    holder.start()
    holding.wait(10)
    check: Callable[[], bool] = lambda: samples(fast(directory)) == expected  # noqa: E731
    try:
        assert in_forked_child(check)
    finally:
        release.set()
        holder.join(10)


def test_no_file_stays_open_between_scrapes(directory: Path) -> None:
    # Workers come and go (gunicorn's max_requests), their files stay: one descriptor kept per
    # file would run into the process's limit.
    for _ in range(3):
        run_worker(directory, "app.mail")
    fast(directory)
    before = len(os.listdir("/proc/self/fd"))
    run_worker(directory, "app.report")
    assert_same_as_prometheus_client(directory)
    assert len(os.listdir("/proc/self/fd")) == before


def test_a_file_that_grows_while_it_is_read_is_read_on_at_the_next_scrape(
    directory: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    run_worker(directory, "app.mail")
    counter_file = next(directory.glob("counter_*.db"))
    mapped = worker_files.mmap.mmap

    def map_then_grow(fileno: int, length: int, **kwargs: Any) -> Any:
        data = mapped(fileno, length, **kwargs)
        if os.path.samefile(f"/proc/self/fd/{fileno}", counter_file):
            monkeypatch.setattr(worker_files.mmap, "mmap", mapped)  # the mmap module's own
            # The writer doubles the file and goes on writing past this map's end.
            write_extra_keys(counter_file, 800)
        return data

    monkeypatch.setattr(worker_files.mmap, "mmap", map_then_grow)
    with caplog.at_level(logging.WARNING, logger="bgtrace"):
        fast(directory)
        found = assert_same_as_prometheus_client(directory)
    assert not caplog.records and worker_files._reader is not None
    assert sum(v for (name, _), v in found.items() if name == "app_extra_total") == 800


def test_a_series_whose_histograms_are_not_in_the_files_yet_reads_zero(
    directory: Path, caplog: pytest.LogCaptureFixture
) -> None:
    run_worker(directory, "app.mail")
    fast(directory)  # the buckets are known
    pid = run_worker(directory, "app.report")
    (directory / f"histogram_{pid}.db").unlink()  # as if read before its writer got there
    with caplog.at_level(logging.WARNING, logger="bgtrace"):
        found = samples(fast(directory))
    assert not caplog.records
    expected = samples(collector(directory))
    extra = {key: value for key, value in found.items() if key not in expected}
    assert {key: found[key] for key in expected} == expected
    assert extra and set(extra.values()) == {0.0}
    assert all(("task", "app.report") in labels for (_, labels) in extra)


def test_workers_with_other_buckets_under_one_name_are_read_by_prometheus_client(
    directory: Path, caplog: pytest.LogCaptureFixture
) -> None:
    run_worker(directory, "app.mail", buckets="0.01,1.0")
    run_worker(directory, "app.mail", buckets="0.05,1.0")  # another release's buckets
    with caplog.at_level(logging.WARNING, logger="bgtrace"):
        for _ in range(3):
            assert fast(directory) == collector(directory)
    warnings = [r for r in caplog.records if "MultiProcessCollector" in r.getMessage()]
    assert len(warnings) == 1


def test_a_file_rewritten_in_place_is_read_anew(directory: Path) -> None:
    # Same name, same inode, the same first entry: only what follows differs (a worker that got
    # a used pid and inode again, writing the same first metric).
    pid = run_worker(directory, "app.mail")
    assert_same_as_prometheus_client(directory)
    other = run_worker(directory, "app.mail,app.report", rounds=2)
    for path in directory.glob(f"*_{other}.db"):
        target = directory / path.name.replace(f"_{other}.db", f"_{pid}.db")
        content = path.read_bytes()
        path.unlink()
        with target.open("r+b") as rewritten:
            rewritten.truncate(0)
            rewritten.write(content)
    found = assert_same_as_prometheus_client(directory)
    assert bgtrace_value(found, "bgtask_enqueued_total", task="app.report", **LABELS) == 8


def test_buckets_of_workers_gone_do_not_stay(
    directory: Path, caplog: pytest.LogCaptureFixture
) -> None:
    run_worker(directory, "app.mail", buckets="0.01,1.0")
    assert_same_as_prometheus_client(directory)
    for path in directory.iterdir():
        path.unlink()
    # A new release with other buckets, the old one's files gone: nothing to fall back for.
    run_worker(directory, "app.mail", buckets="0.05,2.0")
    with caplog.at_level(logging.WARNING, logger="bgtrace"):
        found = assert_same_as_prometheus_client(directory)
    assert not caplog.records
    les = {dict(labels)["le"] for name, labels in found if name == "bgtask_duration_seconds_bucket"}
    assert les == {"0.05", "2.0", "+Inf"}


def test_a_worker_that_stopped_inside_its_first_histogram_does_not_stop_the_reader(
    directory: Path, caplog: pytest.LogCaptureFixture
) -> None:
    run_worker(directory, "app.mail")
    # Killed after writing the sum and the first bucket of its first histogram (the writer
    # puts +Inf last): this file has fewer bounds than the others, for good.
    half = MmapedDict(str(directory / "histogram_4242.db"))  # type: ignore[no-untyped-call]
    labels = {"origin": "handler", "route": "/late", "task": "app.late"}
    help_text = "Background task run time, start to end."
    for name, extra in (("_sum", {}), ("_bucket", {"le": "0.01"})):
        key = json.dumps(
            ["bgtask_duration_seconds", "bgtask_duration_seconds" + name, {**labels, **extra},
             help_text],
            sort_keys=True,
        )  # fmt: skip
        half.write_value(key, 0.0, 0.0)  # type: ignore[no-untyped-call]
    half.close()  # type: ignore[no-untyped-call]
    with caplog.at_level(logging.WARNING, logger="bgtrace"):
        for _ in range(2):
            found = samples(fast(directory))
    assert not caplog.records and worker_files._reader is not None
    late = {key: value for key, value in found.items() if ("task", "app.late") in key[1]}
    assert late and set(late.values()) == {0.0}


def make_buckets_cumulative(directory: Path) -> None:
    """Rewrite every histogram's bucket values in the files as running totals, as a
    prometheus_client release might store them: still readable, another meaning."""
    for path in directory.glob("histogram_*.db"):
        values = MmapedDict.read_all_values_from_file(str(path))
        groups: dict[str, list[tuple[float, str, float]]] = {}
        for key, value, _timestamp, _position in values:
            metric_name, name, labels, _help = json.loads(key)
            if name.endswith("_bucket"):
                rest = {k: v for k, v in labels.items() if k != "le"}
                group = json.dumps([metric_name, rest], sort_keys=True)
                groups.setdefault(group, []).append((float(labels["le"]), key, value))
        written = MmapedDict(str(path))  # type: ignore[no-untyped-call]
        for buckets in groups.values():
            total = 0.0
            for _le, key, value in sorted(buckets):
                total += value
                written.write_value(key, total, 0.0)  # type: ignore[no-untyped-call]
        written.close()  # type: ignore[no-untyped-call]


def read_cumulative_buckets(original: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """``MultiProcessCollector._read_metrics`` of that release: it knows bucket values are
    running totals, per file."""

    def read(files: Any) -> Any:
        merged: dict[str, Any] = {}
        for file in files:
            for name, metric in original([file]).items():
                running: dict[Any, float] = {}
                samples = []
                # Label sets here are sorted tuples of pairs, as prometheus_client reads them.
                for sample in sorted(
                    metric.samples, key=lambda s: float(dict(s.labels).get("le", 0))
                ):
                    if sample.name.endswith("_bucket"):
                        group = tuple(i for i in sample.labels if i[0] != "le")
                        before = running.get(group, 0.0)
                        running[group] = sample.value
                        sample = sample._replace(value=sample.value - before)
                    samples.append(sample)
                metric.samples = samples
                if name in merged:
                    merged[name].samples += samples
                else:
                    merged[name] = metric
        return merged

    return read


def test_a_reader_whose_sums_differ_from_prometheus_clients_warns_once_and_steps_aside(
    directory: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    run_worker(directory, "app.mail,app.audit", rounds=2)
    run_worker(directory, "app.mail", rounds=1)
    make_buckets_cumulative(directory)
    original = MultiProcessCollector._read_metrics
    monkeypatch.setattr(MultiProcessCollector, "_read_metrics",
                        staticmethod(read_cumulative_buckets(original)))  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="bgtrace"):
        assert samples(fast(directory)) == samples(collector(directory))
        assert fast(directory) == collector(directory)  # from then on, as the collector gives it
    (warning,) = [r.getMessage() for r in caplog.records if "differ" in r.getMessage()]
    # What differed, in one line: a metric, its labels and both values, a few of them.
    assert "bgtask_duration_seconds_bucket{" in warning or "queue_wait_seconds_bucket{" in warning
    assert "bgtrace " in warning and "prometheus_client " in warning and "more)" in warning
    assert warning.count("; ") == 2 and "\n" not in warning


def test_the_reader_checks_its_sums_once_per_process_and_agrees(
    directory: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    run_worker(directory, "app.mail,app.audit", rounds=2)
    run_worker(directory, "app.mail", rounds=3)
    reads: list[int] = []
    original = MultiProcessCollector.collect

    def counting(self: Any) -> Any:
        reads.append(1)
        return original(self)

    monkeypatch.setattr(MultiProcessCollector, "collect", counting)
    with caplog.at_level(logging.WARNING, logger="bgtrace"):
        for _ in range(3):
            fast(directory)
    assert len(reads) == 1  # the check, at the first scrape only
    assert not caplog.records
    assert "tmp" not in str(worker_files._unfit)
    assert worker_files._reader is not None
