"""The compose monitoring profile: alert rules (promtool check + unit tests), their wiring into
Prometheus, and the Grafana dashboard (parses, provisioned, every query valid PromQL over metrics the
service exports).
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from tests.conftest import REPO_ROOT
from tests.monitoring_support import ALERTS, exported_metric_names, metric_names_in, promtool

DOCKER = REPO_ROOT / "docker"
DASHBOARD = DOCKER / "grafana" / "dashboards" / "deepmad.json"
# The list: drift, anomalous share, error rate, p95 latency, not ready, reload failures.
REQUIRED_ALERTS = {
    "DeepmadScoreDrift",
    "DeepmadAnomalousShareHigh",
    "DeepmadServerErrors",
    "DeepmadSlowClassification",
    "DeepmadNotReady",
    "DeepmadModelReloadFailed",
}


def rules() -> list[dict]:
    return [rule for group in yaml.safe_load(ALERTS.read_text())["groups"] for rule in group["rules"]]


def test_alert_rules_pass_promtool_check() -> None:
    result = promtool("check", "rules", str(ALERTS))
    assert result.returncode == 0, result.stdout + result.stderr
    assert {rule["alert"] for rule in rules()} >= REQUIRED_ALERTS


def test_alert_rule_unit_tests() -> None:
    """docker/alerts.test.yml: each alert fires on a faulty series and stays silent on a healthy one."""
    result = promtool("test", "rules", "alerts.test.yml", cwd=DOCKER)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout
    tested = {case["alertname"] for test in yaml.safe_load((DOCKER / "alerts.test.yml").read_text())["tests"]
              for case in test.get("alert_rule_test", []) if case["exp_alerts"]}  # fmt: skip
    assert tested == {rule["alert"] for rule in rules()}, "every alert has a firing case"


def test_alert_rules_read_metrics_the_service_exports() -> None:
    exported = exported_metric_names()
    for rule in rules():
        names = metric_names_in(rule["expr"])
        assert names <= exported, f"{rule['alert']} reads {sorted(names - exported)}, which /metrics never has"


def test_prometheus_loads_the_rules_in_the_compose_profile() -> None:
    result = promtool("check", "config", str(DOCKER / "prometheus.yml"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "alerts.yml" in yaml.safe_load((DOCKER / "prometheus.yml").read_text())["rule_files"]
    services = yaml.safe_load((REPO_ROOT / "docker-compose.yml").read_text())["services"]
    prometheus, grafana = services["prometheus"], services["grafana"]
    assert "monitoring" in prometheus["profiles"] and "monitoring" in grafana["profiles"]
    assert "./docker/alerts.yml:/etc/prometheus/alerts.yml:ro" in prometheus["volumes"]  # beside prometheus.yml
    mounts = {volume.split(":")[0]: volume.split(":")[1] for volume in grafana["volumes"]}
    assert mounts["./docker/grafana/provisioning"] == "/etc/grafana/provisioning"
    provider = yaml.safe_load((DOCKER / "grafana/provisioning/dashboards/deepmad.yml").read_text())["providers"][0]
    assert mounts["./docker/grafana/dashboards"] == provider["options"]["path"]


def dashboard_queries() -> list[tuple[str, str]]:
    dashboard = json.loads(DASHBOARD.read_text())
    queries = []
    for panel in dashboard["panels"]:
        assert panel.get("targets"), f"panel {panel['title']!r} has no query"
        queries += [(panel["title"], target["expr"]) for target in panel["targets"]]
    return queries


def test_dashboard_parses_and_queries_exported_metrics() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    datasource = yaml.safe_load((DOCKER / "grafana/provisioning/datasources/prometheus.yml").read_text())
    uid = datasource["datasources"][0]["uid"]
    exported = exported_metric_names()
    assert dashboard["uid"] and dashboard["panels"]
    for panel in dashboard["panels"]:
        assert panel["datasource"]["uid"] == uid
    for title, expr in dashboard_queries():
        names = metric_names_in(expr)
        assert names, f"panel {title!r}: {expr} reads none of the service's metrics"
        assert names <= exported, f"panel {title!r} reads {sorted(names - exported)}, which /metrics never has"
    drift = {name for _, expr in dashboard_queries() for name in metric_names_in(expr)}
    assert {"deepmad_score_drift_psi", "deepmad_anomalous_share", "deepmad_ready"} <= drift


def test_dashboard_queries_are_valid_promql(tmp_path: Path) -> None:
    """promtool parses each query as a recording rule (Grafana's variables replaced by plain values)."""
    records = []
    for index, (_, expr) in enumerate(dashboard_queries()):
        plain = expr.replace("$__rate_interval", "5m").replace("$instance", ".*")
        records.append({"record": f"dashboard:panel_query_{index}", "expr": plain})
    path = tmp_path / "dashboard-queries.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": records}]}))
    result = promtool("check", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr
