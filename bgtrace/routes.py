"""Route templates for the ``route`` label: the matched template, never the raw path."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from starlette.routing import BaseRoute, Host, Match, Mount
from starlette.types import Scope

NO_ROUTE = "none"
Resolved = tuple[str, BaseRoute | None]
# Mounts nest a handful of levels in real apps; the bound keeps a pathological tree cheap.
_MAX_DEPTH = 16


def find_router_app(app: Any) -> Any:
    """The object holding ``routes`` for a middleware's wrapped app (or ``None``)."""
    for _ in range(_MAX_DEPTH):
        if app is None or isinstance(getattr(app, "routes", None), Sequence):
            return app
        app = getattr(app, "app", None)
    return None


def resolve(live_scope: Scope, request_scope: Scope, router_app: Any) -> Resolved:
    """Return ``(template, route)`` for a request.

    ``live_scope`` is the scope as the app mutated it: after routing Starlette has put the
    matched ``route`` in it, and when no mount changed ``root_path`` that route's path is the
    whole template. Otherwise match again from the top on ``request_scope``, the scope as it
    arrived, joining mount prefixes.
    """
    route = live_scope.get("route")
    if (
        route is not None
        and not isinstance(route, (Mount, Host))
        and live_scope.get("root_path", "") == request_scope.get("root_path", "")
    ):
        path = getattr(route, "path", None)
        if isinstance(path, str):
            return path, route
    if router_app is None:
        return NO_ROUTE, None
    return _match(router_app.routes, request_scope, "", 0)


def _match(routes: Sequence[BaseRoute], scope: Scope, prefix: str, depth: int) -> Resolved:
    partial: tuple[BaseRoute, Scope] | None = None
    for route in routes:
        try:
            match, child_scope = route.matches(scope)
        except Exception:
            # A custom route that cannot match this scope is not our error to raise.
            continue
        if match is Match.FULL:
            return _descend(route, {**scope, **child_scope}, prefix, depth)
        if match is Match.PARTIAL and partial is None:
            partial = (route, child_scope)
    if partial is not None:
        route, child_scope = partial
        return _descend(route, {**scope, **child_scope}, prefix, depth)
    return NO_ROUTE, None


def _descend(
    route: BaseRoute, scope: Scope, prefix: str, depth: int
) -> tuple[str, BaseRoute | None]:
    path = getattr(route, "path", "") if not isinstance(route, Host) else ""
    template = prefix + (path if isinstance(path, str) else "")
    if isinstance(route, (Mount, Host)) and depth < _MAX_DEPTH:
        children = route.routes
        if children:
            found, leaf = _match(children, scope, template, depth + 1)
            return (found, leaf) if leaf is not None else (template or "/", route)
    return template or "/", route
