"""Prometheus metrics and OpenTelemetry spans for FastAPI and Starlette background tasks."""

__version__ = "0.1.0"

from .exposition import metrics_app
from .instrumentation import BackgroundTasks, instrument, uninstrument
from .middleware import BackgroundTaskMiddleware

__all__ = [
    "BackgroundTaskMiddleware",
    "BackgroundTasks",
    "__version__",
    "instrument",
    "metrics_app",
    "uninstrument",
]
