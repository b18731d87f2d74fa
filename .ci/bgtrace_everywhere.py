"""pytest plugin: every Starlette/FastAPI app the tests build runs inside BackgroundTaskMiddleware.

Loaded with ``-p bgtrace_everywhere`` (``.ci`` on ``PYTHONPATH``) by ``.ci/framework_suites.py``
for the second run of the frameworks' own suites. Their tests are not edited: the app's
``build_middleware_stack`` is wrapped, so bgtrace sits outside everything the app builds
(``ServerErrorMiddleware`` included), the harshest place for "never change the app".
"""

from __future__ import annotations

import functools
from typing import Any

import pytest

# Imported here, not in the patched method: the first app of a test would otherwise import
# prometheus_client on the event loop, whose /proc read Starlette's blockbuster fixture flags
# as a blocking call (a difference of this harness, not of bgtrace).
from bgtrace import BackgroundTaskMiddleware

# Not "/metrics": bgtrace's own page would answer in place of a test app's route of that name,
# which the README documents (pass metrics_path=None to hand it to the app). A path no test
# uses keeps the path check on every request in the hot path without shadowing a route.
METRICS_PATH = "/__bgtrace_framework_suites__/metrics"


def _wrap(build: Any) -> Any:
    @functools.wraps(build)
    def build_middleware_stack(self: Any) -> Any:
        stack = build(self)
        # FastAPI's override calls Starlette's: wrap once, in the outermost call.
        if isinstance(stack, BackgroundTaskMiddleware):
            return stack
        return BackgroundTaskMiddleware(stack, metrics_path=METRICS_PATH)

    build_middleware_stack.__bgtrace_original__ = build  # type: ignore[attr-defined]
    return build_middleware_stack


def _patch(cls: type) -> None:
    build = cls.__dict__.get("build_middleware_stack")
    if build is not None and not hasattr(build, "__bgtrace_original__"):
        cls.build_middleware_stack = _wrap(build)  # type: ignore[attr-defined]


def pytest_configure(config: pytest.Config) -> None:
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    from starlette.applications import Starlette

    # An SDK provider with no processor: spans are made, sampled and ended, and go nowhere.
    trace.set_tracer_provider(TracerProvider())
    _patch(Starlette)
    try:
        from fastapi import FastAPI
    except ImportError:  # Starlette's suite runs without FastAPI installed too
        return
    _patch(FastAPI)
