"""Bounded, stable names for task callables and exception types.

Names become Prometheus label values, so they must be cheap to compute, never raise, and never
contain anything but code identifiers: no reprs, which could carry task arguments.
"""

from __future__ import annotations

import functools
import types

UNKNOWN = "unknown"
MAX_NAME_LENGTH = 200
# Unwrap at most this many layers of functools.partial; deeper nesting is not real code.
_MAX_PARTIAL_DEPTH = 32
# Functions created at run time (exec, factories) each have their own code object: keep the
# cache bounded so that naming them cannot grow memory.
_MAX_CACHED_NAMES = 1024

_function_names: dict[types.CodeType, tuple[str, str]] = {}
_labels: dict[types.CodeType, tuple[str, str]] = {}


def task_name(func: object) -> tuple[str, str]:
    """Return ``(module, qualname)`` for a task callable; never raises.

    ``functools.partial`` is unwrapped, bound methods are named by their defining class,
    callable objects by their class, lambdas as ``<lambda>``.
    """
    try:
        module, qualname = _name(func)
    except Exception:
        return UNKNOWN, UNKNOWN
    return module[:MAX_NAME_LENGTH], qualname[:MAX_NAME_LENGTH]


def task_names(func: object) -> tuple[str, str]:
    """``(label, qualname)`` for a task callable: the ``task`` label and the span name's part."""
    if type(func) is types.FunctionType:
        # The common case, on every queued task: one cached lookup.
        found = _labels.get(func.__code__)
        if found is not None:
            return found
        module, qualname = task_name(func)
        found = (qualified(module, qualname), qualname)
        if len(_labels) >= _MAX_CACHED_NAMES:
            _labels.clear()
        _labels[func.__code__] = found
        return found
    module, qualname = task_name(func)
    return qualified(module, qualname), qualname


def qualified(module: str, qualname: str) -> str:
    return qualname if module == UNKNOWN else f"{module}.{qualname}"


def error_type(exc: BaseException) -> str:
    """The exception's class, module-qualified unless it is a builtin."""
    try:
        cls = type(exc)
        module, qualname = _text(cls.__module__), _text(cls.__qualname__)
    except Exception:
        return UNKNOWN
    if module == "builtins" or module == UNKNOWN:
        return qualname[:MAX_NAME_LENGTH]
    return f"{module}.{qualname}"[:MAX_NAME_LENGTH]


def _name(func: object) -> tuple[str, str]:
    for _ in range(_MAX_PARTIAL_DEPTH):
        if not isinstance(func, functools.partial):
            break
        func = func.func
    if isinstance(func, types.FunctionType):
        return _function_name(func)
    if isinstance(func, types.MethodType):
        return _name(func.__func__)
    if isinstance(func, types.BuiltinFunctionType):
        # print, time.sleep, [].append: C functions carry their own qualname; bound C methods
        # have no __module__, so take the module of the object's class.
        owner = func.__self__
        module = func.__module__
        if module is None and owner is not None and not isinstance(owner, types.ModuleType):
            module = type(owner).__module__
        return _text(module), _text(func.__qualname__)
    cls = func if isinstance(func, type) else type(func)
    return _text(cls.__module__), _text(cls.__qualname__)


def _function_name(func: types.FunctionType) -> tuple[str, str]:
    code = func.__code__
    name = _function_names.get(code)
    if name is None:
        qualname = "<lambda>" if func.__name__ == "<lambda>" else _text(func.__qualname__)
        name = (_text(func.__module__), qualname)
        if len(_function_names) >= _MAX_CACHED_NAMES:
            _function_names.clear()
        _function_names[code] = name
    return name


def _text(value: object) -> str:
    return value if isinstance(value, str) and value else UNKNOWN
