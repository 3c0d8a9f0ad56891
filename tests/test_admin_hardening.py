"""Issue #11, items 8 and 9, replayed against a real gateway (uvicorn in a child process):
weak admin tokens refused at start, admin brute force throttled per client address, and the
reveal/import audit filed under the server's request id, never the one a client chose."""

from __future__ import annotations

import os
import secrets
import subprocess
from collections.abc import Callable

import asyncpg
import httpx
import pytest
from redis.asyncio import Redis

from cli.stack import gateway_argv
from core.embedded import ServiceURLs, free_port
from core.keys import Keys
from core.runtime import Runtime
from core.settings import ConfigError, Settings
from tests.conftest import channel_headers, create_channel, create_sale, purchase_body
from tests.live_gateway import LiveGateway, live_gateway  # noqa: F401 - the fixture
from workers.runner import Worker

GENERATE = 'python -c "import secrets; print(secrets.token_urlsafe(32))"'
BASE = {
    "FLASHGATE_REDIS_URL": "redis://127.0.0.1:1/0",
    "FLASHGATE_DATABASE_URL": "postgresql://u:p@127.0.0.1:1/db",
    "FLASHGATE_MASTER_KEY": "a2tra2tra2tra2tra2tra2tra2tra2tra2tra2tra2s=",
}


# -- #11.8 weak tokens ----------------------------------------------------------------------
@pytest.mark.parametrize(
    ("token", "why"),
    [
        ("", "is required"),
        ("a", "too short"),
        ("correct-horse", "too short"),
        ("a" * 40, "too predictable"),
        ("abcd" * 10, "too predictable"),
        ("0123456789" * 4, "too predictable"),
        ("has spaces " + secrets.token_urlsafe(32), "printable ASCII"),
        (secrets.token_urlsafe(32) + ",short", "token 2 of 2"),
    ],
)
def test_weak_admin_tokens_are_refused(token: str, why: str) -> None:
    with pytest.raises(ConfigError) as err:
        Settings.from_env({**BASE, "FLASHGATE_ADMIN_TOKEN": token})
    assert why in str(err.value) and "FLASHGATE_ADMIN_TOKEN" in str(err.value)
    assert GENERATE in str(err.value)
    assert len(token) < 8 or token[:8] not in str(err.value)  # never quoted back


def test_generated_tokens_pass_and_several_rotate() -> None:
    from core.settings import estimated_bits, parse_admin_tokens
    from gateway.auth import admin_token_matches

    # What `flashgate up` and the docs generate passes with room to spare: the rule is
    # >= 32 characters and >= 128 estimated bits (token_urlsafe(32): ~190-230).
    makers: list[Callable[[], str]] = [
        lambda: secrets.token_urlsafe(32),
        lambda: secrets.token_hex(32),
        lambda: "fg-admin-" + secrets.token_urlsafe(24),
    ]
    for make in makers:
        assert min(estimated_bits(make()) for _ in range(2000)) > 150
    old, new = secrets.token_urlsafe(32), secrets.token_urlsafe(32)
    s = Settings.from_env({**BASE, "FLASHGATE_ADMIN_TOKEN": f"{new}, {old}"})
    assert s.admin_token.reveal() == new and len(s.admin_tokens) == 2
    assert admin_token_matches(old, s.admin_tokens) and admin_token_matches(new, s.admin_tokens)
    assert not admin_token_matches(new[:-1], s.admin_tokens)
    assert not admin_token_matches("", s.admin_tokens)
    assert "*****" in repr(s) and new not in repr(s) and old not in repr(s)
    with pytest.raises(ConfigError, match="listed twice"):
        parse_admin_tokens(f"{new},{new}")


