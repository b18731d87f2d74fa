"""The incoming trace of a request, read through the configured global propagator.

W3C trace context is only the default: behind Istio, Envoy or Zipkin the trace arrives in B3
headers, from Jaeger clients in ``uber-trace-id``, and ``OTEL_PROPAGATORS`` (or
``propagate.set_global_textmap``) says which. bgtrace extracts through whatever is configured,
with a getter over all of the request's headers, as opentelemetry-instrumentation-asgi does.
"""

from __future__ import annotations

from collections.abc import Sequence

from opentelemetry import propagate
from opentelemetry.context import Context
from opentelemetry.propagators.textmap import Getter, TextMapPropagator

Headers = Sequence[tuple[bytes, bytes]]

# The headers each well-known propagator reads when extracting. A propagator's ``fields`` is
# not that list: it names what ``inject`` writes (B3's multi-header format also reads ``b3``
# and ``x-b3-flags``), so it cannot tell that a request carries nothing to extract.
_EXTRACTED = {
    ("opentelemetry.trace.propagation.tracecontext", "TraceContextTextMapPropagator"): (
        b"traceparent",
        b"tracestate",
    ),
    ("opentelemetry.baggage.propagation", "W3CBaggagePropagator"): (b"baggage",),
    ("opentelemetry.propagators.b3", "B3MultiFormat"): (
        b"b3",
        b"x-b3-traceid",
        b"x-b3-spanid",
        b"x-b3-sampled",
        b"x-b3-flags",
    ),
    # Its uberctx-* baggage headers are read only along with uber-trace-id.
    ("opentelemetry.propagators.jaeger", "JaegerPropagator"): (b"uber-trace-id",),
}
_COMPOSITE = ("opentelemetry.propagators.composite", "CompositePropagator")


def _extracted_headers(propagator: object) -> frozenset[bytes] | None:
    """Every header ``propagator`` may read, or ``None`` when bgtrace cannot tell."""
    names: set[bytes] = set()
    for cls in type(propagator).__mro__:
        key = (cls.__module__, cls.__qualname__)
        if key == _COMPOSITE:
            # Its children are private; without them, extract on every request.
            children = getattr(propagator, "_propagators", None)
            if not isinstance(children, list | tuple):
                return None
            for child in children:
                found = _extracted_headers(child)
                if found is None:
                    return None
                names |= found
            return frozenset(names)
        if key in _EXTRACTED:
            return frozenset(_EXTRACTED[key])
    return None


# (the global propagator, the headers it reads): recomputed when the global one is replaced.
_known: tuple[object, frozenset[bytes] | None] = (None, None)


def incoming_context(headers: Headers, context: Context) -> Context:
    """``context`` with what the request's headers carry (remote parent, baggage) added.

    A request without any header the propagator reads costs one pass over its header names:
    no carrier is built and the propagator is not called.
    """
    global _known
    propagator: TextMapPropagator = propagate.get_global_textmap()
    known, names = _known
    if known is not propagator:
        names = _extracted_headers(propagator)
        _known = (propagator, names)
    if names is not None:
        for key, _ in headers:
            if key in names:
                break
        else:
            return context
    return propagator.extract(headers, context=context, getter=header_getter)


class _HeaderGetter(Getter[Headers]):
    """Reads a request's raw ASGI headers (ASGI servers send their names lowercased)."""

    def get(self, carrier: Headers, key: str) -> list[str] | None:
        wanted = key.lower().encode("latin-1", "replace")
        values = [value.decode("latin-1") for name, value in carrier if name.lower() == wanted]
        if not values:
            return None
        if wanted == b"baggage" and len(values) > 1:
            # HTTP allows a list header to be split; the W3C propagator reads the first only.
            return [",".join(values)]
        return values

    def keys(self, carrier: Headers) -> list[str]:
        return [name.decode("latin-1") for name, _ in carrier]


header_getter = _HeaderGetter()
