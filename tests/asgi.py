"""Call an ASGI app directly, as a server would: raw bytes, no HTTP client in between."""

from __future__ import annotations

from typing import Any

from starlette.types import ASGIApp


async def call(
    app: ASGIApp,
    path: str | bytes,
    *,
    method: str = "POST",
    headers: list[tuple[bytes, bytes]] | None = None,
    body: bytes = b"",
    root_path: str = "",
    extensions: dict[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """Send one HTTP request through ``app``; return the messages it sent."""
    raw_path = path if isinstance(path, bytes) else path.encode()
    sent: list[dict[str, Any]] = []
    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method,
        "scheme": "http", "path": raw_path.decode("latin-1"), "raw_path": raw_path,
        "root_path": root_path, "query_string": b"", "extensions": extensions or {},
        "headers": [(b"host", b"test"), *(headers or [])],
        "server": ("test", 80), "client": ("127.0.0.1", 1),
    }  # fmt: skip

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await app(scope, receive, send)
    return sent


def status(sent: list[dict[str, Any]]) -> int:
    return int(next(m["status"] for m in sent if m["type"] == "http.response.start"))
