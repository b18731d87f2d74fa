"""Checks for the shipped Grafana dashboard and Prometheus alerting rules.

* ``promtool`` validates and unit-tests ``dashboards/alerts.yml`` and parses
  every dashboard expression (skipped without promtool unless ``CI=true``).
* Pure-Python checks make sure every PromQL expression only uses the metric
  names and labels bgtrace exports (``EXPORTED_METRICS``) and that the
  dashboard is wired to its template variables.
"""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import yaml

from tests.servers import prometheus_tool

ROOT = Path(__file__).resolve().parent.parent
DASHBOARDS = ROOT / "dashboards"
DASHBOARD_JSON = DASHBOARDS / "bgtrace.json"
ALERTS_YML = DASHBOARDS / "alerts.yml"
ALERTS_TEST_YML = DASHBOARDS / "alerts_test.yml"

PROMTOOL_TIMEOUT = 120  # seconds

# Metric names as queried in PromQL -> labels set by bgtrace. Counters are keyed
# by their `_total` sample name (prometheus_client names the family without it),
# histograms by their base name: they expose `<name>_bucket` (plus `le`),
# `<name>_sum` and `<name>_count`. Prometheus adds `job` and `instance`.
EXPORTED_METRICS: dict[str, set[str]] = {
    "bgtask_enqueued_total": {"task", "origin", "route"},
    "bgtask_completed_total": {"task", "origin", "route", "outcome"},
    "bgtask_failures_total": {"task", "origin", "route", "error_type"},
    "bgtask_dropped_total": {"task", "origin", "route", "reason"},
    "bgtask_duration_seconds": {"task", "origin", "route"},
    "bgtask_queue_wait_seconds": {"task", "origin", "route"},
    "bgtask_queue_length": {"task", "origin", "route"},
    "bgtask_in_progress": {"task", "origin", "route"},
    "bgtask_post_response_seconds": {"route"},
    # Why tasks are late (issue 13).
    "bgtask_oldest_running_seconds": {"task", "origin", "route"},
    "bgtask_oldest_queued_seconds": {"task", "origin", "route"},
    "bgtask_thread_wait_seconds": {"task", "origin", "route"},
    "bgtask_loop_blocked_seconds_total": {"task", "origin", "route"},
    # The process's own health: no task labels.
    "bgtrace_event_loop_lag_seconds": set(),
    "bgtrace_threadpool_tokens": set(),
    "bgtrace_threadpool_borrowed": set(),
    "bgtrace_threadpool_waiting": set(),
}
HISTOGRAM_METRICS = frozenset(
    {"bgtask_duration_seconds", "bgtask_queue_wait_seconds", "bgtask_post_response_seconds",
     "bgtask_thread_wait_seconds", "bgtrace_event_loop_lag_seconds"}
)  # fmt: skip
SCRAPE_LABELS = frozenset({"job", "instance"})
ALLOWED_LABELS = frozenset(
    {"task", "origin", "route", "outcome", "error_type", "reason", "le", "job", "instance"}
)

EXPECTED_ALERTS = frozenset(
    {
        "BgtaskFailureRatioHigh",
        "BgtaskDropped",
        "BgtaskQueueGrowing",
        "BgtaskQueueWaitHigh",
        "BgtaskRunningLong",
        "BgtaskStuck",
        "BgtaskEventLoopBlocked",
        "BgtaskThreadpoolSaturated",
    }
)

# Values used to turn Grafana expressions into plain PromQL.
GRAFANA_SUBSTITUTIONS = {
    "$__rate_interval": "1m",
    "$__interval": "1m",
    "$__range": "5m",
    "$job": ".*",
    "$route": ".*",
    "$task": ".*",
}


# --------------------------------------------------------------------------
# A small PromQL tokenizer: enough to find metric names and label names.
# --------------------------------------------------------------------------

