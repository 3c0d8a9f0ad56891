"""Fault 4: Redis restarted during a sale.

With AOF (appendonly yes, appendfsync everysec) Redis is SIGKILLed and restarted: every
answered purchase survives (retries replay the same order), nothing is sold twice. Without
persistence every key is lost: the sale is paused (503 `sale_not_ready`, never 404 and never
a fresh ledger) until `flashgate reconcile SALE` rebuilds it from PostgreSQL; then the sale
goes on, and the audit holds."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from redis.exceptions import ConnectionError as RedisConnectionError

from core.embedded import EmbeddedRedis, stop_process
from core.runtime import Runtime
from core.settings import Settings
from tests.conftest import (
    ADMIN,
    channel_headers,
    create_channel,
    create_sale,
    purchase_body,
    until,
)
from tests.faults.conftest import app_client, fault_settings
from tests.faults.support import ROOT, audit, child_env
from workers.runner import Worker


async def buy(
    client: httpx.AsyncClient,
    channel: dict[str, str],
    sale: str,
    user: str,
    key: str,
    pay: str | None = "pay",
    timeout_s: float = 20,
    through_pause: bool = False,
) -> httpx.Response:
    """One purchase, retried with its Idempotency-Key while the answer is 5xx or no answer
    (`through_pause`: a 503 `sale_not_ready` too: the short pause after a restart, while the
    gateway merges PostgreSQL into the restarted Redis, core/failover.py)."""
    body = purchase_body(user, **({"payment_ref": pay} if pay else {}))
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        try:
            r = await client.post(
                f"/v1/sales/{sale}/purchase", json=body, headers=channel_headers(channel, key)
            )
            if r.status_code < 500 or (
                r.json().get("code") == "sale_not_ready" and not through_pause
            ):
                return r  # a paused sale is an answer: the test looks at it
        except httpx.HTTPError:
            pass
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"no answer for {key} within {timeout_s} s")
        await asyncio.sleep(0.05)


class Stage:
    """A private Redis (restartable), the faults database, an in-process gateway and a
    runtime for the workers and the audit."""

    def __init__(
        self,
        redis: EmbeddedRedis,
        settings: Settings,
        app: Any,
        client: httpx.AsyncClient,
        rt: Runtime,
    ) -> None:
        self.redis, self.settings, self.app, self.client, self.rt = (
            redis,
            settings,
            app,
            client,
            rt,
        )

    def crash_redis(self) -> None:
        assert self.redis.proc is not None
        stop_process(self.redis.proc, signal.SIGKILL)

    async def restart_redis(self, *, wipe: bool = False) -> None:
        if wipe:  # what a restart without persistence (or a failover to an empty node) leaves
            for f in self.redis.dir.glob("appendonly*"):
                f.unlink() if f.is_file() else None
        self.redis.start()
        await self.rt.redis.connection_pool.disconnect()  # the test's own reads: reconnect


@pytest.fixture
async def stage(
    request: pytest.FixtureRequest, tmp_path: Path, faults_database: str
) -> AsyncIterator[Stage]:
    aof = bool(getattr(request, "param", False))
    redis = EmbeddedRedis(tmp_path, appendonly=aof, appendfsync="everysec")
    redis.start()
    settings = fault_settings(redis.url, faults_database)
    app, client = await app_client(settings)
    rt = await Runtime.open(settings)
    try:
        async with app.router.lifespan_context(app):  # type: ignore[attr-defined]
            yield Stage(redis, settings, app, client, rt)
    finally:
        await client.aclose()
        await rt.close()
        redis.stop()


async def deliver_all(rt: Runtime) -> None:
    """The workers' batches (a long-running worker retries a broken connection by itself)."""
    for attempt in range(3):
        try:
            await Worker(rt).run_burst(timeout_s=60)
            return
        except RedisConnectionError:
            if attempt == 2:
                raise
            await rt.redis.connection_pool.disconnect()  # connections of the dead server


