"""What the README promises about names, checked against the code: the options, the metric
families and the alert rules it documents are exactly those that exist."""

from __future__ import annotations

import inspect
import re

import yaml

from bgtrace import BackgroundTaskMiddleware, families
from tests.servers import ROOT

README = (ROOT / "README.md").read_text()
ALERTS = ROOT / "dashboards" / "alerts.yml"


def _section(title: str) -> str:
    start = README.index(f"\n## {title}\n")
    end = README.find("\n## ", start + 1)
    return README[start : end if end != -1 else len(README)]


def _options() -> dict[str, inspect.Parameter]:
    parameters = inspect.signature(BackgroundTaskMiddleware.__init__).parameters
    return {name: p for name, p in parameters.items() if name not in ("self", "app")}


def test_reference_signature_lists_exactly_the_middlewares_options_with_their_defaults() -> None:
    reference = _section("Reference")
    signature = re.search(r"`BackgroundTaskMiddleware\(app, \*, (.*?)\)`", reference, re.S)
    assert signature is not None
    documented = dict(
        option.split("=", 1) for option in re.split(r",\s+", " ".join(signature[1].split()))
    )
    options = _options()
    assert list(documented) == list(options)
    for name, default in documented.items():
        assert eval(default) == options[name].default, name  # literals only: None, "x", 0.1


def test_reference_table_lists_exactly_the_middlewares_options() -> None:
    rows = re.findall(r"^\| `(\w+)` \|", _section("Reference"), re.M)
    assert rows == list(_options())


def test_every_metric_family_is_in_the_metrics_tables() -> None:
    tables = _section("Metrics")
    rows = set(re.findall(r"^\| `(\w+)` \| (?:counter|gauge|histogram) \|", tables, re.M))
    every = {
        value.name + ("_total" if value.type == "counter" else "")
        for value in vars(families).values()
        if isinstance(value, families.Family)
    }
    assert every and rows == every


def test_every_alert_rule_is_named_in_the_readme() -> None:
    [group] = yaml.safe_load(ALERTS.read_text())["groups"]
    alerts = [rule["alert"] for rule in group["rules"]]
    assert alerts and [a for a in alerts if f"`{a}`" not in README] == []
