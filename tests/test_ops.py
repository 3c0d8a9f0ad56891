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
    check = subprocess.run(
        [promtool, "check", "rules", str(ALERTS)], capture_output=True, text=True, timeout=60
    )
    assert check.returncode == 0, check.stdout + check.stderr
    unit = subprocess.run(
        [promtool, "test", "rules", ALERTS_TEST.name],
        cwd=ALERTS_TEST.parent,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert unit.returncode == 0, unit.stdout + unit.stderr


def test_every_alert_is_unit_tested_and_has_a_runbook_entry() -> None:
    doc = yaml.safe_load(ALERTS.read_text())
    alerts = [r for g in doc["groups"] for r in g["rules"] if "alert" in r]
    tests = yaml.safe_load(ALERTS_TEST.read_text())
    tested = {t["alertname"] for case in tests["tests"] for t in case["alert_rule_test"]}
    assert {a["alert"] for a in alerts} <= tested
    runbook = (ROOT / "docs" / "OPERATIONS.md").read_text()
    for alert in alerts:
        assert alert["annotations"]["runbook_url"] == RUNBOOK_URL + alert["alert"].lower()
        assert f"### {alert['alert']}" in runbook, alert["alert"]


RUNBOOK_URL = "https://github.com/flashgate/flashgate/blob/main/docs/OPERATIONS.md#"


def github_anchor(heading: str) -> str:
    """The id GitHub gives a Markdown heading: lower case, punctuation dropped but '-' and
    '_', spaces to '-'."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def test_every_runbook_url_is_a_real_url_to_a_heading_of_the_runbook() -> None:
    headings = [
        line.lstrip("#").strip()
        for line in (ROOT / "docs" / "OPERATIONS.md").read_text().splitlines()
        if line.startswith("#")
    ]
    anchors = {github_anchor(h) for h in headings}
    doc = yaml.safe_load(ALERTS.read_text())
    urls = [
        r["annotations"].get("runbook_url")
        for g in doc["groups"]
        for r in g["rules"]
        if "alert" in r
    ]
    assert urls and all(urls), "every alert carries a runbook_url"
    for url in urls:
        assert url.startswith(RUNBOOK_URL), url
        assert url.removeprefix(RUNBOOK_URL) in anchors, url
    assert "runbook:" not in ALERTS.read_text()  # the old relative form is gone
    assert github_anchor("Probes and shutdown") == "probes-and-shutdown"


def test_new_alerts_cover_hoarding_absent_gateways_stale_jobs_and_webhooks() -> None:
    doc = yaml.safe_load(ALERTS.read_text())
    exprs = {r["alert"]: r["expr"] for g in doc["groups"] for r in g["rules"] if "alert" in r}
    assert "flashgate-gateway" in exprs["FlashgateGatewayAbsent"]
    assert "flashgate_audit_last_run_timestamp_seconds" in exprs["FlashgateAuditStale"]
    assert "flashgate_reconcile_last_run_timestamp_seconds" in exprs["FlashgateReconcileStale"]
    assert "flashgate_webhook_deliveries_total" in exprs["FlashgateWebhookDeliveryFailing"]
    assert 'state="reserved"' in exprs["FlashgateReservationsHoarded"]


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
    for needed in (
        "stock left",
        "by result",
        "p50 / p99",
        "delivery latency",
        "stream lag",
        "dead letters",
        "risk decisions by rule",
        "share ending expired",
    ):
        assert needed in titles, needed
