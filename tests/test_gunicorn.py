"""bgtrace under ``gunicorn -k uvicorn_worker.UvicornWorker`` with several workers and
``PROMETHEUS_MULTIPROC_DIR``, configured by examples/gunicorn.conf.py: counts exact across
workers recycled by ``--max-requests``, and a worker killed by its ``--timeout`` keeps its
counters in the totals and takes its live gauges with it."""

from __future__ import annotations

from pathlib import Path

import httpx

from tests import servers
from tests.servers import ROOT, free_port, scrape, serve_process, total, wait_for

CONFIG = ROOT / "examples" / "gunicorn.conf.py"
WORK_TASKS = 2  # per POST /work


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


def run(tmp_path: Path, config: Path, requests: int) -> tuple[set[int], float, float]:
    """Serve the app, send ``requests`` POST /work then one POST /block; wait for gunicorn to
    kill the blocked worker. Returns the pids that answered /work, and the in-progress gauge
    while the block ran and after its worker was killed."""
    multiproc = tmp_path / "multiproc"
    multiproc.mkdir()
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
            for _ in range(requests):
                pids.add(client.post("/work").json()["pid"])

            def all_ended() -> bool:
                samples = scrape(url)
                return total(samples, "bgtask_completed_total") == requests * WORK_TASKS

            wait_for(all_ended, timeout=30, what="every /work task to end")
            blocked = client.post("/block").json()["pid"]

            def running() -> bool:
                return total(scrape(url), "bgtask_in_progress") == 1

            wait_for(running, timeout=15, what="the blocking task to show as running")
            during = total(scrape(url), "bgtask_in_progress")

            def killed() -> bool:
                return f"WORKER TIMEOUT (pid:{blocked})" in log.read_text(errors="replace")

            wait_for(killed, timeout=30, what="gunicorn to kill the blocked worker")
            # A new worker answers; gunicorn has reaped the old one (child_exit ran).
            wait_for(lambda: client.get("/metrics").status_code == 200, timeout=30, what="a worker")
            samples = scrape(url)
            assert total(samples, "bgtask_enqueued_total") == requests * WORK_TASKS + 1
            assert total(samples, "bgtask_completed_total") == requests * WORK_TASKS
            return pids, during, total(samples, "bgtask_in_progress")
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n--- gunicorn ---\n{log.read_text()[-4000:]}") from None


def test_counts_stay_exact_across_recycled_workers_and_a_timed_out_worker_leaves_no_gauge(
    tmp_path: Path,
) -> None:
    requests = 45  # --max-requests 10 on 2 workers: several recycled
    pids, during, after = run(tmp_path, CONFIG, requests)
    assert len(pids) > 2, f"no worker was recycled: {pids}"
    assert during == 1
    assert after == 0


def test_without_child_exit_a_timed_out_workers_running_task_stays_in_the_gauge(
    tmp_path: Path,
) -> None:
    # Why the example configuration has its child_exit hook.
    _, during, after = run(tmp_path, without_child_exit(tmp_path), 4)
    assert during == 1
    assert after == 1
