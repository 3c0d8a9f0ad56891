"""Property tests (hypothesis): the request models, and the Lua ledger's arguments on a real
Redis. Bounded in examples so the set runs in seconds on a shared 2-core machine."""

from __future__ import annotations

import contextlib
import uuid
from typing import Any

import httpx
import msgspec
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from starlette.applications import Starlette

from core import errors
from core.ledger import PurchaseRequest
from core.runtime import Runtime
from gateway import models
from tests.conftest import channel_headers, create_channel, create_sale, purchase_body
from tests.test_ledger import T0, open_sale

BOUNDED = settings(
    max_examples=60,
    deadline=2000,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)

# Strings of every kind the brief worries about: unicode, empty, huge, control characters.
nasty_text = st.one_of(
    st.text(max_size=20),
    st.text(st.characters(codec="utf-8"), max_size=200),
    st.text(st.characters(max_codepoint=0x1F), max_size=8),
    st.sampled_from(["", " ", "a\n", "\x00", "u\u202e1", "x" * 129, "x" * 5000, "{s:x}", "|"]),
)
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | nasty_text,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(nasty_text, inner, max_size=4),
    max_leaves=12,
)
purchase_like = st.fixed_dictionaries(
    {},
    optional={
        "user_id": nasty_text | json_values,
        "client_ip": nasty_text,
        "device_id": nasty_text,
        "quantity": st.integers(-5, 200) | json_values,
        "user_agent": nasty_text,
        "payment_ref": nasty_text | st.none(),
    },
)
BODIES = (
    models.PurchaseBody,
    models.ConfirmBody,
    models.ChannelBody,
    models.SaleBody,
    models.ListEntriesBody,
    models.KeysBody,
)


def _ascii_printable(s: str) -> bool:
    return bool(s) and all("\x21" <= c <= "\x7e" for c in s)


def check_bounds(body: Any) -> None:
    """What the models document, checked by hand on anything they accept."""
    if isinstance(body, models.PurchaseBody):
        assert _ascii_printable(body.user_id) and len(body.user_id) <= 128
        assert _ascii_printable(body.device_id) and len(body.device_id) <= 128
        assert 1 <= body.quantity <= 100 and type(body.quantity) is int
        assert 2 <= len(body.client_ip) <= 45
        assert body.payment_ref is None or _ascii_printable(body.payment_ref)
    if isinstance(body, models.ConfirmBody):
        assert _ascii_printable(body.payment_ref) and len(body.payment_ref) <= 128
    if isinstance(body, models.ChannelBody):
        assert 1 <= len(body.name) <= 200 and all(c >= " " and c != "\x7f" for c in body.name)


@BOUNDED
@given(doc=json_values | purchase_like, target=st.sampled_from(BODIES))
def test_models_accept_only_what_they_document_and_round_trip(doc: Any, target: type) -> None:
    raw = msgspec.json.encode(doc)
    try:
        body = msgspec.json.decode(raw, type=target)
    except msgspec.ValidationError:
        return  # -> 422 invalid_request (gateway/state.py)
    check_bounds(body)
    assert msgspec.json.decode(msgspec.json.encode(body), type=target) == body


@BOUNDED
@given(raw=st.binary(max_size=64) | json_values.map(msgspec.json.encode))
def test_any_bytes_decode_or_fail_as_a_client_error(raw: bytes) -> None:
    for target in BODIES:
        with contextlib.suppress(msgspec.ValidationError, msgspec.DecodeError):  # 422 / 400
            check_bounds(msgspec.json.decode(raw, type=target))


@settings(
    max_examples=40,
    deadline=5000,
    derandomize=True,
    database=None,
    suppress_health_check=list(HealthCheck),
)
@given(doc=purchase_like | json_values, idem=nasty_text)
async def test_purchase_endpoint_never_answers_500(app: Starlette, doc: Any, idem: str) -> None:
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        world = getattr(app.state, "props_world", None)
        if world is None:
            ch = await create_channel(client)
            sale_id, _ = await create_sale(client, keys=3, per_user_limit=100)
            world = app.state.props_world = (ch, sale_id)
        ch, sale_id = world
        headers = channel_headers(ch)
        if idem.isascii() and "\n" not in idem and "\r" not in idem and "\x00" not in idem:
            headers["Idempotency-Key"] = idem
        body = (
            {**purchase_body("p-" + uuid.uuid4().hex[:8]), **doc} if isinstance(doc, dict) else doc
        )
        r = await client.post(f"/v1/sales/{sale_id}/purchase", json=body, headers=headers)
    assert r.status_code < 500, r.text
    if r.status_code >= 400:
        problem = r.json()
        assert r.headers["content-type"] == "application/problem+json"
        assert problem["status"] == r.status_code and problem["code"], problem


# -- the Lua ledger, called with whatever a caller could pass -----------------------------------
async def ledger_state(runtime: Runtime, sale_id: str) -> tuple[Any, ...]:
    r, k = runtime.redis, runtime.keys
    return (
        await r.hgetall(k.sale(sale_id)),
        await r.hgetall(k.buyers(sale_id)),
        await r.hgetall(k.idempotency(sale_id)),
        await r.xlen(k.events(sale_id)),
        await r.zcard(k.deadlines(sale_id)),
    )


def balanced(sale: dict[str, str]) -> bool:
    n = {
        f: int(sale.get(f, 0)) for f in ("total", "available", "reserved", "confirmed", "delivered")
    }
    return (
        n["available"] + n["reserved"] + n["confirmed"] + n["delivered"] == n["total"]
        and min(n.values()) >= 0
    )


@settings(
    max_examples=60,
    deadline=3000,
    derandomize=True,
    database=None,
    suppress_health_check=list(HealthCheck),
)
@given(
    user=nasty_text,
    qty=st.integers(-3, 5) | st.sampled_from([0, 10**6, 2**40]),
    key=nasty_text,
    pay=nasty_text,
    repeat=st.booleans(),
)
async def test_ledger_holds_its_invariant_for_any_arguments(
    runtime: Runtime, user: str, qty: int, key: str, pay: str, repeat: bool
) -> None:
    sale_id = await open_sale(runtime.ledger, stock=3, limit=2)
    req = PurchaseRequest(
        sale_id=sale_id,
        channel_id="ch_props",
        idempotency_key=key,
        fingerprint="fp",
        user_id=user,
        quantity=qty,
        payment_ref=pay,
    )
    for _ in range(2 if repeat else 1):
        before = await ledger_state(runtime, sale_id)
        try:
            res = await runtime.ledger.reserve(req, now=T0 + 1)
        except errors.FlashgateError as exc:
            # A refusal is a domain error (a ReturnCode mapped in core/ledger.py), never a
            # Redis error, and it wrote nothing.
            assert 400 <= exc.status < 500, exc
            assert await ledger_state(runtime, sale_id) == before
        else:
            assert 1 <= qty <= 2 and res.status in ("reserved", "confirmed")
        assert balanced((await ledger_state(runtime, sale_id))[0])
