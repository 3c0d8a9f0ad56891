"""Admission limits that nobody chose don't cap a sale, and a 429 says which limit answered
(issue #19 goal 5). Against the app with the scoring engine on real Redis, in both risk modes
(the inline purchase script and the split features call)."""

from __future__ import annotations

import httpx

from risk import config as risk_config
from tests.conftest import create_channel, create_sale
from tests.test_risk import buy, honest_ip, override, rc, risk_app, tag

__all__ = ["rc", "risk_app"]  # the fixtures, shared with tests/test_risk.py


def test_the_shipped_config_sets_no_admission_limit() -> None:
    """Was: 20,000/s per sale and 10,000/s per channel, which a big channel's flash sale
    reaches silently (429s from 4 gateway processes on 16 cores). Now off unless set."""
    adm = risk_config.load().admission
    assert (adm.sale_rate, adm.channel_rate) == (0, 0)  # 0 = unlimited


async def test_429_names_the_channel_limit(rc: httpx.AsyncClient) -> None:
    ch = await create_channel(rc)
    sale_id, _ = await create_sale(rc, keys=50)
    await override(
        rc,
        sale_id,
        {
            "admission": {
                "channel_rate": 1,
                "channel_burst": 2,
                "sale_rate": 1000,
                "sale_burst": 1000,
            }
        },
    )
    t = tag()
    answers = [await buy(rc, ch, sale_id, f"lc-{t}-{i}", ip=honest_ip(6000 + i)) for i in range(3)]
    assert [r.status_code for r in answers] == [201, 201, 429]
    body = answers[2].json()
    assert body["code"] == "rate_limited" and body["limit"] == "channel_rate"
    assert "admission.channel_rate" in body["detail"]
    assert answers[2].headers["Retry-After"] == "1"
    assert "limit" not in answers[0].json()


async def test_429_names_the_sale_limit(rc: httpx.AsyncClient) -> None:
    a, b = await create_channel(rc, "a"), await create_channel(rc, "b")
    sale_id, _ = await create_sale(rc, keys=50)
    await override(
        rc,
        sale_id,
        {"admission": {"sale_rate": 0.5, "sale_burst": 2, "channel_rate": 1, "channel_burst": 5}},
    )
    t = tag()
    first = [
        await buy(rc, ch, sale_id, f"ls-{t}-{i}", ip=honest_ip(6100 + i))
        for i, ch in enumerate((a, b))
    ]
    assert [r.status_code for r in first] == [201, 201]
    limited = await buy(rc, a, sale_id, f"ls-{t}-x", ip=honest_ip(6200))
    assert limited.status_code == 429, limited.text
    assert limited.json()["limit"] == "sale_rate"  # the channel still had room
    assert int(limited.headers["Retry-After"]) >= 1
