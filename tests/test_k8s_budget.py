"""The connection budget of each overlay, rendered with kustomize: every Flashgate pod the
autoscalers may run at once (their maxima plus a rollout's surge) holds its PostgreSQL pool and
its Redis connections, and together they must fit PostgreSQL's max_connections and every Redis
node's maxclients, less a reserve. Each process's numbers come from core.settings, parsed from the
container's resolved environment exactly as the process would (explicit env over the envFrom
ConfigMap over Settings' defaults), so a changed default or a forgotten variable shows here.
"""

from __future__ import annotations

import base64
import math
import re
import secrets
from dataclasses import dataclass
from typing import Any

import pytest

from core.settings import Settings
from tests.test_k8s import OVERLAYS, all_containers, named, of_kind, render

# PostgreSQL's own default (CloudNativePG keeps it when the Cluster doesn't set one).
PG_DEFAULT_MAX_CONNECTIONS = 100
# Kept free on both servers: PostgreSQL's superuser_reserved_connections (3), CloudNativePG's
# instance manager and exporter, replicas, `flashgate reconcile` / `rotate-master-key` run by
# hand, psql and redis-cli sessions, pods still terminating during a rollout.
RESERVE = 0.10
# Each Deployment's default rollingUpdate.maxSurge (Kubernetes).
DEFAULT_SURGE = "25%"
# Stand-ins for the values read from Secrets (the budget doesn't depend on them).
SECRET_STANDINS = {
    "FLASHGATE_REDIS_URL": "redis://redis.invalid:6379/0",
    "FLASHGATE_DATABASE_URL": "postgresql://db.invalid/flashgate",
    "FLASHGATE_ADMIN_TOKEN": "k8s-budget-" + secrets.token_urlsafe(32),
    "FLASHGATE_MASTER_KEY": base64.b64encode(bytes(32)).decode(),
}
# Pool sizes belong to one Deployment each (sized from its autoscaler's maximum).
PER_DEPLOYMENT = (
    "FLASHGATE_DB_POOL_MAX",
    "FLASHGATE_REDIS_MAX_CONNECTIONS",
    "FLASHGATE_REDIS_PIPELINE_CONNECTIONS",
)


@dataclass(frozen=True)
class PodCost:
    name: str
    pods: int  # at the autoscaler's maximum, plus the rollout surge
    postgres: int  # connections per pod
    redis: int  # connections per pod to each Redis node


def resolved_env(docs: tuple[dict[str, Any], ...], container: dict[str, Any]) -> dict[str, str]:
    """The container's environment as the kubelet builds it: envFrom ConfigMaps in order, then
    env entries (which win); Secret references are replaced by stand-ins."""
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        ref = source["configMapRef"]["name"]
        maps = [c for c in of_kind(docs, "ConfigMap") if c["metadata"]["name"] == ref]
        assert maps or source["configMapRef"].get("optional"), ref
        for cm in maps:
            env.update(cm.get("data", {}))
    for entry in container.get("env", []):
        if "value" in entry:
            env[entry["name"]] = entry["value"]
        else:
            env[entry["name"]] = SECRET_STANDINS[entry["name"]]
    return env


def exec_probes_using_redis(container: dict[str, Any]) -> int:
    """`flashgate worker-check` opens its own Redis client on every run."""
    return sum(
        1
        for probe in ("livenessProbe", "readinessProbe", "startupProbe")
        if container.get(probe, {}).get("exec", {}).get("command", [""])[0] == "flashgate"
    )


def max_pods(docs: tuple[dict[str, Any], ...], deployment: dict[str, Any]) -> int:
    name = deployment["metadata"]["name"]
    maxima = [
        h["spec"]["maxReplicas"]
        for h in of_kind(docs, "HorizontalPodAutoscaler")
        if h["spec"]["scaleTargetRef"]["name"] == name
    ]
    maxima += [
        s["spec"]["maxReplicaCount"]
        for s in of_kind(docs, "ScaledObject")
        if s["spec"]["scaleTargetRef"]["name"] == name
    ]
    top = max(maxima) if maxima else deployment["spec"].get("replicas", 1)
    surge = (
        deployment["spec"]
        .get("strategy", {})
        .get("rollingUpdate", {})
        .get("maxSurge", DEFAULT_SURGE)
    )
    extra = math.ceil(top * int(surge[:-1]) / 100) if isinstance(surge, str) else int(surge)
    return int(top) + extra


