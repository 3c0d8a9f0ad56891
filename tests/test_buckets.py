"""Stock buckets (core/buckets.py) on a real 3-master Redis Cluster, and end to end.

One hot sale's stock split over N hash-tagged ledgers on different nodes: no oversell in total,
per-bucket ledgers that balance, the per-user limit exact, replays, expiry and cancel back to
the right bucket exactly once, an interrupted transfer finished by the recovery pass, sold out
only once every bucket is empty, and the workers delivering every confirmed order once.
"""

from __future__ import annotations

import asyncio
import dataclasses
import secrets
import time
import uuid
from collections import Counter

import httpx
import pytest
from redis.asyncio import Redis, RedisCluster

from core import errors, metrics
from core.embedded import EmbeddedRedisCluster
from core.ids import (
    home_bucket,
    is_order_id,
    new_order_id,
    parse_order_id,
    sale_of_order,
    shard_id,
    shard_of_order,
)
from core.keys import WORKER_GROUP, Keys
from core.ledger import Ledger, WrongBuckets
from core.runtime import Runtime
from core.scripts import ReturnCode
from core.settings import Settings
from risk import config as risk_config
from risk.engine import RiskContext, RiskPlan, Verdict
from risk.lists import load_datacenter_ranges
from risk.scoring import ScoringEngine
from tests import test_cluster
from tests.conftest import (
    ADMIN,
    channel_headers,
    create_channel,
    purchase_body,
)
from tests.test_ledger import T0, TTL_MS, attempt, request
from tests.workers_fixtures import buy, keys_by_order, make_channel, make_sale, order_rows
from workers.runner import Worker
from workers.sweeper import Sweeper

BUCKETS = 4
keyslot = test_cluster.keyslot
# The cluster's module fixtures (a cluster of this module's own, started once).
cluster, cluster_settings, rc = test_cluster.cluster, test_cluster.cluster_settings, test_cluster.rc
ledger, slot_owner, nodes = test_cluster.ledger, test_cluster.slot_owner, test_cluster.nodes


async def bucketed_sale(
    ledger: Ledger,
    rc: Redis,
    slot_owner: dict[int, int],
    stock: int,
    *,
    buckets: int = BUCKETS,
    limit: int = 1,
) -> str:
    """An open sale of `buckets` buckets spread over all three masters."""
    while True:
        sale_id = "b-" + uuid.uuid4().hex[:12]
        ports = {
            slot_owner[await keyslot(rc, ledger.keys.sale(shard_id(sale_id, b)))]
            for b in range(buckets)
        }
        if len(ports) == min(3, buckets):
            break
    await ledger.init_sale(sale_id, T0, T0 + 3_600_000, limit, TTL_MS, buckets)
    if stock:
        await ledger.add_stock(sale_id, 1, stock)
    return sale_id


async def balanced(ledger: Ledger, sale_id: str) -> list[dict[str, int]]:
    """Every bucket's ledger balances and none is negative; returns the buckets' rows."""
    rows = await ledger.bucket_stock(sale_id)
    for b, row in enumerate(rows):
        assert min(row.values()) >= 0, f"bucket {b}: {row}"
        assert (
            row["available"] + row["reserved"] + row["confirmed"] + row["delivered"] == row["total"]
        ), f"bucket {b}: {row}"
    return rows


def user_in(bucket: int, buckets: int = BUCKETS, prefix: str = "u") -> str:
    """A user id whose home is `bucket`."""
    while True:
        user = f"{prefix}-{uuid.uuid4().hex[:8]}"
        if home_bucket(user, buckets) == bucket:
            return user


