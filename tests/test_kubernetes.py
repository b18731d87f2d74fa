"""examples/kubernetes/: what can be checked without a cluster. The dashboard ConfigMap and the
PrometheusRule are generated from dashboards/ (examples/kubernetes/generate.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml

from tests.servers import ROOT, prometheus_tool

KUBERNETES = ROOT / "examples" / "kubernetes"
MANIFESTS = sorted(KUBERNETES.glob("*.yaml"))


def manifest(name: str) -> dict[str, object]:
    loaded: dict[str, object] = yaml.safe_load((KUBERNETES / name).read_text())
    return loaded


def test_every_manifest_parses_and_names_its_api_version_and_kind() -> None:
    kinds = set()
    for path in MANIFESTS:
        documents = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
        assert documents, path.name
        for document in documents:
            assert document.get("apiVersion") and document.get("kind"), path.name
            assert document.get("metadata", {}).get("name"), path.name
            kinds.add(document["kind"])
    assert kinds >= {"Deployment", "Service", "PodMonitor", "Secret", "ConfigMap",
                     "PrometheusRule"}  # fmt: skip


def test_the_generated_files_are_up_to_date() -> None:
    # Fails when dashboards/ changed: python examples/kubernetes/generate.py fixes it.
    result = subprocess.run(
        [sys.executable, str(KUBERNETES / "generate.py"), "--check"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_configmap_holds_exactly_the_dashboard_for_grafanas_sidecar() -> None:
    configmap = manifest("dashboard-configmap.yaml")
    assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"  # type: ignore[index]
    data = configmap["data"]
    assert data == {"bgtrace.json": (ROOT / "dashboards" / "bgtrace.json").read_text()}


def test_the_prometheusrule_holds_the_alert_rules_and_passes_promtool(tmp_path: Path) -> None:
    rule = manifest("prometheusrule.yaml")
    spec = rule["spec"]
    alerts = yaml.safe_load((ROOT / "dashboards" / "alerts.yml").read_text())
    assert spec == {"groups": alerts["groups"]}
    promtool = prometheus_tool("promtool")
    rules = tmp_path / "rules.yml"
    rules.write_text(yaml.safe_dump(spec))
    result = subprocess.run(
        [promtool, "check", "rules", str(rules)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_deployment_reads_the_otlp_endpoint_and_the_token_from_the_environment() -> None:
    deployment = manifest("deployment.yaml")
    [container] = deployment["spec"]["template"]["spec"]["containers"]  # type: ignore[index]
    env = {e["name"]: e for e in container["env"]}
    assert "configMapKeyRef" in env["OTEL_EXPORTER_OTLP_ENDPOINT"]["valueFrom"]
    assert (
        env["BGTRACE_METRICS_TOKEN"]["valueFrom"]["secretKeyRef"]["name"] == "bgtrace-metrics-token"
    )
    assert int(env["WEB_CONCURRENCY"]["value"]) > 1
    monitor = manifest("podmonitor.yaml")
    [endpoint] = monitor["spec"]["podMetricsEndpoints"]  # type: ignore[index]
    assert endpoint["authorization"]["credentials"]["name"] == "bgtrace-metrics-token"
