"""Resident memory after 10k and after 100k requests with tasks: it must stay flat.

Runs in a child process per variant (``bench.py --child memory``) so that each starts clean.
"""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Sequence
from typing import Any

from asgi_driver import run_requests, start_lifespan
from rss import rss_bytes
from variants import build, switch_to

MIB = 1024 * 1024


async def _measure(name: str, shape: str, checkpoints: Sequence[int]) -> dict[str, Any]:
    variant = build(name, shape)
    if variant is None:
        raise SystemExit(f"{name} is not available")
    stop = await start_lifespan(variant.app)
    switch_to(variant)
    done = 0
    points = []
    for target in checkpoints:
        await run_requests(variant.app, target - done)
        done = target
        if variant.provider is not None:
            variant.provider.force_flush()  # spans waiting for export are not a leak
        gc.collect()
        points.append(
            {"requests": done, "rss_mib": rss_bytes() / MIB, "objects": len(gc.get_objects())}
        )
    await stop()
    variant.close()
    return {"variant": name, "shape": shape, "points": points}


def measure(name: str, shape: str, checkpoints: Sequence[int]) -> dict[str, Any]:
    return asyncio.run(_measure(name, shape, checkpoints))
