"""Who queued a task: the path operation function, a dependency, or something else.

FastAPI routes carry a ``dependant`` tree naming the endpoint and every (sub-)dependency.
When a task is queued we walk up the calling frames and look each frame's code object up in
that tree. This works the same for sync functions run in the threadpool, coroutines,
generator dependencies and helpers called by any of them.
"""

from __future__ import annotations

import functools
import inspect
import sys
import types
import weakref
from typing import Any

from .naming import qualified, task_name

HANDLER = "handler"
DEPENDENCY = "dependency"
OTHER = "other"

# Deeper than any real call chain from an endpoint to add_task; bounds the walk's cost.
MAX_FRAMES = 96

# code object -> None for the endpoint, or the dependency's qualified name
_CodeMap = dict[types.CodeType, "str | None"]
# Routes define __eq__ without __hash__, so key by id and keep a weak reference to check that
# the id still names the same route.
_code_maps: dict[int, tuple[weakref.ref[Any], _CodeMap]] = {}
_MAX_ROUTES = 4096


def detect(
    route: Any, stop: types.CodeType | None, frame: types.FrameType | None = None
) -> tuple[str, str | None]:
    """Return ``(origin, dependency name)`` for a task being queued from ``frame`` (by default
    our caller's): the first frame up from it that runs the endpoint or a dependency.

    The walk stops at ``stop`` (the middleware's own code): past it lies only the server.
    """
    dependant = getattr(route, "dependant", None)
    if dependant is None:
        return OTHER, None
    codes = _route_codes(route, dependant)
    overrides = _override_codes(route)
    if frame is None:
        frame = sys._getframe(1)
    for _ in range(MAX_FRAMES):
        if frame is None:
            break
        code = frame.f_code
        if code in codes:
            name = codes[code]
            return (HANDLER, None) if name is None else (DEPENDENCY, name)
        if overrides and code in overrides:
            return DEPENDENCY, overrides[code]
        if code is stop:
            break
        frame = frame.f_back
    return OTHER, None


def _route_codes(route: Any, dependant: Any) -> _CodeMap:
    cached = _code_maps.get(id(route))
    if cached is not None and cached[0]() is route:
        return cached[1]
    codes = _codes_of(dependant)
    if len(_code_maps) >= _MAX_ROUTES:
        _code_maps.clear()
    _code_maps[id(route)] = (weakref.ref(route), codes)
    return codes


def _codes_of(dependant: Any) -> _CodeMap:
    codes: _CodeMap = {}
    # Sub-dependencies first, so that an endpoint also used as a dependency reads as handler.
    stack = list(getattr(dependant, "dependencies", ()))
    seen: set[int] = set()
    while stack:
        sub = stack.pop()
        if id(sub) in seen:
            continue
        seen.add(id(sub))
        call = getattr(sub, "call", None)
        if call is not None:
            name = qualified(*task_name(call))
            for code in _code_objects(call):
                codes.setdefault(code, name)
        stack.extend(getattr(sub, "dependencies", ()))
    for code in _code_objects(getattr(dependant, "call", None)):
        codes[code] = None
    return codes


_overrides_seen: tuple[tuple[int, ...], _CodeMap] | None = None


def _override_codes(route: Any) -> _CodeMap | None:
    global _overrides_seen
    provider = getattr(route, "dependency_overrides_provider", None)
    overrides = getattr(provider, "dependency_overrides", None)
    if not overrides:
        return None
    # Tests swap overrides in and out: remember the last set, keyed by what it holds.
    key = (id(overrides), *map(id, overrides.values()))
    if _overrides_seen is not None and _overrides_seen[0] == key:
        return _overrides_seen[1]
    codes: _CodeMap = {}
    for call in overrides.values():
        name = qualified(*task_name(call))
        for code in _code_objects(call):
            codes[code] = name
    _overrides_seen = (key, codes)
    return codes


def _code_objects(call: Any) -> list[types.CodeType]:
    """The code objects that run when FastAPI calls ``call``."""
    found: list[types.CodeType] = []
    for _ in range(8):
        if isinstance(call, functools.partial):
            call = call.func
        else:
            break
    candidates: list[Any] = []
    if isinstance(call, type):
        # Depends(SomeClass): FastAPI instantiates the class.
        candidates += [call.__dict__.get("__init__"), call.__dict__.get("__new__")]
        candidates += [getattr(call, "__init__", None)]
    elif inspect.isfunction(call) or inspect.ismethod(call):
        candidates.append(call)
    elif call is not None:
        # An instance with __call__ used as a dependency.
        dunder_call = "__call__"  # an attribute lookup, not a callable() test
        candidates.append(getattr(type(call), dunder_call, None))
    for candidate in candidates:
        # functools.wraps decorators: both the wrapper and every wrapped layer may be on stack.
        for _ in range(8):
            func = getattr(candidate, "__func__", candidate)
            if isinstance(func, (staticmethod, classmethod)):
                func = func.__func__
            code = getattr(func, "__code__", None)
            if isinstance(code, types.CodeType) and code not in found:
                found.append(code)
            candidate = getattr(func, "__wrapped__", None)
            if candidate is None:
                break
    return found