def test_a_gateway_with_a_weak_token_does_not_start(service_urls: ServiceURLs) -> None:
    env = {
        **os.environ,
        **BASE,
        "FLASHGATE_REDIS_URL": service_urls.redis_url,
        "FLASHGATE_DATABASE_URL": service_urls.database_url,
        "FLASHGATE_ADMIN_TOKEN": "a",
    }
    proc = subprocess.run(
        gateway_argv("127.0.0.1", free_port()),
        env=env,
        timeout=60,
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode != 0
    assert "FLASHGATE_ADMIN_TOKEN is too short" in proc.stdout + proc.stderr


# -- #11.8 brute force ------------------------------------------------------------------------
def _from(address: str, url: str) -> httpx.AsyncClient:
    """A client whose connections come from `address` (any of 127.0.0.0/8 is loopback)."""
    return httpx.AsyncClient(
        base_url=url, transport=httpx.AsyncHTTPTransport(local_address=address)
    )


async def test_admin_brute_force_is_locked_out_per_address(live_gateway: LiveGateway) -> None:  # noqa: F811
    address = f"127.0.0.{2 + secrets.randbelow(200)}"
    redis = Redis.from_url(live_gateway.redis_url)
    keys = Keys(live_gateway.key_prefix)
    try:
        async with (
            _from(address, live_gateway.url) as attacker,
            httpx.AsyncClient(base_url=live_gateway.url) as admin,
        ):
            # No token at all guesses nothing: a plain 401, never counted.
            for _ in range(15):
                r = await attacker.get("/v1/admin/risk/stats")
                assert r.status_code == 401
            statuses = []
            for i in range(14):
                r = await attacker.get(
                    "/v1/admin/risk/stats", headers={"Authorization": f"Bearer guess-{i}"}
                )
                statuses.append(r.status_code)
            assert statuses == [401] * 10 + [429] * 4, statuses
            assert r.json()["code"] == "rate_limited"
            assert 1 <= int(r.headers["retry-after"]) <= 300
            # Locked out: even the right token is refused, so no guess can succeed meanwhile.
            r = await attacker.get("/v1/admin/risk/stats", headers=live_gateway.admin)
            assert r.status_code == 429
            # Other addresses are not affected.
            r = await admin.get("/v1/admin/risk/stats", headers=live_gateway.admin)
            assert r.status_code == 200
            # The state lives in Redis (shared by every gateway process), with the window's TTL.
            key = keys.admin_auth_failures(address)
            assert int(await redis.get(key) or 0) == 10 and 0 < await redis.ttl(key) <= 300
            await redis.delete(key)
            r = await attacker.get("/v1/admin/risk/stats", headers=live_gateway.admin)
            assert r.status_code == 200
    finally:
        await redis.delete(keys.admin_auth_failures(address))
        await redis.aclose()


# -- #11.9 audit ids ----------------------------------------------------------------------
async def test_forged_request_id_is_not_the_audit_id_of_an_import(
    live_gateway: LiveGateway,
) -> None:  # noqa: F811
    async with httpx.AsyncClient(base_url=live_gateway.url) as c:
        r = await c.post(
            "/v1/admin/sales",
            headers=live_gateway.admin,
            json={
                "sku": "SKU-A",
                "name": "Audit",
                "starts_at": "2030-01-01T00:00:00Z",
                "ends_at": "2030-01-02T00:00:00Z",
            },
        )
        sale_id = r.json()["sale_id"]
        code = "AUDIT-" + secrets.token_hex(8)
        r = await c.post(
            f"/v1/admin/sales/{sale_id}/keys",
            content=code,
            headers={
                **live_gateway.admin,
                "Content-Type": "text/plain",
                "X-Request-Id": "admin-maintenance-job",
            },
        )
        assert r.status_code == 200, r.text
        ours = r.headers["x-request-id"]
    assert ours != "admin-maintenance-job" and len(ours) == 16
    conn = await asyncpg.connect(live_gateway.database_url)
    try:
        row = await conn.fetchrow(
            "SELECT e.request_id, e.client_request_id FROM key_events e JOIN card_keys k"
            " USING (key_id) WHERE k.sale_id = $1 AND e.event = 'imported'",
            sale_id,
        )
    finally:
        await conn.close()
    assert (row["request_id"], row["client_request_id"]) == (ours, "admin-maintenance-job")


async def test_forged_request_id_is_not_the_audit_id_of_a_reveal(
    client: httpx.AsyncClient, runtime: Runtime
) -> None:
    ch = await create_channel(client)
    sale_id, _ = await create_sale(client, keys=1)
    r = await client.post(
        f"/v1/sales/{sale_id}/purchase",
        headers=channel_headers(ch, "idem-audit"),
        json=purchase_body("u-audit", payment_ref="pay-1"),
    )
    assert r.status_code == 201, r.text
    order = r.json()["order_id"]
    await Worker(runtime, sale_ids=[sale_id]).run_burst()
    forged = [b"admin-maintenance-job", ("x" * 300 + "\u00e9 <script>").encode("latin-1")]
    returned = []
    for request_id in forged:
        headers = [(k.encode(), v.encode()) for k, v in channel_headers(ch).items()]
        r = await client.get(
            f"/v1/orders/{order}", headers=[*headers, (b"X-Request-Id", request_id)]
        )
        assert len(r.json()["card_keys"]) == 1
        returned.append(r.headers["x-request-id"])
    rows = await runtime.pool.fetch(
        "SELECT e.request_id, e.client_request_id FROM key_events e JOIN card_keys k"
        " USING (key_id) WHERE k.sale_id = $1 AND e.event = 'revealed' ORDER BY e.id",
        sale_id,
    )
    assert [r["request_id"] for r in rows] == returned
    assert all(len(i) == 16 and i != "admin-maintenance-job" for i in returned)
    # The client's own, apart: sanitized and bounded (64 characters of [A-Za-z0-9._:-]).
    assert [r["client_request_id"] for r in rows] == ["admin-maintenance-job", "x" * 64]
    with pytest.raises(asyncpg.CheckViolationError):
        await runtime.pool.execute(
            "INSERT INTO key_events (key_id, event, actor, client_request_id)"
            " VALUES (0, 'revealed', 'test', 'has a space')"
        )


def test_client_request_id_is_sanitized() -> None:
    from core.logging import client_request_id_from

    assert client_request_id_from([(b"x-request-id", b"trace-1.2:3_4")]) == "trace-1.2:3_4"
    assert client_request_id_from([(b"x-request-id", b"a b\r\nc")]) == "a_b__c"
    assert client_request_id_from([(b"x-request-id", b"z" * 500)]) == "z" * 64
    assert client_request_id_from([(b"host", b"x")]) == ""
