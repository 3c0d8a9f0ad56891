"""The ledger on a real 3-master Redis Cluster (Valkey, no replicas, started privately).

Every key of a sale carries the hash tag `{s:<sale>}` (core/keys.py), so each script's KEYS
share one slot and the scripts run on a cluster unchanged. These tests prove it: sales spread
over the nodes, every key of a sale in one slot on one node, and the ledger's invariants (stock,
per-user limit, idempotency, expiry exactly once, inline risk, a flushed script cache) through
the cluster client of `redis+cluster://` URLs (core.runtime.redis_client).
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import json
import os
import secrets
import shutil
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from redis.asyncio import Redis, RedisCluster

from core import errors
from core.embedded import EmbeddedRedisCluster
from core.keys import WORKER_GROUP, Keys
from core.ledger import Ledger
from core.runtime import Runtime, redis_client, warm_up
from core.settings import Settings
from gateway.app import create_app
from gateway.routes.metrics import metrics_app
from risk import config as risk_config
from risk.engine import AllowAll, RiskContext, RiskPlan, Verdict
from risk.lists import RiskLists, load_datacenter_ranges
from risk.scoring import ScoringEngine
from tests.conftest import until
from tests.test_ledger import T0, TTL_MS, attempt, request
from tests.test_workers_delivery import HookServer
from tests.workers_fixtures import (
    buy,
    buy_and_confirm,
    keys_by_order,
    make_channel,
    make_sale,
    new_sale_id,
    order_rows,
    revealed_codes,
)
from workers import metrics as worker_metrics
from workers.runner import Worker


@pytest.fixture(scope="module")
def cluster() -> Iterator[EmbeddedRedisCluster]:
    try:
        EmbeddedRedisCluster.cli()
    except (ImportError, RuntimeError) as exc:
        # `make test` sets FLASHGATE_REQUIRE_TOOLS: the cluster tests are required there, as
        # promtool is; a bare pytest run without the embedded extra may skip them.
        if os.environ.get("FLASHGATE_REQUIRE_TOOLS") == "1":
            pytest.fail(f"no Redis Cluster to start (valkey-cli missing?): {exc}")
        pytest.skip(f"no Redis Cluster to start: {exc}")
    run_dir = Path(tempfile.mkdtemp(prefix="flashgate-cluster-"))
    servers = EmbeddedRedisCluster(run_dir)
    try:
        servers.start()
        yield servers
    finally:
        servers.stop()
        shutil.rmtree(run_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def cluster_settings(cluster: EmbeddedRedisCluster) -> Settings:
    return Settings.from_env(
        {
            "FLASHGATE_REDIS_URL": cluster.url,
            "FLASHGATE_DATABASE_URL": "postgresql://unused",  # the ledger needs no database
            "FLASHGATE_ADMIN_TOKEN": "unused-" + secrets.token_urlsafe(32),
            "FLASHGATE_MASTER_KEY": base64.b64encode(secrets.token_bytes(32)).decode(),
            "FLASHGATE_KEY_PREFIX": "fgc" + secrets.token_hex(4),
            "FLASHGATE_REDIS_MAX_CONNECTIONS": "32",  # fewer than the tests' concurrent buyers
        }
    )


@pytest.fixture(scope="module")
async def rc(cluster_settings: Settings) -> AsyncIterator[Redis]:
    client = redis_client(cluster_settings)
    assert isinstance(client, RedisCluster)
    await warm_up(client, 4)
    yield client
    await client.aclose()


@pytest.fixture(scope="module")
async def ledger(rc: Redis, cluster_settings: Settings) -> Ledger:
    ledger = Ledger(rc, Keys(cluster_settings.key_prefix))
    await ledger.scripts.load(rc)
    return ledger


@pytest.fixture(scope="module")
async def nodes(cluster: EmbeddedRedisCluster) -> AsyncIterator[dict[int, Redis]]:
    """A plain client per node (port -> client), to look at one node alone."""
    clients = {p: Redis(host="127.0.0.1", port=p, decode_responses=True) for p in cluster.ports}
    yield clients
    for client in clients.values():
        await client.aclose()


@pytest.fixture(scope="module")
async def slot_owner(nodes: dict[int, Redis]) -> dict[int, int]:
    """slot -> port of the master serving it, from CLUSTER SHARDS."""
    owner: dict[int, int] = {}
    shards: list[dict[str, Any]] = await next(iter(nodes.values())).execute_command(
        "CLUSTER", "SHARDS"
    )
    for shard in shards:
        (master,) = [n for n in shard["nodes"] if n["role"] == "master"]
        ranges = shard["slots"]
        for lo, hi in zip(ranges[::2], ranges[1::2], strict=True):
            owner.update(dict.fromkeys(range(lo, hi + 1), int(master["port"])))
    assert len(owner) == 16384  # every slot is served
    return owner


async def keyslot(rc: Redis, key: str) -> int:
    """The slot the server (not redis-py) computes for a key."""
    return int(await rc.execute_command("CLUSTER KEYSLOT", key))


async def spread_sales(
    ledger: Ledger, rc: Redis, slot_owner: dict[int, int], count: int, stock: int, *, limit: int = 1
) -> list[tuple[str, int]]:
    """`count` open sales, each on another node (round robin): [(sale_id, port)]."""
    ports = sorted(set(slot_owner.values()))
    sales: list[tuple[str, int]] = []
    while len(sales) < count:
        sale_id = "c-" + uuid.uuid4().hex[:12]
        port = slot_owner[await keyslot(rc, ledger.keys.sale(sale_id))]
        if port != ports[len(sales) % len(ports)]:
            continue
        await ledger.init_sale(sale_id, T0, T0 + 3_600_000, limit, TTL_MS)
        if stock:
            await ledger.add_stock(sale_id, 1, stock)
        sales.append((sale_id, port))
    return sales


def sale_keys(keys: Keys, sale_id: str, order_id: str) -> list[str]:
    return [
        keys.sale(sale_id),
        keys.buyers(sale_id),
        keys.idempotency(sale_id),
        keys.deadlines(sale_id),
        keys.events(sale_id),
        keys.dead_letters(sale_id),
        keys.imports(sale_id),
        keys.risk_config(sale_id),
        keys.risk_admission(sale_id),
        keys.risk_admission(sale_id, "ch_test"),
        keys.risk_counter(sale_id, "u", "u1"),
        keys.risk_distinct_users(sale_id, "i", "203.0.113.7"),
        keys.risk_memo(sale_id),
        keys.risk_verdicts(sale_id),
        keys.risk_solution(sale_id, "c1"),
        keys.order(order_id),
    ]


async def test_sales_spread_over_nodes_and_each_stays_in_one_slot(
    ledger: Ledger, rc: Redis, nodes: dict[int, Redis], slot_owner: dict[int, int]
) -> None:
    sales = await spread_sales(ledger, rc, slot_owner, 3, stock=5)
    assert len({port for _, port in sales}) == 3  # one sale on every master
    for sale_id, port in sales:
        order = await ledger.reserve(request(sale_id, "u1"), now=T0 + 1)
        slots = {await keyslot(rc, key) for key in sale_keys(ledger.keys, sale_id, order.order_id)}
        assert len(slots) == 1, f"{sale_id}: keys in slots {slots}"
        (slot,) = slots
        assert slot_owner[slot] == port
        # The keys written by the scripts live on that node, and on no other.
        pattern = f"{ledger.keys.prefix}:{{s:{sale_id}}}:*"
        for node_port, node in nodes.items():
            found = {k async for k in node.scan_iter(match=pattern, count=1000)}
            if node_port == port:
                assert {
                    ledger.keys.sale(sale_id),
                    ledger.keys.buyers(sale_id),
                    ledger.keys.idempotency(sale_id),
                    ledger.keys.deadlines(sale_id),
                    ledger.keys.events(sale_id),
                    ledger.keys.imports(sale_id),
                    ledger.keys.order(order.order_id),
                } <= found
            else:
                assert found == set()


async def test_concurrent_buyers_get_exactly_the_stock_on_every_node(
    ledger: Ledger, rc: Redis, slot_owner: dict[int, int]
) -> None:
    stock, buyers = 40, 250
    sales = await spread_sales(ledger, rc, slot_owner, 3, stock=stock)
    # 750 purchases at once through 32 connections per node: they wait for a connection.
    results = await asyncio.gather(
        *[
            attempt(ledger, request(sale_id, f"user-{i}"))
            for i in range(buyers)
            for sale_id, _ in sales
        ]
    )
    assert results.count("reserved") == 3 * stock
    assert results.count("sold_out") == 3 * (buyers - stock)
    for sale_id, _ in sales:
        assert await ledger.stock(sale_id) == {
            "total": stock,
            "available": 0,
            "reserved": stock,
            "confirmed": 0,
            "delivered": 0,
            "cancelled": 0,
            "expired": 0,
            "refunded": 0,
            "voided": 0,
        }
        assert await rc.xlen(ledger.keys.events(sale_id)) == stock
        assert sorted(await rc.hvals(ledger.keys.buyers(sale_id))) == ["1"] * stock


async def test_per_user_limit_holds_under_concurrency(
    ledger: Ledger, rc: Redis, slot_owner: dict[int, int]
) -> None:
    sales = await spread_sales(ledger, rc, slot_owner, 2, stock=100, limit=2)
    results = await asyncio.gather(
        *[attempt(ledger, request(sale_id, "greedy")) for _ in range(40) for sale_id, _ in sales]
    )
    assert results.count("reserved") == 4  # 2 per sale: the limit is per sale
    assert results.count("purchase_limit_exceeded") == 76
    for sale_id, _ in sales:
        assert await rc.hget(ledger.keys.buyers(sale_id), "ch_test:greedy") == "2"
        assert await attempt(ledger, request(sale_id, "bulk", qty=3)) == "purchase_limit_exceeded"


async def test_idempotent_replay(ledger: Ledger, rc: Redis, slot_owner: dict[int, int]) -> None:
    ((sale_id, _),) = await spread_sales(ledger, rc, slot_owner, 1, stock=10)
    req = request(sale_id, "u1", key="raced")
    first = await asyncio.gather(*[ledger.reserve(req, now=T0 + 1) for _ in range(30)])
    assert len({r.order_id for r in first}) == 1
    assert sum(not r.replayed for r in first) == 1
    later = await ledger.reserve(req, now=T0 + 10_000_000)  # after the sale: the answer holds
    assert later.order_id == first[0].order_id and later.replayed
    with pytest.raises(errors.IdempotencyMismatch):
        await ledger.reserve(request(sale_id, "u1", key="raced", fp="other"), now=T0 + 2)
    stock = await ledger.stock(sale_id)
    assert stock is not None and stock["reserved"] == 1


async def sweep(ledger: Ledger, sale_id: str, now: int) -> int:
    """One sweeper: the ledger's own expiry (one expire.lua call per batch of a sale)."""
    return await ledger.expire_due(sale_id, now=now)


