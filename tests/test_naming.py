from __future__ import annotations

import functools
import math
import time

import pytest

from bgtrace.naming import error_type, qualified, task_name
from tests import apps


def name(func: object) -> str:
    return qualified(*task_name(func))


class Mailer:
    def send(self) -> None: ...

    @staticmethod
    def static() -> None: ...

    @classmethod
    def klass(cls) -> None: ...

    def __call__(self) -> None: ...


class Hostile:
    def __call__(self) -> None: ...

    def __repr__(self) -> str:
        raise RuntimeError("repr")

    def __getattr__(self, item: str) -> object:
        raise RuntimeError(item)


def test_function() -> None:
    assert name(apps.write_log) == "tests.apps.write_log"


def test_partial_unwrapped() -> None:
    nested = functools.partial(functools.partial(apps.write_log, "a"))
    assert name(nested) == "tests.apps.write_log"


def test_methods_named_by_class() -> None:
    assert name(Mailer().send) == "tests.test_naming.Mailer.send"
    assert name(Mailer.static) == "tests.test_naming.Mailer.static"
    assert name(Mailer.klass) == "tests.test_naming.Mailer.klass"
    assert name(Mailer()) == "tests.test_naming.Mailer"
    assert name(Mailer) == "tests.test_naming.Mailer"


def test_lambda() -> None:
    assert name(lambda: None) == "tests.test_naming.<lambda>"


def test_builtins_and_c_functions() -> None:
    assert name(print) == "builtins.print"
    assert name(time.sleep) == "time.sleep"
    assert name(math.sqrt) == "math.sqrt"
    assert name([].append) == "builtins.list.append"


def test_hostile_objects_named_by_class() -> None:
    assert name(Hostile()) == "tests.test_naming.Hostile"


def test_nested_function() -> None:
    def inner() -> None: ...

    assert name(inner) == "tests.test_naming.test_nested_function.<locals>.inner"


def test_names_are_bounded() -> None:
    def f() -> None: ...

    f.__qualname__ = "x" * 10_000
    assert len(name(f)) <= 2 * 200 + 1


@pytest.mark.parametrize(
    ("exc", "expected"),
    [
        (ValueError(), "ValueError"),
        (KeyboardInterrupt(), "KeyboardInterrupt"),
        (apps.NotificationError(), "tests.apps.NotificationError"),
        (TimeoutError(), "TimeoutError"),
    ],
)
def test_error_type(exc: BaseException, expected: str) -> None:
    assert error_type(exc) == expected
