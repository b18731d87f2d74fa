"""A real server: uvicorn on 127.0.0.1, one worker, loaded by wrk over loopback.

Each run starts a fresh server for one variant; runs alternate between variants, round after
round. With two or more CPUs the server and wrk are pinned to different ones, so that they do
not take turns on one core.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import collector
from variants import PATH, QUERY

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
_UNITS_MS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3}
# wrk's --latency table stops at p99: the script prints p90, p99 and p99.9 (microseconds).
_WRK_SCRIPT = """wrk.method = "POST"
wrk.headers["Content-Length"] = "0"
done = function(summary, latency, requests)
  for _, p in pairs({90, 99, 99.9}) do
    io.write(string.format("percentile %g %d\\n", p, latency:percentile(p)))
  end
end
"""


@dataclass
class Run:
    variant: str
    round: int
    rps: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    p999_ms: float
    requests: int
    errors: int
    tasks_per_request: float | None
    # The server process's own CPU (all threads) per request answered: unlike requests/s, it
    # does not move when something else on the machine competes for the CPUs.
    server_cpu_us: float | None
    # The cyclic collector during the measured run (see collector.py): full collections per
    # 10,000 requests, all its pauses' total per 1,000 requests, its longest pause.
    gc_full_per_10k: float | None = None
    gc_pause_ms_per_1k: float | None = None
    gc_longest_ms: float | None = None


def wrk_available() -> bool:
    return shutil.which("wrk") is not None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _pin(cpu: int) -> list[str]:
    if (os.cpu_count() or 1) >= 2 and shutil.which("taskset"):
        return ["taskset", "-c", str(cpu)]
    return []


def _start(variant: str, port: int, gc_stats: str = "") -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "BENCH_GC_STATS": gc_stats,
        "BENCH_VARIANT": variant,
        "BENCH_SHAPE": "async",
        "PYTHONPATH": os.pathsep.join([str(ROOT), str(HERE)]),
    }
    command = [
        *_pin(0), sys.executable, "-m", "uvicorn", "variants:server_app", "--factory",
        "--host", "127.0.0.1", "--port", str(port),
        "--no-access-log", "--log-level", "warning",
    ]  # fmt: skip
    return subprocess.Popen(command, env=env, cwd=HERE, start_new_session=True)


def _request(port: int, method: str, path: str) -> tuple[int, bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        connection.request(method, path, headers={"Content-Length": "0"})
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def _wait_ready(port: int, server: subprocess.Popen[bytes], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"server exited with {server.returncode}")
        try:
            status, _ = _request(port, "POST", f"{PATH}?{QUERY.decode()}")
            if status == 200:
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError("server did not answer in time")


def _stop(server: subprocess.Popen[bytes]) -> None:
    if server.poll() is None:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(10)


def _cpu_seconds(pid: int) -> float | None:
    try:
        # Fields after the parenthesised command name; utime and stime are the 12th and 13th.
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _ms(text: str) -> float:
    match = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text)
    if match is None:
        raise ValueError(f"unexpected wrk duration {text!r}")
    return float(match.group(1)) * _UNITS_MS[match.group(2)]


def parse_wrk(output: str) -> dict[str, Any]:
    rps = re.search(r"Requests/sec:\s+([\d.]+)", output)
    p50 = re.search(r"^\s+50%\s+(\S+)", output, re.M)
    p99 = re.search(r"^\s+99%\s+(\S+)", output, re.M)
    total = re.search(r"(\d+) requests in", output)
    if not (rps and p50 and p99 and total):
        raise RuntimeError(f"cannot parse wrk output:\n{output}")
    errors = sum(int(n) for n in re.findall(r"(?:connect|read|write|timeout) (\d+)", output))
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    # The script's own lines, in microseconds; the --latency table rounds to two digits.
    cuts = {
        float(p): int(us) / 1e3 for p, us in re.findall(r"^percentile (\S+) (\d+)$", output, re.M)
    }
    return {
        "rps": float(rps.group(1)),
        "p50_ms": _ms(p50.group(1)),
        "p90_ms": cuts.get(90.0, float("nan")),
        "p99_ms": cuts.get(99.0, _ms(p99.group(1))),
        "p999_ms": cuts.get(99.9, float("nan")),
        "requests": int(total.group(1)),
        "errors": errors + (int(non_2xx.group(1)) if non_2xx else 0),
    }


def _load(port: int, script: str, duration: float, connections: int) -> dict[str, Any]:
    if not wrk_available():
        return _python_load(port, duration, connections)
    command = [
        *_pin(1), "wrk", "-t1", f"-c{connections}", f"-d{max(1, round(duration))}s", "--latency",
        "-s", script, f"http://127.0.0.1:{port}{PATH}?{QUERY.decode()}",
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=duration + 60)
    if done.returncode != 0:
        raise RuntimeError(f"wrk failed: {done.stderr}")
    return parse_wrk(done.stdout)


def _python_load(port: int, duration: float, connections: int) -> dict[str, Any]:
    command = [
        *_pin(1), sys.executable, str(HERE / "loadgen.py"), "127.0.0.1", str(port),
        f"{PATH}?{QUERY.decode()}", str(duration), str(connections),
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=duration + 60)
    if done.returncode != 0:
        raise RuntimeError(f"load generator failed: {done.stderr}")
    result: dict[str, Any] = json.loads(done.stdout.splitlines()[-1])
    return result


def load_generator() -> str:
    if wrk_available():
        done = subprocess.run(["wrk", "--version"], capture_output=True, text=True)
        return (done.stdout + done.stderr).split("\n", 1)[0].split(" Copyright")[0].strip()
    return "benchmarks/loadgen.py (asyncio, keep-alive; wrk not found)"


def _tasks_completed(port: int) -> float | None:
    """bgtrace's own count of tasks that ran: proof that the tasks were measured."""
    status, body = _request(port, "GET", "/metrics")
    if status != 200:
        return None
    total = 0.0
    for line in body.decode().splitlines():
        if line.startswith("bgtask_completed_total{"):
            total += float(line.rsplit(" ", 1)[1])
    return total