async def test_expiry_returns_stock_exactly_once_with_many_sweepers(
    ledger: Ledger, rc: Redis, slot_owner: dict[int, int]
) -> None:
    sales = await spread_sales(ledger, rc, slot_owner, 3, stock=20)
    for sale_id, _ in sales:
        for i in range(20):
            await ledger.reserve(request(sale_id, f"u{i}"), now=T0 + 1)
    assert [await sweep(ledger, sale_id, T0 + 2) for sale_id, _ in sales] == [0, 0, 0]
    expired = await asyncio.gather(
        *[sweep(ledger, sale_id, T0 + 1 + TTL_MS) for _ in range(8) for sale_id, _ in sales]
    )
    assert sum(expired) == 60
    for sale_id, _ in sales:
        stock = await ledger.stock(sale_id)
        assert stock is not None
        assert stock["available"] == 20 and stock["reserved"] == 0 and stock["expired"] == 20
        assert await rc.hlen(ledger.keys.buyers(sale_id)) == 0
        assert await rc.zcard(ledger.keys.deadlines(sale_id)) == 0
        assert await attempt(ledger, request(sale_id, "u0"), now=T0 + 2 + TTL_MS) == "reserved"


async def test_expire_due_on_a_cluster(
    ledger: Ledger, rc: Redis, slot_owner: dict[int, int]
) -> None:
    ((sale_id, _),) = await spread_sales(ledger, rc, slot_owner, 1, stock=3)
    for i in range(3):
        await ledger.reserve(request(sale_id, f"u{i}"), now=T0 + 1)
    assert await ledger.expire_due(sale_id, now=T0 + 1 + TTL_MS) == 3