@pytest.mark.parametrize("stage", [True], indirect=True, ids=["aof"])
@pytest.mark.timeout(90)
async def test_redis_killed_with_aof_sells_nothing_twice(stage: Stage) -> None:
    c = stage.client
    channel = await create_channel(c)
    sale, codes = await create_sale(c, keys=50)
    first = {f"u{i}": await buy(c, channel, sale, f"u{i}", f"k{i}") for i in range(40)}
    assert all(r.status_code == 201 for r in first.values())

    stage.crash_redis()  # SIGKILL: no shutdown fsync; AOF everysec already wrote each reply
    await stage.restart_redis()

    again = {u: await buy(c, channel, sale, u, f"k{u[1:]}", through_pause=True) for u in first}
    for u, r in again.items():  # the same answer, replayed: nothing reserved twice
        assert r.status_code == 201 and r.headers.get("idempotent-replayed") == "true", r.text
        assert r.json()["order_id"] == first[u].json()["order_id"]
    late = await asyncio.gather(*(buy(c, channel, sale, f"n{i}", f"n{i}") for i in range(40)))
    won = [r for r in late if r.status_code == 201]
    assert len(won) == 10 and {r.json()["code"] for r in late if r.status_code != 201} == {
        "sold_out"
    }
    await deliver_all(stage.rt)
    confirmed = {r.json()["order_id"]: 1 for r in [*first.values(), *won]}
    result = await audit(stage.rt, sale, confirmed, codes)
    guard = stage.app.state.gateway.runtime.failover  # type: ignore[attr-defined]
    assert not guard.paused and guard.last_merge is not None
    assert guard.last_merge.orders == 0  # same data: nothing to merge, the pause is short
    print(
        "FAULT4-AOF",
        json.dumps(
            {
                "orders_before_crash": 40,
                "replayed_after": 40,
                "pause_s": round(guard.last_pause_s, 3),
                "sold_after": len(won),
                "keys": 50,
                "delivered": result.keys_delivered,
            }
        ),
    )


def reconcile_cli(settings: Settings, sale: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cli.main", "reconcile", sale, *args],
        env=child_env(settings),
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )


@pytest.mark.timeout(120)
async def test_redis_lost_pauses_the_sale_until_reconciled(stage: Stage) -> None:
    c, rt = stage.client, stage.rt
    channel = await create_channel(c)
    sale, codes = await create_sale(c, keys=60, per_user_limit=1)
    paid = {f"p{i}": await buy(c, channel, sale, f"p{i}", f"p{i}") for i in range(20)}
    held = {f"h{i}": await buy(c, channel, sale, f"h{i}", f"h{i}", pay=None) for i in range(5)}
    await deliver_all(rt)  # PostgreSQL has these 25
    unpersisted = await buy(c, channel, sale, "lost", "lost")  # its event dies with Redis
    assert unpersisted.status_code == 201
    # Risk state set through the admin API of a gateway with the risk engine on: in
    # PostgreSQL too (risk/durable.py).
    risk_app, rc = await app_client(stage.settings, risk=True)
    async with contextlib.AsyncExitStack() as on_exit:
        await on_exit.enter_async_context(risk_app.router.lifespan_context(risk_app))  # type: ignore[attr-defined]
        on_exit.push_async_callback(rc.aclose)
        await _redis_lost_and_reconciled(stage, rc, channel, sale, codes, paid, held, unpersisted)


