"""Where bgtrace's time per request goes: cost by knockout, and a cProfile of its hot path.

A knockout is bgtrace with one piece replaced by a stub (only in this process, only while its
own batches run): what the knockout saves against full bgtrace, in the same interleaved
rounds, is what that piece costs, and an upper bound on what optimising it can save. The
stubs break the metrics they skip; they measure, they are not proposals.
"""

from __future__ import annotations

import asyncio
import cProfile
import pstats
from collections.abc import Callable
from typing import Any

import variants
from asgi_driver import run_requests, start_lifespan
from variants import Variant, build, switch_to

import bgtrace
import bgtrace.config
import bgtrace.inflight
import bgtrace.instrumentation
import bgtrace.metrics
import bgtrace.middleware
import bgtrace.records
from bgtrace.accumulators import LocalSeries

Patch = tuple[Any, str, Any]
# (name, what it knocks out, the patches for one built variant)
Plan = tuple[str, str, Callable[[Variant], list[Patch]]]


class _Nothing:
    """Stands in for a histogram: every observation does nothing."""

    def observe(self, *args: Any) -> None:
        return None


_NOTHING = _Nothing()


def _nothing(*args: Any, **kwargs: Any) -> None:
    return None


def _handler(route: Any, stop: Any, frame: Any = None) -> tuple[str, None]:
    return "handler", None


def _with_patches(variant: Variant, name: str, patches: list[Patch]) -> Variant | None:
    """``variant`` renamed, with ``patches`` applied only while it is the active variant."""
    for obj, attribute, _ in patches:
        if not hasattr(obj, attribute):
            return None  # the library changed shape: this knockout no longer applies
    saved: list[Patch] = []

    def activate() -> None:
        bgtrace.instrument()
        for obj, attribute, value in patches:
            saved.append((obj, attribute, getattr(obj, attribute)))
            setattr(obj, attribute, value)

    def deactivate() -> None:
        while saved:
            obj, attribute, value = saved.pop()
            setattr(obj, attribute, value)
        bgtrace.uninstrument()

    variant.name = name
    variant.activate, variant.deactivate = activate, deactivate
    return variant


class _EmptyMiddleware:
    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        await self.app(scope, receive, send)


def _silence(*methods: str, post_response: bool = False) -> Callable[[Variant], list[Patch]]:
    def patches(variant: Variant) -> list[Patch]:
        found: list[Patch] = [(LocalSeries, method, _nothing) for method in methods]
        if post_response:
            assert variant.registry is not None
            metrics = bgtrace.metrics.task_metrics(variant.registry)
            found.append((metrics, "post_response_for", lambda route: _NOTHING))
        return found

    return patches


_SERIES_UPDATES = ("queued", "started", "finished", "dropped")
_ALL_METRICS = "- all metric updates"


def _metrics_knockouts() -> list[Plan]:
    mw, rec, ins = bgtrace.middleware, bgtrace.records, bgtrace.instrumentation
    return [
        ("- ensure_instrumented()", "per-request check that the class patch is in place",
         lambda v: [(mw, "ensure_instrumented", _nothing)]),
        ("- Config.tracing()", "the is-an-SDK-configured check, once per request",
         lambda v: [(bgtrace.config.Config, "tracing", lambda self: False)]),
        ("- origin frame walk", "origin.detect: code maps and frame walk, per task",
         lambda v: [(rec, "detect", _handler)]),
        ("- task naming", "naming.task_names (label and qualname, cached), per task",
         lambda v: [(rec, "task_names", lambda func: ("app.task", "task"))]),
        ("- series updates", "queued, started and finished values of a task's series (under "
         "the lock the record holds anyway)", _silence(*_SERIES_UPDATES)),
        ("- post_response observe", "post_response_for(route).observe(): 1 per request",
         _silence(post_response=True)),
        (_ALL_METRICS, "both rows above at once",
         _silence(*_SERIES_UPDATES, post_response=True)),
        ("- in-flight set", "inflight.add and discard: the live record set the stuck check, "
         "the oldest-age gauges and the live page read", lambda v: [
             (bgtrace.inflight, "add", _nothing), (bgtrace.inflight, "discard", _nothing)]),
        ("- loop watchdog check", "ensure_watched(): the per-request check that this loop "
         "has its watchdog", lambda v: [(mw, "ensure_watched", _nothing)]),
        ("skeleton only", "middleware + class patches; no per-task or end-of-request work",
         lambda v: [(ins, "track", _nothing), (ins, "task_starting", _nothing),
                    (ins, "background_starting", _nothing), (mw, "finish_request", _nothing),
                    (mw, "release", _nothing)]),
    ]  # fmt: skip


