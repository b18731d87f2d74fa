"""The process's resident memory, from /proc (Linux)."""

from __future__ import annotations

import contextlib
from pathlib import Path

_STATUS = Path("/proc/self/status")


def _status_kib(field: str) -> int:
    for line in _STATUS.read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in {_STATUS}")


def rss_bytes() -> int:
    return _status_kib("VmRSS") * 1024


def peak_rss_bytes() -> int:
    return _status_kib("VmHWM") * 1024


def clear_peak_rss() -> None:
    """Reset VmHWM to the current RSS, so that the next peak is the next operation's own."""
    # Where that is not permitted, the peak includes earlier work.
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")
