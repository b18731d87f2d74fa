"""Every worker's metric files, added up at a scrape: bgtrace's families in milliseconds, the
rest as prometheus_client adds them.

prometheus_client's ``MultiProcessCollector`` reads every file whole at each scrape, decodes
the JSON key of every value and makes a sample object of each: seconds for bgtrace's thousands
of series (a histogram is 18 values, each with its key). Its files only grow, and a value never
moves once written, so ``WorkerFiles`` reads each key once and keeps where its value lies; a
later scrape maps the files again and reads the values at those places and only the keys added
since. bgtrace's families are added up into the structures one process renders from
(``families.render``). Whatever else is in the directory (the app's own metrics) goes, from
the kept keys, through prometheus_client's own summing, so it comes out as
``MultiProcessCollector`` gives it.
"""

from __future__ import annotations

import glob
import json
import math
import mmap
import os
import struct
import threading
from collections.abc import Callable, Iterator
from operator import add, itemgetter
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.metrics_core import Metric
from prometheus_client.multiprocess import MultiProcessCollector

from . import logs
from .accumulators import LocalHistogram, LocalSeries
from .families import (
    ALL_FAMILIES,
    COMPLETED,
    DROPPED,
    DURATION,
    FAILURES,
    POST_RESPONSE,
    QUEUE_LENGTH,
    TASK_LABELS,
    Family,
    LocalValues,
    collect,
    join_encoded,
    render,
)  # fmt: skip

_USED = struct.Struct("i")  # the file's first field: how many bytes hold entries
_FIRST_ENTRY = 8
_DOUBLE = 8
# Slot 0 of the sums is never added to: a value that no file holds reads it.
_ZERO = 0
_TASK_LABELS = frozenset(TASK_LABELS)
# Label names beyond (task, origin, route) of each family that has one.
_EXTRA_LABEL = {COMPLETED: "outcome", FAILURES: "error_type", DROPPED: "reason"}
_INF = "+Inf"


class Unfit(Exception):
    """The files hold something this reader does not add up as prometheus_client would."""


class _Histogram:
    """Where one histogram's values lie among the sums, and the values to render."""

    __slots__ = ("buckets", "files", "order", "sum", "values")

    def __init__(self, lock: threading.RLock) -> None:
        self.buckets: dict[str, int] = {}  # le -> slot
        self.sum = _ZERO
        self.order: Callable[[list[float]], tuple[float, ...]] = _slots_getter([_ZERO])
        # How many files hold a value of it; read for post-response histograms only (a
        # series' two histograms are counted on the series, ``_Series.files``).
        self.files = 0
        self.values = LocalHistogram((), lock)


class _Series:
    """Where the values of one (task, origin, route) lie among the sums."""

    __slots__ = (
        "completed", "drops", "duration", "enqueued", "failures", "files", "in_progress",
        "queue_length", "queue_wait", "scalars", "values",
    )  # fmt: skip

    def __init__(self, labels: tuple[str, str, str], lock: threading.RLock) -> None:
        self.enqueued = self.queue_length = self.in_progress = _ZERO
        self.completed: dict[str, int] = {}
        self.failures: dict[str, int] = {}
        self.drops: dict[str, int] = {}
        self.queue_wait = _Histogram(lock)
        self.duration = _Histogram(lock)
        self.files = 0
        # Reads enqueued, queue_length, in_progress and the completed counts in one call;
        # made again when a slot of them is made.
        self.scalars: Callable[[list[float]], tuple[float, ...]] | None = None
        self.values = LocalSeries(labels, (), lock)
        # Rendered from the histograms filled here.
        self.values.queue_wait = self.queue_wait.values
        self.values.duration = self.duration.values


