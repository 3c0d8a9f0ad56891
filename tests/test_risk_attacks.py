"""Red-team replays against the purchase path's risk and idempotency logic (issue #11 items 1,
2 and 6, "also seen" a and b; issue #10 item 2): each test performs the attack against the
in-process gateway with real Redis and PostgreSQL, in both risk modes (scored inside the
reservation script, and the split features call), and failed before its fix."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import httpx
import pytest

from core.ledger import _span, from_ms
from risk import config as risk_config
from risk.solver import solve
from tests.conftest import ADMIN, channel_headers, create_channel, create_sale
from tests.test_risk import EASY_POW, buy, honest_ip, override, tag

DC = "198.51.100.41"  # in the shipped datacenter sample: scored 40, challenged


@pytest.fixture(scope="module", params=["inline", "split"])
async def risk_app(request, settings, runtime):  # type: ignore[no-untyped-def]
    from gateway.app import create_app

    application = create_app(
        replace(settings, risk_inline=request.param == "inline", risk_timeout_ms=2000)
    )
    async with application.router.lifespan_context(application):
        yield application


@pytest.fixture
async def rc(risk_app) -> AsyncIterator[httpx.AsyncClient]:  # type: ignore[no-untyped-def]
    transport = httpx.ASGITransport(app=risk_app)
    async with httpx.AsyncClient(transport=transport, base_url="http://flashgate.test") as c:
        yield c


# -- item 1: a stored verdict is honoured only for the request it was given to --------------
async def test_challenged_key_reused_with_another_body_is_idempotency_mismatch(
    rc: httpx.AsyncClient,
) -> None:
    """Key K is challenged for user A; a challenge is solved for user B under another key; K
    retried with B's body and B's solution answered 201. Now 422 idempotency_mismatch, and K
    still works for A's own body and solution."""
    ch = await create_channel(rc)
    sale_id, _ = await create_sale(rc, keys=5)
    await override(rc, sale_id, EASY_POW)
    t = tag()
    a, b, k = f"a-{t}", f"b-{t}", f"K-{t}"
    first = await buy(rc, ch, sale_id, a, ip=DC, key=k)
    assert first.status_code == 428, first.text
    other = await buy(rc, ch, sale_id, b, ip=DC, key=f"K2-{t}")
    assert other.status_code == 428, other.text
    b_solution = solve(other.json()["challenge"])

    hijack = await buy(rc, ch, sale_id, b, ip=DC, key=k, solution=b_solution)
    assert hijack.status_code == 422, hijack.text
    assert hijack.json()["code"] == "idempotency_mismatch"
    # Without a solution, or with A's device changed: the same answer, nothing reserved.
    assert (await buy(rc, ch, sale_id, a, device="elsewhere", ip=DC, key=k)).status_code == 422
    stock = (await rc.get(f"/v1/admin/sales/{sale_id}", headers=ADMIN)).json()["stock"]
    assert stock["reserved"] == 0

    # The key still belongs to A's request: solved, it goes through, and B's solution is unspent.
    ok = await buy(rc, ch, sale_id, a, ip=DC, key=k, solution=solve(first.json()["challenge"]))
    assert ok.status_code == 201, ok.text
    ok = await buy(rc, ch, sale_id, b, ip=DC, key=f"K2-{t}", solution=b_solution)
    assert ok.status_code == 201, ok.text


# -- item 2: challenges can't be banked before the opening, solved retries are admitted ------
async def test_no_challenge_is_issued_before_the_opening(rc: httpx.AsyncClient) -> None:
    """Before the opening a farm collected 428 challenges under many keys, to solve them at
    leisure and retry at the opening. Now a sale that is not open answers 409 (when it opens,
    Retry-After) before risk runs: nothing is admitted, counted or challenged."""
    ch = await create_channel(rc)
    sale_id, _ = await create_sale(rc, keys=10, starts_in_s=1.5)
    opens_at = time.time() + 1.5
    await override(rc, sale_id, {**EASY_POW, "admission": {"sale_rate": 0.5, "sale_burst": 1}})
    t = tag()
    early = await asyncio.gather(
        *[buy(rc, ch, sale_id, f"farm-{t}-{i}", ip=DC, key=f"farm-{t}-{i}") for i in range(5)]
    )
    for r in early:
        assert r.status_code == 409, r.text
        problem = r.json()
        assert problem["code"] == "sale_not_active" and "challenge" not in problem
        assert f"sale {sale_id} opens at " in problem["detail"]
        assert 1 <= int(r.headers["Retry-After"]) <= 2
    await asyncio.sleep(max(0.0, opens_at - time.time()) + 0.1)
    # The farm's keys hold nothing: retried now, the first one is admitted and challenged.
    bot = await buy(rc, ch, sale_id, f"farm-{t}-0", ip=DC, key=f"farm-{t}-0")
    assert bot.status_code == 428, bot.text
    assert (await buy(rc, ch, sale_id, f"farm-{t}-1", ip=DC, key=f"farm-{t}-1")).status_code == 429