async def test_inline_risk_purchase(ledger: Ledger, rc: Redis) -> None:
    now_s = time.time()
    now = int(now_s * 1000)
    sale_id = "r-" + uuid.uuid4().hex[:12]
    await ledger.init_sale(sale_id, now - 1000, now + 3_600_000, 1, TTL_MS)
    await ledger.add_stock(sale_id, 1, 25)
    engine = ScoringEngine(
        rc,
        ledger.keys,
        config=risk_config.load(),
        datacenter=load_datacenter_ranges(),
        challenge_secret=b"s" * 32,
        cache_ttl_s=0,
        clock=lambda: now_s,
    )

    async def buy(user: str, ip: str) -> str:
        ctx = RiskContext(
            sale_id=sale_id,
            channel_id="ch_test",
            user_id=user,
            device_id="d-" + user,
            client_ip=ip,
            user_agent="ua",
            quantity=1,
            idempotency_key=uuid.uuid4().hex,
        )
        plan = await engine.plan(ctx)
        assert isinstance(plan, RiskPlan)
        slots = {await keyslot(rc, key) for key in (*plan.script.keys, ledger.keys.sale(sale_id))}
        assert len(slots) == 1
        req = request(sale_id, user, key=ctx.idempotency_key)
        try:
            reservation, outcome = await ledger.purchase(req, plan.script, now=now)
        except errors.FlashgateError as exc:
            return exc.code
        decision = engine.judge(plan, outcome)
        if reservation is None:
            return decision.verdict.value
        assert decision.verdict is Verdict.ALLOW
        return reservation.status

    # Honest buyers (own device, ip and /24): exactly the stock, whatever the concurrency.
    results = await asyncio.gather(*[buy(f"h{i}", f"100.70.{i}.1") for i in range(60)])
    assert results.count("reserved") == 25 and results.count("sold_out") == 35
    # A datacenter ip is challenged by the script, and nothing is reserved for it.
    assert await buy("bot", "198.51.100.200") == Verdict.CHALLENGE.value
    assert await rc.hget(ledger.keys.buyers(sale_id), "ch_test:bot") is None
    stock = await ledger.stock(sale_id)
    assert stock is not None and stock["reserved"] == 25 and stock["available"] == 0


