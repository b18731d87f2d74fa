"""bgtrace's own log lines: one per failed task, and each internal error (once per place)."""

from __future__ import annotations

import logging

logger = logging.getLogger("bgtrace")

_reported: set[str] = set()


def internal_error(where: str) -> None:
    """Log an error in bgtrace's own bookkeeping; the app and its tasks carry on untouched.

    Only the first error of each place gets a traceback, so a broken registry or tracer
    cannot flood the logs.
    """
    try:
        if where in _reported:
            logger.debug("bgtrace internal error in %s (repeated)", where)
            return
        _reported.add(where)
        logger.error("bgtrace internal error in %s; bgtrace carries on", where, exc_info=True)
    except Exception:  # pragma: no cover - logging itself broken
        pass


def task_failed(task: str, origin: str, route: str, error_type: str, trace_id: str) -> None:
    # No exception message: it may quote the task's arguments. The traceback still reaches
    # the server's own log, since the exception propagates as without bgtrace.
    logger.error(
        "background task failed: task=%s origin=%s route=%s error_type=%s trace_id=%s",
        task,
        origin,
        route,
        error_type,
        trace_id,
    )
