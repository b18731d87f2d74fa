"""Calls an ASGI app directly, no sockets: the app's own CPU cost per request.

One asyncio loop runs everything. Variants are interleaved batch by batch in a shuffled order
each round, so slow drift of the machine (frequency, a noisy neighbour) lands on every variant
alike and cancels in the per-round ratio to the bare app.
"""

from __future__ import annotations

import asyncio
import gc
import random
import statistics
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from variants import PATH, QUERY, Variant, switch_off, switch_to, tasks_run

SCOPE: dict[str, Any] = {
    "type": "http",
    "asgi": {"version": "3.0", "spec_version": "2.4"},
    "http_version": "1.1",
    "method": "POST",
    "scheme": "http",
    "path": PATH,
    "raw_path": PATH.encode(),
    "root_path": "",
    "query_string": QUERY,
    "headers": [
        (b"host", b"127.0.0.1:8000"),
        (b"user-agent", b"bgtrace-bench"),
        (b"accept", b"*/*"),
        (b"content-length", b"0"),
    ],
    "client": ("127.0.0.1", 50000),
    "server": ("127.0.0.1", 8000),
}
_REQUEST = {"type": "http.request", "body": b"", "more_body": False}


async def _receive() -> dict[str, Any]:
    return _REQUEST


async def _discard(message: dict[str, Any]) -> None:
    return None


async def run_requests(app: Any, count: int) -> None:
    for n in range(count):
        # The app mutates its scope (route, path_params): a fresh shallow copy per request.
        await app(dict(SCOPE), _receive, _discard)
        if n % 10 == 9:
            # Back to the event loop now and then, as a server's socket reads go back to it
            # at every request: else a batch holds the loop for its whole length, and
            # bgtrace's watchdog (rightly) samples it as blocked.
            await asyncio.sleep(0)


async def check(variant: Variant, count: int) -> dict[str, float]:
    """Run ``count`` requests that must all answer 200 and run both tasks; per-request counts."""
    statuses: list[int] = []

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            statuses.append(message["status"])

    switch_to(variant)
    spans_before = variant.spans_exported()
    ran_before = next(tasks_run)
    for _ in range(count):
        await variant.app(dict(SCOPE), _receive, send)
    tasks = next(tasks_run) - ran_before - 1
    if statuses != [200] * count or tasks != 2 * count:
        raise RuntimeError(
            f"{variant.name}/{variant.shape}: statuses {set(statuses)}, {tasks} tasks"
        )
    return {"spans": (variant.spans_exported() - spans_before) / count, "tasks": tasks / count}


async def start_lifespan(app: Any) -> Callable[[], Awaitable[None]]:
    """Run the app's lifespan startup (which also builds its middleware stack); return a
    coroutine function that shuts it down."""
    inbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    started = asyncio.Event()

    async def receive() -> dict[str, Any]:
        return await inbox.get()

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "lifespan.startup.failed":
            raise RuntimeError(message.get("message", "lifespan startup failed"))
        if message["type"] == "lifespan.startup.complete":
            started.set()

    scope = {"type": "lifespan", "asgi": {"version": "3.0", "spec_version": "2.0"}, "state": {}}
    runner = asyncio.ensure_future(app(scope, receive, send))
    inbox.put_nowait({"type": "lifespan.startup"})
    await asyncio.wait_for(started.wait(), 10)

    async def stop() -> None:
        inbox.put_nowait({"type": "lifespan.shutdown"})
        await asyncio.wait_for(runner, 10)

    return stop


@dataclass
class Batches:
    """Per-request CPU and wall microseconds of every batch, by (shape, variant), in rounds."""

    cpu: dict[tuple[str, str], list[float]] = field(default_factory=dict)
    wall: dict[tuple[str, str], list[float]] = field(default_factory=dict)
    checks: dict[tuple[str, str], dict[str, float]] = field(default_factory=dict)


async def time_batch(variant: Variant, count: int, warmup: int) -> tuple[float, float]:
    switch_to(variant)
    await run_requests(variant.app, warmup)
    gc.collect()
    cpu0, wall0 = time.process_time(), time.perf_counter()
    await run_requests(variant.app, count)
    if variant.provider is not None:
        # Export the batch's spans now, so that their cost lands on this variant's batch.
        variant.provider.force_flush()
    cpu1, wall1 = time.process_time(), time.perf_counter()
    return (cpu1 - cpu0) / count * 1e6, (wall1 - wall0) / count * 1e6


async def interleave(
    variants: Sequence[Variant], rounds: int, batch: int, warmup: int, seed: int = 4
) -> Batches:
    result = Batches()
    stops = [await start_lifespan(v.app) for v in variants]
    for variant in variants:
        result.checks[variant.shape, variant.name] = await check(variant, 20)
        # Warm every variant once before round one so no round pays a first-call cost.
        await time_batch(variant, batch, warmup)
    order = list(variants)
    rng = random.Random(seed)
    for _ in range(rounds):
        rng.shuffle(order)
        for variant in order:
            cpu, wall = await time_batch(variant, batch, warmup)
            result.cpu.setdefault((variant.shape, variant.name), []).append(cpu)
            result.wall.setdefault((variant.shape, variant.name), []).append(wall)
    for stop in stops:
        await stop()
    switch_off()
    return result


@dataclass
class Row:
    shape: str
    name: str
    cpu_us: float
    wall_us: float
    added_us: float
    ratio: float
    ratio_p25: float
    ratio_p75: float
    spans: float


def quartiles(values: Sequence[float]) -> tuple[float, float, float]:
    if len(values) < 2:
        return values[0], values[0], values[0]
    q1, q2, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, q2, q3


def summarise(batches: Batches, shape: str, names: Sequence[str]) -> list[Row]:
    bare = batches.cpu[shape, "bare"]
    rows = []
    for name in names:
        cpu = batches.cpu.get((shape, name))
        if cpu is None:
            continue
        ratios = [v / b for v, b in zip(cpu, bare, strict=True)]
        added = [v - b for v, b in zip(cpu, bare, strict=True)]
        p25, ratio, p75 = quartiles(ratios)
        rows.append(
            Row(
                shape,
                name,
                statistics.median(cpu),
                statistics.median(batches.wall[shape, name]),
                statistics.median(added),
                ratio,
                p25,
                p75,
                batches.checks[shape, name]["spans"],
            )
        )
    return rows


def run(variants: Sequence[Variant], rounds: int, batch: int, warmup: int) -> Batches:
    return asyncio.run(interleave(variants, rounds, batch, warmup))