async def test_flushed_script_cache_on_one_node_is_survived(
    ledger: Ledger, rc: Redis, nodes: dict[int, Redis], slot_owner: dict[int, int]
) -> None:
    sales = await spread_sales(ledger, rc, slot_owner, 2, stock=30)
    (flushed_sale, port), (other_sale, _) = sales
    first = await asyncio.gather(
        *[attempt(ledger, request(sale_id, f"a{i}")) for i in range(10) for sale_id, _ in sales]
    )
    assert await nodes[port].script_flush()
    assert await nodes[port].script_exists(ledger.scripts.reserve.sha) == [False]
    second = await asyncio.gather(
        *[attempt(ledger, request(sale_id, f"b{i}")) for i in range(30) for sale_id, _ in sales]
    )
    assert (first + second).count("reserved") == 60
    assert (first + second).count("sold_out") == 20
    # NOSCRIPT made redis-py load the script again (on every master) and retry.
    assert await nodes[port].script_exists(ledger.scripts.reserve.sha) == [True]
    for sale_id in (flushed_sale, other_sale):
        stock = await ledger.stock(sale_id)
        assert stock is not None and stock["reserved"] == 30 and stock["available"] == 0


async def test_risk_list_changes_on_a_cluster(rc: Redis) -> None:
    """A list change is a MULTI over the list and its version: one hash tag, one slot."""
    keys = Keys("fgc" + secrets.token_hex(3))
    lists = RiskLists(rc, keys, ttl_s=0)
    assert await lists.change("block", "user", ["bad-user"], add=True) == 1
    snapshot = await lists.current()
    assert snapshot.entries[("block", "user")] == frozenset({"bad-user"})
    assert await lists.change("block", "user", ["bad-user"], add=False) == 1


