"""#10.4: webhooks verify as documented, on requests a real dispatcher sent to a local receiver.

The shipped snippets (docs/examples/verify_webhook.py, stdlib only; verify_webhook.mjs, Node's
crypto) run as subprocesses with the secret the API showed, the captured body and header: a
genuine delivery exits 0, a tampered one 1. The Standard Webhooks headers are checked with that
spec's own library. Then the secret's life: channels from before the whsec_ form, rotation.
"""

from __future__ import annotations

import asyncio
import base64
import os
import secrets
import shutil
import sys
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg
import httpx
import pytest
from standardwebhooks import Webhook, WebhookVerificationError

from core.crypto import SIGNATURE_HEADER, show_webhook_secret, sign_webhook, verify_webhook
from core.db import migration_files
from core.embedded import ServiceURLs
from core.runtime import Runtime
from tests.conftest import ADMIN, create_channel, scratch_database
from tests.test_workers_delivery import HookServer
from tests.workers_fixtures import buy_and_confirm, make_channel, make_sale
from workers.runner import Worker
from workers.webhooks import Dispatcher

EXAMPLES = Path(__file__).resolve().parent.parent / "docs" / "examples"
SNIPPETS = {
    "python": [sys.executable, str(EXAMPLES / "verify_webhook.py")],
    "node": ["node", str(EXAMPLES / "verify_webhook.mjs")],
}
Request = tuple[dict[str, str], bytes]


@pytest.fixture
async def hook() -> AsyncIterator[HookServer]:
    state = HookServer()
    server = await asyncio.start_server(state.handle, "127.0.0.1", 0)
    state.url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/hooks/flashgate"
    async with server:
        yield state


async def dispatch(rt: Runtime, channel: str, hook: HookServer) -> Request:
    async with httpx.AsyncClient(trust_env=False) as http:
        await Dispatcher(
            rt.pool, rt.keyring, rt.settings, http, channel_ids=[channel]
        ).dispatch_due()
    return hook.requests[-1]


async def real_webhook(rt: Runtime, channel: str, hook: HookServer) -> Request:
    """An order bought, delivered by a worker, its `order.delivered` webhook sent."""
    sale, _ = await make_sale(rt, keys=1)
    await buy_and_confirm(rt, sale, channel)
    await Worker(rt, sale_ids=[sale]).run_burst()
    return await dispatch(rt, channel, hook)


async def queued_webhook(rt: Runtime, channel: str, hook: HookServer) -> Request:
    await rt.pool.execute(
        "INSERT INTO webhook_outbox (channel_id, order_id, event, payload)"
        " VALUES ($1, $2, 'order.delivered', $3)",
        channel,
        "o-" + secrets.token_hex(8),
        b'{"event":"order.delivered"}',
    )
    return await dispatch(rt, channel, hook)


async def snippet(lang: str, secret: str, body: bytes, header: str) -> int:
    if shutil.which(SNIPPETS[lang][0]) is None:
        pytest.skip(f"{lang} is not installed")
    proc = await asyncio.create_subprocess_exec(
        *SNIPPETS[lang],
        header,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "WEBHOOK_SECRET": secret},
    )
    out, err = await asyncio.wait_for(proc.communicate(body), 30)
    assert proc.returncode in (0, 1), err.decode()
    assert out.decode().strip() == ("valid" if proc.returncode == 0 else "INVALID")
    return proc.returncode


def standard_ok(secret: str, headers: dict[str, str], body: bytes) -> bool:
    try:
        Webhook(secret).verify(body, headers)
    except WebhookVerificationError:
        return False
    return True


def raw_of(whsec: str) -> bytes:
    return base64.b64decode(whsec.removeprefix("whsec_"))


@pytest.mark.parametrize("lang", ["python", "node"])
async def test_snippet_verifies_a_real_webhook(
    runtime: Runtime, hook: HookServer, client: httpx.AsyncClient, lang: str
) -> None:
    channel = await create_channel(client, webhook_url=hook.url)  # the secret as the API shows
    secret = channel["webhook_secret"]
    assert secret.startswith("whsec_") and len(raw_of(secret)) == 32
    headers, body = await real_webhook(runtime, channel["channel_id"], hook)
    header = headers[SIGNATURE_HEADER.lower()]
    assert await snippet(lang, secret, body, header) == 0
    assert await snippet(lang, secret, body.replace(b'"quantity":1', b'"quantity":9'), header) == 1
    assert await snippet(lang, show_webhook_secret(os.urandom(32)), body, header) == 1
    stale = sign_webhook(secret, body, int(time.time()) - 301)  # outside the tolerance
    assert await snippet(lang, secret, body, stale) == 1
    assert await snippet(lang, secret, body, "v1=" + header.split("v1=")[1]) == 1  # no t=


async def test_core_and_standard_webhooks_verify_the_same_delivery(
    runtime: Runtime, hook: HookServer, client: httpx.AsyncClient
) -> None:
    channel = await create_channel(client, webhook_url=hook.url)
    secret = channel["webhook_secret"]
    headers, body = await real_webhook(runtime, channel["channel_id"], hook)
    # core.crypto takes the string as shown (it raised TypeError on it before).
    assert verify_webhook(secret, body, headers[SIGNATURE_HEADER.lower()])
    assert standard_ok(secret, headers, body)
    assert not standard_ok(secret, headers, body + b" ")
    assert not standard_ok(show_webhook_secret(os.urandom(32)), headers, body)
    # One delivery id, in both header sets; stable across retries (the outbox row).
    assert headers["webhook-id"] == headers["flashgate-delivery"]
    assert headers["flashgate-event"] == "order.delivered"
    assert headers["flashgate-signature"].startswith(f"t={headers['webhook-timestamp']},v1=")


