"""A short, concurrent burst of requests against the example app, with a progress bar."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import random
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TextIO

import httpx

from .app import MAX_IMPORT_ROWS

# Out of every six requests: three signups, two receipts, one import.
MIX = ("signup", "signup", "signup", "receipt", "receipt", "import")
# About one import in three is too large, so its queued task is dropped.
OVERSIZED_IMPORT_SHARE = 1 / 3
# Tries per request when the connection breaks (see ``drive``).
ATTEMPTS = 3


def request_paths(seed: int = 0) -> Iterator[str]:
    """Endless POST paths in a fixed mix; ids and import sizes from a seeded RNG."""
    rng = random.Random(seed)
    for n in itertools.count(1):
        kind = MIX[(n - 1) % len(MIX)]
        if kind == "signup":
            yield f"/signup/{rng.randrange(1, 1_000_000)}"
        elif kind == "receipt":
            yield f"/orders/{rng.randrange(1, 1_000_000)}/receipt"
        else:
            oversized = rng.random() < OVERSIZED_IMPORT_SHARE
            rows = rng.randrange(MAX_IMPORT_ROWS + 1, 5 * MAX_IMPORT_ROWS) if oversized else 200
            yield f"/import?rows={rows}"


class ProgressBar:
    """``[#####.....]  42%  123 requests`` rewritten in place with a carriage return."""

    def __init__(self, stream: TextIO, width: int = 30) -> None:
        self.stream = stream
        self.width = width

    def show(self, fraction: float, requests: int) -> None:
        fraction = min(max(fraction, 0.0), 1.0)
        filled = round(fraction * self.width)
        bar = "#" * filled + "." * (self.width - filled)
        self.stream.write(f"\r[{bar}] {fraction:4.0%}  {requests} requests")
        self.stream.flush()

    def done(self, requests: int) -> None:
        self.show(1.0, requests)
        self.stream.write("\n")
        self.stream.flush()


@dataclass
class Sent:
    """What a burst sent: responses by status code, and how often a request was re-sent."""

    statuses: Counter[int] = field(default_factory=Counter)
    resent: int = 0

    def total(self) -> int:
        return self.statuses.total()


async def drive(
    base_url: str,
    duration: float,
    *,
    concurrency: int = 8,
    seed: int = 0,
    progress: ProgressBar | None = None,
) -> Sent:
    """POST the mix to ``base_url`` from ``concurrency`` clients for ``duration`` seconds.

    Status 0 counts requests that got no response, even when sent again.
    """
    paths = request_paths(seed)
    sent = Sent()
    started = time.monotonic()
    deadline = started + duration

    async def post(client: httpx.AsyncClient, path: str) -> None:
        for attempt in range(1, ATTEMPTS + 1):
            try:
                response = await client.post(path)
            except httpx.TransportError:
                # uvicorn closes a keep-alive connection when a background task raises, and
                # the request in flight on it gets no answer (though it may have run). A
                # client would retry; so does the demo.
                if attempt < ATTEMPTS:
                    sent.resent += 1
                    continue
                sent.statuses[0] += 1
                await asyncio.sleep(0.1)  # the app is down or restarting: do not spin
                return
            sent.statuses[response.status_code] += 1
            return

    async def client_loop(client: httpx.AsyncClient) -> None:
        while time.monotonic() < deadline:
            await post(client, next(paths))

    async def report() -> None:
        assert progress is not None
        while True:
            progress.show((time.monotonic() - started) / duration, sent.total())
            await asyncio.sleep(0.1)

    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(base_url=base_url, timeout=10, limits=limits) as client:
        reporter = asyncio.create_task(report()) if progress is not None else None
        try:
            await asyncio.gather(*(client_loop(client) for _ in range(concurrency)))
        finally:
            if reporter is not None:
                reporter.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await reporter
    if progress is not None:
        progress.done(sent.total())
    return sent
