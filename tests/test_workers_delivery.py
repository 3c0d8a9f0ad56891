"""Webhook delivery (signed, retried, given up) and a real worker process drained by SIGTERM."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import os
import signal
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import msgspec
import pytest

from core.crypto import SIGNATURE_HEADER, verify_webhook
from core.keys import WORKER_GROUP, Keys
from core.ledger import Ledger
from core.refunds import refund_order
from core.runtime import Runtime
from tests.workers_fixtures import (
    buy,
    buy_and_confirm,
    make_channel,
    make_sale,
    order_rows,
    redis_statuses,
)
from workers.runner import Worker
from workers.webhooks import Dispatcher

ROOT = Path(__file__).resolve().parent.parent


class HookServer:
    """A tiny HTTP/1.1 receiver on 127.0.0.1: records requests, answers with queued statuses."""

    def __init__(self) -> None:
        self.statuses: list[int] = []
        self.requests: list[tuple[dict[str, str], bytes]] = []
        self.url = ""

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = (await reader.readuntil(b"\r\n\r\n")).decode()
        lines = head.split("\r\n")[1:]
        headers = {
            k.strip().lower(): v.strip()
            for k, v in (line.split(":", 1) for line in lines if ":" in line)
        }
        body = await reader.readexactly(int(headers.get("content-length", "0")))
        self.requests.append((headers, body))
        status = self.statuses.pop(0) if self.statuses else 200
        writer.write(
            f"HTTP/1.1 {status} X\r\ncontent-length: 0\r\nconnection: close\r\n\r\n".encode()
        )
        await writer.drain()
        writer.close()
        await writer.wait_closed()


@pytest.fixture
async def hook() -> AsyncIterator[HookServer]:
    server_state = HookServer()
    server = await asyncio.start_server(server_state.handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    server_state.url = f"http://127.0.0.1:{port}/hooks/flashgate"
    async with server:
        yield server_state
        server.close()
        await server.wait_closed()


async def outbox(rt: Runtime, order_id: str) -> list[dict[str, object]]:
    rows = await rt.pool.fetch("SELECT * FROM webhook_outbox WHERE order_id = $1", order_id)
    return [dict(r) for r in rows]


async def test_webhook_is_signed_and_retried_after_a_500(
    runtime: Runtime, hook: HookServer
) -> None:
    channel, secret = await make_channel(runtime, webhook_url=hook.url)
    quiet, _ = await make_channel(runtime)  # no webhook_url: no outbox rows
    sale, codes = await make_sale(runtime, keys=3)
    order = await buy_and_confirm(runtime, sale, channel, qty=2)
    silent = await buy_and_confirm(runtime, sale, quiet)
    await Worker(runtime, sale_ids=[sale]).run_burst()
    assert await outbox(runtime, silent) == []
    (row,) = await outbox(runtime, order)
    assert (row["event"], row["attempts"], row["delivered_at"]) == ("order.delivered", 0, None)

    async with httpx.AsyncClient(trust_env=False) as http:
        dispatcher = Dispatcher(
            runtime.pool,
            runtime.keyring,
            runtime.settings,
            http,
            channel_ids=[channel],
            backoff_base_s=0.05,
        )
        hook.statuses = [500]
        assert await dispatcher.dispatch_once() == 1
        (row,) = await outbox(runtime, order)
        assert (row["attempts"], row["last_error"], row["delivered_at"]) == (1, "http_500", None)
        assert await dispatcher.dispatch_once() == 0  # backing off
        await asyncio.sleep(0.1)
        assert await dispatcher.dispatch_due() == 1

    (row,) = await outbox(runtime, order)
    assert row["attempts"] == 2 and row["delivered_at"] is not None and row["failed_at"] is None
    assert len(hook.requests) == 2
    for headers, body in hook.requests:
        assert verify_webhook(secret, body, headers[SIGNATURE_HEADER.lower()])
        assert not verify_webhook("whsec_" + "x" * 44, body, headers[SIGNATURE_HEADER.lower()])
        assert headers["content-type"] == "application/json"
    payload = msgspec.json.decode(hook.requests[-1][1])
    delivered_at = (await order_rows(runtime, sale))[order]["delivered_at"]
    assert payload == {
        "event": "order.delivered",
        "order_id": order,
        "sale_id": sale,
        "user_id": payload["user_id"],
        "quantity": 2,
        "delivered_at": delivered_at.isoformat().replace("+00:00", "Z"),  # type: ignore[union-attr]
    }
    assert not any(code.encode() in hook.requests[-1][1] for code in codes)


async def test_webhook_gives_up_after_max_attempts(runtime: Runtime, hook: HookServer) -> None:
    channel, _ = await make_channel(runtime, webhook_url=hook.url)
    sale, _ = await make_sale(runtime, keys=1)
    order = await buy_and_confirm(runtime, sale, channel)
    await Worker(runtime, sale_ids=[sale]).run_burst()
    settings = dataclasses.replace(runtime.settings, webhook_max_attempts=2)
    hook.statuses = [503, 503, 200]
    async with httpx.AsyncClient(trust_env=False) as http:
        dispatcher = Dispatcher(
            runtime.pool,
            runtime.keyring,
            settings,
            http,
            channel_ids=[channel],
            backoff_base_s=0.01,
        )
        assert await dispatcher.dispatch_once() == 1
        await asyncio.sleep(0.05)
        assert await dispatcher.dispatch_due() == 1
        await asyncio.sleep(0.05)
        assert await dispatcher.dispatch_due() == 0  # failed for good: not retried
    (row,) = await outbox(runtime, order)
    assert row["attempts"] == 2 and row["failed_at"] is not None and row["delivered_at"] is None
    assert row["last_error"] == "http_503"


# -- a real worker process ---------------------------------------------------------------------
def worker_env(rt: Runtime, prefix: str) -> dict[str, str]:
    s = rt.settings
    masters = ",".join(f"{k.key_id}:{base64.b64encode(k.material).decode()}" for k in s.master_keys)
    return {
        **os.environ,
        "FLASHGATE_REDIS_URL": s.redis_url,
        "FLASHGATE_DATABASE_URL": s.database_url.reveal(),
        "FLASHGATE_ADMIN_TOKEN": s.admin_token.reveal(),
        "FLASHGATE_MASTER_KEY": masters,
        "FLASHGATE_KEY_PREFIX": prefix,
        "FLASHGATE_WORKER_BLOCK_MS": "50",
        "FLASHGATE_WORKER_CLAIM_IDLE_MS": "200",
        "FLASHGATE_SWEEP_INTERVAL_S": "0.05",
        "PYTHONPATH": str(ROOT),
    }


async def wait_for(predicate, timeout_s: float = 15.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while not await predicate():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met in time")
        await asyncio.sleep(0.05)


async def test_worker_process_drains_on_sigterm(runtime: Runtime) -> None:
    # A key prefix of its own, so the process sees only this test's sales.
    prefix = runtime.settings.key_prefix + "w"
    keys = Keys(prefix)
    rt = dataclasses.replace(
        runtime,
        keys=keys,
        ledger=Ledger(runtime.redis, keys),
        settings=dataclasses.replace(runtime.settings, key_prefix=prefix),
    )
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        "from workers.runner import main; main()",
        env=worker_env(runtime, prefix),
        cwd=ROOT,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    assert proc.stderr is not None
    try:
        channel, _ = await make_channel(rt)
        sale, _ = await make_sale(rt, keys=20, ttl_ms=300)
        paid = [await buy_and_confirm(rt, sale, channel) for _ in range(5)]
        lapsed = await buy(rt, sale, channel)  # never confirmed: the sweeper expires it

        async def settled() -> bool:
            rows = await order_rows(rt, sale)
            return (
                all(rows.get(o, {}).get("status") == "delivered" for o in paid)
                and rows.get(lapsed, {}).get("status") == "expired"
            )

        await wait_for(settled)
        assert await redis_statuses(rt, paid) == {"delivered"}

        more = [await buy_and_confirm(rt, sale, channel) for _ in range(5)]
        proc.send_signal(signal.SIGTERM)
        stderr = (await asyncio.wait_for(proc.stderr.read(), 15)).decode()
        assert await asyncio.wait_for(proc.wait(), 15) == 0, stderr
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert "stop requested, draining" in stderr and "stopped" in stderr
    # Whatever it had read it finished: nothing is left pending, PG and Redis agree.
    pend = await rt.redis.xpending(keys.events(sale), WORKER_GROUP)
    assert pend["pending"] == 0
    rows = await order_rows(rt, sale)
    done = [o for o in more if o in rows and rows[o]["status"] == "delivered"]
    assert not done or await redis_statuses(rt, done) == {"delivered"}
    with contextlib.suppress(Exception):
        async for key in rt.redis.scan_iter(match=f"{prefix}:*"):
            await rt.redis.delete(key)


async def test_refund_webhook_is_delivered_signed(runtime: Runtime, hook: HookServer) -> None:
    """`order.refunded` reaches the channel's receiver like `order.delivered`: signed with the
    channel's secret, through the same outbox and dispatcher, never with a key."""
    channel, secret = await make_channel(runtime, webhook_url=hook.url)
    sale, codes = await make_sale(runtime, keys=2)
    order = await buy_and_confirm(runtime, sale, channel)
    await Worker(runtime, sale_ids=[sale]).run_burst()  # delivered, order.delivered queued
    assert await refund_order(runtime, order, channel, actor="channel:test") == "refunded"
    await Worker(runtime, sale_ids=[sale]).run_burst()  # settled, order.refunded queued
    async with httpx.AsyncClient(trust_env=False) as http:
        dispatcher = Dispatcher(
            runtime.pool, runtime.keyring, runtime.settings, http, channel_ids=[channel]
        )
        assert await dispatcher.dispatch_once() == 2
    events = {}
    for headers, body in hook.requests:
        assert verify_webhook(secret, body, headers[SIGNATURE_HEADER.lower()])
        doc = msgspec.json.decode(body)
        events[doc["event"]] = doc
        assert not any(code.encode() in body for code in codes)
    assert set(events) == {"order.delivered", "order.refunded"}
    refunded = events["order.refunded"]
    assert (refunded["order_id"], refunded["sale_id"], refunded["keys_voided"]) == (order, sale, 1)
    assert all(r["delivered_at"] is not None for r in await outbox(runtime, order))
