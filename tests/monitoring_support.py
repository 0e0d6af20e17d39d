"""Helpers for the monitoring tests: promtool (Debian's prometheus package) and the service's metric names."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from prometheus_client.metrics_core import Metric

from service.metrics import Metrics
from tests.conftest import REPO_ROOT

ALERTS = REPO_ROOT / "docker" / "alerts.yml"
SUFFIXES = {
    "counter": ("_total", "_created"),
    "histogram": ("_bucket", "_count", "_sum", "_created"),
    "info": ("_info",),
    "gauge": ("",),
}


def promtool(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    binary = shutil.which("promtool")
    if binary is None:
        pytest.fail("promtool not found: `make system-deps` installs Debian's prometheus package")
    return subprocess.run([binary, *args], cwd=cwd, capture_output=True, text=True, timeout=120)


def exported_metric_names() -> set[str]:
    """Every series name the service's /metrics can carry (families with their type's suffixes)."""
    families: list[Metric] = list(Metrics().registry.collect())
    return {family.name + suffix for family in families for suffix in SUFFIXES[family.type]}


def metric_names_in(expression: str) -> set[str]:
    """The service's metric names (``deepmad_*``) an expression reads."""
    return set(re.findall(r"\bdeepmad_[a-z0-9_]+\b", expression))


def check_alert(series: dict[str, str], alertname: str, eval_time: str, firing: list[str], work: Path) -> None:
    """Run docker/alerts.yml on ``series`` with promtool; exactly the ``firing`` instances alert at ``eval_time``.

    Every series must carry the labels job="deepmad" and instance="<name>"; the expected alerts are the
    rule's labels plus those, with its annotations filled in for the instance (rules whose
    annotations use only ``$labels.instance``).
    """
    rule = next(
        rule for group in yaml.safe_load(ALERTS.read_text())["groups"] for rule in group["rules"]
        if rule.get("alert") == alertname
    )  # fmt: skip

    def filled(text: str, instance: str) -> str:
        out = text.replace("{{ $labels.instance }}", instance)
        assert "{{" not in out, f"{alertname}: annotation uses more than $labels.instance: {text}"
        return out

    expected = [
        {
            "exp_labels": {**rule.get("labels", {}), "job": "deepmad", "instance": instance},
            "exp_annotations": {key: filled(value, instance) for key, value in rule.get("annotations", {}).items()},
        }
        for instance in firing
    ]
    shutil.copyfile(ALERTS, work / "alerts.yml")
    test = {
        "rule_files": ["alerts.yml"],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": [{"series": name, "values": values} for name, values in series.items()],
                "alert_rule_test": [{"eval_time": eval_time, "alertname": alertname, "exp_alerts": expected}],
            }
        ],
    }
    (work / "probe.test.yml").write_text(yaml.safe_dump(test))
    result = promtool("test", "rules", "probe.test.yml", cwd=work)
    assert result.returncode == 0, result.stdout + result.stderr