async def test_solved_retry_passes_admission(rc: httpx.AsyncClient) -> None:
    """A challenged key retried with its solution used to skip admission: under a burst-1 sale
    limit it got 201 while the honest first try before it got 429."""
    ch = await create_channel(rc)
    sale_id, _ = await create_sale(rc, keys=10)
    await override(rc, sale_id, {**EASY_POW, "admission": {"sale_rate": 0.5, "sale_burst": 1}})
    t = tag()
    bot = await buy(rc, ch, sale_id, f"bot-{t}", ip=DC, key=f"bot-{t}")
    assert bot.status_code == 428, bot.text
    # That used the sale's burst of 1: the next first try waits, as does the solved retry.
    honest = await buy(rc, ch, sale_id, f"h-{t}", ip=honest_ip(7000))
    assert honest.status_code == 429 and honest.headers["Retry-After"] == "2"
    solved = await buy(
        rc, ch, sale_id, f"bot-{t}", ip=DC, key=f"bot-{t}", solution=solve(bot.json()["challenge"])
    )
    assert solved.status_code == 429, solved.text
    assert int(solved.headers["Retry-After"]) <= 2


# -- item 6: admin overrides are bounded, the limiter follows the current config -------------
async def test_override_out_of_range_is_422_naming_the_field(rc: httpx.AsyncClient) -> None:
    ch = await create_channel(rc)
    sale_id, _ = await create_sale(rc, keys=5)
    url = f"/v1/admin/sales/{sale_id}/risk"
    cases = {
        "admission.sale_rate": {"admission": {"sale_rate": 1e-300}},
        "admission.channel_rate": {"admission": {"channel_rate": 1e-12}},
        "admission.sale_burst": {"admission": {"sale_burst": 10**7}},
        "admission.channel_burst": {"admission": {"channel_burst": 0}},
        "rules.user_burst.limit": {"rules": {"user_burst": {"limit": 10**30}}},
        "rules.ip_rate.weight": {"rules": {"ip_rate": {"weight": -1}}},
        "thresholds.deny": {"thresholds": {"deny": 10**6}},
        "challenge.ttl_s": {"challenge": {"ttl_s": 10**9}},
    }
    for path, doc in cases.items():
        r = await rc.put(url, json=doc, headers=ADMIN)
        assert r.status_code == 422, (doc, r.text)
        assert r.json()["code"] == "invalid_request" and f"`$.{path}`" in r.json()["detail"]
    assert (await rc.get(url, headers=ADMIN)).json()["override"] == {}
    r = await buy(rc, ch, sale_id, f"u-{tag()}", ip=honest_ip(7100))
    assert r.status_code == 201, r.text


