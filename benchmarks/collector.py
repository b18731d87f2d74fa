"""The cyclic garbage collector's pauses in a benchmark server, by generation.

A full collection walks every object of the process (a FastAPI app: some 60,000): tens of
milliseconds during which no request moves. Those pauses, not the mean cost per request, make
the latency tail. The server counts them from ``BENCH_GC_STATS``: reset at SIGUSR1 (the start
of the measured load), written to that path as JSON at exit.
"""

from __future__ import annotations

import gc
import json
import os
import signal
import time
from typing import Any

_started = 0.0
# generation -> [collections, total seconds, longest seconds]
_stats: dict[int, list[float]] = {}


def _reset(*_: Any) -> None:
    for generation in range(3):
        _stats[generation] = [0, 0.0, 0.0]


def _callback(phase: str, info: dict[str, Any]) -> None:
    global _started
    if phase == "start":
        _started = time.perf_counter()
        return
    took = time.perf_counter() - _started
    found = _stats[info["generation"]]
    found[0] += 1
    found[1] += took
    found[2] = max(found[2], took)


def _write(path: str) -> None:
    # Whole or not at all: the reader polls for the file.
    with open(path + ".part", "w") as out:
        json.dump({str(g): s for g, s in _stats.items()}, out)
    os.replace(path + ".part", path)


def watch_from_env() -> None:
    """Count the collector's pauses when ``BENCH_GC_STATS`` names a file for them."""
    path = os.environ.get("BENCH_GC_STATS")
    if not path:
        return
    _reset()
    gc.callbacks.append(_callback)
    signal.signal(signal.SIGUSR1, _reset)
    signal.signal(signal.SIGUSR2, lambda *_: _write(path))


def read(pid: int, path: str, timeout: float = 5.0) -> dict[str, float] | None:
    """Full collections, all pauses' total and the longest pause (ms), of the server ``pid``
    since its SIGUSR1; ``None`` if it does not write them in time."""
    os.kill(pid, signal.SIGUSR2)
    deadline = time.monotonic() + timeout
    while True:
        try:
            with open(path) as found:
                stats = json.load(found)
            break
        except (OSError, ValueError):
            if time.monotonic() > deadline:
                return None
            time.sleep(0.05)
    return {
        "collections": sum(s[0] for s in stats.values()),
        "full_collections": stats["2"][0],
        "pause_ms": sum(s[1] for s in stats.values()) * 1e3,
        "longest_ms": max(s[2] for s in stats.values()) * 1e3,
    }
