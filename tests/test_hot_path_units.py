"""The purchase path's hand-tuned helpers give exactly what the slow, obvious code gives."""

from __future__ import annotations

import ipaddress
import random
from datetime import UTC, datetime, timedelta

import pytest

from core.ids import _CROCKFORD, is_order_id, new_order_id, ulid
from gateway.routes.storefront import rfc3339_ms
from risk.engine import RiskContext
from risk.signals import Signals, subnet_of

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def _decode_ulid_ms(value: str) -> int:
    n = 0
    for ch in value:
        n = n * 32 + _CROCKFORD.index(ch)
    return n >> 80


def test_ulid_carries_its_millisecond_and_sorts_by_it() -> None:
    rng = random.Random(7)
    stamps = sorted(rng.randrange(0, 2**48) for _ in range(500))
    ids = [ulid(ms) for ms in stamps]
    assert all(len(i) == 26 and set(i) <= set(_CROCKFORD) for i in ids)
    assert [_decode_ulid_ms(i) for i in ids] == stamps
    assert sorted(ids) == ids
    assert len(set(ulid(1) for _ in range(1000))) == 1000  # 80 random bits each
    assert is_order_id(new_order_id("sale-1"))


@pytest.mark.parametrize(
    "ms", [0, 1, 999, 1000, 1_764_612_345_678, 1_764_612_346_000, 253_402_300_799_999]
)
def test_rfc3339_ms_matches_isoformat(ms: int) -> None:
    # Exact (a float of ms / 1000 rounds the last millisecond away near year 9999).
    expected = (EPOCH + timedelta(milliseconds=ms)).isoformat(timespec="milliseconds")
    assert rfc3339_ms(ms) == expected.replace("+00:00", "Z")


@pytest.mark.parametrize(
    "text",
    [
        "203.0.113.7",
        " 100.64.3.7 ",
        "0.0.0.0",
        "255.255.255.255",
        "256.1.1.1",
        "1.2.3",
        "1.2.3.4.5",
        "01.2.3.4",
        "1.2.3.04",
        "1..3.4",
        "١.٢.٣.٤",
        "+1.2.3.4",
        "1.2.3.4 ",
        "::ffff:203.0.113.9",
        "2001:db8::1",
        "not-an-ip",
        "",
        "1.2.3.4\n",
        "\t1.2.3.4",
        "fe80::1%eth0",
        "2001:db8::1 ",
    ],
)
def test_signals_of_any_address_text_as_ipaddress_reads_it(text: str) -> None:
    """The same reading as ipaddress, except that nothing around the address is trimmed and an
    IPv6 zone is refused: the gateway answers 422 for such a client_ip."""
    sig = Signals.of(
        RiskContext(
            sale_id="s",
            channel_id="c",
            user_id="u",
            device_id="d",
            client_ip=text,
            user_agent="ua",
            quantity=1,
            challenge_solution=None,
            idempotency_key="k",
        )
    )
    try:
        if text != text.strip() or "%" in text:
            raise ValueError(text)
        address = ipaddress.ip_address(text)
    except ValueError:
        assert (sig.address, sig.ip, sig.subnet) == (None, text, "invalid")
        return
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    assert sig.address == address
    assert sig.ip == str(address)
    assert sig.subnet == subnet_of(address)
