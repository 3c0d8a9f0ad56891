"""A real gateway: uvicorn (uvloop, httptools) in a child process on a free port, with its own
database and Redis key prefix on the session's servers, stopped by its PID.

For what only a real server shows: the HTTP parser's limits, slow clients over a raw socket,
and schemathesis against the served /openapi.json.
"""

from __future__ import annotations

import asyncio
import base64
import os
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import httpx
import pytest

from cli.stack import Child, gateway_argv, spawn, stop_children, wait_healthy
from core.db import migrate
from core.embedded import ServiceURLs, free_port
from tests.conftest import scratch_database

BODY_TIMEOUT_S = 1.0  # short, so the slow-client tests stay short


@dataclass
class LiveGateway:
    url: str
    port: int
    admin: dict[str, str]
    channel: dict[str, str]  # headers of a channel created at start
    database_url: str
    redis_url: str
    key_prefix: str
    child: Child


@pytest.fixture(scope="session")
async def live_gateway(
    service_urls: ServiceURLs,
    tmp_path_factory: pytest.TempPathFactory,
) -> AsyncIterator[LiveGateway]:
    async with scratch_database(service_urls.database_url, "flashgate_live_") as db_url:
        conn = await asyncpg.connect(db_url)
        try:
            await migrate(conn)
        finally:
            await conn.close()
        token, prefix, port = (
            "live-" + secrets.token_urlsafe(32),
            "fgl" + secrets.token_hex(4),
            free_port(),
        )
        env = {
            **os.environ,
            "FLASHGATE_REDIS_URL": service_urls.redis_url,
            "FLASHGATE_DATABASE_URL": db_url,
            "FLASHGATE_ADMIN_TOKEN": token,
            "FLASHGATE_MASTER_KEY": base64.b64encode(secrets.token_bytes(32)).decode(),
            "FLASHGATE_KEY_PREFIX": prefix,
            "FLASHGATE_BODY_TIMEOUT_S": str(BODY_TIMEOUT_S),
        }
        logs = Path(tmp_path_factory.mktemp("live-gateway"))
        child = spawn("gateway", gateway_argv("127.0.0.1", port), env, logs)
        url = f"http://127.0.0.1:{port}"
        try:
            await asyncio.to_thread(wait_healthy, child, url)
            admin = {"Authorization": f"Bearer {token}"}
            async with httpx.AsyncClient(base_url=url) as c:
                r = await c.post("/v1/admin/channels", json={"name": "live"}, headers=admin)
                assert r.status_code == 201, r.text
            channel = {"Authorization": f"Bearer {r.json()['api_key']}"}
            yield LiveGateway(
                url, port, admin, channel, db_url, service_urls.redis_url, prefix, child
            )
        finally:
            await asyncio.to_thread(stop_children, [child], 10)
            assert "unexpected error" not in child.tail(100_000), child.tail(200)
