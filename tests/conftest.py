from __future__ import annotations

from collections.abc import Iterator

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client import CollectorRegistry

import bgtrace
from tests import apps

# bgtrace's pytest11 entry point registers bgtrace.testing under this very name when the
# package is installed: pytest then skips it here, so a source tree installed before the
# entry point existed gets the fixture too, once. pytester runs test files in a subprocess.
pytest_plugins = ["bgtrace.testing", "pytester"]


@pytest.fixture(autouse=True)
def _instrumented() -> Iterator[None]:
    """Every test starts instrumented and with an empty task log, whatever the last one did."""
    bgtrace.instrument()
    apps.done.clear()
    yield
    bgtrace.instrument()


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


@pytest.fixture
def exporter() -> InMemorySpanExporter:
    return InMemorySpanExporter()


@pytest.fixture
def tracer_provider(exporter: InMemorySpanExporter) -> TracerProvider:
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider


@pytest.fixture
def global_tracer_provider(
    tracer_provider: TracerProvider, monkeypatch: pytest.MonkeyPatch
) -> TracerProvider:
    """``tracer_provider`` as the process's global provider, for this test only (the API lets
    a process set it once)."""
    from opentelemetry import trace

    monkeypatch.setattr(trace, "_TRACER_PROVIDER", tracer_provider)
    return tracer_provider


class Samples:
    """Reads bgtrace samples from a registry; absent series read as 0."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry

    def __call__(self, name: str, **labels: str) -> float:
        return self.registry.get_sample_value(name, labels) or 0.0

    def total(self, name: str, **labels: str) -> float:
        """Sum of ``name`` over every series whose labels include ``labels``."""
        found = 0.0
        for metric in self.registry.collect():
            for sample in metric.samples:
                if sample.name == name and labels.items() <= sample.labels.items():
                    found += sample.value
        return found

    def label_values(self, name: str, label: str) -> set[str]:
        return {
            sample.labels[label]
            for metric in self.registry.collect()
            for sample in metric.samples
            if sample.name == name and label in sample.labels
        }


@pytest.fixture
def samples(registry: CollectorRegistry) -> Samples:
    return Samples(registry)
