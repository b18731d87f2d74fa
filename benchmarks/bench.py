"""bgtrace's cost per request and per task, side by side with the bare app and other tools.

    python benchmarks/bench.py            # full run (about 8 minutes), writes RESULTS.md
    python benchmarks/bench.py --quick    # under a minute: proves the benchmark still works

Sections: 1. in-process ASGI driver, CPU per request, variants interleaved; 2. a real server
(uvicorn + wrk); 3. ``/metrics`` render time and memory; 4. RSS after 10k and 100k requests;
5. where bgtrace's time goes (knockouts, cProfile); 1b. sections 1 and 3 in multiprocess mode.
Memory, render and multiprocess mode run in child processes.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
for entry in (str(HERE), str(ROOT)):
    if entry not in sys.path:
        sys.path.insert(0, entry)

import asgi_driver  # noqa: E402
import hot_path  # noqa: E402
import live_server  # noqa: E402
import results  # noqa: E402
import watchdog_idle  # noqa: E402
from variants import SHAPES, VARIANT_NAMES, VARIANTS, build  # noqa: E402

RESULTS = HERE / "RESULTS.md"
# Every tool in the same rounds, and the span floor: what the SDK alone does to the tail.
SERVER_VARIANTS = [
    "bare", "bgtrace", "bgtrace+tracing", "instrumentator", "starlette-exporter", "otel-fastapi",
    "fastapi-telemetry", "fastapi-telemetry+bgtrace", "otel-fastapi+bgtrace", "span-floor",
    "count-floor",
]  # fmt: skip
MEMORY_CASES = [
    ("bare", "async"), ("bgtrace", "async"), ("bgtrace+tracing", "async"),
    ("bgtrace+tracing", "def"),
]  # fmt: skip
KNOCKOUT_FULL = {"bgtrace", "bgtrace+tracing"}


@dataclass(frozen=True)
class Settings:
    rounds: int
    batch: int
    warmup: int
    knockout_rounds: int
    knockout_batch: int
    profile_requests: int
    server_rounds: int
    server_seconds: float
    server_warmup: float
    connections: int
    memory_checkpoints: tuple[int, int]
    memory_cases: tuple[tuple[str, str], ...]
    server_variants: tuple[str, ...]


FULL = Settings(
    rounds=40, batch=1000, warmup=50, knockout_rounds=20, knockout_batch=1000,
    profile_requests=5000, server_rounds=3, server_seconds=10, server_warmup=2, connections=16,
    memory_checkpoints=(10_000, 100_000), memory_cases=tuple(MEMORY_CASES),
    server_variants=tuple(SERVER_VARIANTS),
)  # fmt: skip
QUICK = Settings(
    rounds=3, batch=100, warmup=10, knockout_rounds=2, knockout_batch=100,
    profile_requests=300, server_rounds=2, server_seconds=2, server_warmup=1, connections=16,
    memory_checkpoints=(1_000, 5_000), memory_cases=(("bgtrace+tracing", "async"),),
    server_variants=("bare", "bgtrace", "bgtrace+tracing", "fastapi-telemetry+bgtrace"),
)  # fmt: skip


def _log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# --- 1. in-process -------------------------------------------------------------------------


def in_process(settings: Settings) -> dict[str, Any]:
    variants = []
    for shape in SHAPES:
        for name in VARIANT_NAMES:
            variant = build(name, shape)
            if variant is not None:
                variants.append(variant)
    try:
        batches = asgi_driver.run(variants, settings.rounds, settings.batch, settings.warmup)
    finally:
        for variant in variants:
            variant.close()
    return {
        shape: [asdict(row) for row in asgi_driver.summarise(batches, shape, VARIANT_NAMES)]
        for shape in SHAPES
    }


# --- 5. knockouts and profile --------------------------------------------------------------


def knockouts(settings: Settings, tracing: bool) -> list[dict[str, Any]]:
    shape = "async"
    studied, described, skipped = hot_path.knockouts(shape, tracing)
    if skipped:
        _log(f"knockouts skipped (bgtrace changed shape): {', '.join(skipped)}")
    try:
        batches = asgi_driver.run(
            studied, settings.knockout_rounds, settings.knockout_batch, settings.warmup
        )
    finally:
        for variant in studied:
            variant.close()
    full = next(v.name for v in studied if v.name in KNOCKOUT_FULL)
    rows = []
    for row in asgi_driver.summarise(batches, shape, [v.name for v in studied]):
        saving = statistics.median(
            f - k
            for f, k in zip(batches.cpu[shape, full], batches.cpu[shape, row.name], strict=True)
        )
        rows.append({**asdict(row), "saves_us": saving, "what": described.get(row.name, "")})
    gone = "skipped: bgtrace no longer has what it patches"
    for name in skipped:
        empty = dict.fromkeys(("cpu_us", "added_us", "ratio", "saves_us"))
        rows.append({"name": name, **empty, "what": gone})
    return rows


def profiles(settings: Settings) -> dict[str, Any]:
    return hot_path.profile(["bgtrace", "bgtrace+tracing"], "async", settings.profile_requests)


# --- child processes: render, memory, multiprocess mode -------------------------------------------


def _child(*args: str, env: dict[str, str] | None = None) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--child", *args],
        capture_output=True,
        text=True,
        timeout=1800,
        env=None if env is None else {**os.environ, **env},
    )
    if done.returncode != 0:
        raise RuntimeError(f"child {args} failed:\n{done.stderr}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def render_section(quick: bool) -> dict[str, Any]:
    return _child("render", *(["--quick"] if quick else []))


MULTIPROCESS_VARIANTS = ("bare", "bgtrace", "bgtrace+tracing")


def multiprocess_section(settings: Settings, quick: bool) -> dict[str, Any]:
    """Section 1 and 3 again with ``PROMETHEUS_MULTIPROC_DIR`` set, in a child process:
    prometheus_client picks its file-backed values at import, for the whole process."""
    with tempfile.TemporaryDirectory() as directory:
        sizes = (settings.rounds, settings.batch, settings.warmup)
        return _child("multiprocess", *map(str, sizes), *(["--quick"] if quick else []),
                      env={"PROMETHEUS_MULTIPROC_DIR": directory})  # fmt: skip


def memory_section(settings: Settings) -> list[dict[str, Any]]:
    checkpoints = ",".join(str(n) for n in settings.memory_checkpoints)
    return [_child("memory", name, shape, checkpoints) for name, shape in settings.memory_cases]


def run_child(args: list[str]) -> None:
    kind, *rest = args
    if kind == "render":
        import render

        result = render.measure(quick="--quick" in rest)
    elif kind == "memory":
        import memory_growth

        name, shape, checkpoints = rest
        result = memory_growth.measure(name, shape, [int(n) for n in checkpoints.split(",")])
    elif kind == "multiprocess":
        import render

        rounds, batch, warmup = (int(n) for n in rest[:3])
        built = [build(name, "async") for name in MULTIPROCESS_VARIANTS]
        studied = [v for v in built if v is not None]
        try:
            batches = asgi_driver.run(studied, rounds, batch, warmup)
        finally:
            for variant in studied:
                variant.close()
        rows = asgi_driver.summarise(batches, "async", MULTIPROCESS_VARIANTS)
        result = {
            "rows": [asdict(row) for row in rows],
            "render": render.measure_multiprocess(quick="--quick" in rest),
        }
    else:
        raise SystemExit(f"unknown child {kind!r}")
    print(json.dumps(result))


# --- 2. real server ------------------------------------------------------------------------


def server_section(settings: Settings) -> dict[str, Any]:
    runs = live_server.measure(
        list(settings.server_variants),
        settings.server_rounds,
        settings.server_seconds,
        settings.server_warmup,
        settings.connections,
    )
    return {"load_generator": live_server.load_generator(), "runs": [asdict(r) for r in runs]}


def server_summary(data: dict[str, Any]) -> list[dict[str, Any]]:
    runs = data["runs"]
    bare = {r["round"]: r for r in runs if r["variant"] == "bare"}
    summary = []
    for name in dict.fromkeys(r["variant"] for r in runs):
        mine = [r for r in runs if r["variant"] == name]
        ratios = [r["rps"] / bare[r["round"]]["rps"] for r in mine if r["round"] in bare]
        cpu_ratios = [
            r["server_cpu_us"] / bare[r["round"]]["server_cpu_us"]
            for r in mine
            if r["round"] in bare and r["server_cpu_us"] and bare[r["round"]]["server_cpu_us"]
        ]
        summary.append({
            "variant": name,
            "runs": len(mine),
            "rps": statistics.median(r["rps"] for r in mine),
            "rps_ratio": statistics.median(ratios) if ratios else float("nan"),
            "p50_ms": statistics.median(r["p50_ms"] for r in mine),
            "p90_ms": statistics.median(r["p90_ms"] for r in mine),
            "p99_ms": statistics.median(r["p99_ms"] for r in mine),
            "p999_ms": statistics.median(r["p999_ms"] for r in mine),
            "p99_ratio": statistics.median(
                r["p99_ms"] / bare[r["round"]]["p99_ms"] for r in mine if r["round"] in bare
            ) if bare else float("nan"),
            "errors": sum(r["errors"] for r in mine),
            "cpu_us": _median_of(mine, "server_cpu_us"),
            "cpu_ratio": statistics.median(cpu_ratios) if cpu_ratios else None,
            "tasks_per_request": _median_of(mine, "tasks_per_request"),
            **{key: _median_of(mine, key) for key in GC_KEYS},
        })  # fmt: skip
    return summary


# The collector's pauses per run (live_server.Run): full collections per 10k requests, total
# pause per 1k requests, longest pause.
GC_KEYS = ("gc_full_per_10k", "gc_pause_ms_per_1k", "gc_longest_ms")


def _median_of(runs: list[dict[str, Any]], key: str) -> float | None:
    values = [r[key] for r in runs if r.get(key) is not None]
    return statistics.median(values) if values else None


# --- targets -------------------------------------------------------------------------------


def _row(rows: list[dict[str, Any]], name: str) -> dict[str, Any] | None:
    return next((r for r in rows if r["name"] == name), None)


def targets(data: dict[str, Any], quick: bool) -> list[tuple[str, str, str]]:
    out: list[tuple[str, str, str]] = []

    def verdict(ok: bool) -> str:
        return ("PASS" if ok else "MISS") + (" (quick run)" if quick else "")

    rows = data.get("in_process", {}).get("async")
    if rows:
        metrics, tracing = _row(rows, "bgtrace"), _row(rows, "bgtrace+tracing")
        otel = _row(rows, "otel-fastapi")
        if metrics:
            out.append(("metrics only: ratio to bare <= 1.10 (async, in-process, median)",
                        f"{metrics['ratio']:.3f}", verdict(metrics["ratio"] <= 1.10)))  # fmt: skip
        if tracing:
            out.append(("metrics and tracing: ratio to bare <= 1.40",
                        f"{tracing['ratio']:.3f}", verdict(tracing["ratio"] <= 1.40)))  # fmt: skip
        if tracing and otel:
            half = otel["added_us"] / 2
            out.append((
                "metrics and tracing: added cost <= half of otel-fastapi's added cost",
                f"{tracing['added_us']:.1f} us vs {half:.1f} us (half of {otel['added_us']:.1f})",
                verdict(tracing["added_us"] <= half),
            ))  # fmt: skip
    if rows:
        out += _floor_targets(rows, verdict)
    server = data.get("server")
    if server:
        out += _tail_targets(server_summary(server), verdict)
    render = data.get("render")
    if render:
        slowest = max(render["text_ms"], render["openmetrics_ms"])
        measured = f"text {render['text_ms']:.0f} ms, OpenMetrics {render['openmetrics_ms']:.0f} ms"
        out.append((f"/metrics render, {render['series']} series, < 50 ms (both formats)",
                    measured, verdict(slowest < 50)))  # fmt: skip
    multiprocess = data.get("multiprocess", {}).get("render")
    if multiprocess:
        slowest = max(multiprocess["text_ms"], multiprocess["openmetrics_ms"])
        measured = (f"text {multiprocess['text_ms']:.0f} ms, OpenMetrics "
                    f"{multiprocess['openmetrics_ms']:.0f} ms (first scrape "
                    f"{multiprocess['first_ms']:.0f} ms)")  # fmt: skip
        out.append(("the same, multiprocess mode (one worker's files; after its first scrape)",
                    measured, verdict(slowest < 50)))  # fmt: skip
    memory = [m for m in data.get("memory", []) if m["variant"].startswith("bgtrace")]
    if memory:
        growth = max(m["points"][-1]["rss_mib"] - m["points"][0]["rss_mib"] for m in memory)
        first, last = memory[0]["points"][0]["requests"], memory[0]["points"][-1]["requests"]
        out.append((f"RSS growth {first:,} -> {last:,} requests < 2 MiB (worst bgtrace case)",
                    f"{growth:+.2f} MiB", verdict(growth < 2)))  # fmt: skip
    return out


TRACING_PEERS = ("otel-fastapi", "fastapi-telemetry")


def _floor_targets(rows: list[dict[str, Any]], verdict: Any) -> list[tuple[str, str, str]]:
    """Issue 17's in-process targets: near the floors, and cheap on top of other tracers."""
    out: list[tuple[str, str, str]] = []
    metrics, tracing = _row(rows, "bgtrace"), _row(rows, "bgtrace+tracing")
    count_floor, span_floor = _row(rows, "count-floor"), _row(rows, "span-floor")
    if metrics and count_floor:
        limit = 2 * count_floor["added_us"]
        out.append(("metrics only: added cost <= 2x count-floor's",
                    f"{metrics['added_us']:.1f} us vs {limit:.1f} us",
                    verdict(metrics["added_us"] <= limit)))  # fmt: skip
    if metrics and tracing and span_floor:
        limit = span_floor["added_us"] + metrics["added_us"]
        out.append(("tracing: added cost <= span-floor's + bgtrace's metrics-only",
                    f"{tracing['added_us']:.1f} us vs {limit:.1f} us",
                    verdict(tracing["added_us"] <= limit)))  # fmt: skip
    for peer in TRACING_PEERS:
        alone, both = _row(rows, peer), _row(rows, f"{peer}+bgtrace")
        if metrics and alone and both:
            added = both["added_us"] - alone["added_us"]
            limit = metrics["added_us"] + 15
            out.append((f"bgtrace on top of {peer}: <= its metrics-only cost + 15 us",
                        f"{added:.1f} us vs {limit:.1f} us", verdict(added <= limit)))  # fmt: skip
    return out


