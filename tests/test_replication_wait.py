"""An acknowledged write is on a replica (core/autopipeline.py, one WAIT per flushed buffer):
a real Valkey primary and replica, the replica stopped with SIGSTOP to stall the link."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import tempfile
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from redis.asyncio import Redis

from core.autopipeline import AutoPipeline, NotReplicated
from core.embedded import EmbeddedRedis, ServiceURLs
from tests.conftest import scratch_database
from tests.replication import replica_online, send


@dataclass
class Pair:
    primary: EmbeddedRedis
    replica: EmbeddedRedis

    def stall(self) -> None:
        send(self.replica, signal.SIGSTOP)

    def resume(self) -> None:
        send(self.replica, signal.SIGCONT)


@pytest.fixture(scope="module")
def pair() -> Iterator[Pair]:
    run_dir = Path(tempfile.mkdtemp(prefix="flashgate-replica-"))
    primary = EmbeddedRedis(run_dir, name="primary")
    primary.start()
    replica = EmbeddedRedis(run_dir, name="replica", replica_of=primary.port)
    try:
        replica.start()
        yield Pair(primary, replica)
    finally:
        if replica.proc is not None:
            os.kill(replica.proc.pid, signal.SIGCONT)  # a stopped process ignores SIGTERM
        replica.stop()
        primary.stop()
        shutil.rmtree(run_dir, ignore_errors=True)


@pytest.fixture
async def linked(pair: Pair) -> AsyncIterator[Pair]:
    """The pair, its replication link up."""
    await replica_online(pair.primary.url)
    yield pair


async def test_auto_waits_for_the_replica_before_answering(linked: Pair) -> None:
    """With a replica connected, `auto` waits for one: whatever a caller was told is already
    on the replica when it hears it."""
    pipe = AutoPipeline.from_url(
        linked.primary.url, timeout_s=2, connections=2, wait_replicas=None, wait_timeout_ms=500
    )
    replica = Redis.from_url(linked.replica.url, decode_responses=True)
    try:
        await pipe.warm_up()
        assert all(c.wait_replicas == 1 for c in pipe.connections)
        for _ in range(5):
            values = await asyncio.gather(*(pipe.execute("INCR", "wait:n") for _ in range(50)))
            # the replica holds at least the highest value any caller was given
            assert int(await replica.get("wait:n") or 0) >= max(values)
        assert max(c.writes for c in pipe.connections) <= 10  # one WAIT per buffer, shared
    finally:
        await pipe.aclose()
        await replica.aclose()


async def test_a_stalled_replica_fails_the_call_and_a_retry_succeeds(linked: Pair) -> None:
    pipe = AutoPipeline.from_url(
        linked.primary.url, timeout_s=2, connections=1, wait_replicas=1, wait_timeout_ms=100
    )
    primary = Redis.from_url(linked.primary.url, decode_responses=True)
    try:
        before = int(await pipe.execute("INCR", "wait:stall"))
        linked.stall()
        try:
            results = await asyncio.gather(
                *(pipe.execute("INCR", "wait:stall") for _ in range(3)), return_exceptions=True
            )
        finally:
            linked.resume()
        assert all(isinstance(r, NotReplicated) for r in results), results
        # they ran on the primary: the caller was told "not replicated", never "not done"
        assert int(await primary.get("wait:stall")) == before + 3
        # the connection stays usable, and once the replica is back the writes are acked
        assert int(await pipe.execute("INCR", "wait:stall")) == before + 4
    finally:
        await pipe.aclose()
        await primary.aclose()


async def test_no_replica_no_wait(pair: Pair, tmp_path: Path) -> None:
    """A single-node stack (make up, the tests' own Redis) runs without WAIT in auto mode."""
    alone = EmbeddedRedis(tmp_path)
    alone.start()
    try:
        pipe = AutoPipeline.from_url(alone.url, timeout_s=2, connections=1, wait_replicas=None)
        assert await pipe.execute("PING") == "PONG"
        assert pipe.connections[0].wait_replicas == 0
        await pipe.aclose()
    finally:
        alone.stop()


@pytest.fixture
async def own_database(service_urls: ServiceURLs) -> AsyncIterator[str]:
    """A database of its own: this test's random master key must not seal data keys into the
    session's shared database (the later tests could not open them: DecryptionError)."""
    async with scratch_database(service_urls.database_url, "flashgate_wait_") as url:
        yield url


async def test_a_purchase_is_acknowledged_only_once_replicated(
    linked: Pair, own_database: str
) -> None:
    """Through the gateway: with the replica stalled a purchase answers 503 with Retry-After
    (its reservation did happen on the primary); the storefront's retry with the same
    Idempotency-Key, once the replica is back, gets that same order with 201."""
    import base64
    import secrets

    import httpx

    from core.settings import Settings
    from gateway.app import create_app
    from risk.engine import AllowAll
    from tests.conftest import (
        ADMIN_TOKEN,
        channel_headers,
        create_channel,
        create_sale,
        purchase_body,
    )

    settings = Settings.from_env(
        {
            "FLASHGATE_REDIS_URL": linked.primary.url,
            "FLASHGATE_DATABASE_URL": own_database,
            "FLASHGATE_ADMIN_TOKEN": ADMIN_TOKEN,
            "FLASHGATE_MASTER_KEY": base64.b64encode(secrets.token_bytes(32)).decode(),
            "FLASHGATE_KEY_PREFIX": "fgr" + secrets.token_hex(4),
            "FLASHGATE_REDIS_WAIT_TIMEOUT_MS": "100",
        }
    )
    app = create_app(settings, risk=AllowAll())
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://fg.test") as client:
            channel = await create_channel(client)
            sale_id, _ = await create_sale(client, keys=3)
            headers = channel_headers(channel, "retry-me")
            path = f"/v1/sales/{sale_id}/purchase"
            linked.stall()
            try:
                r = await client.post(path, json=purchase_body("u-1"), headers=headers)
            finally:
                linked.resume()
            assert r.status_code == 503, r.text
            assert r.headers["content-type"].startswith("application/problem+json")
            assert int(r.headers["retry-after"]) >= 1
            first = await client.post(path, json=purchase_body("u-1"), headers=headers)
            again = await client.post(path, json=purchase_body("u-1"), headers=headers)
    assert first.status_code == 201, first.text
    assert first.headers.get("idempotent-replayed") == "true"  # the 503'd reservation itself
    assert again.json()["order_id"] == first.json()["order_id"]
    assert again.headers.get("idempotent-replayed") == "true"