# -- ids --------------------------------------------------------------------------------------
def test_order_ids_carry_their_bucket_and_old_ids_stay_valid() -> None:
    old = new_order_id("summer")
    assert parse_order_id(old) == ("summer", 0) and shard_of_order(old) == "summer"
    new = new_order_id("summer", bucket=7)
    assert new.startswith("summer.b7.") and is_order_id(new)
    assert parse_order_id(new) == ("summer", 7) and shard_of_order(new) == "summer:b7"
    assert sale_of_order(new) == "summer"
    for bad in (
        "summer.b0." + old[-26:],
        "summer.b64." + old[-26:],
        "summer.x1." + old[-26:],
        "a.b.c." + old[-26:],
        "summer.b7",
    ):
        assert not is_order_id(bad), bad
    assert Keys("fg").order(new).startswith("fg:{s:summer:b7}:o:")
    # Homes are stable and spread: 4,000 users over 4 buckets, none far from 1,000.
    homes = Counter(home_bucket(f"user-{i}", 4) for i in range(4000))
    assert set(homes) == {0, 1, 2, 3} and min(homes.values()) > 850
    assert home_bucket("anyone", 1) == 0


# -- the ledger on the cluster -------------------------------------------------------------------
async def test_buckets_spread_over_nodes_each_in_one_slot(
    ledger: Ledger, rc: Redis, slot_owner: dict[int, int]
) -> None:
    sale_id = await bucketed_sale(ledger, rc, slot_owner, stock=10)
    k = ledger.keys
    for b in range(BUCKETS):
        user = user_in(b)
        order = await ledger.reserve(request(sale_id, user), now=T0 + 1)
        assert parse_order_id(order.order_id) == (sale_id, b)
        shard = shard_id(sale_id, b)
        slots = {
            await keyslot(rc, key)
            for key in (
                k.sale(shard),
                k.buyers(shard),
                k.idempotency(shard),
                k.deadlines(shard),
                k.events(shard),
                k.transfers(shard),
                k.transfer_ids(shard),
                k.deposits(shard),
                k.imports(shard),
                k.risk_verdicts(shard),
                k.order(order.order_id),
            )
        }
        assert len(slots) == 1
        assert await rc.hget(k.buyers(shard), f"ch_test:{user}") == "1"  # per channel
    rows = await balanced(ledger, sale_id)
    assert [r["total"] for r in rows] == [2, 3, 3, 2]  # import 1's remainder: buckets 1, 2
    assert await ledger.stock(sale_id) == {
        "total": 10,
        "available": 6,
        "reserved": 4,
        "confirmed": 0,
        "delivered": 0,
        "cancelled": 0,
        "expired": 0,
        "refunded": 0,
        "voided": 0,
    }


async def test_concurrent_buyers_never_oversell_over_buckets(
    ledger: Ledger, rc: Redis, slot_owner: dict[int, int]
) -> None:
    stock, buyers = 101, 600
    sale_id = await bucketed_sale(ledger, rc, slot_owner, stock=stock)
    # 600 distinct buyers at once (32 connections per node): homes run dry at different
    # moments and refill from the others; sold out only once every bucket is empty.
    results = await asyncio.gather(
        *[attempt(ledger, request(sale_id, f"buyer-{i}")) for i in range(buyers)]
    )
    assert results.count("reserved") == stock
    assert results.count("sold_out") == buyers - stock
    rows = await balanced(ledger, sale_id)
    assert all(r["available"] == 0 and r["transit"] == 0 for r in rows)
    assert sum(r["total"] for r in rows) == stock and sum(r["reserved"] for r in rows) == stock
    events = [await rc.xlen(ledger.keys.events(shard_id(sale_id, b))) for b in range(BUCKETS)]
    assert sum(events) == stock
    for b in range(BUCKETS):  # each order sits in its buyer's home bucket
        held = await rc.hgetall(ledger.keys.buyers(shard_id(sale_id, b)))
        assert set(held.values()) <= {"1"}
        assert all(home_bucket(u.removeprefix("ch_test:"), BUCKETS) == b for u in held)
        assert len(held) == rows[b]["reserved"]
    # Found empty: every bucket is marked, so the next buyers hear sold_out from their home.
    marks = [
        await rc.hget(ledger.keys.sale(shard_id(sale_id, b)), "drained_until")
        for b in range(BUCKETS)
    ]
    assert all(marks)
    assert await attempt(ledger, request(sale_id, "late")) == "sold_out"
    # One more unit, imported into bucket 2 alone: every mark is cleared, and a buyer of
    # bucket 0 finds it.
    await ledger.add_stock(sale_id, 2, 1)
    assert (await balanced(ledger, sale_id))[2]["available"] == 1
    assert await attempt(ledger, request(sale_id, user_in(0))) == "reserved"
    assert await attempt(ledger, request(sale_id, user_in(1))) == "sold_out"


