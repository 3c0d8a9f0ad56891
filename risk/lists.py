"""Block and allow lists (users, devices, ips, CIDR ranges) and the datacenter ranges file.

Lists live in Redis sets (`keys.risk_list(action, kind)`), changed through the admin API; each
gateway keeps a copy in memory and reloads it when the lists' version counter moves, checked
at most every `ttl_s`. So the hot path matches lists without a Redis round trip, and a change
reaches every gateway within `ttl_s` (at once in the gateway that made it).

Datacenter file format: one CIDR range per line (`203.0.113.0/24`, `2001:db8::/32`); a bare
address counts as a /32 or /128; `#` starts a comment; anything after the range on the same
line (whitespace-separated) is a free-text label, e.g. the provider's name.
"""

from __future__ import annotations

import ipaddress
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Literal, cast

from redis.asyncio import Redis

from core.keys import Keys
from risk.signals import IPAddress, Signals

ACTIONS = ("allow", "block")
KINDS = ("user", "device", "ip", "cidr")
Action = Literal["allow", "block"]
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class ListEntryInvalid(ValueError):
    pass


class CidrSet:
    """Networks grouped by (ip version, prefix length): a lookup costs one shift and one set
    probe per distinct prefix length, however many ranges are loaded."""

    def __init__(self, networks: Iterable[Network] = ()) -> None:
        self._by_len: dict[tuple[int, int], set[int]] = {}
        self.size = 0
        for net in networks:
            self.add(net)

    def add(self, net: Network) -> None:
        self._by_len.setdefault((net.version, net.prefixlen), set()).add(
            int(net.network_address) >> (net.max_prefixlen - net.prefixlen)
        )
        self.size += 1

    def __contains__(self, address: IPAddress) -> bool:
        value, bits = int(address), address.max_prefixlen
        for (version, plen), nets in self._by_len.items():
            if version == address.version and (value >> (bits - plen)) in nets:
                return True
        return False


def normalize(kind: str, value: str) -> str:
    """The canonical form of one list entry; raises ListEntryInvalid."""
    value = value.strip()
    try:
        if kind == "ip":
            return str(ipaddress.ip_address(value))
        if kind == "cidr":
            return str(ipaddress.ip_network(value, strict=False))
    except ValueError as exc:
        raise ListEntryInvalid(f"{value!r} is not a valid {kind}: {exc}") from None
    if kind in ("user", "device"):
        if (
            not 1 <= len(value) <= 128
            or not value.isascii()
            or not value.isprintable()
            or " " in value
        ):
            raise ListEntryInvalid(f"{value!r}: 1-128 printable ASCII characters, no spaces")
        return value
    raise ListEntryInvalid(f"unknown list kind {kind!r} (one of {', '.join(KINDS)})")


def parse_cidr_lines(text: str, source: str = "<text>") -> list[Network]:
    out: list[Network] = []
    for number, line in enumerate(text.splitlines(), 1):
        entry = line.split("#", 1)[0].strip().split(maxsplit=1)
        if not entry:
            continue
        try:
            out.append(ipaddress.ip_network(entry[0], strict=False))
        except ValueError:
            raise ListEntryInvalid(f"{source}:{number}: {entry[0]!r} is not a CIDR range") from None
    return out


def load_datacenter_ranges(path: str | Path | None = None) -> CidrSet:
    """The datacenter/hosting ranges file (default: the small sample shipped in risk/data)."""
    if path:
        return CidrSet(parse_cidr_lines(Path(path).read_text(), str(path)))
    text = resources.files("risk").joinpath("data/datacenter_sample.txt").read_text()
    return CidrSet(parse_cidr_lines(text, "risk/data/datacenter_sample.txt"))


@dataclass
class Snapshot:
    """One consistent copy of all lists."""

    entries: dict[tuple[str, str], frozenset[str]] = field(default_factory=dict)
    cidrs: dict[str, CidrSet] = field(default_factory=dict)

    def _hit(self, action: str, sig: Signals) -> str | None:
        for kind, value in (("user", sig.user_id), ("device", sig.device_id), ("ip", sig.ip)):
            if value in self.entries.get((action, kind), ()):
                return kind
        cidrs = self.cidrs.get(action)
        if cidrs is not None and sig.address is not None and sig.address in cidrs:
            return "cidr"
        return None

    def match(self, sig: Signals) -> tuple[Action, str] | None:
        """("allow" | "block", kind) of the first list that names this request; allow wins."""
        if not any(self.entries.values()) and not any(c.size for c in self.cidrs.values()):
            return None  # the usual case on the hot path: no list has an entry
        for action in ACTIONS:
            kind = self._hit(action, sig)
            if kind is not None:
                return cast(Action, action), kind
        return None


class RiskLists:
    def __init__(self, redis: Redis, keys: Keys, ttl_s: float) -> None:
        self.redis, self.keys, self.ttl_s = redis, keys, ttl_s
        self._snapshot = Snapshot()
        self._version: str | None = None
        self._checked_at = float("-inf")

    async def current(self) -> Snapshot:
        now = time.monotonic()
        if now - self._checked_at >= self.ttl_s:
            self._checked_at = now
            version = str(await self.redis.get(self.keys.risk_lists_version()) or "0")
            if version != self._version:
                self._snapshot = await self._load()
                self._version = version
        return self._snapshot

    async def _load(self) -> Snapshot:
        async with self.redis.pipeline(transaction=False) as pipe:
            for action in ACTIONS:
                for kind in KINDS:
                    pipe.smembers(self.keys.risk_list(action, kind))
            results = await pipe.execute()
        snap = Snapshot()
        pairs = [(a, k) for a in ACTIONS for k in KINDS]
        for (action, kind), members in zip(pairs, results, strict=True):
            if kind == "cidr":
                snap.cidrs[action] = CidrSet(ipaddress.ip_network(m) for m in members)
            else:
                snap.entries[(action, kind)] = frozenset(members)
        return snap

    async def entries(self, action: str, kind: str) -> list[str]:
        members = await self.redis.smembers(self.keys.risk_list(action, kind))
        return sorted(str(m) for m in members)

    async def change(self, action: str, kind: str, values: list[str], *, add: bool) -> int:
        """Add or remove entries (validated first); returns how many changed."""
        if action not in ACTIONS:
            raise ListEntryInvalid(f"unknown list {action!r} (allow or block)")
        return await self.apply(action, kind, [normalize(kind, v) for v in values], add=add)

    async def apply(self, action: str, kind: str, clean: list[str], *, add: bool) -> int:
        """`change` for entries already normalized (the admin API records them in PostgreSQL
        between the two: risk/durable.py)."""
        if not clean:
            return 0
        key = self.keys.risk_list(action, kind)
        async with self.redis.pipeline(transaction=True) as pipe:
            (pipe.sadd if add else pipe.srem)(key, *clean)
            pipe.incr(self.keys.risk_lists_version())
            changed, _ = await pipe.execute()
        self._checked_at = float("-inf")  # this gateway sees its own change at once
        return int(changed)
