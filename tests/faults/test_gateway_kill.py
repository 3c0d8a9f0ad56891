"""Fault 2: the gateway process (uvicorn) SIGKILLed mid-burst and restarted on its port, while
every client retries with its Idempotency-Key: no oversell, no Idempotency-Key reserved
twice, one final answer per key."""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from pathlib import Path

import httpx
import pytest

from core.embedded import free_port
from core.runtime import Runtime
from tests.conftest import purchase_body
from tests.faults.support import child_env, kill, start_gateway, stop_all, wait_healthy
from tests.workers_fixtures import import_keys, make_sale

STOCK, CLIENTS = 150, 400


@pytest.mark.timeout(120)
async def test_gateway_killed_mid_burst_with_retrying_clients(frt: Runtime, tmp_path: Path) -> None:
    env = child_env(frt.settings, FLASHGATE_RISK_ENABLED="0")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    gateways = [start_gateway(env, tmp_path, port, "gateway-1")]
    await asyncio.to_thread(wait_healthy, url, gateways[0])
    try:
        admin = {"Authorization": f"Bearer {frt.settings.admin_token.reveal()}"}
        async with httpx.AsyncClient(base_url=url, timeout=5) as http:
            r = await http.post("/v1/admin/channels", json={"name": "shop"}, headers=admin)
            api_key = r.json()["api_key"]
            sale, _ = await make_sale(frt, keys=0, per_user_limit=2)
            await import_keys(frt, sale, STOCK)
        answers: dict[str, list[tuple[int, str]]] = {}
        stats: Counter[str] = Counter()

        async def client(i: int, http: httpx.AsyncClient) -> None:
            key, seen = f"key-{i}", answers.setdefault(f"key-{i}", [])
            body = purchase_body(f"u{i}", payment_ref="pay")
            headers = {"Authorization": f"Bearer {api_key}", "Idempotency-Key": key}
            for _ in range(200):
                try:
                    r = await http.post(f"/v1/sales/{sale}/purchase", json=body, headers=headers)
                except httpx.HTTPError:
                    stats["connection_errors"] += 1
                    await asyncio.sleep(0.05)
                    continue
                if r.status_code >= 500:
                    stats["5xx"] += 1
                    await asyncio.sleep(0.05)
                    continue
                seen.append((r.status_code, r.json().get("order_id") or r.json()["code"]))
                if len(seen) == 1 and i % 3 == 0:
                    continue  # a third of the clients ask again (their answer was "lost")
                return
            raise AssertionError(f"{key}: no answer")

        async def killer() -> None:
            for n in (2, 3):
                await asyncio.sleep(0.4)
                kill(gateways[-1])
                stats["gateway_sigkills"] += 1
                gateways.append(start_gateway(env, tmp_path, port, f"gateway-{n}"))
                await asyncio.to_thread(wait_healthy, url, gateways[-1])

        limits = httpx.Limits(max_connections=50)
        async with httpx.AsyncClient(base_url=url, timeout=3, limits=limits) as http:
            await asyncio.gather(killer(), *(client(i, http) for i in range(CLIENTS)))

        orders: set[str] = set()
        for key, seen in answers.items():
            assert seen, key
            assert len({a for a in seen}) == 1, (key, seen)  # the same answer every time
            status, value = seen[0]
            assert status in (201, 409), (key, seen)
            if status == 201:
                orders.add(value)
        stream = await frt.redis.xrange(frt.keys.events(sale))
        by_user = Counter(f["u"] for _, f in stream if f["t"] == "confirmed")
        assert max(by_user.values()) == 1  # no key reserved twice (each client: one user)
        assert len(by_user) == len(orders) == STOCK  # sold out exactly, nothing oversold
        stock = await frt.ledger.stock(sale)
        assert stock is not None and stock["available"] == 0 and stock["confirmed"] == STOCK
        print(
            "FAULT2",
            json.dumps(
                {
                    **stats,
                    "clients": CLIENTS,
                    "stock": STOCK,
                    "orders": len(orders),
                    "answers": sum(len(s) for s in answers.values()),
                }
            ),
        )
    finally:
        stop_all(gateways)