async def test_limiter_state_follows_a_config_change(rc: httpx.AsyncClient, runtime) -> None:  # type: ignore[no-untyped-def]
    """A GCRA state left by a slower config (here the PTTL-10^15 key the 1e-12 override left
    behind, and a legitimately slow override) stops applying once the config changes."""
    ch = await create_channel(rc)
    sale_id, _ = await create_sale(rc, keys=20)
    t = tag()
    # The shipped config sets no admission limit (issue #19): a fast one set here instead.
    fast = {"admission": {"sale_rate": 20000, "sale_burst": 20000}}
    await override(rc, sale_id, fast)
    # The state the reported attack left: a TAT ~10^18 us ahead, kept for ~10^15 ms.
    key = runtime.keys.risk_admission(sale_id)
    await runtime.redis.set(key, str(int(time.time() * 1e6) + 10**18), px=10**15)
    r = await buy(rc, ch, sale_id, f"s-{t}-0", ip=honest_ip(7200))
    assert r.status_code == 201, (r.status_code, r.headers.get("Retry-After"), r.text)
    assert await runtime.redis.pttl(key) <= 2000  # a full bucket of the fast config, 1 s

    # A slow override filled legitimately (1 per 100 s, burst 3), then reverted.
    await override(rc, sale_id, {"admission": {"sale_rate": 0.01, "sale_burst": 3}})
    codes = [
        (await buy(rc, ch, sale_id, f"s-{t}-{i}", ip=honest_ip(7210 + i))).status_code
        for i in range(1, 5)
    ]
    assert codes[-1] == 429, codes
    await override(rc, sale_id, fast)
    r = await buy(rc, ch, sale_id, f"s-{t}-5", ip=honest_ip(7220))
    assert r.status_code == 201, (r.status_code, r.headers.get("Retry-After"))
    # Tightened: a Retry-After never exceeds the current config's interval (1 s).
    await override(rc, sale_id, {"admission": {"sale_rate": 1, "sale_burst": 1}})
    answers = [
        await buy(rc, ch, sale_id, f"s-{t}-{6 + i}", ip=honest_ip(7230 + i)) for i in range(3)
    ]
    limited = [r for r in answers if r.status_code == 429]
    assert limited and all(r.headers["Retry-After"] == "1" for r in limited)


def test_config_file_out_of_range_fails_at_start(tmp_path: Path) -> None:
    doc = Path(risk_config.__file__).with_name("rules.json").read_text()
    bad = tmp_path / "rules.json"
    bad.write_text(doc.replace('"sale_rate": 0', '"sale_rate": 1e-300'))
    with pytest.raises(
        risk_config.ConfigInvalid, match=r"rules\.json: .*`\$\.admission\.sale_rate`"
    ):
        risk_config.load(bad)
    bad.write_text(doc.replace('"limit": 5}', '"limit": 100000000000}', 1))
    with pytest.raises(risk_config.ConfigInvalid, match=r"`\$\.rules\.user_burst\.limit`"):
        risk_config.load(bad)