async def test_per_user_limit_is_exact_with_buckets(
    ledger: Ledger, rc: Redis, slot_owner: dict[int, int]
) -> None:
    # 8 units, 2 per bucket, limit 3: the greedy buyer's home must refill to give the third.
    sale_id = await bucketed_sale(ledger, rc, slot_owner, stock=8, limit=3)
    results = await asyncio.gather(
        *[attempt(ledger, request(sale_id, "greedy")) for _ in range(40)]
    )
    assert results.count("reserved") == 3
    assert results.count("purchase_limit_exceeded") == 37
    home = shard_id(sale_id, home_bucket("greedy", BUCKETS))
    assert await rc.hget(ledger.keys.buyers(home), "ch_test:greedy") == "3"
    assert await attempt(ledger, request(sale_id, "bulk", qty=4)) == "purchase_limit_exceeded"
    # quantity 3 with 5 units left, at most 2 in any bucket: gathered from several buckets
    assert await attempt(ledger, request(sale_id, "bulk", qty=3)) == "reserved"
    assert await attempt(ledger, request(sale_id, "other", qty=3)) == "insufficient_stock"
    rows = await balanced(ledger, sale_id)
    assert sum(r["total"] for r in rows) == 8 and sum(r["available"] for r in rows) == 2


async def test_idempotent_replay_with_buckets(
    ledger: Ledger, rc: Redis, slot_owner: dict[int, int]
) -> None:
    sale_id = await bucketed_sale(ledger, rc, slot_owner, stock=10)
    req = request(sale_id, "u1", key="raced")
    first = await asyncio.gather(*[ledger.reserve(req, now=T0 + 1) for _ in range(30)])
    assert len({r.order_id for r in first}) == 1
    assert sum(not r.replayed for r in first) == 1
    assert parse_order_id(first[0].order_id)[1] == home_bucket("u1", BUCKETS)
    later = await ledger.reserve(req, now=T0 + 10_000_000)  # after the sale: the answer holds
    assert later.order_id == first[0].order_id and later.replayed
    with pytest.raises(errors.IdempotencyMismatch):
        await ledger.reserve(request(sale_id, "u1", key="raced", fp="other"), now=T0 + 2)
    # A process that never heard of the buckets routes by 1, is corrected by the script and
    # replays the same answer.
    fresh = Ledger(rc, ledger.keys)
    again = await fresh.reserve(req, now=T0 + 3)
    assert again.order_id == first[0].order_id and again.replayed
    assert fresh.route(sale_id, "u1") == (BUCKETS, home_bucket("u1", BUCKETS))
    stock = await ledger.stock(sale_id)
    assert stock is not None and stock["reserved"] == 1