async def test_channel_from_before_whsec_keeps_its_secret(
    runtime: Runtime, hook: HookServer
) -> None:
    """A channel created before migration 0006 was shown base64url: that string stays its
    Flashgate-Signature key; its Standard Webhooks secret is the same bytes as whsec_."""
    channel, whsec = await make_channel(runtime, webhook_url=hook.url)
    await runtime.pool.execute(
        "UPDATE channels SET webhook_secret_form = 'b64url' WHERE channel_id = $1", channel
    )
    legacy = show_webhook_secret(raw_of(whsec), "b64url")
    headers, body = await queued_webhook(runtime, channel, hook)
    header = headers[SIGNATURE_HEADER.lower()]
    assert await snippet("python", legacy, body, header) == 0
    assert not verify_webhook(whsec, body, header)
    assert standard_ok(whsec, headers, body)


async def test_rotation_signs_with_both_secrets_during_the_overlap(
    runtime: Runtime, hook: HookServer, client: httpx.AsyncClient
) -> None:
    channel = await create_channel(client, webhook_url=hook.url)
    channel_id, old = channel["channel_id"], channel["webhook_secret"]
    path = f"/v1/admin/channels/{channel_id}/webhook-secret/rotate"
    r = await client.post(path, headers=ADMIN)
    assert r.status_code == 200 and r.headers["cache-control"] == "no-store", r.text
    new = r.json()["webhook_secret"]
    until = datetime.fromisoformat(r.json()["previous_valid_until"])
    assert new.startswith("whsec_") and new != old
    assert timedelta(hours=23) < until - datetime.now(UTC) <= timedelta(hours=24)

    headers, body = await queued_webhook(runtime, channel_id, hook)
    header = headers[SIGNATURE_HEADER.lower()]
    assert header.count("v1=") == 2 and headers["webhook-signature"].count("v1,") == 2
    for secret in (old, new):
        assert await snippet("python", secret, body, header) == 0
        assert standard_ok(secret, headers, body)

    # A leaked secret: rotate again with no overlap; only the newest signs from now on.
    r = await client.post(path, headers=ADMIN, json={"overlap_s": 0})
    assert r.status_code == 200, r.text
    newest = r.json()["webhook_secret"]
    headers, body = await queued_webhook(runtime, channel_id, hook)
    header = headers[SIGNATURE_HEADER.lower()]
    assert header.count("v1=") == 1
    assert verify_webhook(newest, body, header) and standard_ok(newest, headers, body)
    for secret in (old, new):
        assert not verify_webhook(secret, body, header)
        assert not standard_ok(secret, headers, body)


async def test_rotation_refuses_bad_requests(client: httpx.AsyncClient) -> None:
    channel = await create_channel(client)
    path = f"/v1/admin/channels/{channel['channel_id']}/webhook-secret/rotate"
    cases = [
        (path, {}, None, 401, "unauthorized"),
        (path, ADMIN, {"overlap_s": -1}, 422, "invalid_request"),
        (path, ADMIN, {"overlap_s": 1, "extra": 1}, 422, "invalid_request"),
        (
            "/v1/admin/channels/ch_nosuchchannel/webhook-secret/rotate",
            ADMIN,
            None,
            404,
            "not_found",
        ),
        ("/v1/admin/channels/not-a-channel/webhook-secret/rotate", ADMIN, None, 404, "not_found"),
    ]
    for url, headers, body, status, code in cases:
        r = (
            await client.post(url, headers=headers, json=body)
            if body is not None
            else await client.post(url, headers=headers)
        )
        assert (r.status_code, r.json()["code"]) == (status, code), (url, body, r.text)


def test_docs_carry_the_tested_snippets_verbatim() -> None:
    doc = (EXAMPLES.parent / "WEBHOOKS.md").read_text()
    for fence, name in (("python", "verify_webhook.py"), ("js", "verify_webhook.mjs")):
        assert f"```{fence}\n{(EXAMPLES / name).read_text()}```" in doc, name


async def test_migration_keeps_existing_channels_on_their_shown_secret(
    service_urls: ServiceURLs,
) -> None:
    """Rows that exist when 0006 runs were shown base64url and stay 'b64url'; rows inserted
    afterwards without naming the form (bench, fixtures) are 'whsec'."""
    async with scratch_database(service_urls.database_url, "flashgate_wh_") as url:
        conn = await asyncpg.connect(url)
        try:
            for version, sql in migration_files():
                if version.startswith("0006_webhook_secrets"):
                    await conn.execute(
                        "INSERT INTO channels (channel_id, name, api_key_hash, webhook_secret,"
                        " webhook_dek_id) VALUES ('ch_old', 'old', '\\x01', '\\x02', 'dek_x')"
                    )
                await conn.execute(sql)
            await conn.execute(
                "INSERT INTO channels (channel_id, name, api_key_hash, webhook_secret,"
                " webhook_dek_id) VALUES ('ch_new', 'new', '\\x03', '\\x04', 'dek_x')"
            )
            forms = dict(
                await conn.fetch("SELECT channel_id, webhook_secret_form FROM channels ORDER BY 1")
            )
        finally:
            await conn.close()
    assert forms == {"ch_new": "whsec", "ch_old": "b64url"}
