"""A small keep-alive HTTP/1.1 load generator, for machines without wrk.

Run as its own process (``python loadgen.py HOST PORT PATH SECONDS CONNECTIONS``) so that it
does not share a GIL with the server; prints one JSON line with the same fields as the wrk
parser: rps, p50_ms, p90_ms, p99_ms, p999_ms, requests, errors.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import sys
import time


async def _connection(
    host: str, port: int, request: bytes, deadline: float, latencies: list[float]
) -> int:
    errors = 0
    reader, writer = await asyncio.open_connection(host, port)
    try:
        while time.perf_counter() < deadline:
            start = time.perf_counter()
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            status = int(head.split(b" ", 2)[1])
            length = 0
            for line in head.split(b"\r\n"):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":", 1)[1])
            await reader.readexactly(length)
            latencies.append(time.perf_counter() - start)
            errors += status >= 400
    finally:
        writer.close()
    return errors


async def load(
    host: str, port: int, path: str, seconds: float, connections: int
) -> dict[str, float]:
    request = (f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Length: 0\r\n\r\n").encode()
    latencies: list[float] = []
    start = time.perf_counter()
    deadline = start + seconds
    errors = await asyncio.gather(
        *(_connection(host, port, request, deadline, latencies) for _ in range(connections))
    )
    elapsed = time.perf_counter() - start
    cuts = statistics.quantiles(latencies, n=1000)
    return {
        "rps": len(latencies) / elapsed,
        "p50_ms": cuts[499] * 1e3,
        "p90_ms": cuts[899] * 1e3,
        "p99_ms": cuts[989] * 1e3,
        "p999_ms": cuts[998] * 1e3,
        "requests": len(latencies),
        "errors": sum(errors),
    }


def main() -> None:
    host, port, path, seconds, connections = sys.argv[1:6]
    result = asyncio.run(load(host, int(port), path, float(seconds), int(connections)))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