def run_once(
    variant: str, round_: int, script: str, duration: float, warmup: float, connections: int
) -> Run:
    port = _free_port()
    gc_stats = str(Path(script).with_name(f"gc-{variant}-{round_}.json"))
    server = _start(variant, port, gc_stats)
    try:
        _wait_ready(port, server)
        warm = _load(port, script, warmup, connections)
        os.kill(server.pid, signal.SIGUSR1)  # the collector's counts start now
        cpu_before = _cpu_seconds(server.pid)
        result = _load(port, script, duration, connections)
        cpu_after = _cpu_seconds(server.pid)
        cpu_us = None
        if cpu_before is not None and cpu_after is not None and result["requests"]:
            cpu_us = (cpu_after - cpu_before) / result["requests"] * 1e6
        pauses = collector.read(server.pid, gc_stats)
        tasks = None
        if "bgtrace" in variant:
            completed = _tasks_completed(port)
            # Every request (readiness probe, warm-up, measured) queued two tasks.
            sent = 1 + warm["requests"] + result["requests"]
            tasks = None if completed is None else completed / sent
    finally:
        _stop(server)
    run = Run(variant, round_, result["rps"], result["p50_ms"], result["p90_ms"],
              result["p99_ms"], result["p999_ms"], result["requests"], result["errors"], tasks,
              cpu_us)  # fmt: skip
    if pauses is not None and result["requests"]:
        run.gc_full_per_10k = pauses["full_collections"] / result["requests"] * 1e4
        run.gc_pause_ms_per_1k = pauses["pause_ms"] / result["requests"] * 1e3
        run.gc_longest_ms = pauses["longest_ms"]
    return run


def measure(
    variants: list[str], rounds: int, duration: float, warmup: float, connections: int
) -> list[Run]:
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        script = str(Path(tmp) / "post.lua")
        Path(script).write_text(_WRK_SCRIPT)
        for round_ in range(rounds):
            # Alternate the order too, so that neither variant always runs first.
            order = variants if round_ % 2 == 0 else list(reversed(variants))
            for variant in order:
                runs.append(run_once(variant, round_, script, duration, warmup, connections))
    return runs
