"""The ``/metrics`` endpoint: a small ASGI app over prometheus_client's encoders."""

from __future__ import annotations

import gzip
import hmac
import os
from collections.abc import Callable
from typing import Any

from prometheus_client import REGISTRY, CollectorRegistry
from prometheus_client.exposition import choose_encoder
from starlette.types import Receive, Scope, Send

from . import logs
from .metrics import render_registry
from .multiprocess import flush_all, multiprocess_dir, multiprocess_mode
from .rendering import rendered
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


def authorized(scope: Scope, secret: bytes) -> bool:
    """Whether the request bears ``Authorization: Bearer <secret>``."""
    given = b""
    for key, value in scope.get("headers", ()):
        if key.lower() == b"authorization":
            given = bytes(value)
            break
    # RFC 7235: the scheme is case-insensitive (``bearer x`` is valid), then one or more spaces.
    scheme, _, credentials = given.partition(b" ")
    # The token in constant time, so response timing does not reveal how much of a guess
    # was right.
    matches = hmac.compare_digest(credentials.lstrip(b" "), secret)
    return matches and scheme.lower() == b"bearer"


def _render(
    registry: CollectorRegistry, encoder: Callable[[Any], bytes], openmetrics: bool, zipped: bool
) -> bytes:
    """The page (compressed when ``zipped``); runs in bgtrace's render thread."""
    if multiprocess_mode():
        # Every worker writes its own files, read at each scrape. This worker's are brought
        # up to date first (the others' are at most a second old).
        flush_all()
        body = render_directory(multiprocess_dir(), encoder, openmetrics)
    else:
        body = render_registry(registry, encoder, openmetrics)
    return gzip.compress(body, compresslevel=GZIP_LEVEL) if zipped else body


class MetricsApp:
    """The ``/metrics`` ASGI app (see ``metrics_app``).

    An instance, not a function, so that Starlette's ``Route`` (``app.add_route``) takes it
    for an ASGI app: it wraps a plain function endpoint as ``request -> response``.
    """

    __slots__ = ("registry", "secret")

    def __init__(self, registry: CollectorRegistry, secret: bytes | None) -> None:
        self.registry = registry
        self.secret = secret

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        if self.secret is not None and not authorized(scope, self.secret):
            challenge = [(b"www-authenticate", b'Bearer realm="metrics"')]
            await _respond(send, 401, b"Unauthorized\n", "text/plain", challenge, head=False)
            return
        if scope.get("method") not in ("GET", "HEAD"):
            allow = [(b"allow", b"GET, HEAD")]
            await _respond(send, 405, b"Method Not Allowed\n", "text/plain", allow, head=False)
            return
        zipped = "gzip" in _header(scope, b"accept-encoding").lower()
        try:
            encoder, content_type = choose_encoder(_header(scope, b"accept"))
            openmetrics = content_type.startswith("application/openmetrics-text")
            registry = self.registry
            # Rendering and compressing many series takes a while (a second for thousands):
            # in bgtrace's own thread, shared with concurrent scrapes of the same page (see
            # rendering), while the event loop serves the app.
            body = await rendered(
                (registry, content_type, zipped),
                lambda: _render(registry, encoder, openmetrics, zipped),
            )
        except Exception:
            logs.internal_error("metrics exposition")
            await _respond(send, 500, b"metrics collection failed\n", "text/plain", [], head=False)
            return
        extra: list[tuple[bytes, bytes]] = []
        if zipped:
            extra.append((b"content-encoding", b"gzip"))
        extra.append((b"vary", b"Accept, Accept-Encoding"))
        await _respond(send, 200, body, content_type, extra, head=scope["method"] == "HEAD")


def metrics_app(
    registry: CollectorRegistry | None = None, *, token: str | None = None
) -> MetricsApp:
    """An ASGI app serving ``registry`` (default: prometheus_client's) for Prometheus.

    GET and HEAD; OpenMetrics when the scraper asks for it; gzip when accepted. With
    ``PROMETHEUS_MULTIPROC_DIR`` set it serves the sum of every worker process instead.
    With ``token`` (default: the ``BGTRACE_METRICS_TOKEN`` environment variable, when set and
    not empty) a scrape must send ``Authorization: Bearer <token>`` (scheme in any case);
    anything else gets 401. Serve it with ``app.add_route("/metrics", metrics_app())``, or
    as a ``Route`` or ``Mount`` of its own.
    """
    source = REGISTRY if registry is None else registry
    return MetricsApp(source, token_secret(token))


def token_secret(token: str | None) -> bytes | None:
    """The token a request must bear (``token``, else ``BGTRACE_METRICS_TOKEN`` when set and
    not empty), or ``None`` when none is asked for: ``/metrics`` and the live page alike."""
    secret = token if token is not None else os.environ.get(TOKEN_ENV, "")
    return secret.encode() if secret else None


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