async def test_expiry_and_cancel_return_stock_to_the_right_bucket_once(
    ledger: Ledger, rc: Redis, slot_owner: dict[int, int]
) -> None:
    sale_id = await bucketed_sale(ledger, rc, slot_owner, stock=20)
    orders = [await ledger.reserve(request(sale_id, f"u{i}"), now=T0 + 1) for i in range(20)]
    assert await attempt(ledger, request(sale_id, "nobody")) == "sold_out"
    before = await balanced(ledger, sale_id)
    cancelled = orders[0]
    bucket = parse_order_id(cancelled.order_id)[1]
    assert set(
        await asyncio.gather(
            *[ledger.cancel(sale_id, cancelled.order_id, "ch_test", now=T0 + 2) for _ in range(10)]
        )
    ) == {"cancelled"}
    after = await balanced(ledger, sale_id)
    assert after[bucket]["available"] == before[bucket]["available"] + 1
    assert after[bucket]["cancelled"] == 1
    # The drained marks were cleared, so a buyer of another bucket finds that unit.
    other = user_in((bucket + 1) % BUCKETS)
    assert await attempt(ledger, request(sale_id, other), now=T0 + 3) == "reserved"

    sweepers = [Sweeper(ledger) for _ in range(8)]
    expired = await asyncio.gather(*[s.sweep_sale(sale_id, now=T0 + 1 + TTL_MS) for s in sweepers])
    assert sum(expired) == 19
    rows = await balanced(ledger, sale_id)
    assert sum(r["expired"] for r in rows) == 19 and sum(r["reserved"] for r in rows) == 1
    for order in orders[1:]:
        b = parse_order_id(order.order_id)[1]
        assert (await ledger.order(order.order_id) or {})["status"] == "expired"
        assert rows[b]["expired"] >= 1
    assert sum(r["available"] for r in rows) == 19
    assert sum(r["total"] for r in rows) == 20


async def test_an_interrupted_transfer_is_finished_by_recovery_once(
    ledger: Ledger, rc: Redis, slot_owner: dict[int, int]
) -> None:
    sale_id = await bucketed_sale(ledger, rc, slot_owner, stock=8)  # 2 per bucket
    b = ledger.buckets
    # A gateway withdraws 2 units from bucket 1 for bucket 3 and dies before depositing.
    code, moved = await b.withdraw(sale_id, 1, 3, "3.crashed", 5, T0)
    assert (code, moved) == (ReturnCode.OK, 2)
    # A retry of the same withdrawal takes nothing more.
    assert await b.withdraw(sale_id, 1, 3, "3.crashed", 5, T0) == (ReturnCode.REPLAYED, 2)
    rows = await balanced(ledger, sale_id)
    assert rows[1]["available"] == 0 and rows[1]["transit"] == 2
    assert sum(r["total"] for r in rows) == 6  # stranded, not sellable, never sold twice
    # Buyers get the six units left; the stranded two are in transit, so nobody hears
    # sold_out while they exist: the search waits for them and finally gives up with 503.
    results = [await attempt(ledger, request(sale_id, f"x{i}"), now=T0 + 1) for i in range(6)]
    assert results == ["reserved"] * 6
    assert await attempt(ledger, request(sale_id, "x6"), now=T0 + 1) == "service_unavailable"

    assert await b.recover(sale_id, now=T0 + 1) == 0  # too recent: a live transfer may finish
    assert await ledger.recover_transfers(sale_id, now=T0 + 10_000) == 1
    assert await ledger.recover_transfers(sale_id, now=T0 + 20_000) == 0
    await b.finish(sale_id, 1, "3.crashed", 3, 2)  # the dead gateway's late deposit: no-op
    rows = await balanced(ledger, sale_id)
    assert rows[3]["available"] == 2 and all(r["transit"] == 0 for r in rows)
    assert sum(r["total"] for r in rows) == 8
    late = await asyncio.gather(
        *[attempt(ledger, request(sale_id, f"y{i}"), now=T0 + 2) for i in range(5)]
    )
    assert late.count("reserved") == 2 and late.count("sold_out") == 3
    final = await balanced(ledger, sale_id)
    assert sum(r["reserved"] for r in final) == 8 and sum(r["available"] for r in final) == 0


