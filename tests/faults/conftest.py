"""Fixtures of the fault tests: a database and a key prefix of their own (their worker
processes see only their sales), on the session's servers unless a test starts private ones.

Long chaos runs are marked `chaos` and skipped unless FLASHGATE_CHAOS=1 (`make chaos`)."""

from __future__ import annotations

import base64
import os
import secrets
from collections.abc import AsyncIterator

import httpx
import pytest

from core.embedded import ServiceURLs
from core.runtime import Runtime
from core.settings import Settings
from tests.conftest import ADMIN_TOKEN, scratch_database

MASTER_KEY = base64.b64encode(secrets.token_bytes(32)).decode()


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "chaos: long fault runs (make chaos; FLASHGATE_CHAOS=1)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.environ.get("FLASHGATE_CHAOS") == "1":
        return
    skip = pytest.mark.skip(reason="chaos run: make chaos (FLASHGATE_CHAOS=1)")
    for item in items:
        if "chaos" in item.keywords:
            item.add_marker(skip)


def fault_settings(
    redis_url: str, database_url: str, prefix: str | None = None, **extra: str
) -> Settings:
    return Settings.from_env(
        {
            "FLASHGATE_REDIS_URL": redis_url,
            "FLASHGATE_DATABASE_URL": database_url,
            "FLASHGATE_ADMIN_TOKEN": ADMIN_TOKEN,
            "FLASHGATE_MASTER_KEY": MASTER_KEY,
            "FLASHGATE_KEY_PREFIX": prefix or "fgf" + secrets.token_hex(4),
            "FLASHGATE_WORKER_BLOCK_MS": "50",
            "FLASHGATE_WORKER_CLAIM_IDLE_MS": "300",
            "FLASHGATE_REDIS_MIN_CONNECTIONS": "2",
            **extra,
        }
    )


@pytest.fixture(scope="session")
async def faults_database(service_urls: ServiceURLs) -> AsyncIterator[str]:
    async with scratch_database(service_urls.database_url, "flashgate_faults_") as url:
        yield url


@pytest.fixture
async def frt(service_urls: ServiceURLs, faults_database: str) -> AsyncIterator[Runtime]:
    """A runtime of its own: a fresh key prefix per test, the faults database."""
    rt = await Runtime.open(fault_settings(service_urls.redis_url, faults_database))
    yield rt
    async for key in rt.redis.scan_iter(match=f"{rt.settings.key_prefix}:*", count=1000):
        await rt.redis.delete(key)
    await rt.close()


async def app_client(
    settings: Settings,
    rt: Runtime | None = None,
    *,
    risk: bool = False,
) -> tuple[object, httpx.AsyncClient]:
    """An in-process gateway (risk off unless `risk`) and a client of it; the caller enters
    the lifespan."""
    from gateway.app import create_app
    from risk.engine import AllowAll

    app = create_app(settings) if risk else create_app(settings, risk=AllowAll())
    client = httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://flashgate.test"
    )
    return app, client
