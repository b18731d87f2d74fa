"""prometheus_client's multiprocess mode, as bgtrace sees it: per-process files under
``PROMETHEUS_MULTIPROC_DIR``, added up at each scrape."""

from __future__ import annotations

import atexit
import os
import threading

from prometheus_client.multiprocess import mark_process_dead

from . import logs

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
_MULTIPROC_ENVS = (MULTIPROC_ENV, "prometheus_multiproc_dir")  # the old name still counts


_exit_hook_lock = threading.Lock()
_exit_hook_registered = False


def multiprocess_mode() -> bool:
    """Whether prometheus_client writes metrics to per-process files: like prometheus_client
    itself, decided by the variable's presence, even when it is empty."""
    return any(name in os.environ for name in _MULTIPROC_ENVS)


def check_multiprocess_dir() -> None:
    """Say at start-up what prometheus_client would only show as wrong numbers."""
    if not multiprocess_mode():
        return
    path = next((os.environ[name] for name in _MULTIPROC_ENVS if os.environ.get(name)), "")
    if not os.path.isdir(path):
        logs.logger.error(
            "bgtrace: %s is set but %r is not a directory: prometheus_client writes this "
            "process's metrics elsewhere and /metrics cannot add up the workers; point it at "
            "an empty directory that exists before the workers start",
            MULTIPROC_ENV,
            path,
        )


def forget_process_at_exit() -> None:
    """In multiprocess mode, drop this process's live-sum gauges when it exits.

    Counters and histograms of a dead worker stay in the sum (they are totals); its gauges
    would otherwise report tasks queued or running forever.
    """
    global _exit_hook_registered
    if not multiprocess_mode():
        return
    with _exit_hook_lock:
        if not _exit_hook_registered:
            _exit_hook_registered = True
            atexit.register(_forget_process, os.getpid())


def _forget_process(pid: int) -> None:
    if os.getpid() != pid:
        return  # a forked child inherited the hook; it is not the process that registered
    forget_process()


def forget_process() -> None:
    """Remove this process's live-sum gauge files from the multiprocess directory."""
    try:
        mark_process_dead(os.getpid())  # type: ignore[no-untyped-call]
    except Exception:
        logs.internal_error("multiprocess exit")
