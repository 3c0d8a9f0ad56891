"""ops/: the alert rules (promtool check + unit tests) and the Grafana dashboard, and that every
metric they use is declared in core/metrics.py."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from core import metrics

ROOT = Path(__file__).resolve().parents[1]
ALERTS = ROOT / "ops" / "prometheus" / "alerts.yml"
ALERTS_TEST = ROOT / "ops" / "prometheus" / "alerts_test.yml"
DASHBOARD = ROOT / "ops" / "grafana" / "flashgate-sale.json"
METRIC = re.compile(r"\bflashgate_[a-z0-9_]+")


def find_tool(name: str) -> str:
    """A tool from the venv (`make tools` puts promtool there) or PATH. Missing: skipped, or a
    failure under `make test` (FLASHGATE_REQUIRE_TOOLS=1), which installs it first."""
    local = Path(sys.prefix) / "bin" / name
    path = str(local) if local.exists() else shutil.which(name)
    if path is None:
        if os.environ.get("FLASHGATE_REQUIRE_TOOLS") == "1":
            pytest.fail(f"{name} not found: run `make tools`")
        pytest.skip(f"{name} not installed (make tools)")
    return path


def rule_exprs() -> list[str]:
    doc = yaml.safe_load(ALERTS.read_text())
    return [rule["expr"] for group in doc["groups"] for rule in group["rules"]]


def dashboard_exprs() -> list[str]:
    dash = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    exprs += [v["definition"] for v in dash["templating"]["list"] if "definition" in v]
    return exprs


def test_promtool_checks_and_unit_tests_the_alert_rules() -> None:
    promtool = find_tool("promtool")
    check = subprocess.run([promtool, "check", "rules", str(ALERTS)], capture_output=True,
                           text=True, timeout=60)
    assert check.returncode == 0, check.stdout + check.stderr
    unit = subprocess.run([promtool, "test", "rules", ALERTS_TEST.name], cwd=ALERTS_TEST.parent,
                          capture_output=True, text=True, timeout=60)
    assert unit.returncode == 0, unit.stdout + unit.stderr


def test_every_alert_is_unit_tested_and_has_a_runbook_entry() -> None:
    doc = yaml.safe_load(ALERTS.read_text())
    alerts = [r for g in doc["groups"] for r in g["rules"] if "alert" in r]
    tests = yaml.safe_load(ALERTS_TEST.read_text())
    tested = {t["alertname"] for case in tests["tests"] for t in case["alert_rule_test"]}
    assert {a["alert"] for a in alerts} <= tested
    runbook = (ROOT / "docs" / "OPERATIONS.md").read_text()
    for alert in alerts:
        assert alert["annotations"]["runbook"].endswith("#" + alert["alert"].lower())
        assert f"### {alert['alert']}" in runbook, alert["alert"]


def test_every_metric_used_by_alerts_and_dashboard_is_declared() -> None:
    declared = metrics.metric_names()
    used = {m for expr in rule_exprs() + dashboard_exprs() for m in METRIC.findall(expr)}
    assert used, "no metric found in ops/"
    assert used - declared == set()


def test_dashboard_has_a_stable_uid_and_a_datasource_variable() -> None:
    dash = json.loads(DASHBOARD.read_text())
    assert dash["uid"] == "flashgate-sale"
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dash["panels"]:
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert all(t["datasource"]["uid"] == "${datasource}" for t in panel["targets"])
    titles = " ".join(p["title"].lower() for p in dash["panels"])
    for needed in ("stock left", "by result", "p50 / p99", "delivery latency", "stream lag",
                   "dead letters", "risk decisions by rule"):
        assert needed in titles, needed