async def test_workers_deliver_on_a_cluster(
    cluster: EmbeddedRedisCluster, settings: Settings, rc: Redis, slot_owner: dict[int, int]
) -> None:
    """The workers on the cluster client, with the session's PostgreSQL: two sales on two
    masters, every confirmed order delivered once with keys of its own, a malformed entry
    dead-lettered (the dead-letter MULTI: the sale's events and dead letters share a slot)."""
    rt = await Runtime.open(
        dataclasses.replace(
            settings, redis_url=cluster.url, key_prefix="fgw" + secrets.token_hex(4)
        )
    )
    try:
        assert isinstance(rt.redis, RedisCluster)
        ports = sorted(set(slot_owner.values()))
        sale_ids: list[str] = []
        while len(sale_ids) < 2:  # one sale on the first master, one on the second
            sale_id = new_sale_id()
            if slot_owner[await keyslot(rc, rt.keys.sale(sale_id))] == ports[len(sale_ids)]:
                sale_ids.append(sale_id)
        assert len({slot_owner[await keyslot(rc, rt.keys.sale(s))] for s in sale_ids}) == 2
        channel, _ = await make_channel(rt)
        paid: dict[str, list[str]] = {}
        codes: dict[str, list[str]] = {}
        for sale_id in sale_ids:
            _, codes[sale_id] = await make_sale(rt, keys=10, sale_id=sale_id)
            paid[sale_id] = [
                await buy_and_confirm(rt, sale_id, channel, qty=q) for q in (1, 2, 3, 1)
            ]
        poisoned = sale_ids[1]
        await rt.redis.xadd(
            rt.keys.events(poisoned), {"t": "bogus", "o": f"{poisoned}.01J00000000000000000000000"}
        )

        # A worker dies between its commit and its ack on the first sale; the heir takes the
        # idle entries over (XAUTOCLAIM, the pipelined XPENDING of redelivered entries).
        async def crash(sale_id: str, outcome: object) -> None:
            raise RuntimeError("killed after commit")

        with pytest.raises(RuntimeError, match="killed after commit"):
            await Worker(rt, name="doomed", sale_ids=sale_ids[:1], after_commit=crash).run_burst()
        assert await keys_by_order(rt, sale_ids[0])  # committed in PostgreSQL, not acked
        doomed = await rt.redis.xpending(rt.keys.events(sale_ids[0]), WORKER_GROUP)
        assert doomed["pending"] > 0
        assert await Worker(rt, name="heir", sale_ids=sale_ids).run_burst() >= 2 * 8 + 1

        for sale_id in sale_ids:
            rows, allocated = await order_rows(rt, sale_id), await keys_by_order(rt, sale_id)
            assert set(allocated) == set(paid[sale_id]) == set(rows)
            for order_id in paid[sale_id]:
                assert rows[order_id]["status"] == "delivered"
                assert len(allocated[order_id]) == rows[order_id]["quantity"]
                assert (await rt.ledger.order(order_id) or {})["status"] == "delivered"
            key_ids = [k for ks in allocated.values() for k in ks]
            assert len(key_ids) == len(set(key_ids)) == 7
            revealed = [c for o in paid[sale_id] for c in await revealed_codes(rt, o)]
            assert len(set(revealed)) == 7 and set(revealed) <= set(codes[sale_id])
            stock = await rt.ledger.stock(sale_id)
            assert stock is not None
            assert stock["delivered"] == 7 and stock["confirmed"] == 0 and stock["available"] == 3
            pending = await rt.redis.xpending(rt.keys.events(sale_id), WORKER_GROUP)
            assert pending["pending"] == 0
        dead = await rt.redis.xrange(rt.keys.dead_letters(poisoned))
        assert [f["dl_reason"] for _, f in dead] == ["malformed: unknown event type"]
        assert await rt.redis.xlen(rt.keys.dead_letters(sale_ids[0])) == 0
    finally:
        await rt.close()