_TOKEN_RE = re.compile(
    r"""
      (?P<space>\s+)
    | (?P<string>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'|`[^`]*`)
    | (?P<variable>\$\{?\w+\}?)                  # Grafana variable, e.g. $__range
    | (?P<number>\d[\w.]*|\.\d+)                 # numbers and durations: 0.95, 5m, 1d
    | (?P<ident>[A-Za-z_][A-Za-z0-9_]*)
    | (?P<op>=~|!~|!=|==|>=|<=|[-+*/%^=<>{}()\[\],:@])
    """,
    re.VERBOSE,
)
_MATCH_OPS = frozenset({"=", "!=", "=~", "!~"})
_GROUPING_KEYWORDS = frozenset({"by", "without", "on", "ignoring", "group_left", "group_right"})
_KEYWORDS = frozenset({"and", "or", "unless", "bool", "offset", "inf", "nan"})


def tokenize(expr: str) -> list[tuple[str, str]]:
    """Split a PromQL expression into (kind, text) tokens, dropping whitespace."""
    tokens, pos = [], 0
    while pos < len(expr):
        match = _TOKEN_RE.match(expr, pos)
        if match is None:
            raise ValueError(f"cannot tokenize {expr!r} at {expr[pos : pos + 20]!r}")
        if match.lastgroup != "space":
            tokens.append((match.lastgroup, match.group()))
        pos = match.end()
    return tokens


def analyse(expr: str) -> tuple[set[str], list[tuple[str | None, dict[str, str]]], set[str]]:
    """Return (metric names, selectors, grouping labels) used by ``expr``.

    A metric name is any bare identifier that is not a function, keyword or
    label name. Each selector is ``(metric or None, {label: matcher text})``.
    Grouping labels come from ``by/without/on/ignoring/group_left/group_right``.
    """
    tokens = tokenize(expr)
    metrics: set[str] = set()
    selectors: list[tuple[str | None, dict[str, str]]] = []
    grouping: set[str] = set()

    def text(i: int) -> str:
        return tokens[i][1] if i < len(tokens) else ""

    i = 0
    while i < len(tokens):
        kind, tok = tokens[i]
        if tok == "{":
            owner = tokens[i - 1][1] if i and tokens[i - 1][0] == "ident" else None
            matchers: dict[str, str] = {}
            i += 1
            while text(i) != "}":
                if i >= len(tokens):
                    raise ValueError(f"unclosed selector in {expr!r}")
                if tokens[i][0] == "ident" and text(i + 1) in _MATCH_OPS:
                    matchers[tokens[i][1]] = text(i + 1) + text(i + 2)
                    i += 3
                else:
                    i += 1
            selectors.append((owner, matchers))
        elif kind == "ident" and tok in _GROUPING_KEYWORDS and text(i + 1) == "(":
            i += 2
            while text(i) != ")":
                if i >= len(tokens):
                    raise ValueError(f"unclosed label list in {expr!r}")
                if tokens[i][0] == "ident":
                    grouping.add(tokens[i][1])
                i += 1
        elif (
            kind == "ident"
            and text(i + 1) not in {"(", "by", "without"}  # function or aggregation
            and tok.lower() not in _KEYWORDS
            and tok not in _GROUPING_KEYWORDS  # bare group_left / group_right
        ):
            metrics.add(tok)
            if text(i + 1) != "{":
                selectors.append((tok, {}))
        i += 1
    return metrics, selectors, grouping


def metric_family(name: str) -> str | None:
    """Map a series name to its EXPORTED_METRICS key (``None`` if unknown)."""
    if name in EXPORTED_METRICS and name not in HISTOGRAM_METRICS:
        return name
    base, _, suffix = name.rpartition("_")
    if base in HISTOGRAM_METRICS and suffix in {"bucket", "sum", "count"}:
        return base
    return None


def series_labels(name: str) -> set[str]:
    labels = set(EXPORTED_METRICS[metric_family(name)]) | SCRAPE_LABELS
    if name.endswith("_bucket"):
        labels.add("le")
    return labels