class _Namespace:
    """bgtrace's families under one namespace, as found in the files."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.les: list[str] = []  # bucket bounds seen, ascending, without +Inf
        self.series: dict[tuple[str, str, str], _Series] = {}
        self.post_response: dict[str, _Histogram] = {}
        self.reorder = False  # a bucket was added since the orders were made


# What one value in a file is: a place among bgtrace's sums, or a sample of another metric
# (metric name, sample name, sorted labels, help, file type, gauge mode, pid).
_Other = tuple[str, str, tuple[tuple[str, str], ...], str, str, str, str, int]


class _File:
    """What is kept of one worker file between scrapes: where its values lie."""

    __slots__ = ("first", "identity", "indexes", "last", "les", "mode", "other", "parsed",
                 "pid", "read", "runs", "seen", "slots", "type")  # fmt: skip

    def __init__(self, identity: tuple[int, int], name: str) -> None:
        parts = name.split("_")
        self.identity = identity
        self.type = parts[0]
        self.mode = parts[1] if self.type == "gauge" else ""
        self.pid = parts[2][:-3] if self.type == "gauge" else ""
        # The first and the last entry read (place, bytes): a file made anew under the same
        # name and inode number (a pid used again, its inode freed) differs in one of them or
        # is shorter, and is read anew.
        self.first = b""
        self.last: tuple[int, bytes] = (_FIRST_ENTRY, b"")
        self.parsed = _FIRST_ENTRY
        self.indexes: list[int] = []  # where bgtrace's values lie, in doubles
        self.slots: list[int] = []  # and which sum each goes to
        self.read: Callable[[Any], tuple[float, ...]] = _slots_getter([])
        # Runs of consecutive slots, as (first slot, end slot, start among the values read,
        # whether no other file adds to them): each run is added with one C-level map(), or
        # copied. A file's values usually fill one run (the first worker's file made the slots
        # in its own order) or one per series.
        self.runs: list[tuple[int, int, int, bool]] = []
        self.other: list[_Other] = []
        self.seen: set[_Series | _Histogram] = set()
        self.les: dict[str, set[str]] = {}  # per namespace, the bucket bounds in this file

    def same_file(self, data: mmap.mmap) -> bool:
        """Whether ``data`` is still the file whose keys were read (files only grow)."""
        (used,) = _USED.unpack_from(data, 0)
        place, last = self.last
        return (
            used >= self.parsed
            and data[_FIRST_ENTRY : _FIRST_ENTRY + len(self.first)] == self.first
            and data[place : place + len(last)] == last
        )


def _slots_getter(indexes: list[int]) -> Callable[[Any], tuple[float, ...]]:
    """``itemgetter`` that always returns a tuple (it returns the item itself for one index)."""
    if len(indexes) >= 2:
        return itemgetter(*indexes)
    if indexes:
        only = indexes[0]
        return lambda values: (values[only],)
    return lambda values: ()


class WorkerFiles:
    """The files of one multiprocess directory, with what is kept of them between scrapes."""

    def __init__(self, directory: str) -> None:
        self.directory = directory
        self._files: dict[str, _File] = {}
        self._namespaces: dict[str, _Namespace] = {}
        self._holders = [0]  # per slot, how many files hold a value for it; slot 0 is _ZERO
        self._replan = False  # files came or went: runs may stop or start being shared
        self._fast_names: set[str] = set()
        self._other_names: set[str] = set()
        self._lock = threading.RLock()  # the LocalSeries' lock: rendering never takes it

    def collect(self) -> tuple[list[LocalValues], list[Any]]:
        """bgtrace's values per namespace, and prometheus_client metrics of everything else."""
        opened, changed = self._update()
        try:
            self._check_buckets(changed)
            sums = [0.0] * len(self._holders)
            others: dict[str, Any] = {}
            for file, data in opened:
                size = len(data) // _DOUBLE * _DOUBLE
                # Released before the map is closed (a map with views on it cannot be).
                with memoryview(data) as raw, raw[:size].cast("d") as doubles:
                    values = file.read(doubles)
                    for first, end, start, alone in file.runs:
                        part = values[start : start + end - first]
                        sums[first:end] = part if alone else map(add, sums[first:end], part)
                    if file.other:
                        _add_others(others, file.other, doubles)
        finally:
            for _, data in opened:
                data.close()
        # prometheus_client's own summing (per gauge mode, buckets made cumulative).
        merged = _accumulate(others) if others else []
        own = [_values(ns, sums) for ns in self._namespaces.values()]
        return [values for values in own if values is not None], merged

    def _update(self) -> tuple[list[tuple[_File, mmap.mmap]], bool]:
        """Every file of the directory, mapped for this scrape (the caller closes the maps),
        its new keys read; files gone are let go; and whether any of that changed what is kept.
        Nothing stays open between scrapes: a worker's files outlive it, and workers come and
        go (a kept map holds a file descriptor)."""
        paths = sorted(glob.glob(os.path.join(self.directory, "*.db")))
        opened: list[tuple[_File, mmap.mmap]] = []
        try:
            for path in paths:
                found = self._open(path)
                if found is not None:
                    opened.append(found)
            for path in set(self._files) - set(paths):
                self._forget(path)
            changed = self._replan
            if changed:
                self._bounds_from_files()
            for ns in self._namespaces.values():
                if ns.reorder:
                    _reorder(ns)
            if changed:
                for file, _ in opened:
                    _plan_reads(file, self._holders)
                self._replan = False
        except BaseException:
            for _, data in opened:
                data.close()
            raise
        return opened, changed

    def _bounds_from_files(self) -> None:
        """Each namespace's bucket bounds: those of the files there are now (files with other
        bounds may have gone since)."""
        for ns in self._namespaces.values():
            les: set[str] = set()
            for file in self._files.values():
                les.update(file.les.get(ns.name, ()))
            les.discard(_INF)
            if les != set(ns.les):
                ns.les = sorted(les, key=float)
                ns.reorder = True

    def _open(self, path: str) -> tuple[_File, mmap.mmap] | None:
        try:
            handle = open(path, "rb")  # noqa: SIM115 - closed right after mapping
        except FileNotFoundError:  # removed since the listing (a dead worker's gauges)
            return None
        with handle:
            stat = os.fstat(handle.fileno())
            if stat.st_size < _FIRST_ENTRY:
                return None  # just made by its writer, not yet sized
            data = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
        try:
            identity = (stat.st_dev, stat.st_ino)
            file = self._files.get(path)
            if file is not None and (file.identity != identity or not file.same_file(data)):
                self._forget(path)
                file = None
            if file is None:
                file = self._files[path] = _File(identity, os.path.basename(path))
            self._read_keys(file, data)
        except BaseException:
            data.close()
            raise
        return file, data

    def _forget(self, path: str) -> None:
        file = self._files.pop(path)
        for target in file.seen:
            target.files -= 1
        for slot in file.slots:
            self._holders[slot] -= 1
        self._replan = True

    def _read_keys(self, file: _File, data: mmap.mmap) -> None:
        """Read the keys written to ``file`` since the last scrape."""
        (used,) = _USED.unpack_from(data, 0)
        # Up to what this map holds (the writer may have grown the file since it was mapped);
        # an entry not wholly there yet is read at the next scrape.
        end = min(used, len(data))
        position = file.parsed
        added = False
        while position + 4 <= end:
            (length,) = _USED.unpack_from(data, position)
            value_at = position + 4 + length + (8 - (length + 4) % 8)
            if length <= 0 or value_at + 16 > end:
                break
            key = data[position + 4 : position + 4 + length].decode("utf-8")
            # Keys are padded so that the value after them starts at a multiple of 8.
            self._place(file, key, value_at // _DOUBLE)
            if position == _FIRST_ENTRY:
                file.first = data[position:value_at]
            file.last = (position, data[position:value_at])
            position = value_at + 16  # the value and its timestamp
            added = True
        file.parsed = position
        if added:
            self._replan = True

    def _check_buckets(self, changed: bool) -> None:
        """Every file holds the same bucket bounds for each namespace, or some writer is not
        done with its first histogram yet.

        prometheus_client writes a histogram's buckets in order, ``+Inf`` last: a file without
        ``+Inf`` is still being written (its missing buckets read zero, as they are), while
        one with ``+Inf`` and fewer bounds than another file has other buckets (workers of
        two releases, say). Only prometheus_client adds that up, as each histogram's own.
        """
        if not changed:
            return
        for file in self._files.values():
            for name, les in file.les.items():
                if _INF in les and len(les) != len(self._namespaces[name].les) + 1:
                    raise Unfit("workers with different histogram buckets under one name")

    def _place(self, file: _File, key: str, index: int) -> None:
        metric_name, name, labels, help_text = json.loads(key)
        found = self._target(file, metric_name, name, labels, help_text)
        if found is None:
            if metric_name in self._fast_names:
                raise Unfit(f"{metric_name}: a value bgtrace does not write")
            self._other_names.add(metric_name)
            labels_key = tuple(sorted(labels.items()))
            file.other.append((metric_name, name, labels_key, help_text, file.type, file.mode,
                               file.pid, index))  # fmt: skip
            return
        if metric_name in self._other_names:
            raise Unfit(f"{metric_name}: values of two kinds under one name")
        self._fast_names.add(metric_name)
        target, slot = found
        if target not in file.seen:
            file.seen.add(target)
            target.files += 1
        file.indexes.append(index)
        file.slots.append(slot)
        self._holders[slot] += 1

    def _slot(self) -> int:
        self._holders.append(0)
        return len(self._holders) - 1

    def _target(
        self, file: _File, metric_name: str, name: str, labels: dict[str, str], help_text: str
    ) -> tuple[_Series | _Histogram, int] | None:
        """The series or histogram a value of bgtrace's adds to, and its slot (``None`` for any
        other metric's value)."""
        labels = dict(labels)  # the caller keeps the whole label set for another metric
        family = _family(metric_name)
        if (family is None or help_text != family.help or file.type != family.type
                or file.mode not in ("", "livesum")):  # fmt: skip
            return None
        namespace = metric_name[: -len(family.name)].removesuffix("_")
        ns = self._namespaces.get(namespace)
        if ns is None:
            ns = self._namespaces[namespace] = _Namespace(namespace)
        le = labels.pop("le", None) if family.type == "histogram" else None
        if family is POST_RESPONSE:
            if set(labels) != {"route"}:
                return None
            route = labels["route"]
            histogram = ns.post_response.get(route)
            if histogram is None:
                histogram = ns.post_response[route] = _Histogram(self._lock)
                ns.reorder = True  # its buckets may all be in files not read yet
            return self._histogram_slot(file, ns, histogram, metric_name, name, le)
        extra = _EXTRA_LABEL.get(family)
        value = labels.pop(extra, None) if extra is not None else None
        if set(labels) != _TASK_LABELS or (extra is not None and value is None):
            return None
        triple = (labels["task"], labels["origin"], labels["route"])
        series = ns.series.get(triple)
        if series is None:
            series = ns.series[triple] = _Series(triple, self._lock)
            ns.reorder = True  # its histograms' buckets may all be in files not read yet
        if family.type == "histogram":
            which = series.duration if family is DURATION else series.queue_wait
            found = self._histogram_slot(file, ns, which, metric_name, name, le)
            # The series is what a file holds (and it is rendered while any file does).
            return None if found is None else (series, found[1])
        expected = metric_name + "_total" if family.type == "counter" else metric_name
        if name != expected:
            return None
        series.scalars = None  # (failures and drops are read apart: rare, and dropped if 0)
        if family.type == "gauge":
            if family is QUEUE_LENGTH:
                slot = series.queue_length = self._fresh(series.queue_length)
            else:
                slot = series.in_progress = self._fresh(series.in_progress)
            return series, slot
        if value is None:
            slot = series.enqueued = self._fresh(series.enqueued)
            return series, slot
        by_value = {"outcome": series.completed, "error_type": series.failures,
                    "reason": series.drops}[extra or ""]  # fmt: skip
        slot = by_value.get(value) or self._slot()
        by_value[value] = slot
        return series, slot

    def _fresh(self, slot: int) -> int:
        """A series' own slot for one value, made when a file first holds it."""
        return slot if slot != _ZERO else self._slot()

    def _histogram_slot(
        self,
        file: _File,
        ns: _Namespace,
        histogram: _Histogram,
        metric_name: str,
        name: str,
        le: str | None,
    ) -> tuple[_Histogram, int] | None:
        if name == metric_name + "_sum" and le is None:
            histogram.sum = self._fresh(histogram.sum)
            return histogram, histogram.sum
        if name != metric_name + "_bucket" or le is None:
            return None
        file.les.setdefault(ns.name, set()).add(le)
        slot = histogram.buckets.get(le)
        if slot is None:
            slot = histogram.buckets[le] = self._slot()
            if le != _INF and le not in ns.les:
                try:
                    float(le)
                except ValueError:
                    raise Unfit(f"{metric_name}: bucket bound {le!r}") from None
                ns.les.append(le)
                ns.les.sort(key=float)
            ns.reorder = True
        return histogram, slot


def _plan_reads(file: _File, holders: list[int]) -> None:
    """How a scrape reads ``file``'s values of bgtrace's and adds them to the sums."""
    # In slot order, so that consecutive slots make runs.
    order = sorted(range(len(file.slots)), key=file.slots.__getitem__)
    file.read = _slots_getter([file.indexes[i] for i in order])
    runs: list[tuple[int, int, int, bool]] = []
    first = previous = -2
    start = 0
    for position, slot in enumerate([*(file.slots[i] for i in order), -2]):
        if slot != previous + 1:
            if previous >= 0:
                alone = all(holders[s] == 1 for s in range(first, previous + 1))
                runs.append((first, previous + 1, start, alone))
            first, start = slot, position
        previous = slot
    file.runs = runs


def _family(metric_name: str) -> Family | None:
    for family in ALL_FAMILIES:
        if metric_name == family.name or metric_name.endswith("_" + family.name):
            return family
    return None


def _histograms(ns: _Namespace) -> Iterator[_Histogram]:
    for series in ns.series.values():
        yield series.queue_wait
        yield series.duration
    yield from ns.post_response.values()


def _reorder(ns: _Namespace) -> None:
    """Each histogram's bucket slots in the order of the namespace's bounds."""
    les = [*ns.les, _INF]
    for histogram in _histograms(ns):
        histogram.order = _slots_getter([histogram.buckets.get(le, _ZERO) for le in les])
    ns.reorder = False


def _fill(histogram: _Histogram, sums: list[float]) -> LocalHistogram:
    values = histogram.values
    # Counts are whole numbers held as floats: rendered with %d, they print as integers.
    values.counts = histogram.order(sums)  # type: ignore[assignment]
    values.sum = sums[histogram.sum]
    return values


def _values(ns: _Namespace, sums: list[float]) -> LocalValues | None:
    """One namespace's sums as the structures one process renders, or ``None`` when no file
    holds any of it any more."""
    series = []
    for one in ns.series.values():
        if not one.files:
            continue
        values = one.values
        scalars = one.scalars
        if scalars is None:
            slots = [one.enqueued, one.queue_length, one.in_progress, *one.completed.values()]
            scalars = one.scalars = _slots_getter(slots)
        read = scalars(sums)
        values.enqueued = int(read[0])
        values.queue_length = int(read[1])
        values.in_progress = int(read[2])
        values.completed = dict(zip(one.completed, map(int, read[3:]), strict=True))
        # A failure or drop exists in a file once counted: a zero is a dead worker's file gone.
        if one.failures:
            values.failures = {k: n for k, slot in one.failures.items() if (n := int(sums[slot]))}
        if one.drops:
            values.drops = {k: n for k, slot in one.drops.items() if (n := int(sums[slot]))}
        _fill(one.queue_wait, sums)
        _fill(one.duration, sums)
        series.append(values)
    post = {route: _fill(h, sums) for route, h in ns.post_response.items() if h.files}
    if not series and not post:
        return None
    return LocalValues(ns.name, tuple(float(le) for le in ns.les), series, post)


def _accumulate(others: dict[str, Any]) -> list[Any]:
    """prometheus_client's own summing of other metrics' samples (per gauge mode, buckets
    made cumulative): private, in every release bgtrace supports, so looked up here; were it
    gone, the directory is read with ``MultiProcessCollector`` from then on."""
    accumulate = getattr(MultiProcessCollector, "_accumulate_metrics", None)
    if not callable(accumulate):
        raise Unfit("prometheus_client's MultiProcessCollector._accumulate_metrics is not there")
    return list(accumulate(others, True))


def _add_others(others: dict[str, Any], entries: list[_Other], doubles: Any) -> None:
    """Other metrics' samples, made as ``MultiProcessCollector`` makes them from a file."""
    for metric_name, name, labels_key, help_text, typ, mode, pid, index in entries:
        metric: Any = others.get(metric_name)
        if metric is None:
            metric = others[metric_name] = Metric(metric_name, help_text, typ)
        value = doubles[index]
        # Sorted label tuples, not dicts: prometheus_client's summing expects them so.
        if typ == "gauge":
            metric._multiprocess_mode = mode
            metric.add_sample(name, (*labels_key, ("pid", pid)), value, doubles[index + 1])
        else:
            metric.add_sample(name, labels_key, value)


# --- the scrape ----------------------------------------------------------------------------

_reader: WorkerFiles | None = None
_reader_lock = threading.Lock()
# Directories holding something the reader does not add up: files only grow, so for good.
_unfit: set[str] = set()
# The process whose reader has checked its sums against MultiProcessCollector's (once per
# process: that read takes seconds with thousands of series), and the checks left to try
# while the files keep changing under every comparison.
_checked_pid = 0
_checks_left = 5
# Differences named in the one warning; the rest are counted.
_SHOWN_DIFFERENCES = 3
# Series per namespace compared by the check (a change of meaning shows in every series).
_CHECKED_SERIES = 200


def render_directory(directory: str, encoder: Callable[[Any], bytes], openmetrics: bool) -> bytes:
    """Every worker's metrics in ``directory``, in the encoder's format."""
    if not os.path.isdir(directory):
        # As prometheus_client's collector refuses it: a scrape of nothing would look fine.
        raise ValueError("env PROMETHEUS_MULTIPROC_DIR is not set or not a directory")
    read = _read(directory, openmetrics)
    if read is None:
        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=directory)  # type: ignore[no-untyped-call]
        return encoder(registry)
    pieces, merged = read
    return join_encoded(encoder(_Collected(merged)), pieces, openmetrics)