async def _redis_lost_and_reconciled(
    stage: Stage,
    rc: httpx.AsyncClient,
    channel: dict[str, str],
    sale: str,
    codes: list[str],
    paid: dict[str, httpx.Response],
    held: dict[str, httpx.Response],
    unpersisted: httpx.Response,
) -> None:
    c, rt = stage.client, stage.rt
    banned = f"banned-{sale}"
    r = await rc.post("/v1/admin/risk/lists/block/user", json={"entries": [banned]}, headers=ADMIN)
    assert r.status_code == 200 and r.json()["changed"] == 1
    override = {"thresholds": {"challenge": 45}}
    r = await rc.put(f"/v1/admin/sales/{sale}/risk", json=override, headers=ADMIN)
    assert r.status_code == 200

    stage.crash_redis()
    await stage.restart_redis(wipe=True)
    stage.app.state.gateway.channels.forget()  # type: ignore[attr-defined]

    r = await buy(c, channel, sale, "x0", "x0")  # paused: not 404, not a fresh ledger
    assert r.status_code == 503 and r.json()["code"] == "sale_not_ready", r.text
    assert r.headers["retry-after"] == "5"
    held_order = held["h0"].json()["order_id"]
    r = await c.post(
        f"/v1/orders/{held_order}/confirm",
        json={"payment_ref": "late"},
        headers=channel_headers(channel),
    )
    assert r.status_code == 503 and r.json()["code"] == "sale_not_ready"
    r = await c.post(f"/v1/admin/sales/{sale}/keys", headers=ADMIN, json={"keys": ["MORE-1"]})
    assert r.status_code == 503 and r.json()["code"] == "sale_not_ready"
    checked = reconcile_cli(stage.settings, sale, "--check")
    assert checked.returncode == 1, checked.stderr
    found = json.loads(checked.stdout)
    assert found["drift"]["missing_ledger"] == 1
    assert found["risk"]["risk_list_entries"] >= 1 and found["risk"]["risk_override"] == 1
    assert not found["risk_restored"]

    rebuilt = reconcile_cli(stage.settings, sale)
    assert rebuilt.returncode == 0, rebuilt.stdout + rebuilt.stderr
    report = json.loads(rebuilt.stdout)
    assert report["rebuilt"] and report["ok"] and report["risk_restored"], report
    again = reconcile_cli(stage.settings, sale)  # never twice: the ledger exists now
    assert again.returncode == 0 and not json.loads(again.stdout)["rebuilt"]
    assert json.loads(again.stdout)["risk"] == {"risk_list_entries": 0, "risk_override": 0}
    stock = await rt.ledger.stock(sale)
    assert stock is not None and stock["total"] == 60 and stock["delivered"] == 20
    assert stock["reserved"] == 5 and stock["available"] == 35

    # The restart also changed Redis' identity: the gateway's failover pause (merge) ends
    # on its own once its event loop runs again (the CLI calls above block it).
    guard = stage.app.state.gateway.runtime.failover  # type: ignore[attr-defined]

    async def resumed() -> bool:
        return not guard.paused

    await until(resumed, timeout_s=10)
    r = await buy(c, channel, sale, "p0", "p0-retry")  # the buyer's count came back
    assert r.status_code == 409 and r.json()["code"] == "purchase_limit_exceeded"
    r = await c.post(
        f"/v1/orders/{held_order}/confirm",
        json={"payment_ref": "late"},
        headers=channel_headers(channel),
    )
    assert r.status_code == 202, r.text
    late = await asyncio.gather(*(buy(c, channel, sale, f"n{i}", f"n{i}") for i in range(40)))
    won = [r for r in late if r.status_code == 201]
    assert len(won) == 35, [r.text for r in late if r.status_code != 201][:3]
    lost = await c.get(
        f"/v1/orders/{unpersisted.json()['order_id']}", headers=channel_headers(channel)
    )
    assert lost.status_code == 404  # never reached PostgreSQL: why production runs AOF
    # The block list and the override came back with the reconcile (the gateway reloads its
    # copy of the lists within cache_ttl_s).
    answers: list[httpx.Response] = []

    async def read_back() -> bool:  # its first call may meet a connection of the old Redis
        answers.append(await rc.get(f"/v1/admin/sales/{sale}/risk", headers=ADMIN))
        return answers[-1].status_code == 200

    await until(read_back, timeout_s=10)
    assert answers[-1].json()["override"] == override
    blocked: list[httpx.Response] = []

    async def banned_refused() -> bool:
        blocked.append(await buy(rc, channel, sale, banned, f"{banned}-{len(blocked)}"))
        return blocked[-1].status_code == 403

    await until(banned_refused, timeout_s=10)
    assert blocked[-1].json()["reasons"] == ["block_list_user"]
    await deliver_all(rt)
    confirmed = {r.json()["order_id"]: 1 for r in [*paid.values(), *won]}
    confirmed[held_order] = 1
    result = await audit(rt, sale, confirmed, codes)
    print(
        "FAULT4-LOST",
        json.dumps(
            {
                "persisted_before": 25,
                "lost_unpersisted": 1,
                "sold_after_reconcile": len(won),
                "delivered": result.keys_delivered,
                "keys": 60,
            }
        ),
    )