def _tail_targets(summary: list[dict[str, Any]], verdict: Any) -> list[tuple[str, str, str]]:
    """Issue 17's real-server targets: the p99 next to the bare app's and the tracing peers'."""
    out: list[tuple[str, str, str]] = []
    by_name = {r["variant"]: r for r in summary}
    metrics, tracing = by_name.get("bgtrace"), by_name.get("bgtrace+tracing")
    if metrics:
        ratio = metrics["p99_ratio"]
        out.append(("real server: metrics-only p99 <= 1.3x the bare app's (median of rounds)",
                    f"{ratio:.2f}x", verdict(ratio <= 1.3)))  # fmt: skip
    peers = [by_name[p] for p in TRACING_PEERS if p in by_name]
    if tracing and peers:
        best = min(peers, key=lambda r: r["p99_ms"])
        out.append((f"real server: tracing p99 <= the best tracing peer's ({best['variant']})",
                    f"{tracing['p99_ms']:.2f} ms vs {best['p99_ms']:.2f} ms",
                    verdict(tracing["p99_ms"] <= best["p99_ms"])))  # fmt: skip
    return out


# --- Markdown ------------------------------------------------------------------------------


def _f(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _head(data: dict[str, Any], quick: bool) -> list[str]:
    m = data["machine"]
    dirty = " with uncommitted changes in bgtrace/" if m["bgtrace_dirty"] else ""
    return [
        "# bgtrace benchmarks",
        "",
        f"Written by `python benchmarks/bench.py{' --quick' if quick else ''}` on "
        f"{data['date']} in {data['minutes']:.1f} minutes. bgtrace at commit `{m['commit']}`"
        f"{dirty}. Load average {data['load_before']} before, {data['load_after']} after.",
        "",
        "## Machine",
        "",
        f"{m['cpu']}, {m['nproc']} CPUs, {m['ram_gib']:.1f} GiB RAM, Linux {m['kernel']}, "
        f"{m['python']}.",
        "",
        results.table(["package", "version"], sorted(m["versions"].items())),
        "",
        "## Targets",
        "",
        results.table(["target", "measured", "result"], data["targets"]),
        "",
    ]


_IN_PROCESS_METHOD = (
    "The app is called directly with HTTP scopes (no sockets), one asyncio loop. {rounds} "
    "rounds; each round runs a batch of {batch} requests of every variant and shape in a new "
    "random order, after {warmup} untimed requests and a `gc.collect()`. CPU time is "
    "`time.process_time()` (all threads: the threadpool and the span processor's export thread "
    "count; each batch flushes its spans before the clock stops). *ratio* is the median over "
    "rounds of variant/bare in the same round, with its interquartile range; *added* likewise "
    "of variant minus bare. Spans per request are counted by the null exporter.\n\n"
    "App: FastAPI's background-tasks tutorial, `POST /send-notification/{{email}}?q=...`: the "
    "dependency queues one task, the handler another. The dependency is `async def` (the "
    "tutorial's is a `def`, which would add a threadpool hop to every variant and shrink every "
    "ratio). **async** shape: both tasks `async def` no-ops; **def** shape: the handler's task "
    "is a `def` no-op (threadpool)."
)


def _in_process_md(rows_by_shape: dict[str, list[dict[str, Any]]], s: Settings) -> list[str]:
    method = _IN_PROCESS_METHOD.format(rounds=s.rounds, batch=s.batch, warmup=s.warmup)
    parts = ["## 1. In-process: CPU per request", "", method, ""]
    parts += [results.table(["variant", "what"], VARIANTS), ""]
    header = ["variant", "CPU us/request", "added us", "ratio to bare [IQR]", "wall us/request",
              "spans/request"]  # fmt: skip
    for shape in SHAPES:
        rows = [
            [
                r["name"],
                _f(r["cpu_us"]),
                _f(r["added_us"]),
                f"{r['ratio']:.3f} [{r['ratio_p25']:.3f}-{r['ratio_p75']:.3f}]",
                _f(r["wall_us"]),
                _f(r["spans"]),
            ]
            for r in rows_by_shape[shape]
        ]
        parts += [f"### {shape} shape", "", results.table(header, rows), ""]
    return parts


RUN_HEADER = ["round", "variant", "requests/s", "p50 ms", "p90 ms", "p99 ms", "p99.9 ms",
              "server CPU us", "requests", "full GCs per 10k"]  # fmt: skip


def _server_md(data: dict[str, Any], s: Settings, uvicorn: str) -> list[str]:
    method = (
        f"uvicorn {uvicorn} (asyncio loop and h11 unless uvloop and httptools are installed: see "
        "the versions), one worker on 127.0.0.1, access log off, a fresh server per run. Load: "
        f"{data['load_generator']}, one thread, {s.connections} keep-alive connections, "
        f"{s.server_warmup:g} s warm-up then {s.server_seconds:g} s measured; variants "
        f"alternate, {s.server_rounds} rounds. With 2+ CPUs the server and the load generator "
        "are pinned to different CPUs. async shape. *vs bare*: median over rounds of the ratio "
        "to the bare run of the same round. *server CPU*: the server process's user+system time "
        "(all threads) during the measured run, per request answered; unlike requests/s it "
        "barely moves when other processes compete for the CPUs. *tasks/request*: bgtrace's own "
        "`bgtask_completed_total` over requests sent (a little over 2: requests in flight when "
        "the load stops ran their tasks but are not counted). *GC*: the cyclic garbage "
        "collector in the server during the measured run (`gc.callbacks`, "
        "`benchmarks/collector.py`): a full collection walks every object of the process and "
        "stops every request for its length, so these columns explain the p99 and p99.9 "
        "columns; medians over rounds."
    )
    header = ["variant", "runs", "requests/s (median)", "vs bare", "p50 ms", "p90 ms", "p99 ms",
              "p99 vs bare", "p99.9 ms", "server CPU us/request", "vs bare", "errors",
              "tasks/request", "full GCs per 10k requests", "GC pause ms per 1k requests",
              "longest GC pause ms"]  # fmt: skip
    summary = [
        [
            r["variant"],
            r["runs"],
            _f(r["rps"], 0),
            f"{r['rps_ratio']:.3f}",
            _f(r["p50_ms"], 2),
            _f(r["p90_ms"], 2),
            _f(r["p99_ms"], 2),
            _f(r["p99_ratio"], 2),
            _f(r["p999_ms"], 2),
            _f(r["cpu_us"]),
            _f(r["cpu_ratio"], 3),
            r["errors"],
            _f(r["tasks_per_request"], 3),
            _f(r["gc_full_per_10k"], 2),
            _f(r["gc_pause_ms_per_1k"], 2),
            _f(r["gc_longest_ms"]),
        ]
        for r in server_summary(data)
    ]
    runs = [
        [r["round"], r["variant"], _f(r["rps"], 0), _f(r["p50_ms"], 2), _f(r["p90_ms"], 2),
         _f(r["p99_ms"], 2), _f(r["p999_ms"], 2), _f(r["server_cpu_us"]), r["requests"],
         _f(r.get("gc_full_per_10k"), 2)]
        for r in data["runs"]
    ]  # fmt: skip
    return [
        "## 2. Real server",
        "",
        method,
        "",
        results.table(header, summary),
        "",
        "<details><summary>every run</summary>",
        "",
        results.table(RUN_HEADER, runs),
        "",
        "</details>",
        "",
    ]


def _render_md(r: dict[str, Any]) -> list[str]:
    method = (
        f"bgtrace's metrics in a fresh registry with {r['series']:,} live series (50 tasks x 20 "
        "routes x 3 origins, each queued, run and ended once; the duration observed with a "
        "trace-id exemplar, as with tracing on), plus `post_response` for the 20 routes, "
        "rendered by the function bgtrace's `/metrics` app runs in its worker thread "
        "(`exposition._render`, single-process mode: bgtrace writes its own families). "
        f"Median of {r.get('repeats', 9)} renders, in a child process of its own."
    )
    rows = [
        ["samples (text format)", f"{r['samples']:,}"],
        ["text format", f"{r['text_ms']:.1f} ms, {r['text_bytes'] / 1e6:.1f} MB"],
        ["OpenMetrics (what Prometheus asks for)",
         f"{r['openmetrics_ms']:.1f} ms, {r['openmetrics_bytes'] / 1e6:.1f} MB"],
        ["the same registry through prometheus_client's `generate_latest` (other exporters)",
         f"{r['generic_ms']:.0f} ms"],
        ["gzip of the text body (level 1, as `/metrics` sends it)",
         f"{r['gzip_ms']:.0f} ms, {r['gzip_bytes'] / 1e6:.2f} MB"],
        ["RSS of the populated metrics", f"{r['registry_rss_mib']:.1f} MiB"],
        ["peak RSS growth during one OpenMetrics render", f"{r['render_rss_peak_mib']:.1f} MiB"],
        ["peak Python allocations during one OpenMetrics render (tracemalloc)",
         f"{r['render_traced_peak_mib']:.1f} MiB"],
    ]  # fmt: skip
    parts = ["## 3. `/metrics` render", "", method, "", results.table(["measure", "value"], rows)]
    return [*parts, ""]


def _multiprocess_md(m: dict[str, Any]) -> list[str]:
    method = (
        "Several worker processes: the in-process benchmark of section 1 (async shape, same "
        "rounds) in a child process with `PROMETHEUS_MULTIPROC_DIR` set, where bgtrace copies "
        "its values into prometheus_client's file-backed metrics once a second (only they add "
        "up across workers; the copying thread's CPU counts), and the 3,000-series set of "
        "section 3: one copy of all of it to the files, then its render as `/metrics` serves "
        "it there (bgtrace's reader of the files of one worker: its first scrape reads every "
        "key, later ones the values only), and prometheus_client's `MultiProcessCollector` "
        "reading the same files, for comparison."
    )
    rows = [
        [r["name"], _f(r["cpu_us"]), _f(r["added_us"]), f"{r['ratio']:.3f} "
         f"[{r['ratio_p25']:.3f}-{r['ratio_p75']:.3f}]"]
        for r in m["rows"]
    ]  # fmt: skip
    r = m["render"]
    render_rows = [
        ["copy of every series to the files (one flush)", f"{r['flush_ms']:.0f} ms"],
        [
            "a flush with 10 of the 3,000 series changed (median)",
            f"{r['steady_flush_us']:.0f} µs",
        ],
        ["a worker's first scrape (every key read; OpenMetrics)", f"{r['first_ms']:.0f} ms"],
        ["text format (later scrapes, median)", f"{r['text_ms']:.0f} ms"],
        ["OpenMetrics (later scrapes, median)", f"{r['openmetrics_ms']:.0f} ms"],
        [
            "prometheus_client's MultiProcessCollector, text (any scrape)",
            f"{r['collector_ms']:.0f} ms",
        ],
        ["files written by the populated set", f"{r['files_mib']:.1f} MiB"],
    ]
    return [
        "## 1b. Multiprocess mode",
        "",
        method,
        "",
        results.table(["variant", "CPU us/request", "added us", "ratio to bare [IQR]"], rows),
        "",
        results.table(["/metrics render, 3,000 series", "value"], render_rows),
        "",
    ]


def _memory_md(cases: list[dict[str, Any]], s: Settings) -> list[str]:
    a, b = s.memory_checkpoints
    rows = []
    for case in cases:
        first, last = case["points"][0], case["points"][-1]
        rows.append(
            [
                case["variant"],
                case["shape"],
                f"{first['rss_mib']:.1f}",
                f"{last['rss_mib']:.1f}",
                f"{last['rss_mib'] - first['rss_mib']:+.2f}",
                f"{last['objects'] - first['objects']:+,}",
            ]
        )
    method = (
        f"In-process, a child process per case: RSS (`VmRSS`) after `gc.collect()` at {a:,} and "
        f"at {b:,} requests (two tasks each), and the growth of the number of objects the "
        "garbage collector tracks. Span processors are flushed first."
    )
    header = ["variant", "shape", f"RSS MiB @{a:,}", f"RSS MiB @{b:,}", "growth MiB",
              "objects growth"]  # fmt: skip
    return ["## 4. Memory", "", method, "", results.table(header, rows), ""]


def _knockouts_md(studies: dict[str, list[dict[str, Any]]], s: Settings) -> list[str]:
    method = (
        "Cost by knockout, async shape, in-process, interleaved as in section 1 "
        f"({s.knockout_rounds} rounds x {s.knockout_batch} requests): each row is bgtrace with "
        "one piece replaced by a stub, in this process only (`hot_path.py`). *saves* is the "
        "median per-round CPU difference to full bgtrace: what the piece costs per request, "
        "and the most that optimising it can save."
    )
    parts = ["## 5. Where bgtrace's time goes", "", method, ""]
    header = ["variant", "CPU us/request", "added us", "ratio to bare", "saves us", "what"]
    for label, study in studies.items():
        rows = [
            [r["name"], _f(r["cpu_us"]), _f(r["added_us"]), _f(r["ratio"], 3),
             _f(r["saves_us"]), r["what"]]
            for r in study
        ]  # fmt: skip
        parts += [f"### {label}", "", results.table(header, rows), ""]
    return parts


def _profiles_md(profiled: dict[str, Any], s: Settings) -> list[str]:
    method = (
        f"{s.profile_requests} requests per variant, async shape: each function's self time and "
        "calls per request under cProfile, minus the bare app's (so: what bgtrace's path adds, "
        "in bgtrace, prometheus_client or the OpenTelemetry SDK). cProfile's own overhead "
        "inflates every number, small functions most: read the ranking and the call counts "
        "here, and the knockouts above for real costs."
    )
    parts = ["### cProfile: self time added to the bare app's, by function", "", method, ""]
    header = ["function", "calls/request", "self us/request"]
    for name, profile in profiled.items():
        rows = [[f"`{r['function']}`", _f(r["calls"]), _f(r["self_us"], 2)]
                for r in profile["rows"]]  # fmt: skip
        total = f"{profile['added_us']:.0f} us/request added under cProfile"
        parts += [f"**{name}** ({total})", "", results.table(header, rows), ""]
    return parts


def _watchdog_md(data: dict[str, Any], in_process: dict[str, Any]) -> list[str]:
    idle, server = data["idle"], data["server"]
    parts = [
        "## 6. The event-loop watchdog", "",
        "A uvicorn server (one worker, the async tutorial app) with no traffic after one "
        "request: its own CPU over the window, as a share of one core, runs alternating. "
        "Under load: section 2's server CPU per request (wrk), medians over rounds. In "
        "process: section 1's `bgtrace` (watchdog on, the default) next to "
        "`bgtrace-no-watchdog`.", "",
    ]  # fmt: skip
    rows = [
        [name, _f(found["median_pct"], 3), ", ".join(f"{v:.3f}" for v in found["runs"]),
         _f(server.get(name))]
        for name, found in idle.items()
    ]  # fmt: skip
    rows.append(["bare", "", "", _f(server.get("bare"))])
    header = ["variant", "idle CPU % (median)", "runs", "server CPU µs/request"]
    parts += [results.table(header, rows), ""]
    for shape, found in in_process.items():
        by_name = {row["name"]: row for row in found}
        on, off = by_name.get("bgtrace"), by_name.get("bgtrace-no-watchdog")
        if on and off:
            parts.append(
                f"- {shape} shape, CPU µs/request added to the bare app: watchdog on "
                f"{_f(on['added_us'])}, off {_f(off['added_us'])}"
            )
    return [*parts, ""]


def markdown(data: dict[str, Any], settings: Settings, quick: bool) -> str:
    parts = _head(data, quick)
    if "in_process" in data:
        parts += _in_process_md(data["in_process"], settings)
    if "multiprocess" in data:
        parts += _multiprocess_md(data["multiprocess"])
    if "server" in data:
        parts += _server_md(data["server"], settings, data["machine"]["versions"]["uvicorn"])
    if "render" in data:
        parts += _render_md(data["render"])
    if "memory" in data:
        parts += _memory_md(data["memory"], settings)
    if "knockouts" in data:
        parts += _knockouts_md(data["knockouts"], settings)
    if "profiles" in data:
        parts += _profiles_md(data["profiles"], settings)
    if "watchdog" in data:
        parts += _watchdog_md(data["watchdog"], data.get("in_process", {}))
    parts += ["## Findings", "", results.findings_block(data.get("findings", "")), ""]
    return "\n".join(parts)


# --- main ----------------------------------------------------------------------------------

SECTIONS = (
    "in-process", "multiprocess", "server", "render", "memory", "knockouts", "profile",
    "watchdog",
)  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--quick", action="store_true", help="small counts, under a minute")
    parser.add_argument(
        "--write",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="write benchmarks/RESULTS.md (default: yes, unless --quick)",
    )
    parser.add_argument(
        "--only", action="append", choices=SECTIONS, help="run only these sections (repeatable)"
    )
    parser.add_argument("--json", type=Path, help="also dump the raw numbers here")
    parser.add_argument("--child", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        run_child(args.child)
        return 0
    settings = QUICK if args.quick else FULL
    write = args.write if args.write is not None else not args.quick
    wanted = set(args.only or SECTIONS)
    started = time.monotonic()
    data: dict[str, Any] = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": results.machine(ROOT),
        "load_before": results.load_average(),
    }
    if "in-process" in wanted:
        _log("1. in-process, variants interleaved")
        data["in_process"] = in_process(settings)
    if "multiprocess" in wanted:
        _log("1b. multiprocess mode")
        data["multiprocess"] = multiprocess_section(settings, args.quick)
    if "server" in wanted:
        _log("2. real server")
        data["server"] = server_section(settings)
    if "render" in wanted:
        _log("3. /metrics render")
        data["render"] = render_section(args.quick)
    if "memory" in wanted:
        _log("4. memory")
        data["memory"] = memory_section(settings)
    if "knockouts" in wanted:
        _log("5. knockouts")
        data["knockouts"] = {
            "metrics only (bgtrace)": knockouts(settings, tracing=False),
            "metrics and tracing (bgtrace+tracing)": knockouts(settings, tracing=True),
        }
    if "profile" in wanted:
        _log("5. cProfile")
        data["profiles"] = profiles(settings)
    if "watchdog" in wanted:
        _log("6. the event-loop watchdog at idle")
        data["watchdog"] = {
            "idle": watchdog_idle.idle_cpu(*((2, 3.0) if args.quick else (4, 30.0))),
            "server": watchdog_idle.server_cpu_per_request(
                settings.server_rounds, settings.server_seconds, settings.server_warmup,
                settings.connections,
            ),
        }  # fmt: skip
    data["load_after"] = results.load_average()
    data["minutes"] = (time.monotonic() - started) / 60
    data["targets"] = targets(data, args.quick)
    data["findings"] = results.kept_findings(RESULTS)
    text = markdown(data, settings, args.quick)
    print(text)
    if args.json:
        args.json.write_text(json.dumps(data, indent=1, default=str))
    if write:
        RESULTS.write_text(text)
        _log(f"wrote {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