async def test_gateway_refuses_to_start_with_an_out_of_range_config_file(
    settings, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    from gateway.app import create_app

    doc = Path(risk_config.__file__).with_name("rules.json").read_text()
    bad = tmp_path / "rules.json"
    bad.write_text(doc.replace('"channel_rate": 0', '"channel_rate": 1e-12'))
    application = create_app(replace(settings, risk_config_file=str(bad)))
    with pytest.raises(risk_config.ConfigInvalid, match=r"`\$\.admission\.channel_rate`"):
        async with application.router.lifespan_context(application):
            pass


# -- also seen a: user ids are namespaced per channel ---------------------------------------
async def test_user_ids_are_per_channel_and_devices_global(rc: httpx.AsyncClient) -> None:
    """Channel B's "u-1" used up channel A's "u-1"'s per-user limit. Each storefront has its own
    user id space now; a device shared by "one" user id over many channels is many users."""
    a, b = await create_channel(rc, "a"), await create_channel(rc, "b")
    sale_id, _ = await create_sale(rc, keys=20, per_user_limit=1)
    t = tag()
    user = f"u-{t}"
    assert (await buy(rc, a, sale_id, user, ip=honest_ip(7300))).status_code == 201
    r = await buy(rc, b, sale_id, user, ip=honest_ip(7301))
    assert r.status_code == 201, r.text
    again = await buy(rc, a, sale_id, user, ip=honest_ip(7302))
    assert again.status_code == 409 and again.json()["code"] == "purchase_limit_exceeded"
    # A cancel gives the unit back to that channel's user only.
    order = r.json()["order_id"]
    assert (
        await rc.post(f"/v1/orders/{order}/cancel", headers=channel_headers(b))
    ).status_code == 200
    r = await buy(rc, b, sale_id, user, ip=honest_ip(7303))
    assert r.status_code == 201
    assert (await buy(rc, a, sale_id, user, ip=honest_ip(7304))).status_code == 409
    # So does a refund of a confirmed order (refund_finish.lua).
    order = r.json()["order_id"]
    confirm = await rc.post(
        f"/v1/orders/{order}/confirm", json={"payment_ref": "p-1"}, headers=channel_headers(b)
    )
    assert confirm.status_code == 202, confirm.text
    refund = await rc.post(f"/v1/orders/{order}/refund", headers=channel_headers(b))
    assert refund.status_code == 200 and refund.json()["status"] == "refunded", refund.text
    assert (await buy(rc, b, sale_id, user, ip=honest_ip(7305))).status_code == 201
    assert (await buy(rc, a, sale_id, user, ip=honest_ip(7306))).status_code == 409

    # One device, one user id, five storefronts: five users on the device (limit 3).
    shops = [await create_channel(rc, f"farm{i}") for i in range(5)]
    farm = [
        await buy(rc, shop, sale_id, f"f-{t}", device=f"farmdev-{t}", ip=honest_ip(7310 + i))
        for i, shop in enumerate(shops)
    ]
    assert [r.status_code for r in farm] == [201, 201, 201, 428, 428]
    assert "device_many_users" in farm[3].json()["reasons"]


# -- also seen b: a malformed client_ip is the client's mistake ------------------------------
async def test_malformed_client_ip_is_422_and_never_scored(rc: httpx.AsyncClient, runtime) -> None:  # type: ignore[no-untyped-def]
    ch = await create_channel(rc)
    sale_id, _ = await create_sale(rc, keys=5)
    for ip in (
        "not-an-ip",
        "1.2.3.4\n",
        " 1.2.3.4",
        "1.2.3.4\x00",
        "01.2.3.4",
        "fe80::1%eth0",
        "1.2.3.4/24",
        "::ffff:1.2.3.4 ",
    ):
        r = await buy(rc, ch, sale_id, f"ip-{tag()}", ip=ip)
        assert r.status_code == 422, (ip, r.status_code, r.text)
        assert r.json()["code"] == "invalid_request" and "$.client_ip" in r.json()["detail"]
    keys = [
        k
        async for k in runtime.redis.scan_iter(
            match=runtime.keys.sale_pattern(sale_id).replace(":*", ":risk:*")
        )
    ]
    assert keys == [], keys  # neither admitted nor counted
    for ip in ("203.0.113.9", "2001:db8::7", "::ffff:203.0.113.10"):
        assert (await buy(rc, ch, sale_id, f"ip-{tag()}", ip=ip)).status_code == 201


# -- issue #10 item 2: sale_not_active says when -----------------------------------------------
async def test_sale_not_active_says_when_it_opens_or_ended(rc: httpx.AsyncClient) -> None:
    ch = await create_channel(rc)
    later, _ = await create_sale(rc, keys=1, starts_in_s=3 * 3600 + 125)
    r = await buy(rc, ch, later, f"w-{tag()}", ip=honest_ip(7400))
    assert r.status_code == 409
    p = r.json()
    assert p["code"] == "sale_not_active"
    assert p["detail"].startswith(f"sale {later} opens at {p['starts_at']} (in 3 h 2 min")
    assert p["starts_at"].endswith("Z") and p["ends_at"] > p["starts_at"]
    assert 3 * 3600 + 100 <= int(r.headers["Retry-After"]) <= 3 * 3600 + 126

    ended, _ = await create_sale(rc, keys=1, starts_in_s=-7200, lasts_s=3600 - 90)
    r = await buy(rc, ch, ended, f"w-{tag()}", ip=honest_ip(7401))
    p = r.json()
    assert r.status_code == 409 and "Retry-After" not in r.headers
    assert p["detail"] == f"sale {ended} ended at {p['ends_at']} (1 h 1 min ago)"


async def test_sale_not_active_says_when_without_risk(client: httpx.AsyncClient) -> None:
    """The same answer from reserve.lua (risk switched off)."""
    ch = await create_channel(client)
    later, _ = await create_sale(client, starts_in_s=90)
    r = await client.post(
        f"/v1/sales/{later}/purchase",
        headers=channel_headers(ch, tag()),
        json={"user_id": "u", "client_ip": "203.0.113.1", "device_id": "d"},
    )
    assert r.status_code == 409 and "opens at" in r.json()["detail"]
    assert r.json()["starts_at"] and 80 <= int(r.headers["Retry-After"]) <= 90


def test_span_reads_like_a_person_wrote_it() -> None:
    assert [
        _span(ms) for ms in (0, 400, 45_000, 61_000, 3_600_000, 10_920_000 + 5_000, 90_061_000)
    ] == ["0 s", "1 s", "45 s", "1 min 1 s", "1 h", "3 h 2 min", "1 d 1 h"]
    assert from_ms(0).year == 1970
