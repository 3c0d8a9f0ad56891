"""Test harness: real Redis and PostgreSQL, never the machine's standard-port servers.

By default a private Valkey and PostgreSQL are started on free ports for the session
(core.embedded). Set FLASHGATE_REDIS_URL / FLASHGATE_DATABASE_URL to run against given servers
(e.g. Redis 7 and PostgreSQL 15): the suite then works in a database it creates and drops,
and under a Redis key prefix of its own that it deletes at the end; it never flushes them.
"""

from __future__ import annotations

import asyncio
import base64
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import httpx
import pytest
from redis.asyncio import Redis

from core.embedded import ServiceURLs, backing_services
from core.runtime import Runtime, redis_client
from core.settings import Settings

ADMIN_TOKEN = "test-admin-" + secrets.token_urlsafe(32)


@pytest.fixture(scope="session")
def service_urls() -> Iterator[ServiceURLs]:
    # A private temp dir (not pytest's rotating basetemp, which a concurrent session may prune).
    with backing_services() as urls:
        yield urls


def _with_database(url: str, name: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path="/" + name))


@asynccontextmanager
async def scratch_database(server_url: str, prefix: str) -> AsyncIterator[str]:
    """A database of its own on the given server, dropped afterwards; yields its URL."""
    name = prefix + uuid.uuid4().hex[:12]
    admin = await asyncpg.connect(server_url)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
        yield _with_database(server_url, name)
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


@pytest.fixture(scope="session")
async def database_url(service_urls: ServiceURLs) -> AsyncIterator[str]:
    async with scratch_database(service_urls.database_url, "flashgate_test_") as url:
        yield url


@pytest.fixture(scope="session")
def settings(service_urls: ServiceURLs, database_url: str) -> Settings:
    return Settings.from_env(
        {
            "FLASHGATE_REDIS_URL": service_urls.redis_url,
            "FLASHGATE_DATABASE_URL": database_url,
            "FLASHGATE_ADMIN_TOKEN": ADMIN_TOKEN,
            "FLASHGATE_MASTER_KEY": base64.b64encode(secrets.token_bytes(32)).decode(),
            "FLASHGATE_KEY_PREFIX": "fgt" + secrets.token_hex(4),
            "FLASHGATE_WORKER_BLOCK_MS": "50",
            "FLASHGATE_WORKER_CLAIM_IDLE_MS": "200",
            # Webhook tests deliver to receivers on 127.0.0.1, which production refuses (the SSRF
            # tests in test_webhooks_ssrf.py take this allow-list away again).
            "FLASHGATE_WEBHOOK_ALLOW_NETS": "127.0.0.0/8",
        }
    )


@pytest.fixture(scope="session")
async def runtime(settings: Settings) -> AsyncIterator[Runtime]:
    rt = await Runtime.open(settings)
    yield rt
    # Delete only this session's keys: a given server may hold other data.
    async for key in rt.redis.scan_iter(match=f"{settings.key_prefix}:*", count=1000):
        await rt.redis.delete(key)
    await rt.close()


@pytest.fixture
async def redis(settings: Settings) -> AsyncIterator[Redis]:
    client = redis_client(settings)
    yield client
    await client.aclose()


@pytest.fixture(scope="session")
async def app(settings: Settings, runtime: Runtime):  # type: ignore[no-untyped-def]
    from gateway.app import create_app
    from risk.engine import AllowAll

    # The core tests drive the ledger hard from one ip; the risk tests build their own app.
    application = create_app(settings, risk=AllowAll())
    async with application.router.lifespan_context(application):
        yield application


@pytest.fixture
async def client(app) -> AsyncIterator[httpx.AsyncClient]:  # type: ignore[no-untyped-def]
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://flashgate.test") as c:
        yield c


# -- helpers shared by tests ----------------------------------------------------------------
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


def new_sale_id() -> str:
    return "t-" + uuid.uuid4().hex[:16]


def rfc3339(dt: datetime) -> str:
    return dt.astimezone(UTC).isoformat().replace("+00:00", "Z")


async def create_channel(
    client: httpx.AsyncClient, name: str = "shop", webhook_url: str | None = None
) -> dict[str, str]:
    body: dict[str, str] = {"name": name}
    if webhook_url:
        body["webhook_url"] = webhook_url
    r = await client.post("/v1/admin/channels", json=body, headers=ADMIN)
    assert r.status_code == 201, r.text
    data: dict[str, str] = r.json()
    return data


async def create_sale(
    client: httpx.AsyncClient,
    *,
    keys: int = 0,
    per_user_limit: int = 1,
    ttl_s: int = 300,
    starts_in_s: float = -1,
    lasts_s: float = 3600,
    sale_id: str | None = None,
) -> tuple[str, list[str]]:
    """A sale open now (by default) with `keys` freshly imported codes; returns (id, codes)."""
    sale_id = sale_id or new_sale_id()
    now = datetime.now(UTC)
    r = await client.post(
        "/v1/admin/sales",
        headers=ADMIN,
        json={
            "sale_id": sale_id,
            "sku": "SKU-1",
            "name": "Test sale",
            "starts_at": rfc3339(now + timedelta(seconds=starts_in_s)),
            "ends_at": rfc3339(now + timedelta(seconds=starts_in_s + lasts_s)),
            "per_user_limit": per_user_limit,
            "reservation_ttl_s": ttl_s,
        },
    )
    assert r.status_code == 201, r.text
    codes = [f"{sale_id}-CODE-{i:06d}-{secrets.token_hex(4)}" for i in range(keys)]
    if codes:
        r = await client.post(
            f"/v1/admin/sales/{sale_id}/keys", headers=ADMIN, json={"keys": codes}
        )
        assert r.status_code == 200, r.text
        assert r.json()["imported"] == keys
    return sale_id, codes


def channel_headers(
    channel: dict[str, str],
    idempotency_key: str | None = None,
) -> dict[str, str]:
    headers = {"Authorization": f"Bearer {channel['api_key']}"}
    if idempotency_key is not None:
        headers["Idempotency-Key"] = idempotency_key
    return headers


async def until(predicate: Callable[[], Awaitable[bool]], timeout_s: float = 10.0) -> None:
    """Wait for an async condition, polling every 10 ms; TimeoutError past `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while not await predicate():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met in time")
        await asyncio.sleep(0.01)


def purchase_body(user_id: str, **extra: object) -> dict[str, object]:
    body: dict[str, object] = {
        "user_id": user_id,
        "client_ip": "203.0.113.7",
        "device_id": "dev-" + user_id,
    }
    body.update(extra)
    return body