async def test_long_running_worker_and_metrics_on_a_cluster(
    cluster: EmbeddedRedisCluster, settings: Settings
) -> None:
    """`Worker.run()` as `flashgate worker` runs it (sale discovery, consumers, expiry sweeper,
    webhook dispatch, heartbeat and stream gauges), and the gateway's /metrics scrape, on the
    3-master cluster: confirmed orders delivered and announced, abandoned reservations
    expired, the heartbeat key found by `flashgate worker-check`'s scan over every master, the
    stock gauges read from the sale's node; a clean stop removes the heartbeat."""
    cluster_settings = dataclasses.replace(
        settings,
        redis_url=cluster.url,
        key_prefix="fgl" + secrets.token_hex(4),
        sweep_interval_s=0.1,
    )
    rt = await Runtime.open(cluster_settings)
    hook = HookServer()
    server = await asyncio.start_server(hook.handle, "127.0.0.1", 0)
    hook.url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/hooks"
    worker = Worker(rt, name="cluster-soak-" + secrets.token_hex(3))
    running = asyncio.create_task(worker.run())
    try:
        assert isinstance(rt.redis, RedisCluster) and rt.pipe is None
        channel, _ = await make_channel(rt, webhook_url=hook.url)
        sale_id, codes = await make_sale(rt, keys=8, ttl_ms=400)
        paid = [await buy_and_confirm(rt, sale_id, channel) for _ in range(3)]
        abandoned = [await buy(rt, sale_id, channel) for _ in range(2)]

        async def settled() -> bool:
            stock = await rt.ledger.stock(sale_id) or {}
            return (
                stock.get("delivered") == 3
                and stock.get("expired") == 2
                and len(hook.requests) >= 3
            )

        await until(settled, timeout_s=20)
        rows = await order_rows(rt, sale_id)
        assert {o for o in paid if rows[o]["status"] == "delivered"} == set(paid)
        assert [(await rt.ledger.order(o) or {}).get("status") for o in abandoned] == [
            "expired",
            "expired",
        ]
        revealed = [c for o in paid for c in await revealed_codes(rt, o)]
        assert len(set(revealed)) == 3 and set(revealed) <= set(codes)
        announced = {json.loads(body)["order_id"] for _, body in hook.requests}
        assert announced == set(paid)
        stock = await rt.ledger.stock(sale_id)
        assert stock is not None and stock["available"] == 5 and stock["reserved"] == 0

        async def beating() -> bool:
            return worker.name in await worker_metrics.alive_workers(rt.redis, rt.keys)

        await until(beating, timeout_s=20)

        app = create_app(cluster_settings, risk=AllowAll())
        async with (
            app.router.lifespan_context(app),
            httpx.AsyncClient(
                transport=httpx.ASGITransport(app=metrics_app(app.state.gateway.runtime, 0.0)),
                base_url="http://fg.test",
            ) as client,
        ):  # the metrics port's app
            r = await client.get("/metrics")
        assert r.status_code == 200
        sample = {
            line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
            for line in r.text.splitlines()
            if line.startswith("flashgate_sale_stock_units{") and sale_id in line
        }
        assert sample[f'flashgate_sale_stock_units{{sale="{sale_id}",state="delivered"}}'] == 3
        assert sample[f'flashgate_sale_stock_units{{sale="{sale_id}",state="available"}}'] == 5
    finally:
        worker.request_stop()
        await asyncio.wait_for(running, 40)
        server.close()
        await server.wait_closed()
        try:
            assert worker.name not in await worker_metrics.alive_workers(rt.redis, rt.keys)
        finally:
            await rt.close()
