"""bgtrace under ``gunicorn -k uvicorn_worker.UvicornWorker`` with several workers and
``PROMETHEUS_MULTIPROC_DIR``, configured by examples/gunicorn.conf.py: counts exact across
workers recycled by ``--max-requests``, and a worker killed by its ``--timeout`` keeps its
counters in the totals and takes its live gauges with it."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import httpx

from tests import servers
from tests.servers import ROOT, free_port, scrape, serve_process, total, wait_for

CONFIG = ROOT / "examples" / "gunicorn.conf.py"
WORK_TASKS = 2  # per POST /work
T = TypeVar("T")


def resent(call: Callable[[], T]) -> T:
    """``call()``, again while a recycled worker drops its connection: uvicorn's graceful
    shutdown closes the connections it accepted but had parsed no request from (unanswered, or
    reset when the request's bytes were still unread), so that request never reached the app
    and sending it again counts nothing twice."""
    for _ in range(20):
        try:
            return call()
        except (httpx.RemoteProtocolError, httpx.ReadError):
            continue
    raise AssertionError("20 connections in a row closed unanswered")


def gunicorn_args(port: int, config: Path, *extra: str) -> list[str]:
    return ["-m", "gunicorn", "-c", str(config), "--bind", f"127.0.0.1:{port}",
            "--workers", "2", "--graceful-timeout", "5", *extra,
            "tests.gunicorn_app:app"]  # fmt: skip


def without_child_exit(tmp_path: Path) -> Path:
    """examples/gunicorn.conf.py without its child_exit hook."""
    text = CONFIG.read_text()
    config = tmp_path / "gunicorn-no-hook.conf.py"
    config.write_text(text.split("def child_exit")[0])
    return config


def run(
    tmp_path: Path, config: Path, requests: int, *, recycle: bool
) -> tuple[set[int], float, float]:
    """Serve the app, send at least ``requests`` POST /work (with ``recycle``, until a worker
    started by a recycling has answered one) then one POST /block; wait for gunicorn to kill
    the blocked worker. Returns the pids that answered /work, and the in-progress gauge while
    the block ran and after its worker was killed."""
    multiproc = tmp_path / "multiproc"
    multiproc.mkdir()
    release = tmp_path / "release"
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    args = gunicorn_args(
        port, config, "--max-requests", "10", "--max-requests-jitter", "0", "--timeout", "3"
    )
    env = {servers.MULTIPROC_ENV: str(multiproc)}
    log = tmp_path / "gunicorn.log"
    pids: set[int] = set()
    with (
        serve_process(args, env, f"{url}/metrics", log=log),
        httpx.Client(base_url=url, timeout=30, headers={"connection": "close"}) as client,
    ):
        try:
            # A worker checks its request count between event loop ticks, a tenth of a second
            # apart: fast requests may all reach the first two workers.
            sent = 0
            while sent < requests or (recycle and len(pids) <= 2):
                assert sent < 1000, f"no worker was recycled: {pids}"
                pids.add(resent(lambda: client.post("/work")).json()["pid"])
                sent += 1

            def all_ended() -> bool:
                samples = resent(lambda: scrape(url))
                return total(samples, "bgtask_completed_total") == sent * WORK_TASKS

            wait_for(all_ended, timeout=30, what="every /work task to end")
            block = resent(lambda: client.post("/block", params={"release": str(release)}))
            blocked = block.json()["pid"]

            def running() -> bool:
                return total(resent(lambda: scrape(url)), "bgtask_in_progress") == 1

            wait_for(running, timeout=30, what="the blocking task to show as running")
            during = total(resent(lambda: scrape(url)), "bgtask_in_progress")
            release.touch()  # now it blocks its worker's event loop

            def killed() -> bool:
                return f"WORKER TIMEOUT (pid:{blocked})" in log.read_text(errors="replace")

            wait_for(killed, timeout=30, what="gunicorn to kill the blocked worker")

            # A new worker answers; gunicorn has reaped the old one (child_exit ran).
            def answered() -> bool:
                return resent(lambda: client.get("/metrics")).status_code == 200

            wait_for(answered, timeout=30, what="a worker")
            samples = resent(lambda: scrape(url))
            assert total(samples, "bgtask_enqueued_total") == sent * WORK_TASKS + 1
            assert total(samples, "bgtask_completed_total") == sent * WORK_TASKS
            return pids, during, total(samples, "bgtask_in_progress")
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n--- gunicorn ---\n{log.read_text()[-4000:]}") from None


def test_counts_stay_exact_across_recycled_workers_and_a_timed_out_worker_leaves_no_gauge(
    tmp_path: Path,
) -> None:
    requests = 45  # --max-requests 10 on 2 workers: several recycled
    pids, during, after = run(tmp_path, CONFIG, requests, recycle=True)
    assert len(pids) > 2, f"no worker was recycled: {pids}"
    assert during == 1
    assert after == 0


def test_without_child_exit_a_timed_out_workers_running_task_stays_in_the_gauge(
    tmp_path: Path,
) -> None:
    # Why the example configuration has its child_exit hook.
    _, during, after = run(tmp_path, without_child_exit(tmp_path), 4, recycle=False)
    assert during == 1
    assert after == 1
