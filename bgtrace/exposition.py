"""The ``/metrics`` endpoint: a small ASGI app over prometheus_client's encoders."""

from __future__ import annotations

import atexit
import gzip
import hmac
import os
import threading

import anyio.to_thread
from prometheus_client import REGISTRY, CollectorRegistry
from prometheus_client.exposition import choose_encoder
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead
from starlette.types import ASGIApp, Receive, Scope, Send

from . import logs

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
_MULTIPROC_ENVS = (MULTIPROC_ENV, "prometheus_multiproc_dir")  # the old name still counts
TOKEN_ENV = "BGTRACE_METRICS_TOKEN"


_exit_hook_lock = threading.Lock()
_exit_hook_registered = False


def multiprocess_mode() -> bool:
    """Whether prometheus_client writes metrics to per-process files: like prometheus_client
    itself, decided by the variable's presence, even when it is empty."""
    return any(name in os.environ for name in _MULTIPROC_ENVS)


def check_multiprocess_dir() -> None:
    """Say at start-up what prometheus_client would only show as wrong numbers."""
    if not multiprocess_mode():
        return
    path = next((os.environ[name] for name in _MULTIPROC_ENVS if os.environ.get(name)), "")
    if not os.path.isdir(path):
        logs.logger.error(
            "bgtrace: %s is set but %r is not a directory: prometheus_client writes this "
            "process's metrics elsewhere and /metrics cannot add up the workers; point it at "
            "an empty directory that exists before the workers start",
            MULTIPROC_ENV,
            path,
        )


def forget_process_at_exit() -> None:
    """In multiprocess mode, drop this process's live-sum gauges when it exits.

    Counters and histograms of a dead worker stay in the sum (they are totals); its gauges
    would otherwise report tasks queued or running forever.
    """
    global _exit_hook_registered
    if not multiprocess_mode():
        return
    with _exit_hook_lock:
        if not _exit_hook_registered:
            _exit_hook_registered = True
            atexit.register(_forget_process, os.getpid())


def _forget_process(pid: int) -> None:
    if os.getpid() != pid:
        return  # a forked child inherited the hook; it is not the process that registered
    forget_process()


def forget_process() -> None:
    """Remove this process's live-sum gauge files from the multiprocess directory."""
    try:
        mark_process_dead(os.getpid())  # type: ignore[no-untyped-call]
    except Exception:
        logs.internal_error("multiprocess exit")


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
    if multiprocess_mode():
        # Every worker writes its own files; a fresh registry per scrape reads them all.
        registry = CollectorRegistry()
        MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
    encoder, content_type = choose_encoder(accept)
    return encoder(registry), content_type


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
            body = gzip.compress(body, compresslevel=6)
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
