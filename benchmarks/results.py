"""The machine, the versions, and the Markdown of RESULTS.md."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import re
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

PACKAGES = (
    "bgtrace", "fastapi", "starlette", "uvicorn", "h11", "httptools", "uvloop", "anyio",
    "pydantic", "prometheus_client", "opentelemetry-api", "opentelemetry-sdk",
    "prometheus-fastapi-instrumentator", "starlette-exporter",
    "opentelemetry-instrumentation-fastapi", "opentelemetry-instrumentation-asgi",
)  # fmt: skip
FINDINGS_START = "<!-- findings:start (kept across runs: written by hand) -->"
FINDINGS_END = "<!-- findings:end -->"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _ram_gib() -> float:
    try:
        match = re.search(r"MemTotal:\s+(\d+) kB", Path("/proc/meminfo").read_text())
        return int(match.group(1)) / 1024 / 1024 if match else 0.0
    except OSError:
        return 0.0


def load_average() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "unknown"


def _git(root: Path, *args: str) -> str:
    try:
        done = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return done.stdout.strip()


def machine(root: Path) -> dict[str, Any]:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "not installed"
    dirty = _git(root, "status", "--porcelain", "--", "bgtrace")
    return {
        "cpu": _cpu_model(),
        "nproc": os.cpu_count() or 0,
        "ram_gib": _ram_gib(),
        "kernel": platform.release(),
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "versions": versions,
        "commit": _git(root, "rev-parse", "--short", "HEAD") or "unknown",
        "bgtrace_dirty": bool(dirty),
    }


def table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def kept_findings(path: Path) -> str:
    """The hand-written findings of the previous RESULTS.md, if any."""
    try:
        text = path.read_text()
    except OSError:
        return ""
    start, end = text.find(FINDINGS_START), text.find(FINDINGS_END)
    if start < 0 or end < start:
        return ""
    return text[start + len(FINDINGS_START) : end].strip()


def findings_block(text: str) -> str:
    body = text or "_No hand-written findings yet._"
    return f"{FINDINGS_START}\n{body}\n{FINDINGS_END}"