def flashgate_pods(docs: tuple[dict[str, Any], ...]) -> list[PodCost]:
    costs = []
    for d in of_kind(docs, "Deployment"):
        spec = d["spec"]["template"]["spec"]
        pg = redis = 0
        init_pg = 0
        runs = False
        for c in all_containers(spec):
            if c.get("command", [""])[0] != "flashgate":
                continue
            runs = True
            settings = Settings.from_env(resolved_env(docs, c))
            if c in spec.get("initContainers", []):
                # `flashgate migrate`: one connection, closed before the main container starts
                assert c["command"] == ["flashgate", "migrate"], c["name"]
                init_pg = max(init_pg, 1)
                continue
            pg += settings.db_pool_max
            redis += (
                settings.redis_max_connections
                + settings.redis_pipeline_connections
                + exec_probes_using_redis(c)
            )
        if runs:
            costs.append(PodCost(d["metadata"]["name"], max_pods(docs, d), max(pg, init_pg), redis))
    return costs


def postgres_max_connections(docs: tuple[dict[str, Any], ...]) -> int:
    (cluster,) = [
        c for c in of_kind(docs, "Cluster") if c["apiVersion"].startswith("postgresql.cnpg.io/")
    ]
    params = cluster["spec"].get("postgresql", {}).get("parameters", {})
    return int(params.get("max_connections", PG_DEFAULT_MAX_CONNECTIONS))


def redis_maxclients(docs: tuple[dict[str, Any], ...]) -> list[int]:
    """maxclients of every Redis manifest; each must set it (the default depends on the
    server's build and its open-files limit)."""
    found = []
    for d in of_kind(docs, "RedisCluster"):
        for role in ("redisLeader", "redisFollower"):
            ref = d["spec"][role]["redisConfig"]["additionalRedisConfig"]
            conf = named(docs, "ConfigMap", ref)["data"]["redis-additional.conf"]
            (value,) = re.findall(r"^\s*maxclients\s+(\d+)\s*$", conf, re.M)
            found.append(int(value))
    for _, spec in [(d, d["spec"]["template"]["spec"]) for d in of_kind(docs, "Deployment")]:
        for c in spec["containers"]:
            argv = [*c.get("command", []), *c.get("args", [])]
            if argv and argv[0] in ("redis-server", "valkey-server"):
                assert "--maxclients" in argv, c["name"]
                found.append(int(argv[argv.index("--maxclients") + 1]))
    assert found, "no Redis manifest"
    return found


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_postgres_pools_at_the_autoscalers_maxima_fit_max_connections(overlay: str) -> None:
    docs = render(overlay)
    costs = flashgate_pods(docs)
    assert {c.name for c in costs} == {"flashgate-gateway", "flashgate-worker"}
    limit = postgres_max_connections(docs)
    used = sum(c.pods * c.postgres for c in costs)
    assert used <= limit * (1 - RESERVE), (overlay, used, limit, costs)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_redis_connections_at_the_autoscalers_maxima_fit_maxclients(overlay: str) -> None:
    """Per node: on a cluster each process's pool is per node, so every node may see all of
    them; a single Redis sees them all too."""
    docs = render(overlay)
    used = sum(c.pods * c.redis for c in flashgate_pods(docs))
    for maxclients in redis_maxclients(docs):
        assert used <= maxclients * (1 - RESERVE), (overlay, used, maxclients)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_pool_sizes_are_set_per_deployment_not_in_the_shared_configmap(overlay: str) -> None:
    """flashgate-env is shared by every role: a pool size there would fit one role's maximum
    and not the other's (and an env entry would silently override it anyway)."""
    docs = render(overlay)
    for cm in of_kind(docs, "ConfigMap"):
        if cm["metadata"]["name"].startswith("flashgate-env"):
            assert not set(PER_DEPLOYMENT) & set(cm.get("data", {})), cm["data"]
    for name in ("flashgate-gateway", "flashgate-worker"):
        (c,) = named(docs, "Deployment", name)["spec"]["template"]["spec"]["containers"]
        env = {e["name"] for e in c["env"]}
        assert {"FLASHGATE_DB_POOL_MAX", "FLASHGATE_REDIS_MAX_CONNECTIONS"} <= env, name
