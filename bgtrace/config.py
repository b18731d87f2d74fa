"""What one middleware (or the out-of-request default) records into."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from opentelemetry import trace
from prometheus_client import REGISTRY

from . import __version__
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
        tracer = trace.get_tracer("bgtrace", __version__, tracer_provider=tracer_provider)
        return cls(metrics, tracer_provider, trace_mode, tracer)

    def tracing(self) -> bool:
        """Whether spans would be recorded: skip all span work while no SDK is configured."""
        provider = self.tracer_provider or trace.get_tracer_provider()
        return not isinstance(provider, (trace.ProxyTracerProvider, trace.NoOpTracerProvider))


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