async def test_workers_deliver_a_bucketed_sale_once_on_a_cluster(
    cluster: EmbeddedRedisCluster, settings: Settings, rc: Redis
) -> None:
    rt = await Runtime.open(
        dataclasses.replace(
            settings, redis_url=cluster.url, key_prefix="fgb" + secrets.token_hex(4)
        )
    )
    try:
        assert isinstance(rt.redis, RedisCluster)
        channel, _ = await make_channel(rt)
        sale_id, codes = await make_sale(rt, keys=14, per_user_limit=2, buckets=3)
        paid = []
        for i in range(12):
            order_id = await buy(rt, sale_id, channel, user=user_in(i % 3, 3))
            await rt.ledger.confirm(sale_id, order_id, channel, "pay")
            paid.append(order_id)
        assert {parse_order_id(o)[1] for o in paid} == {0, 1, 2}

        async def crash(sale: str, outcome: object) -> None:
            raise RuntimeError("killed after commit")

        with pytest.raises(RuntimeError, match="killed after commit"):
            await Worker(rt, name="doomed", sale_ids=[sale_id], after_commit=crash).run_burst()
        await Worker(rt, name="heir", sale_ids=[sale_id]).run_burst()

        rows, allocated = await order_rows(rt, sale_id), await keys_by_order(rt, sale_id)
        assert set(rows) == set(allocated) == set(paid)
        assert all(rows[o]["status"] == "delivered" for o in paid)
        key_ids = [k for ks in allocated.values() for k in ks]
        assert len(key_ids) == len(set(key_ids)) == 12
        for o in paid:
            assert (await rt.ledger.order(o) or {})["status"] == "delivered"
        stock = await rt.ledger.stock(sale_id)
        assert stock is not None and stock["delivered"] == 12 and stock["available"] == 2
        for shard in await rt.ledger.shards(sale_id):
            pending = await rt.redis.xpending(rt.keys.events(shard), WORKER_GROUP)
            assert pending["pending"] == 0
        assert len(codes) == 14
    finally:
        await rt.close()


async def test_inline_risk_purchase_on_home_buckets(
    ledger: Ledger, rc: Redis, slot_owner: dict[int, int]
) -> None:
    """The gateway's default path: risk keys in the home bucket's slot, scored in the same
    script; a ledger that didn't know the buckets is corrected and plans again."""
    now_s = time.time()
    now = int(now_s * 1000)
    sale_id = "rb-" + uuid.uuid4().hex[:12]
    await ledger.init_sale(sale_id, now - 1000, now + 3_600_000, 1, TTL_MS, BUCKETS)
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
    fresh = Ledger(rc, ledger.keys)  # knows nothing of the buckets yet

    async def buy_scored(user: str, ip: str) -> str:
        for _ in range(2):
            buckets, home = fresh.route(sale_id, user)
            ctx = RiskContext(
                sale_id=sale_id,
                channel_id="ch_test",
                user_id=user,
                device_id="d-" + user,
                client_ip=ip,
                user_agent="ua",
                quantity=1,
                idempotency_key=uuid.uuid4().hex,
                shard=shard_id(sale_id, home) if buckets > 1 else "",
                buckets=buckets,
            )
            plan = await engine.plan(ctx)
            assert isinstance(plan, RiskPlan)
            slots = {
                await keyslot(rc, key)
                for key in (*plan.script.keys, ledger.keys.sale(shard_id(sale_id, home)))
            }
            assert len(slots) == 1
            try:
                reservation, outcome = await fresh.purchase(
                    request(sale_id, user, key=ctx.idempotency_key),
                    plan.script,
                    now=now,
                    route=(buckets, home),
                )
            except WrongBuckets:
                continue
            except errors.FlashgateError as exc:
                return exc.code
            decision = engine.judge(plan, outcome)
            if reservation is None:
                return decision.verdict.value
            return reservation.status
        raise AssertionError("routed wrong twice")

    results = await asyncio.gather(*[buy_scored(f"h{i}", f"100.71.{i}.1") for i in range(60)])
    assert results.count("reserved") == 25 and results.count("sold_out") == 35
    assert await buy_scored("bot", "198.51.100.200") == Verdict.CHALLENGE.value
    rows = await balanced(ledger, sale_id)
    assert sum(r["reserved"] for r in rows) == 25 and sum(r["available"] for r in rows) == 0


