"""Route templates for the ``route`` label: the matched template, never the raw path."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from starlette.routing import BaseRoute, Host, Match, Mount
from starlette.types import Scope

if TYPE_CHECKING:
    from .request import RequestState

NO_ROUTE = "none"
# (template, the object routing selected: a route, or FastAPI's per-inclusion route context)
Resolved = tuple[str, Any]
# Mounts nest a handful of levels in real apps; the bound keeps a pathological tree cheap.
_MAX_DEPTH = 16


def find_router_app(app: Any) -> Any:
    """The object holding ``routes`` for a middleware's wrapped app (or ``None``)."""
    for _ in range(_MAX_DEPTH):
        if app is None or isinstance(getattr(app, "routes", None), Sequence):
            return app
        app = getattr(app, "app", None)
    return None


def resolve(live_scope: Scope, request: RequestState, router_app: Any) -> Resolved:
    """Return ``(template, route)`` for a request.

    ``live_scope`` is the scope as the app mutated it while routing. The router leaves the
    selected route in it; when a mount changed ``root_path`` on the way, the mounts' prefixes
    are matched again from the top on the scope as it arrived.
    """
    template, route = _selected(live_scope)
    if route is None:
        # Not routed (404, or a task queued before routing): match from the top.
        if router_app is None:
            return NO_ROUTE, None
        return _match(router_app.routes, request.request_scope(), "", 0)
    if live_scope.get("root_path", "") == request.root_path:
        return template, route
    if router_app is None:
        return template, route
    prefix = _mount_prefix(router_app.routes, request.request_scope(), "", 0)
    return (prefix + template) or "/", route


def _selected(scope: Scope) -> Resolved:
    # FastAPI 0.12x+ includes routers lazily: the route's own path lacks the include prefix,
    # which only its per-inclusion context carries (with the dependant actually solved).
    fastapi_scope = scope.get("fastapi")
    if isinstance(fastapi_scope, dict):
        frontend = _frontend(scope, fastapi_scope)
        if frontend is not None:
            return frontend
        context = fastapi_scope.get("effective_route_context")
        path = getattr(context, "path_format", None)
        if isinstance(path, str):
            return path, context
    route = scope.get("route")
    if route is None:
        return NO_ROUTE, None
    if isinstance(route, (Mount, Host)):
        # A mounted app without routes of its own: the prefix is the whole template.
        return "", route
    path = getattr(route, "path", None)
    return (path, route) if isinstance(path, str) else (NO_ROUTE, None)


def _frontend(scope: Scope, fastapi_scope: dict[str, Any]) -> Resolved | None:
    """A route of FastAPI's ``frontend()`` (0.13x+), which routing keeps apart from
    ``routes`` and leaves out of the scope's ``route``: its template as FastAPI's own
    telemetry writes it (``{prefix}/{path}``), and the object holding its dependencies.

    FastAPI's names, all private, are looked up here: the file path it puts in the scope,
    the per-inclusion context of a router's frontend, or the app router's route group. Where
    they are gone, the task reads as before (``none``, ``other``)."""
    rest = fastapi_scope.get("frontend_path")
    path = scope.get("path")
    if not isinstance(rest, str) or not isinstance(path, str) or "route" in scope:
        return None
    root_path = scope.get("root_path", "")
    if root_path and path.startswith(root_path):
        below = path[len(root_path) :]
        if below[:1] in ("/", ""):  # as Starlette routes: a root path ends at a "/"
            path = below
    if not path.endswith(rest):
        return None
    template = path[: len(path) - len(rest)].rstrip("/") + "/{path}"
    context = fastapi_scope.get("effective_route_context")
    if getattr(context, "dependant", None) is not None:
        return template, context  # a router's frontend, included with its dependencies
    group = getattr(scope.get("router"), "_frontend_routes", None)
    if getattr(group, "dependant", None) is not None:
        return template, group
    return template, _FRONTEND_WITHOUT_DEPENDENCIES


class _FrontendWithoutDependencies:
    """What routing selected when FastAPI's route group is not found: a route all the same
    (its template stands), with no dependencies to tell an origin by."""


_FRONTEND_WITHOUT_DEPENDENCIES = _FrontendWithoutDependencies()


def _mount_prefix(routes: Sequence[BaseRoute], scope: Scope, prefix: str, depth: int) -> str:
    if depth >= _MAX_DEPTH:
        return prefix
    for route in routes:
        if not isinstance(route, (Mount, Host)):
            continue
        try:
            match, child_scope = route.matches(scope)
        except Exception:
            continue
        if match is Match.FULL:
            path = route.path if isinstance(route, Mount) else ""
            return _mount_prefix(route.routes, {**scope, **child_scope}, prefix + path, depth + 1)
    return prefix


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


def _descend(route: BaseRoute, scope: Scope, prefix: str, depth: int) -> Resolved:
    path = getattr(route, "path", "") if not isinstance(route, Host) else ""
    template = prefix + (path if isinstance(path, str) else "")
    if isinstance(route, (Mount, Host)) and depth < _MAX_DEPTH:
        children = route.routes
        if children:
            found, leaf = _match(children, scope, template, depth + 1)
            return (found, leaf) if leaf is not None else (template or "/", route)
    return template or "/", route
