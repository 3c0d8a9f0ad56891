"""The HTTP edge over a real uvicorn socket (tests/live_gateway.py): protocol errors answered
once and logged in one short JSON line (#11.3), a 413 that every client reads (#11.4), the
media-type rule (#10.1), `Cache-Control: no-store` (#10.5), one JSON log format (#10.13) and
duplicate JSON keys refused."""

from __future__ import annotations

import asyncio
import json
import secrets
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import httpx
import pytest

from core.runtime import Runtime
from tests.conftest import (
    ADMIN,
    channel_headers,
    create_channel,
    create_sale,
    purchase_body,
    rfc3339,
)
from tests.live_gateway import LiveGateway, live_gateway  # noqa: F401
from tests.test_limits import live_state

CHUNKED_GARBAGE = (
    b"POST /v1/sales/x/purchase HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nZZ\r\n\r\n"
)


async def read_all(port: int, data: bytes, read_timeout: float = 10) -> bytes:
    """Send `data`, then read everything until the server closes (it must, and in time)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        return await asyncio.wait_for(reader.read(), read_timeout)
    finally:
        writer.close()


async def open_sale(gw: LiveGateway, keys: int = 0) -> str:
    sale_id = "t-edge-" + secrets.token_hex(6)
    now = datetime.now(UTC)
    async with httpx.AsyncClient(base_url=gw.url) as c:
        r = await c.post(
            "/v1/admin/sales",
            headers=gw.admin,
            json={
                "sale_id": sale_id,
                "sku": "SKU-E",
                "name": "Edge sale",
                "starts_at": rfc3339(now - timedelta(seconds=1)),
                "ends_at": rfc3339(now + timedelta(hours=1)),
                "per_user_limit": 1,
            },
        )
        assert r.status_code == 201, r.text
        if keys:
            r = await c.post(
                f"/v1/admin/sales/{sale_id}/keys",
                headers=gw.admin,
                json={"keys": [f"{sale_id}-{i}-{secrets.token_hex(4)}" for i in range(keys)]},
            )
            assert r.status_code == 200, r.text
    return sale_id


def log_size(gw: LiveGateway) -> int:
    assert gw.child.log is not None
    return gw.child.log.stat().st_size


def log_since(gw: LiveGateway, offset: int) -> list[str]:
    assert gw.child.log is not None
    with gw.child.log.open("rb") as f:
        f.seek(offset)
        return f.read().decode(errors="replace").splitlines()


async def test_protocol_errors_are_answered_once_and_logged_in_one_line(
    live_gateway: LiveGateway,
) -> None:  # noqa: F811
    """#11.3: a broken chunked body used to log an error with two tracebacks (6-9 KB) per
    request ("Cannot call write() after write_eof()"): an unauthenticated log flood."""
    gw = live_gateway
    sale_id = await open_sale(gw)
    authed = CHUNKED_GARBAGE.replace(b"/v1/sales/x/", f"/v1/sales/{sale_id}/".encode()).replace(
        b"Host: x\r\n",
        b"Host: x\r\nAuthorization: "
        + gw.channel["Authorization"].encode()
        + b"\r\nIdempotency-Key: zz-1\r\n",
    )
    n = 30
    before = log_size(gw)
    answers = [await read_all(gw.port, CHUNKED_GARBAGE if i % 2 else authed) for i in range(n)]
    await asyncio.sleep(0.5)  # the app's tasks for those requests finish (and would log)
    for answer in answers:
        assert answer.count(b"HTTP/1.1 ") == 1, answer[:400]
        assert answer.startswith(b"HTTP/1.1 400 "), answer[:400]
        assert b'"code":"malformed_request"' in answer
    lines = log_since(gw, before)
    grown = log_size(gw) - before
    assert len(lines) <= n and grown <= n * 300, (grown, lines[:6])
    for line in lines:
        doc = json.loads(line)
        assert doc["level"] == "info" and "exc" not in doc, line
    assert "Traceback" not in "\n".join(lines)

    # An Upgrade we don't serve (h2c) is served as HTTP/1.1, without uvicorn's two warnings.
    before = log_size(gw)
    for _ in range(5):
        answer = await read_all(
            gw.port,
            b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: "
            b"Upgrade, close\r\nUpgrade: h2c\r\n\r\n",
        )
        assert answer.startswith(b"HTTP/1.1 200 "), answer[:200]
    await asyncio.sleep(0.2)
    assert log_since(gw, before) == []


@pytest.mark.parametrize("size", [1 << 20, 2 << 20])
async def test_413_reaches_an_httpx_client(live_gateway: LiveGateway, size: int) -> None:  # noqa: F811
    """#11.4: with a valid key, a 1-2 MiB body got ECONNRESET instead of its 413: the server
    closed the socket with the unread body in its buffer (a RST). It lingers now."""
    gw = live_gateway
    sale_id = await open_sale(gw)
    body = json.dumps({**purchase_body("u-big"), "user_agent": "a" * size}).encode()
    async with httpx.AsyncClient(base_url=gw.url, timeout=10) as c:
        for headers in (
            {**gw.channel, "Idempotency-Key": "big-" + secrets.token_hex(4)},
            {"Authorization": "Bearer fgk_nope", "Idempotency-Key": "big"},
        ):
            r = await c.post(
                f"/v1/sales/{sale_id}/purchase",
                content=body,
                headers={**headers, "Content-Type": "application/json"},
            )
            assert r.status_code == 413, r.text
            assert r.json()["code"] == "payload_too_large"

        async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: counted as it streams
            for i in range(0, len(body), 64 * 1024):
                yield body[i : i + 64 * 1024]

        r = await c.post(
            f"/v1/sales/{sale_id}/purchase",
            content=chunks(),
            headers={
                **gw.channel,
                "Idempotency-Key": "big-chunked",
                "Content-Type": "application/json",
            },
        )
        assert r.status_code == 413 and r.json()["code"] == "payload_too_large", r.text
        assert r.headers["connection"] == "close"  # not kept reading an endless stream
        assert (await c.get("/healthz")).status_code == 200


async def test_media_types_over_the_socket(live_gateway: LiveGateway) -> None:  # noqa: F811
    """#10.1: no Content-Type (curl -d without -H) reads as JSON; application/json with any
    parameters and `+json` types too; any other type is 415 saying what to send."""
    gw = live_gateway
    sale_id = await open_sale(gw, keys=4)
    path = f"/v1/sales/{sale_id}/purchase"
    cases: list[tuple[str | None, int]] = [
        (None, 201),
        ("application/json; charset=utf-8", 201),
        ("Application/JSON", 201),
        ("application/vnd.flashgate+json", 201),
        ("application/x-www-form-urlencoded", 415),
        ("text/plain", 415),
        ("multipart/form-data; boundary=x", 415),
        ("application/jsonx", 415),
        ("json", 415),
    ]
    async with httpx.AsyncClient(base_url=gw.url) as c:
        for i, (content_type, status) in enumerate(cases):
            headers = {**gw.channel, "Idempotency-Key": f"mt-{i}"}
            if content_type is not None:
                headers["Content-Type"] = content_type
            body = json.dumps(purchase_body(f"u-mt-{i}")).encode()
            r = await c.post(path, content=body, headers=headers)
            assert r.status_code == status, (content_type, r.text)
            if status == 415:
                problem = r.json()
                assert problem["code"] == "unsupported_media_type"
                assert "application/json" in problem["detail"], problem
        # An admin body without a Content-Type (curl -d '{...}' -H "$ADMIN") is JSON too.
        r = await c.post("/v1/admin/channels", content=b'{"name": "no-type"}', headers=gw.admin)
        assert r.status_code == 201, r.text


async def test_v1_responses_are_not_stored(live_gateway: LiveGateway) -> None:  # noqa: F811
    """#10.5: answers that carry secrets (channel creation: api_key and webhook_secret; order
    reads: card keys) and every other /v1 answer, errors included, say `no-store`."""
    gw = live_gateway
    sale_id = await open_sale(gw, keys=1)
    async with httpx.AsyncClient(base_url=gw.url) as c:
        r = await c.post("/v1/admin/channels", json={"name": "ns"}, headers=gw.admin)
        assert r.status_code == 201 and "api_key" in r.json()
        answers = [r]
        r = await c.post(
            f"/v1/sales/{sale_id}/purchase",
            json=purchase_body("u-ns"),
            headers={**gw.channel, "Idempotency-Key": "ns-1"},
        )
        assert r.status_code == 201, r.text
        answers += [
            r,
            await c.get(f"/v1/orders/{r.json()['order_id']}", headers=gw.channel),
            await c.get(f"/v1/admin/sales/{sale_id}", headers=gw.admin),
            await c.get("/v1/orders/x", headers=gw.channel),
            await c.post("/v1/admin/channels", content=b"x" * 70_000, headers=gw.admin),
        ]
        for r in answers:
            assert r.headers.get("cache-control") == "no-store", (r.request.url, r.headers)
        assert "cache-control" not in (await c.get("/healthz")).headers


async def test_duplicate_json_keys_are_refused(live_gateway: LiveGateway) -> None:  # noqa: F811
    """`{"user_id":"a","user_id":"b"}` used to buy as "b": msgspec keeps the last value."""
    gw = live_gateway
    sale_id = await open_sale(gw, keys=2)
    before = await live_state(gw)
    good = b'"client_ip":"203.0.113.7","device_id":"d-1"'
    cases: list[tuple[str, str, bytes, str]] = [
        (
            "POST",
            f"/v1/sales/{sale_id}/purchase",
            b'{"user_id":"a","user_id":"b",' + good + b"}",
            "user_id",
        ),
        (
            "POST",
            f"/v1/sales/{sale_id}/purchase",  # the same key, written with an escape
            b'{"user_id":"a","user\\u005fid":"b",' + good + b"}",
            "user_id",
        ),
        (
            "POST",
            f"/v1/sales/{sale_id}/purchase",
            b'{"user_id":"a",' + good + b',"quantity":1,"quantity":2}',
            "quantity",
        ),
        ("POST", "/v1/admin/channels", b'{"name":"a","name":"b"}', "name"),
        ("PUT", f"/v1/admin/sales/{sale_id}/risk", b'{"rules":{"x":1,"x":2}}', "x"),
    ]
    async with httpx.AsyncClient(base_url=gw.url) as c:
        for method, path, body, key in cases:
            auth = gw.admin if "/admin/" in path else gw.channel
            r = await c.request(
                method,
                path,
                content=body,
                headers={
                    **auth,
                    "Idempotency-Key": "dup-" + secrets.token_hex(4),
                    "Content-Type": "application/json",
                },
            )
            assert r.status_code == 422, (body, r.text)
            problem = r.json()
            assert problem["code"] == "invalid_request" and f'"{key}"' in problem["detail"], problem
    assert await live_state(gw) == before


async def test_every_log_line_is_json(live_gateway: LiveGateway) -> None:  # noqa: F811
    """#10.13: uvicorn's own lines (start-up, protocol errors, its error logger) go through
    core/logging.py's formatter like ours: one JSON object a line, nothing else."""
    gw = live_gateway
    await read_all(gw.port, CHUNKED_GARBAGE)
    await read_all(gw.port, b"GET /healthz HTTP/1.1\r\nHost t\r\n\r\n")
    async with httpx.AsyncClient(base_url=gw.url) as c:
        await c.get("/healthz")
        await c.get("/v1/nowhere")
    await asyncio.sleep(0.3)
    lines = log_since(gw, 0)
    assert any("Uvicorn running" in line or "Started server" in line for line in lines)
    for line in lines:
        doc = json.loads(line)
        assert {"ts", "level", "logger", "msg"} <= set(doc), line
        assert "color_message" not in doc, line