# -- end to end through the gateway (single node) ----------------------------------------------
async def test_gateway_sells_and_delivers_a_bucketed_sale(
    client: httpx.AsyncClient, runtime: Runtime
) -> None:
    channel = await create_channel(client)
    r = await client.post(
        "/v1/admin/sales",
        headers=ADMIN,
        json={
            "sku": "S",
            "name": "n",
            "starts_at": "2020-01-01T00:00:00Z",
            "ends_at": "2099-01-01T00:00:00Z",
            "stock_buckets": 65,
        },
    )
    assert r.status_code == 422 and "stock_buckets" in r.json()["detail"]
    sale_id = "g-" + uuid.uuid4().hex[:12]
    body = {
        "sale_id": sale_id,
        "sku": "S",
        "name": "n",
        "starts_at": "2020-01-01T00:00:00Z",
        "ends_at": "2099-01-01T00:00:00Z",
        "stock_buckets": 3,
    }
    r = await client.post("/v1/admin/sales", headers=ADMIN, json=body)
    assert r.status_code == 201, r.text
    assert r.json()["stock_buckets"] == 3 and len(r.json()["buckets"]) == 3
    assert (await client.post("/v1/admin/sales", headers=ADMIN, json=body)).status_code == 201
    other = {**body, "stock_buckets": 2}
    assert (await client.post("/v1/admin/sales", headers=ADMIN, json=other)).status_code == 409
    codes = [f"{sale_id}-{i}-{secrets.token_hex(4)}" for i in range(10)]
    r = await client.post(f"/v1/admin/sales/{sale_id}/keys", headers=ADMIN, json={"keys": codes})
    assert r.status_code == 200 and r.json()["stock_total"] == 10

    async def buy(user: str, key: str) -> httpx.Response:
        return await client.post(
            f"/v1/sales/{sale_id}/purchase",
            headers=channel_headers(channel, key),
            json=purchase_body(user, payment_ref="pay-" + user),
        )

    answers = await asyncio.gather(*[buy(f"e2e-{i}", f"k-{i}") for i in range(16)])
    assert sorted(a.status_code for a in answers) == [201] * 10 + [409] * 6
    assert {a.json()["code"] for a in answers if a.status_code == 409} == {"sold_out"}
    won = [i for i, a in enumerate(answers) if a.status_code == 201]
    replay = await buy(f"e2e-{won[0]}", f"k-{won[0]}")
    assert replay.headers.get("Idempotent-Replayed") == "true"
    assert replay.json()["order_id"] == answers[won[0]].json()["order_id"]

    await Worker(runtime, name="e2e", sale_ids=[sale_id]).run_burst()
    seen: list[str] = []
    for i in won:
        order_id = answers[i].json()["order_id"]
        r = await client.get(f"/v1/orders/{order_id}", headers=channel_headers(channel))
        assert r.status_code == 200 and r.json()["status"] == "delivered", r.text
        seen += r.json()["card_keys"]
    assert sorted(seen) == sorted(codes)  # every key once
    r = await client.get(f"/v1/admin/sales/{sale_id}", headers=ADMIN)
    out = r.json()
    assert out["stock"] == {
        "total": 10,
        "available": 0,
        "reserved": 0,
        "confirmed": 0,
        "delivered": 10,
        "cancelled": 0,
        "expired": 0,
    }
    assert sum(b["delivered"] for b in out["buckets"]) == 10
    # The stock gauges sum the buckets; each bucket balances, so no drift.
    # (read for this sale alone: the exported set is bounded to MAX_SALES of the suite's many)
    row = await metrics.read_sale(runtime.redis, runtime.keys, WORKER_GROUP, sale_id)
    assert row["delivered"] == 10 and row["total"] == 10 and row["drift"] == 0