def _read(directory: str, openmetrics: bool) -> tuple[list[bytes], list[Any]] | None:
    """bgtrace's families rendered, and the other metrics; ``None``: read it the slow way."""
    global _reader
    # One scrape at a time: the reader's values are rendered in place.
    with _reader_lock:
        if directory in _unfit:
            return None
        try:
            if _reader is None or _reader.directory != directory:
                _reader = WorkerFiles(directory)
            own, merged = _reader.collect()
            if _checked_pid != os.getpid():
                own, merged = _self_check(_reader, own, merged)
            return [piece for values in own for piece in render(values, openmetrics)], merged
        except Unfit as unfit:
            logs.logger.warning(
                "bgtrace: /metrics adds up %s with prometheus_client's MultiProcessCollector "
                "from now on, which takes seconds with thousands of series: %s",
                directory,
                unfit,
            )
            _unfit.add(directory)
        except Exception:
            # Never a wrong sum: start over at the next scrape, this one the slow way.
            logs.internal_error("multiprocess read")
        _reader = None
        return None


def _self_check(
    reader: WorkerFiles, own: list[LocalValues], merged: list[Any]
) -> tuple[list[LocalValues], list[Any]]:
    """Compare the reader's sums of bgtrace's counters and histograms with
    ``MultiProcessCollector``'s on the same files; raise ``Unfit`` on a difference.

    The reader relies on prometheus_client's file layout and on what its values mean (bucket
    values not cumulative, say): a release that changed either, keeping the files readable,
    would otherwise give wrong sums without a word. Such a change shows in every series, so
    the first ``_CHECKED_SERIES`` of each namespace are compared (and every post-response
    histogram): the collector's read of the whole directory is the cost, once per process.
    The files change while they are read: the reader reads them again after the collector,
    and only values that did not move around the collector's read are compared (counters and
    histograms only grow, so an unmoved value is the one the collector saw). Gauges go up and
    down, and are left out. Returns the second reading, the newer one.
    """
    global _checked_pid, _checks_left
    chosen = {
        (values.namespace, one.labels)
        for values in own
        for one in list(values.series)[:_CHECKED_SERIES]
    }
    before, names = _bgtrace_samples(own, chosen)
    if not before:
        return own, merged  # nothing of bgtrace's in the files yet: checked when there is
    collector = MultiProcessCollector(None, path=reader.directory)  # type: ignore[no-untyped-call]
    theirs = {}
    for metric in collector.collect():  # type: ignore[no-untyped-call]
        if metric.name not in names:
            continue
        for sample in metric.samples:
            labels = sample.labels
            triple = (labels.get("task"), labels.get("origin"), labels.get("route"))
            if "task" in labels and triple not in names[metric.name]:
                continue
            theirs[(sample.name, tuple(sorted(labels.items())))] = sample.value
    own, merged = reader.collect()
    after, _ = _bgtrace_samples(own, chosen)
    differences = []
    compared = 0
    for key in before.keys() | theirs.keys():
        ours = before.get(key, 0.0)
        if ours != after.get(key, 0.0):
            continue  # moved while the collector read: no telling what it saw
        compared += 1
        other = theirs.get(key, 0.0)
        if not math.isclose(ours, other, rel_tol=1e-9, abs_tol=1e-9):
            differences.append((key, ours, other))
    if differences:
        shown = "; ".join(
            f"{name}{{{','.join(f'{k}={v!r}' for k, v in labels)}}}: bgtrace {ours!r}, "
            f"prometheus_client {other!r}"
            for (name, labels), ours, other in sorted(differences)[:_SHOWN_DIFFERENCES]
        )
        more = len(differences) - _SHOWN_DIFFERENCES
        raise Unfit(
            "its sums differ from MultiProcessCollector's on the same files (a prometheus_client"
            f" release that changed its files?): {shown}"
            + (f" (and {more} more)" if more > 0 else "")
        )
    _checks_left -= 1
    if compared or _checks_left <= 0:
        _checked_pid = os.getpid()
    return own, merged