async def test_order_read_with_card_keys_is_not_stored(
    client: httpx.AsyncClient, runtime: Runtime
) -> None:
    """#10.5, the answer that matters most: a delivered order's read, with its card keys."""
    from workers.runner import Worker

    ch = await create_channel(client)
    sale_id, _ = await create_sale(client, keys=1)
    r = await client.post(
        f"/v1/sales/{sale_id}/purchase",
        json=purchase_body("u-keys", payment_ref="pay-1"),
        headers=channel_headers(ch, "ns-keys"),
    )
    assert r.status_code == 201, r.text
    await Worker(runtime, sale_ids=[sale_id]).run_burst()
    r = await client.get(f"/v1/orders/{r.json()['order_id']}", headers=channel_headers(ch))
    assert r.json()["card_keys"] and r.headers["cache-control"] == "no-store"
    assert r.headers.get_list("cache-control") == ["no-store"]
    r = await client.post("/v1/admin/channels", json={"name": "ns2"}, headers=ADMIN)
    assert r.status_code == 201 and r.headers.get_list("cache-control") == ["no-store"]


def test_uvicorn_access_log_when_on_is_json_too() -> None:
    """configure() after uvicorn's own log config: uvicorn's loggers lose their plain handlers
    and propagate to the JSON one; its access log stays off when it was off."""
    import io
    import logging
    import logging.config

    from uvicorn.config import LOGGING_CONFIG

    from core import logging as fglog

    names = ("", "uvicorn", "uvicorn.error", "uvicorn.access")
    saved = [(lg, lg.handlers[:], lg.propagate, lg.level) for lg in map(logging.getLogger, names)]
    try:
        for access_on in (True, False):
            logging.config.dictConfig(LOGGING_CONFIG)
            access = logging.getLogger("uvicorn.access")
            if not access_on:  # what uvicorn does for --no-access-log
                access.handlers, access.propagate = [], False
            fglog.configure()
            out = io.StringIO()
            logging.getLogger().handlers[0].setStream(out)  # type: ignore[attr-defined]
            logging.getLogger("uvicorn.error").info(
                "Started server process [%d]", 1, extra={"color_message": "\x1b[1m"}
            )
            access.info('%s - "%s %s HTTP/%s" %d', "127.0.0.1:1", "GET", "/healthz", "1.1", 200)
            lines = out.getvalue().splitlines()
            assert len(lines) == (2 if access_on else 1), lines
            docs = [json.loads(line) for line in lines]
            assert docs[0]["msg"] == "Started server process [1]" and "color_message" not in docs[0]
            assert access.hasHandlers() is access_on  # what uvicorn reads to log access or not
        fglog.configure(level="WARNING")  # FLASHGATE_LOG_LEVEL holds for uvicorn's lines too
        out = io.StringIO()
        logging.getLogger().handlers[0].setStream(out)  # type: ignore[attr-defined]
        logging.getLogger("uvicorn.error").info("Uvicorn running on ...")
        assert out.getvalue() == ""
    finally:
        for lg, handlers, propagate, level in saved:
            lg.handlers[:], lg.propagate = handlers, propagate
            lg.setLevel(level)