def label_problems(expr: str) -> list[str]:
    """Everything in ``expr`` that does not match what bgtrace exports."""
    metrics, selectors, grouping = analyse(expr)
    problems = []
    if not metrics:
        problems.append("no bgtrace metric referenced")
    unknown = {m for m in metrics if metric_family(m) is None}
    problems += [f"unknown metric {m}" for m in sorted(unknown)]
    known = metrics - unknown

    for owner, matchers in selectors:
        if owner is None or owner in unknown:
            problems += [f"label {label} outside a known metric" for label in matchers]
            continue
        for label in sorted(set(matchers) - series_labels(owner)):
            problems.append(f"{owner} has no label {label!r}")

    available = set().union(*(series_labels(m) for m in known)) if known else set()
    for label in sorted(grouping - available):
        problems.append(f"grouping label {label!r} not on any metric of the expression")
    for label in sorted(grouping - ALLOWED_LABELS):
        problems.append(f"label {label!r} is not exported")
    return problems


_LABEL_VALUES_RE = re.compile(r"^\s*label_values\((?P<selector>.+),\s*(?P<label>\w+)\s*\)\s*$")


def label_values_problems(query: str) -> list[str]:
    """Check a Grafana ``label_values(selector, label)`` variable query."""
    match = _LABEL_VALUES_RE.match(query)
    if match is None:
        return [f"not a label_values(selector, label) query: {query!r}"]
    problems = label_problems(match["selector"])
    metrics, _, _ = analyse(match["selector"])
    for metric in metrics:
        if metric_family(metric) and match["label"] not in series_labels(metric):
            problems.append(f"{metric} has no label {match['label']!r}")
    return problems


def substitute(expr: str) -> str:
    # Longest names first, so that no variable is replaced inside a longer one.
    for var in sorted(GRAFANA_SUBSTITUTIONS, key=len, reverse=True):
        expr = expr.replace(var, GRAFANA_SUBSTITUTIONS[var])
    return expr


# --------------------------------------------------------------------------
# Loading helpers
# --------------------------------------------------------------------------


def load_dashboard() -> dict:
    with DASHBOARD_JSON.open(encoding="utf-8") as f:
        return json.load(f)


def load_alert_rules() -> list[dict]:
    with ALERTS_YML.open(encoding="utf-8") as f:
        rules = yaml.safe_load(f)
    return [rule for group in rules["groups"] for rule in group["rules"]]


def iter_panels(panels: list[dict]) -> Iterator[dict]:
    """All panels, including those nested in collapsed rows."""
    for panel in panels:
        yield panel
        yield from iter_panels(panel.get("panels", []))


def dashboard_exprs(dashboard: dict) -> list[tuple[str, str]]:
    """(panel title / refId, expr) for every panel target."""
    return [
        (f"{panel.get('title')!r} {target.get('refId')}", target["expr"])
        for panel in iter_panels(dashboard["panels"])
        for target in panel.get("targets", [])
    ]


def template_vars(dashboard: dict) -> dict[str, dict]:
    return {var["name"]: var for var in dashboard["templating"]["list"]}


def variable_query(var: dict) -> str:
    query = var.get("query")
    return query.get("query", "") if isinstance(query, dict) else query


def run_promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [prometheus_tool("promtool"), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=PROMTOOL_TIMEOUT,
        check=False,
    )


# --------------------------------------------------------------------------
# promtool
# --------------------------------------------------------------------------


def test_promtool_check_rules() -> None:
    result = run_promtool("check", "rules", str(ALERTS_YML))
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_test_rules() -> None:
    result = run_promtool("test", "rules", str(ALERTS_TEST_YML))
    assert result.returncode == 0, result.stdout + result.stderr


def test_dashboard_exprs_parse_with_promtool(tmp_path: Path) -> None:
    """Wrap every dashboard expression in a recording rule so promtool parses it."""
    dashboard = load_dashboard()
    rules = [
        {"record": f"bgtrace_dashboard:expr_{n}", "expr": substitute(expr)}
        for n, (_, expr) in enumerate(dashboard_exprs(dashboard))
    ]
    rules_file = tmp_path / "dashboard_exprs.yml"
    rules_file.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = run_promtool("check", "rules", str(rules_file))
    assert result.returncode == 0, result.stdout + result.stderr