_SampleKey = tuple[str, tuple[tuple[str, str], ...]]


def _bgtrace_samples(
    own: list[LocalValues], chosen: set[tuple[str, tuple[str, str, str]]]
) -> tuple[dict[_SampleKey, float], dict[str, set[tuple[str, str, str]]]]:
    """The samples of bgtrace's counters and histograms as ``/metrics`` gives them, for the
    ``chosen`` series (namespace, labels) and every post-response histogram; and per family
    name, the label sets of the series taken."""
    found: dict[_SampleKey, float] = {}
    names: dict[str, set[tuple[str, str, str]]] = {}
    for values in own:
        series = [one for one in values.series if (values.namespace, one.labels) in chosen]
        subset = LocalValues(values.namespace, values.bounds, series, values.post_response)
        for metric in collect(subset):
            if metric.type == "gauge":
                continue
            names[metric.name] = {one.labels for one in series}
            for sample in metric.samples:
                if sample.name.endswith("_created"):
                    continue
                found[(sample.name, tuple(sorted(sample.labels.items())))] = float(sample.value)
    return found, names


class _Collected:
    """Metrics already collected, in the shape an encoder reads a registry."""

    def __init__(self, metrics: list[Any]) -> None:
        self._metrics = metrics

    def collect(self) -> Iterator[Any]:
        return iter(self._metrics)


def _forget_after_fork() -> None:
    # The lock may have been held by a scraping thread that the child does not have.
    global _reader, _reader_lock, _checks_left
    _reader = None
    _reader_lock = threading.Lock()
    _checks_left = 5  # and the child checks its reader once more (_checked_pid is not its pid)


os.register_at_fork(after_in_child=_forget_after_fork)
