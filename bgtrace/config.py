"""What one middleware (or the out-of-request default) records into."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Literal

from opentelemetry import trace
from prometheus_client import REGISTRY

from . import __version__, logs
from .metrics import TaskMetrics, task_metrics

TraceMode = Literal["child", "link"]
TRACE_MODES = ("child", "link")


@dataclass(frozen=True)
class Config:
    metrics: TaskMetrics
    tracer_provider: trace.TracerProvider | None
    trace_mode: TraceMode
    tracer: trace.Tracer

    @classmethod
    def create(
        cls,
        metrics: TaskMetrics,
        tracer_provider: trace.TracerProvider | None,
        trace_mode: TraceMode,
    ) -> Config:
        if trace_mode not in TRACE_MODES:
            raise ValueError(f"trace_mode must be one of {TRACE_MODES}, got {trace_mode!r}")
        try:
            tracer = trace.get_tracer("bgtrace", __version__, tracer_provider=tracer_provider)
        except Exception:
            # A provider that cannot give a tracer: bgtrace goes on without spans of its own.
            logs.internal_error("tracer provider")
            tracer_provider = trace.NoOpTracerProvider()
            tracer = tracer_provider.get_tracer("bgtrace")
        return cls(metrics, tracer_provider, trace_mode, tracer)

    def tracing(self) -> bool:
        """Whether spans would be recorded: skip all span work while no SDK is configured."""
        try:
            return self._tracing()
        except Exception:
            # A global provider that fails to load (OTEL_PYTHON_TRACER_PROVIDER naming one
            # that cannot be built): no spans, the request goes on.
            logs.internal_error("tracer provider")
            return False

    def _tracing(self) -> bool:
        provider: object = self.tracer_provider
        if provider is None:
            # The global provider, without get_tracer_provider()'s environment lookup while
            # none is set (a microsecond per request); the lookup decides when it is unknown.
            provider = getattr(trace, "_TRACER_PROVIDER", _UNKNOWN)
            if provider is None and not _provider_from_environment:
                return False
            if provider is None or provider is _UNKNOWN:
                provider = trace.get_tracer_provider()
        kind = type(provider)
        recording = _recording_types.get(kind)
        if recording is None:
            # Once per provider class: both classes are ABCs, whose isinstance is slow.
            recording = _recording_types[kind] = not isinstance(provider, _NOT_RECORDING)
        return recording


_UNKNOWN = object()
_NOT_RECORDING = (trace.ProxyTracerProvider, trace.NoOpTracerProvider)
_recording_types: dict[type, bool] = {}
# OpenTelemetry loads a global provider named by this variable on first use; read once, as
# OpenTelemetry itself reads its configuration at start-up.
_provider_from_environment = "OTEL_PYTHON_TRACER_PROVIDER" in os.environ


_default: Config | None = None


def default_config() -> Config:
    """Where tasks queued outside any instrumented request are recorded: the default registry
    (with whatever buckets a middleware gave it) and the global tracer provider. Created on
    first use, never at import."""
    global _default
    metrics = task_metrics(REGISTRY, implicit=True)
    if _default is None or _default.metrics is not metrics:
        _default = Config.create(metrics, None, "child")
    return _default
