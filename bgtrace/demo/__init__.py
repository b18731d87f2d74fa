"""bgtrace's example app and demo; needs the ``demo`` extra: ``pip install bgtrace[demo]``.

``python -m bgtrace.demo`` (or ``bgtrace-demo``) serves the app, sends it traffic and prints
the background task metrics; ``uvicorn bgtrace.demo.app:app`` serves the app alone.
"""

from .cli import main

__all__ = ["main"]
