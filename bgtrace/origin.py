"""Who queued a task: the path operation function, a dependency, or something else.

FastAPI routes carry a ``dependant`` tree naming the endpoint and every (sub-)dependency.
When a task is queued we walk up the calling frames and look each frame's code object up in
that tree. This works the same for sync functions run in the threadpool, coroutines,
generator dependencies and helpers called by any of them.

One code object can run as several functions: a decorator's wrapper (``functools.wraps``) is
one code for every function it decorates, and so is a nested function made by a factory. A
frame of such a code (one with free variables) stands for a dependency only when its free
variables hold that dependency's own closure values: a helper sharing a dependency's decorator
is not mistaken for the dependency, and a task queued by a dependency's own wrapper (before it
calls the wrapped function) is still the dependency's. A wrapper without a closure (a
decorator class's ``__call__``) cannot be told apart this way: only the function it wraps
identifies its dependency.
"""

from __future__ import annotations

import functools
import inspect
import operator
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

# id of a code object -> None for the endpoint, or the dependency's qualified name. Keyed by
# id: hashing a code object hashes its constants, nested code objects included, on every
# lookup (1.8 us for one of FastAPI's request handlers); the codes are kept alive with the map.
_CodeMap = dict[int, "str | None"]
# A code with free variables (a wrapper, a nested function) -> per function made of it, its
# closure's values and what it stands for, first come first tried.
_Closures = dict[int, "list[tuple[tuple[Any, ...], str | None]]"]
_MISSING = object()


class _Codes:
    """What the code objects on the stack stand for, for one route (or the overrides)."""

    __slots__ = ("closures", "codes", "plain")

    def __init__(self) -> None:
        self.plain: _CodeMap = {}
        self.closures: _Closures = {}
        # The code objects the maps are keyed by the ids of: alive as long as the maps.
        self.codes: list[types.CodeType] = []

    def add(self, call: Any, name: str | None, *, first: bool) -> None:
        """Map the codes that run when FastAPI calls ``call``; ``first``: ahead of any earlier
        meaning of the same code (the endpoint wins over a dependency that is the same
        function)."""
        for code, closure in _code_objects(call):
            self.codes.append(code)
            key = id(code)
            if closure is None:
                if first or key not in self.plain:
                    self.plain[key] = name
                continue
            owners = self.closures.setdefault(key, [])
            if first:
                owners.insert(0, (closure, name))
            else:
                owners.append((closure, name))

    def lookup(self, frame: types.FrameType, key: int) -> Any:
        """What the code ``frame`` runs (whose id is ``key``) stands for: a dependency's
        name, ``None`` for the endpoint, or ``_MISSING``."""
        name = self.plain.get(key, _MISSING)
        if name is not _MISSING:
            return name
        owners = self.closures.get(key)
        if owners is None:
            return _MISSING
        values = _free_values(frame, frame.f_code)
        if values is None:
            return _MISSING
        for closure, name in owners:
            if len(closure) == len(values) and all(map(operator.is_, closure, values)):
                return name
        return _MISSING


_UNSET = object()


def _free_values(frame: types.FrameType, code: types.CodeType) -> tuple[Any, ...] | None:
    """The values of ``frame``'s free variables, in ``co_freevars`` order.

    Read through ``f_locals`` (a snapshot before Python 3.13, a view since), only for frames
    of codes that run as several functions: rare on the walk, and at most once per frame."""
    try:
        local = frame.f_locals
        names = code.co_freevars
        if len(names) == 1:  # the usual closure: one name, no list made
            return (local.get(names[0], _UNSET),)
        return tuple([local.get(name, _UNSET) for name in names])
    except Exception:
        return None


# Routes define __eq__ without __hash__, so key by id and keep a weak reference to check that
# the id still names the same route.
_code_maps: dict[int, tuple[weakref.ref[Any], _Codes]] = {}
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
    plain, closures = codes.plain, codes.closures
    depth = 0
    while frame is not None and depth < MAX_FRAMES:
        code = frame.f_code
        key = id(code)
        if key in plain or key in closures:
            name = codes.lookup(frame, key)
            if name is not _MISSING:
                return (HANDLER, None) if name is None else (DEPENDENCY, name)
        if overrides is not None and (key in overrides.plain or key in overrides.closures):
            name = overrides.lookup(frame, key)
            if name is not _MISSING:
                return DEPENDENCY, name
        if code is stop:
            break
        frame = frame.f_back
        depth += 1
    return OTHER, None


def _route_codes(route: Any, dependant: Any) -> _Codes:
    cached = _code_maps.get(id(route))
    if cached is not None and cached[0]() is route:
        return cached[1]
    codes = _codes_of(dependant)
    if len(_code_maps) >= _MAX_ROUTES:
        _code_maps.clear()
    _code_maps[id(route)] = (weakref.ref(route), codes)
    return codes


def _codes_of(dependant: Any) -> _Codes:
    codes = _Codes()
    # The endpoint goes first among meanings of a code: an endpoint also used as a dependency
    # reads as handler.
    stack = list(getattr(dependant, "dependencies", ()))
    seen: set[int] = set()
    while stack:
        sub = stack.pop()
        if id(sub) in seen:
            continue
        seen.add(id(sub))
        call = getattr(sub, "call", None)
        if call is not None:
            codes.add(call, qualified(*task_name(call)), first=False)
        stack.extend(getattr(sub, "dependencies", ()))
    codes.add(getattr(dependant, "call", None), None, first=True)
    return codes


_overrides_seen: tuple[tuple[int, ...], _Codes] | None = None


def _override_codes(route: Any) -> _Codes | None:
    global _overrides_seen
    provider = getattr(route, "dependency_overrides_provider", None)
    overrides = getattr(provider, "dependency_overrides", None)
    if not overrides:
        return None
    # Tests swap overrides in and out: remember the last set, keyed by what it holds.
    key = (id(overrides), *map(id, overrides.values()))
    if _overrides_seen is not None and _overrides_seen[0] == key:
        return _overrides_seen[1]
    codes = _Codes()
    for call in overrides.values():
        codes.add(call, qualified(*task_name(call)), first=True)
    _overrides_seen = (key, codes)
    return codes


def _code_objects(call: Any) -> list[tuple[types.CodeType, tuple[Any, ...] | None]]:
    """The code objects that run when FastAPI calls ``call``, each with the values of its
    function's closure (``None`` for a function without one: its code is its own)."""
    found: list[tuple[types.CodeType, tuple[Any, ...] | None]] = []
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
        # A wrapper object (a decorator class) around a function: that function's frame.
        candidates.append(getattr(call, "__wrapped__", None))
    for candidate in candidates:
        # functools.wraps decorators: both the wrapper and every wrapped layer may be on stack.
        for _ in range(8):
            func = getattr(candidate, "__func__", candidate)
            if isinstance(func, (staticmethod, classmethod)):
                func = func.__func__
            code = getattr(func, "__code__", None)
            if isinstance(code, types.CodeType):
                closure = _closure_values(func, code)
                # Compared by identity: closure values may define any __eq__.
                if not any(c is code and v is closure for c, v in found):
                    found.append((code, closure))
            candidate = getattr(func, "__wrapped__", None)
            if candidate is None:
                break
    return found


def _closure_values(func: Any, code: types.CodeType) -> tuple[Any, ...] | None:
    if not code.co_freevars:
        return None
    cells = getattr(func, "__closure__", None) or ()
    values = []
    for cell in cells:
        try:
            values.append(cell.cell_contents)
        except ValueError:  # an empty cell: a name assigned later in the enclosing function
            values.append(_UNSET)
    return tuple(values)
