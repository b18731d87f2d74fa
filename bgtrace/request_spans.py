"""The request's ``SERVER`` span: bgtrace opens one only where no HTTP instrumentation does.

An instrumentation further out has its span current when bgtrace runs: easy. One further in
(bgtrace added with ``add_middleware`` after it, so outside it) opens its span only after
bgtrace has decided, and one that excludes a URL opens none at all. So bgtrace looks for
known HTTP instrumentations in the app's middleware stack (once per built stack) and, when
one is there, leaves the request span to it entirely: one trace and one ``SERVER`` span per
request, the instrumentation's, and none for the URLs it excludes.
"""

from __future__ import annotations

from opentelemetry import context as otel_context
from opentelemetry import trace
from starlette.types import Scope

from . import logs
from .config import Config
from .propagation import incoming_context
from .request import RequestState
from .routes import NO_ROUTE
from .spans import ATTR_ROUTE, FASTAPI_TELEMETRY_SCOPE_KEY, http_method

# (module, class) of the ASGI middlewares that open a request's SERVER span themselves.
_HTTP_INSTRUMENTATIONS = frozenset(
    (
        # opentelemetry-instrumentation-asgi, also what FastAPIInstrumentor installs.
        ("opentelemetry.instrumentation.asgi", "OpenTelemetryMiddleware"),
        # Starlette 1.x's own.
        ("starlette.middleware.opentelemetry", "OpenTelemetryMiddleware"),
    )
)
# FastAPIInstrumentor.instrument_app() marks the app before its stack is (re)built.
_OTEL_FASTAPI_MARK = "_is_instrumented_by_opentelemetry"
# Starlette's OpenTelemetryMiddleware sets this scope key while it handles a request, also
# for the URLs it excludes; FastAPI's telemetry sets its own to None for excluded requests.
_STARLETTE_OTEL_SCOPE_KEY = "starlette.opentelemetry"
_MAX_WALK = 200


def _is_instrumentation(cls: object) -> bool:
    mro = getattr(cls, "__mro__", ())
    return any((c.__module__, c.__qualname__) in _HTTP_INSTRUMENTATIONS for c in mro)


def find_http_instrumentation(app: object) -> bool:
    """Whether a known HTTP instrumentation wraps, or is wrapped by, anything in ``app``'s
    chain of middlewares (``.app``), its built stack or its declared middleware."""
    todo = [app]
    seen: set[int] = set()
    while todo and len(seen) < _MAX_WALK:
        node = todo.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        if _is_instrumentation(type(node)) or getattr(node, _OTEL_FASTAPI_MARK, False) is True:
            return True
        for middleware in getattr(node, "user_middleware", None) or ():
            if _is_instrumentation(getattr(middleware, "cls", None)):
                return True
        todo.append(getattr(node, "app", None))
        todo.append(getattr(node, "middleware_stack", None))
    return False


class InstrumentationLookup:
    """Remembers, per built middleware stack, whether an HTTP instrumentation is in it."""

    __slots__ = ("_app", "_known")

    def __init__(self, app: object) -> None:
        self._app = app
        # (the stack or app walked, its answer), replaced as one: concurrent requests read it.
        self._known: tuple[object, bool] = (None, False)

    def present(self, scope: Scope) -> bool:
        # Starlette puts the running application in the scope before its middleware stack
        # runs: bgtrace sits in that stack, beside any instrumentation added the same way.
        # Wrapped around the app by hand, bgtrace finds it through its own ``app``.
        root = scope.get("app")
        if root is None:
            root = self._app
        key = getattr(root, "middleware_stack", None) or root
        known, found = self._known
        if known is not key:
            try:
                found = find_http_instrumentation(root)
            except Exception:
                logs.internal_error("http instrumentation lookup")
                found = False
            self._known = (key, found)
        return found


def left_to_others(scope: Scope, instrumentations: InstrumentationLookup) -> bool:
    """Whether an HTTP instrumentation opens (or, for an excluded URL, withholds) this
    request's span."""
    if trace.get_current_span().get_span_context().is_valid:
        # Already open further out (perhaps unsampled: then its sampling decision stands).
        return True
    if scope.get(_STARLETTE_OTEL_SCOPE_KEY):
        return True
    if FASTAPI_TELEMETRY_SCOPE_KEY in scope and scope[FASTAPI_TELEMETRY_SCOPE_KEY] is None:
        return True  # FastAPI's telemetry excludes this request
    return instrumentations.present(scope)


class RequestSpan:
    """bgtrace's own span for one request, current while the app runs.

    It holds no reference to the request's state (the state holds ``end`` until the
    response is out): nothing of a request lives in a reference cycle.
    """

    __slots__ = ("method", "span", "token")

    def __init__(self, config: Config, scope: Scope) -> None:
        self.method = method = http_method(scope.get("method"))
        # On top of the current context: baggage and values an outer middleware (or FastAPI's
        # telemetry) put there stay visible to the app.
        parent = incoming_context(scope.get("headers") or (), otel_context.get_current())
        self.span = config.tracer.start_span(
            "HTTP" if method == "_OTHER" else method,
            context=parent,
            kind=trace.SpanKind.SERVER,
            attributes={"http.request.method": method},
        )
        self.token: object = otel_context.attach(trace.set_span_in_context(self.span, parent))

    def detach(self) -> None:
        token, self.token = self.token, None
        if token is not None:
            otel_context.detach(token)  # type: ignore[arg-type]

    def end(self, state: RequestState, exc: BaseException | None = None) -> None:
        """Name it after the route and end it: at the last response byte, or at the end of
        the request when the response never finished."""
        try:
            span, method = self.span, self.method
            route = state.route()[0]
            attributes: dict[str, str | int] = {}
            if route != NO_ROUTE:
                attributes[ATTR_ROUTE] = route
                span.update_name(f"{'HTTP' if method == '_OTHER' else method} {route}")
            if state.status is not None:
                attributes["http.response.status_code"] = state.status
                if state.status >= 500:
                    span.set_status(trace.Status(trace.StatusCode.ERROR))
            span.set_attributes(attributes)
            if exc is not None:
                span.set_status(trace.Status(trace.StatusCode.ERROR))
                span.set_attribute("error.type", type(exc).__qualname__)
            span.end()
        except Exception:
            logs.internal_error("request span end")
