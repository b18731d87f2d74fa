"""Other libraries' private names that bgtrace uses, each looked up where it is used.

An upgrade of prometheus_client, Starlette or FastAPI may move any of them. bgtrace then takes
a slower public path, keeping the app and the counts right, and says so once per name.
"""

from __future__ import annotations

from . import logs

_warned: set[str] = set()


def missing(name: str, fallback: str) -> None:
    """``name`` is not there (or not as bgtrace knows it): one warning, naming the fallback."""
    if name in _warned:
        return
    _warned.add(name)
    logs.logger.warning(
        "bgtrace: %s is not there as bgtrace knows it (a library upgrade?); %s", name, fallback
    )
