"""Per-request state, found by tasks through a context variable.

The middleware creates one ``RequestState`` per HTTP request and sets it in ``current``; a task
queued anywhere inside the request (handler, dependency, threadpool, helper) finds it there.
"""

from __future__ import annotations

import os
import sys
import types
from collections.abc import Callable
from contextvars import ContextVar
from time import perf_counter
from typing import TYPE_CHECKING, Any

from starlette.types import Scope

from .routes import NO_ROUTE, Resolved, resolve

if TYPE_CHECKING:
    from .config import Config
    from .records import TaskRecord

# Keys routing adds to the scope; dropped when matching the request again from the top.
_ROUTING_KEYS = frozenset(("route", "endpoint", "path_params", "fastapi", "app_root_path"))


class RequestState:
    __slots__ = (
        "_path", "_route", "background_ran", "client_gone", "closed", "config", "frame_id",
        "live_scope", "on_response_sent", "own_span", "records", "response_done_at", "root_path",
        "router_app", "status", "stop_code", "tracing",
    )  # fmt: skip

    def __init__(
        self, config: Config, scope: Scope, router_app: Any, stop_code: types.CodeType
    ) -> None:
        self.config = config
        # Looking up the tracer provider is not free: decide once per request.
        self.tracing = config.tracing()
        self.live_scope = scope
        # Routing (old Starlette mounts) rewrites these in place: keep them as they arrived.
        self._path = scope.get("path", "")
        self.root_path: str = scope.get("root_path", "")
        self.router_app = router_app
        self.stop_code = stop_code
        self.records: list[TaskRecord] = []
        self.background_ran = False
        # The client went away before the response was over (see the middleware's wrappers):
        # the tasks it leaves unstarted were dropped by the client, not by the request.
        self.client_gone = False
        self.closed = False
        self.status: int | None = None
        self.response_done_at: float | None = None
        # Called with this state once the response is over. Never a closure over the state
        # itself: that would put every request in a reference cycle (see response_sent).
        self.on_response_sent: Callable[[RequestState], None] | None = None
        # The request span bgtrace opened, if it did: a task queued right under it was queued
        # outside any other instrumentation's span (see records._queued).
        self.own_span: object = None
        self._route: Resolved | None = None
        # The middleware call that serves this request (our caller): the event-loop watchdog
        # finds the request a blocked stack belongs to by it. An id, not the frame: the frame
        # holds this state, and a cycle would wait for the cyclic collector.
        self.frame_id = id(sys._getframe(1))
        live[self.frame_id] = self

    def response_sent(self) -> None:
        """The last response byte is out (or the response is over): the rest is background."""
        if self.response_done_at is None:
            self.response_done_at = perf_counter()
            callback = self.on_response_sent
            if callback is not None:
                # Once only; dropped so that nothing the callback holds (the request span)
                # outlives the response through the state.
                self.on_response_sent = None
                callback(self)

    def background_started(self) -> None:
        # Starlette runs the background only once the response is over, also when the client
        # went away mid-stream or the server sent the body as a file (no final body message).
        self.background_ran = True
        self.response_sent()

    def request_scope(self) -> Scope:
        """The scope as it arrived, for matching routes again from the top."""
        scope = {k: v for k, v in self.live_scope.items() if k not in _ROUTING_KEYS}
        scope["path"] = self._path
        scope["root_path"] = self.root_path
        return scope

    def release(self) -> None:
        """The request is over: keep only what a later task of this request asks for (the
        route template), not the scope. Copies of the request's context (every handle the
        event loop queued during the request holds one) keep this state alive a while longer;
        holding the scope would keep everything the app put in it (FastAPI's exit stacks, the
        request's objects) alive with them, enough per request at a server's usual concurrency
        to wake the cyclic collector, whose full collections are the latency tail."""
        scope = self.live_scope
        if self._route is None and ("route" in scope or "fastapi" in scope):
            # Routed, and no task asked yet: memoised from the scope now (routing left the
            # route there: no matching again; a plain route of Starlette before 1.0 leaves
            # none, and a task queued after such a request's end reads ``none``).
            self.route()
        self.live_scope = _RELEASED
        self.records = ENDED
        self.router_app = None
        self.on_response_sent = None
        self.own_span = None

    def route(self) -> Resolved:
        found = self._route
        if found is None:
            try:
                found = resolve(self.live_scope, self, self.router_app)
            except Exception:
                found = (NO_ROUTE, None)
            if found[1] is not None or "route" in self.live_scope:
                # Only memoise once routing has happened; a task queued by a middleware
                # before routing must not fix the label for the rest of the request.
                self._route = found
        return found


def forget(state: RequestState) -> None:
    """The request is over: nothing blocks on its behalf any more."""
    live.pop(state.frame_id, None)


# The records of a request that is over: one shared empty list, which _queued never appends
# to (it checks for it), so that an ended request allocates none.
ENDED: list[TaskRecord] = []
# What a released state reads as its scope: nothing to route on (its route is memoised).
_RELEASED: Scope = {}

# The requests being served now, by the id of the middleware frame that serves each (alive
# while it is listed, so no other object has its id). One insert and one delete per request.
live: dict[int, RequestState] = {}
# A forked child serves none of its parent's requests.
os.register_at_fork(after_in_child=live.clear)


current: ContextVar[RequestState | None] = ContextVar("bgtrace_request", default=None)