# --------------------------------------------------------------------------
# Metric and label names (no binary needed)
# --------------------------------------------------------------------------


def test_tokenizer_finds_metrics_and_labels() -> None:
    metrics, selectors, grouping = analyse(
        'sum by (job, task) (rate(bgtask_failures_total{job=~"$job", error_type!="x"}[1m]))'
        " / on (job, task) group_left"
        " sum without (instance) (bgtask_completed_total offset 5m)"
    )
    assert metrics == {"bgtask_failures_total", "bgtask_completed_total"}
    assert selectors == [
        ("bgtask_failures_total", {"job": '=~"$job"', "error_type": '!="x"'}),
        ("bgtask_completed_total", {}),
    ]
    assert grouping == {"job", "task", "instance"}


def test_label_check_rejects_wrong_names() -> None:
    assert label_problems("rate(bgtask_enqueud_total[5m])") == [
        "unknown metric bgtask_enqueud_total"
    ]
    assert label_problems('bgtask_post_response_seconds_bucket{task="x"}') == [
        "bgtask_post_response_seconds_bucket has no label 'task'"
    ]
    assert label_problems("sum by (pid) (bgtask_in_progress)") == [
        "grouping label 'pid' not on any metric of the expression",
        "label 'pid' is not exported",
    ]
    assert label_problems("sum by (le) (bgtask_duration_seconds_bucket)") == []
    assert label_problems("sum by (le) (bgtask_duration_seconds_count)") == [
        "grouping label 'le' not on any metric of the expression"
    ]


def test_exported_metrics_only_use_allowed_labels() -> None:
    for name, labels in EXPORTED_METRICS.items():
        assert name.startswith(("bgtask_", "bgtrace_"))
        assert labels <= ALLOWED_LABELS, name
    assert set(EXPORTED_METRICS) >= HISTOGRAM_METRICS


def test_dashboard_exprs_use_exported_metrics_and_labels() -> None:
    dashboard = load_dashboard()
    problems = {where: label_problems(expr) for where, expr in dashboard_exprs(dashboard)}
    for name, var in template_vars(dashboard).items():
        if var["type"] == "query":
            problems[f"variable {name}"] = label_values_problems(variable_query(var))
    assert {where: p for where, p in problems.items() if p} == {}


def test_alert_exprs_use_exported_metrics_and_labels() -> None:
    problems = {rule["alert"]: label_problems(rule["expr"]) for rule in load_alert_rules()}
    assert {alert: p for alert, p in problems.items() if p} == {}


def test_dashboard_covers_every_exported_metric() -> None:
    used = set()
    for _, expr in dashboard_exprs(load_dashboard()):
        used |= {metric_family(m) for m in analyse(expr)[0]}
    assert used == set(EXPORTED_METRICS)


def test_dashboard_selectors_use_template_variables() -> None:
    """Every selector filters on $job and $route, and on $task where the metric has it."""
    missing = []
    for where, expr in dashboard_exprs(load_dashboard()):
        for owner, matchers in analyse(expr)[1]:
            family = metric_family(owner)
            if family is None:  # reported by test_dashboard_exprs_use_exported_metrics_and_labels
                continue
            expected = {"job": '=~"$job"'}
            if "route" in EXPORTED_METRICS[family]:
                expected["route"] = '=~"$route"'
            if "task" in EXPORTED_METRICS[family]:
                expected["task"] = '=~"$task"'
            for label, matcher in expected.items():
                if matchers.get(label) != matcher:
                    missing.append(f"{where}: {owner} lacks {label}{matcher}")
    assert missing == []


def test_dashboard_uses_rate_interval() -> None:
    for where, expr in dashboard_exprs(load_dashboard()):
        for window in re.findall(r"\[([^\]]*)\]", expr):
            assert window in {"$__rate_interval", "$__range"}, f"{where}: [{window}]"


