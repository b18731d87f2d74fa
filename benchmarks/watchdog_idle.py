"""The event-loop watchdog's cost: a uvicorn server's own CPU with the watchdog on (bgtrace's
default) and off, runs alternating. At idle: one request starts each server (and so its
watchdog), then nothing, while the process's CPU time is read from ``/proc`` at both ends of
the window. Under load: section 2's measurement (wrk, server CPU per request).
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import live_server
from live_server import _cpu_seconds, _free_port, _start, _stop, _wait_ready

VARIANTS = ("bgtrace", "bgtrace-no-watchdog")


def idle_cpu(rounds: int, seconds: float) -> dict[str, Any]:
    """Per variant: median and each run's CPU share of one core at idle, in percent."""
    runs: dict[str, list[float]] = {name: [] for name in VARIANTS}
    for _ in range(rounds):
        for name in VARIANTS:
            port = _free_port()
            server = _start(name, port)
            try:
                _wait_ready(port, server)
                time.sleep(1.0)  # start-up work done, the watchdog at its pace
                before = _cpu_seconds(server.pid)
                time.sleep(seconds)
                after = _cpu_seconds(server.pid)
            finally:
                _stop(server)
            if before is not None and after is not None:
                runs[name].append(100 * (after - before) / seconds)
    return {
        name: {"median_pct": statistics.median(values) if values else None, "runs": values}
        for name, values in runs.items()
    }


def server_cpu_per_request(
    rounds: int, seconds: float, warmup: float, connections: int
) -> dict[str, float | None]:
    """Per variant (bare too): the median server CPU per request, in microseconds."""
    runs = live_server.measure(["bare", *VARIANTS], rounds, seconds, warmup, connections)
    found: dict[str, float | None] = {}
    for name in ("bare", *VARIANTS):
        values = [r.server_cpu_us for r in runs if r.variant == name and r.server_cpu_us]
        found[name] = statistics.median(values) if values else None
    return found
