"""The README's screenshot of the live page, taken by the browser tests' own machinery.

``python -m tests.page_screenshot docs/live-page.png``: serves the demo app with the page on,
sends it traffic (tasks slowed down so that some are running and queued), opens the page in
headless chromium and saves a PNG of it mid-traffic.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import threading
import time
from pathlib import Path

from opentelemetry.sdk.trace import TracerProvider

from bgtrace.demo.app import SLOWNESS_ENV, create_app
from bgtrace.demo.traffic import drive
from tests.browser import browser_page
from tests.servers import serve_in_thread, wait_for


def main(path: str) -> None:
    os.environ[SLOWNESS_ENV] = "40"
    logging.getLogger("bgtrace").setLevel(logging.CRITICAL)
    app = create_app(
        tasks_path="/bgtasks",
        trace_url="http://localhost:16686/trace/{trace_id}",
        tracer_provider=TracerProvider(),
    )
    with serve_in_thread(app, access_log=False) as url, browser_page() as page:
        traffic = threading.Thread(
            target=lambda: asyncio.run(drive(url, 12.0, concurrency=6)), daemon=True
        )
        traffic.start()
        page.goto(f"{url}/bgtasks")
        time.sleep(8)  # a few refreshes into the traffic: tasks running, queued and failed
        count = "document.querySelectorAll('#running tbody tr').length"
        wait_for(lambda: page.evaluate(count) > 1, what="running tasks on the page")
        page.screenshot(Path(path))
        traffic.join(timeout=30)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "docs/live-page.png")
