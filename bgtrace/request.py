"""Per-request state, found by tasks through a context variable.

The middleware creates one ``RequestState`` per HTTP request and sets it in ``current``; a task
queued anywhere inside the request (handler, dependency, threadpool, helper) finds it there.
"""

from __future__ import annotations

import types
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any

from starlette.types import Scope

from .routes import NO_ROUTE, Resolved, resolve

if TYPE_CHECKING:
    from .config import Config
    from .records import TaskRecord


class RequestState:
    __slots__ = (
        "_route", "background_ran", "config", "live_scope", "records",
        "request_scope", "response_done_at", "router_app", "status", "stop_code",
    )  # fmt: skip

    def __init__(
        self, config: Config, scope: Scope, router_app: Any, stop_code: types.CodeType
    ) -> None:
        self.config = config
        self.live_scope = scope
        # Routing rewrites root_path and path_params in place: keep the scope as it arrived.
        self.request_scope = dict(scope)
        self.router_app = router_app
        self.stop_code = stop_code
        self.records: list[TaskRecord] = []
        self.background_ran = False
        self.status: int | None = None
        self.response_done_at: float | None = None
        self._route: Resolved | None = None

    def route(self) -> Resolved:
        found = self._route
        if found is None:
            try:
                found = resolve(self.live_scope, self.request_scope, self.router_app)
            except Exception:
                found = (NO_ROUTE, None)
            if found[1] is not None or "route" in self.live_scope:
                # Only memoise once routing has happened; a task queued by a middleware
                # before routing must not fix the label for the rest of the request.
                self._route = found
        return found


current: ContextVar[RequestState | None] = ContextVar("bgtrace_request", default=None)