# --------------------------------------------------------------------------
# Dashboard structure
# --------------------------------------------------------------------------


def test_dashboard_metadata() -> None:
    dashboard = load_dashboard()
    assert dashboard["uid"] == "bgtrace"
    assert dashboard["title"] == "bgtrace — background tasks"
    assert dashboard["schemaVersion"] >= 39
    assert dashboard.get("id") is None
    assert "exemplarTraceIdDestinations" in dashboard["description"]
    assert "trace_id" in dashboard["description"]


def test_dashboard_template_variables() -> None:
    variables = template_vars(load_dashboard())
    assert {"datasource", "job", "route", "task"} <= set(variables)

    datasource = variables["datasource"]
    assert (datasource["type"], datasource["query"]) == ("datasource", "prometheus")

    assert variables["job"]["type"] == "query"
    assert variable_query(variables["job"]) == "label_values(bgtask_enqueued_total, job)"

    for name in ("route", "task"):
        var = variables[name]
        assert var["type"] == "query"
        pattern = rf"label_values\(bgtask_enqueued_total(\{{.*\}})?, {name}\)"
        assert re.fullmatch(pattern, variable_query(var))
        assert var["multi"] is True
        assert var["includeAll"] is True
        assert var["allValue"] == ".*"

    for var in variables.values():
        if var["type"] == "query":
            assert var["datasource"]["uid"] == "${datasource}"


def test_every_panel_uses_the_datasource_variable() -> None:
    panels = [p for p in iter_panels(load_dashboard()["panels"]) if p["type"] != "row"]
    assert panels
    for panel in panels:
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${datasource}", panel["title"]


def test_panel_ids_unique_and_layout_fits() -> None:
    panels = list(iter_panels(load_dashboard()["panels"]))
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    for panel in panels:
        pos = panel["gridPos"]
        assert pos["x"] + pos["w"] <= 24, panel["title"]


def test_run_time_panel_has_exemplars() -> None:
    panels = [p for p in iter_panels(load_dashboard()["panels"]) if p["type"] != "row"]
    targets = [t for p in panels for t in p["targets"] if t.get("exemplar")]
    assert any("bgtask_duration_seconds_bucket" in t["expr"] for t in targets)


# --------------------------------------------------------------------------
# Alert rules structure (no binary needed)
# --------------------------------------------------------------------------


def test_alert_rules_are_complete() -> None:
    with ALERTS_YML.open(encoding="utf-8") as f:
        groups = yaml.safe_load(f)["groups"]
    assert [g["name"] for g in groups] == ["bgtrace"]

    rules = load_alert_rules()
    assert {rule["alert"] for rule in rules} == EXPECTED_ALERTS
    for rule in rules:
        assert rule["labels"]["severity"] in {"warning", "critical"}, rule["alert"]
        annotations = rule["annotations"]
        assert {"summary", "description", "runbook"} <= set(annotations), rule["alert"]
        assert "$labels" in annotations["description"], rule["alert"]
    severities = {rule["alert"]: rule["labels"]["severity"] for rule in rules}
    assert severities["BgtaskDropped"] == "warning"


def test_alert_unit_tests_cover_every_alert() -> None:
    """alerts_test.yml has a firing case and a silent case for each alert."""
    with ALERTS_TEST_YML.open(encoding="utf-8") as f:
        spec = yaml.safe_load(f)
    assert spec["rule_files"] == ["alerts.yml"]
    assert spec["evaluation_interval"] == "1m"

    cases = [case for test in spec["tests"] for case in test.get("alert_rule_test", [])]
    fires = {c["alertname"] for c in cases if c.get("exp_alerts")}
    silent = {c["alertname"] for c in cases if not c.get("exp_alerts")}
    assert fires == EXPECTED_ALERTS
    assert silent == EXPECTED_ALERTS
    for case in cases:
        for alert in case.get("exp_alerts") or []:
            assert {"summary", "description", "runbook"} <= set(alert["exp_annotations"])
            assert "severity" in alert["exp_labels"]
