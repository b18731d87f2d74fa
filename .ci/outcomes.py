"""pytest plugin: writes each test's outcome, ``{nodeid: outcome}``, to ``$OUTCOMES_FILE``.

Outcomes: passed, failed, error (setup or teardown failed), skipped, xfailed, xpassed. Works
under pytest-xdist: the controller receives every worker's reports and writes the file.
"""

from __future__ import annotations

import json
import os

import pytest

_outcomes: dict[str, str] = {}


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if hasattr(report, "wasxfail"):
        outcome = "xfailed" if report.skipped else "xpassed"
    elif report.failed:
        outcome = "failed" if report.when == "call" else "error"
    elif report.skipped:
        outcome = "skipped"
    else:
        outcome = "passed"
    # One outcome per test: the call phase's, unless a phase failed (a setup or teardown
    # error after a passing call makes the test an error).
    previous = _outcomes.get(report.nodeid)
    if previous in ("failed", "error"):
        return
    if previous is None or report.when == "call" or outcome in ("failed", "error"):
        _outcomes[report.nodeid] = outcome


def pytest_sessionfinish(session: pytest.Session) -> None:
    if hasattr(session.config, "workerinput"):  # an xdist worker: the controller writes
        return
    path = os.environ.get("OUTCOMES_FILE")
    if path:
        with open(path, "w") as f:
            json.dump(_outcomes, f, indent=0, sort_keys=True)