def _tracing_knockouts() -> list[Plan]:
    from opentelemetry.sdk.trace import Span

    rec = bgtrace.records
    return [
        ("- task spans", "TaskRecord._start_span stubbed (so no task span to end either)",
         lambda v: [(rec.TaskRecord, "_start_span", _nothing)]),
        ("- enqueued span events", "the bgtask.enqueued event per task on the request span",
         lambda v: [(Span, "add_event", _nothing)]),
        ("- foreign span lookup", "spans.foreign_task_span, per task start",
         lambda v: [(rec, "foreign_task_span", lambda: None)]),
        ("- exemplar trace id", "sampled_trace_id per task end: the exemplar's and the "
         "failure log's trace id", lambda v: [(rec, "sampled_trace_id", lambda span: None)]),
    ]  # fmt: skip


def knockouts(shape: str, tracing: bool) -> tuple[list[Variant], dict[str, str], list[str]]:
    """The variants of one knockout study, what each knocks out, and the knockouts skipped
    because this version of bgtrace no longer has what they patch."""
    skipped: list[str] = []
    studied = [build("bare", shape), variants.bgtrace_variant(shape, tracing)]
    described = {"bare": "no bgtrace at all", studied[1].name: "bgtrace as shipped"}
    if tracing:
        quiet = variants.bgtrace_variant(shape, True, request_spans="never")
        quiet.name = "request_spans=never"
        studied.append(quiet)
        described[quiet.name] = "no request span of bgtrace's own (a documented option)"
        plans = _tracing_knockouts() + [p for p in _metrics_knockouts() if p[0] == _ALL_METRICS]
    else:
        empty = build("bare", shape)
        assert empty is not None
        empty.name = "empty pure-ASGI middleware"
        empty.app.add_middleware(_EmptyMiddleware)
        studied.append(empty)
        described[empty.name] = "reference: the floor of any middleware"
        plans = _metrics_knockouts()
    for name, what, patches in plans:
        variant = variants.bgtrace_variant(shape, tracing)
        patched = _with_patches(variant, name, patches(variant))
        if patched is None:
            variant.close()
            skipped.append(name)
        else:
            studied.append(patched)
            described[name] = what
    return [v for v in studied if v is not None], described, skipped


async def _profile(name: str, shape: str, requests: int) -> tuple[pstats.Stats, int]:
    variant = build(name, shape)
    assert variant is not None
    stop = await start_lifespan(variant.app)
    switch_to(variant)
    await run_requests(variant.app, 200)
    profiler = cProfile.Profile()
    profiler.enable()
    await run_requests(variant.app, requests)
    profiler.disable()
    await stop()
    variant.close()
    return pstats.Stats(profiler), requests


def _self_times(name: str, shape: str, requests: int) -> dict[str, tuple[float, float]]:
    """Self microseconds and calls per request, by function, under cProfile."""
    stats, count = asyncio.run(_profile(name, shape, requests))
    entries: dict[Any, Any] = stats.stats  # type: ignore[attr-defined]
    times: dict[str, tuple[float, float]] = {}
    for (filename, line, function), (_, calls, self_s, _, _) in entries.items():
        key = f"{_short(filename)}:{line}({function})"
        previous = times.get(key, (0.0, 0.0))
        times[key] = (previous[0] + self_s / count * 1e6, previous[1] + calls / count)
    return times


def _short(filename: str) -> str:
    for marker in ("/site-packages/", "/bgtrace/", "/lib/python3"):
        if marker in filename:
            tail = filename.rsplit(marker, 1)[1]
            return "bgtrace/" + tail if marker == "/bgtrace/" else tail
    return filename


def profile(names: list[str], shape: str, requests: int, top: int = 20) -> dict[str, Any]:
    """Every function's self time per request under cProfile, minus the bare app's: the
    functions that bgtrace's path adds or makes slower, in any package. cProfile's overhead
    inflates small functions most: read the ranking, and the knockouts for real costs."""
    bare = _self_times("bare", shape, requests)
    found: dict[str, Any] = {}
    for name in names:
        times = _self_times(name, shape, requests)
        total = sum(t for t, _ in times.values()) - sum(t for t, _ in bare.values())
        rows = []
        for key, (self_us, calls) in times.items():
            base_us, base_calls = bare.get(key, (0.0, 0.0))
            if calls - base_calls > 0.01 or key.startswith("bgtrace/"):
                rows.append({"function": key, "calls": calls - base_calls,
                             "self_us": self_us - base_us})  # fmt: skip
        rows.sort(key=lambda row: row["self_us"], reverse=True)
        found[name] = {"added_us": total, "rows": rows[:top]}
    return found
