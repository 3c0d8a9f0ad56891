"""Signals: what one purchase request says about who is buying, normalised for the rules.

Everything comes from the request itself (no lookups): the ip in canonical form and its
subnet, an IPv4 /24 or an IPv6 /64, the unit a scalper rents or a household shares.
"""

from __future__ import annotations

import ipaddress

import msgspec

from risk.engine import IPAddress, RiskContext

__all__ = ["IPAddress", "Signals", "parse_ip", "subnet_of"]


def _ipv4(text: str) -> ipaddress.IPv4Address | None:
    """A dotted-quad in canonical form (no leading zeros), or None for anything else; ~3x
    cheaper than ipaddress.ip_address on the purchase path, which then handles the rest."""
    parts = text.split(".")
    if len(parts) != 4:
        return None
    value = 0
    for part in parts:
        if (
            not (part.isascii() and part.isdigit())
            or len(part) > 3
            or (len(part) > 1 and part[0] == "0")
        ):
            return None
        octet = int(part)
        if octet > 255:
            return None
        value = value << 8 | octet
    return ipaddress.IPv4Address(value)


def parse_ip(text: str) -> IPAddress | None:
    """An IPv4 or IPv6 address written exactly (no spaces or control characters around it, no
    IPv6 zone `%eth0`, no leading zeros in IPv4), IPv4-mapped IPv6 as its IPv4; None otherwise.
    The gateway answers 422 for None (gateway/routes/storefront.py)."""
    v4 = _ipv4(text)
    if v4 is not None:
        return v4
    if "%" in text or not text.isascii() or not text.isprintable() or text != text.strip():
        return None
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def subnet_of(ip: IPAddress) -> str:
    """The /24 (IPv4) or /64 (IPv6) around an address, as CIDR text."""
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if ip.version == 4:  # on the hot path: text surgery, not an ip_network object
        return str(ip).rpartition(".")[0] + ".0/24"
    return f"{ipaddress.IPv6Address(int(ip) >> 64 << 64)}/64"


class Signals(msgspec.Struct, frozen=True):
    sale_id: str
    channel_id: str
    user_id: str
    device_id: str
    ip: str  # canonical text, or the raw value if it is not an address
    subnet: str  # CIDR text; "invalid" when the ip is not an address
    address: IPAddress | None
    user_agent: str | None

    @property
    def buyer(self) -> str:
        """The user as the ledger and the user counters know it: each storefront has a user id
        space of its own, so a user id is namespaced by its channel (the ledger's buyers hash
        field, lua/includes/reserve_order.lua). Device, ip and subnet signals stay global."""
        return f"{self.channel_id}:{self.user_id}"

    @classmethod
    def of(cls, ctx: RiskContext) -> Signals:
        text = ctx.client_ip  # never trimmed: the gateway refuses what isn't an address
        v4 = ctx.address if ctx.address is not None and ":" not in text else _ipv4(text)
        if v4 is not None:  # canonical already (_ipv4 takes nothing else): its own str()
            return cls(
                sale_id=ctx.sale_id,
                channel_id=ctx.channel_id,
                user_id=ctx.user_id,
                device_id=ctx.device_id,
                ip=text,
                subnet=text.rpartition(".")[0] + ".0/24",
                address=v4,
                user_agent=ctx.user_agent or None,
            )
        address = ctx.address if ctx.address is not None else parse_ip(text)
        return cls(
            sale_id=ctx.sale_id,
            channel_id=ctx.channel_id,
            user_id=ctx.user_id,
            device_id=ctx.device_id,
            ip=str(address) if address is not None else ctx.client_ip,
            subnet=subnet_of(address) if address is not None else "invalid",
            address=address,
            user_agent=ctx.user_agent or None,
        )
