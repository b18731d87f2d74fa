"""The ``/metrics`` endpoint: a small ASGI app over prometheus_client's encoders."""

from __future__ import annotations

import gzip
import hmac
import os

import anyio.to_thread
from prometheus_client import REGISTRY, CollectorRegistry
from prometheus_client.exposition import choose_encoder
from starlette.types import ASGIApp, Receive, Scope, Send

from . import logs
from .metrics import render_registry
from .multiprocess import flush_all, multiprocess_dir, multiprocess_mode
from .worker_files import render_directory

TOKEN_ENV = "BGTRACE_METRICS_TOKEN"
# Metric text repeats itself: level 1 still shrinks it about 40 times, in half the time of 6
# (3,000 series, 22 MB: about 35 ms and 0.6 MB against 72 ms and 0.5 MB).
GZIP_LEVEL = 1


def _header(scope: Scope, name: bytes) -> str:
    for key, value in scope.get("headers", ()):
        if key.lower() == name:
            return bytes(value).decode("latin-1")
    return ""


def _authorized(scope: Scope, expected: bytes) -> bool:
    given = b""
    for key, value in scope.get("headers", ()):
        if key.lower() == b"authorization":
            given = bytes(value)
            break
    # Constant time, so response timing does not reveal how much of a guess was right.
    return hmac.compare_digest(given, expected)


def _render(registry: CollectorRegistry, accept: str) -> tuple[bytes, str]:
    encoder, content_type = choose_encoder(accept)
    openmetrics = content_type.startswith("application/openmetrics-text")
    if multiprocess_mode():
        # Every worker writes its own files, read at each scrape. This worker's are brought
        # up to date first (the others' are at most a second old).
        flush_all()
        return render_directory(multiprocess_dir(), encoder, openmetrics), content_type
    return render_registry(registry, encoder, openmetrics), content_type


def metrics_app(registry: CollectorRegistry | None = None, *, token: str | None = None) -> ASGIApp:
    """An ASGI app serving ``registry`` (default: prometheus_client's) for Prometheus.

    GET and HEAD; OpenMetrics when the scraper asks for it; gzip when accepted. With
    ``PROMETHEUS_MULTIPROC_DIR`` set it serves the sum of every worker process instead.
    With ``token`` (default: the ``BGTRACE_METRICS_TOKEN`` environment variable, when set and
    not empty) a scrape must send ``Authorization: Bearer <token>``; anything else gets 401.
    """
    source = REGISTRY if registry is None else registry
    secret = token if token is not None else os.environ.get(TOKEN_ENV, "")
    expected = f"Bearer {secret}".encode() if secret else None

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        if expected is not None and not _authorized(scope, expected):
            challenge = [(b"www-authenticate", b'Bearer realm="metrics"')]
            await _respond(send, 401, b"Unauthorized\n", "text/plain", challenge, head=False)
            return
        if scope.get("method") not in ("GET", "HEAD"):
            allow = [(b"allow", b"GET, HEAD")]
            await _respond(send, 405, b"Method Not Allowed\n", "text/plain", allow, head=False)
            return
        try:
            # Rendering many series takes a while (a second for thousands): in a thread, the
            # event loop keeps serving the app meanwhile.
            body, content_type = await anyio.to_thread.run_sync(
                _render, source, _header(scope, b"accept")
            )
        except Exception:
            logs.internal_error("metrics exposition")
            await _respond(send, 500, b"metrics collection failed\n", "text/plain", [], head=False)
            return
        extra: list[tuple[bytes, bytes]] = []
        if "gzip" in _header(scope, b"accept-encoding").lower():
            body = gzip.compress(body, compresslevel=GZIP_LEVEL)
            extra.append((b"content-encoding", b"gzip"))
        extra.append((b"vary", b"Accept, Accept-Encoding"))
        await _respond(send, 200, body, content_type, extra, head=scope["method"] == "HEAD")

    return app


async def _respond(
    send: Send,
    status: int,
    body: bytes,
    content_type: str,
    extra: list[tuple[bytes, bytes]],
    *,
    head: bool,
) -> None:
    headers = [
        (b"content-type", content_type.encode("latin-1")),
        (b"content-length", str(len(body)).encode("latin-1")),
        *extra,
    ]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": b"" if head else body})
