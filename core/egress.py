"""Where a webhook may go: the rules for its URL and for the address it resolves to.

A channel chooses its webhook URL, so an unchecked URL makes the worker a proxy into the
network it runs in (Redis, PostgreSQL, the cloud's metadata service) and `last_error` a port
scanner. The rules, shared by the admin API (when a channel is saved) and the worker (again
at each delivery, on the address it is about to connect to):

- http or https, a host, no credentials (`user:pw@` would go out as Basic auth);
- every address the host resolves to is public unicast (`ipaddress`' `is_global`, and not
  multicast/reserved/...), IPv4 embedded in IPv6 (mapped, NAT64, 6to4, Teredo) checked as
  IPv4; a host written as a number (`2130706433`, `0x7f.1`, `0177.0.0.1`) is resolved the way
  the connection would read it, by the system resolver, so it can't slip past as a "name";
- the operator may allow private targets by CIDR or by exact host name (settings
  FLASHGATE_WEBHOOK_ALLOW_NETS / _HOSTS); cloud metadata addresses stay refused regardless;
- the worker connects to the address it checked (`pin`), never re-resolving: a DNS answer
  that changes between the check and the connection (rebinding) can't redirect it. Host and
  TLS server name stay the registered host's.

URLs are parsed with httpx.URL, the parser of the client that sends the request, so the
check and the connection can't read one URL two ways.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from dataclasses import dataclass

import httpx

from core.settings import Network, Settings

Address = ipaddress.IPv4Address | ipaddress.IPv6Address

# Refused even when an allow-list covers them: credentials for the whole cloud account.
METADATA = frozenset(
    ipaddress.ip_address(a)
    for a in (
        "169.254.169.254",  # AWS, GCP, Azure, OpenStack, DigitalOcean
        "169.254.170.2",  # AWS ECS task metadata
        "100.100.100.200",  # Alibaba Cloud
        "fd00:ec2::254",  # AWS over IPv6
    )
)
_NAT64 = (ipaddress.ip_network("64:ff9b::/96"), ipaddress.ip_network("64:ff9b:1::/48"))

# `last_error` categories for a refused target (see workers/webhooks.py for the others).
BLOCKED_URL = "blocked_url"
BLOCKED_ADDRESS = "blocked_address"
DNS_FAILED = "dns_failed"


class Refused(Exception):
    """The target is not allowed (or can't be resolved); `category` is what gets stored."""

    def __init__(self, category: str, reason: str) -> None:
        super().__init__(reason)
        self.category = category


@dataclass(frozen=True, slots=True)
class AllowList:
    nets: tuple[Network, ...] = ()
    hosts: frozenset[str] = frozenset()

    @classmethod
    def from_settings(cls, settings: Settings) -> AllowList:
        return cls(settings.webhook_allow_nets, frozenset(settings.webhook_allow_hosts))

    def covers(self, host: str, addr: Address) -> bool:
        return _normal_host(host) in self.hosts or any(addr in net for net in self.nets)


@dataclass(frozen=True, slots=True)
class Target:
    """Where to send: the registered URL with its host replaced by the checked address."""

    url: httpx.URL
    host_header: str  # the registered host[:port]
    sni_hostname: str | None  # TLS server name (and certificate name) for https


def _normal_host(host: str) -> str:
    return host.lower().rstrip(".")


def _embedded_v4(addr: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    if addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    if any(addr in net for net in _NAT64):
        return ipaddress.IPv4Address(int(addr) & 0xFFFFFFFF)
    if addr.sixtofour is not None:
        return addr.sixtofour
    if addr.teredo is not None:
        return addr.teredo[1]
    return None


def unwrap(addr: Address) -> Address:
    """An IPv6 address that carries an IPv4 one, as that IPv4 address; others unchanged."""
    if isinstance(addr, ipaddress.IPv6Address):
        return _embedded_v4(addr) or addr
    return addr


def is_public(addr: Address) -> bool:
    """Public unicast: not loopback, private, link-local, shared (CGNAT), multicast,
    unspecified, reserved or documentation, in either family or embedded in IPv6."""
    inner = unwrap(addr)
    if inner is not addr and not is_public(inner):
        return False
    return addr.is_global and not (
        addr.is_multicast
        or addr.is_reserved
        or addr.is_private
        or addr.is_loopback
        or addr.is_link_local
        or addr.is_unspecified
    )


def permitted(host: str, addr: Address, allow: AllowList) -> bool:
    inner = unwrap(addr)
    if addr in METADATA or inner in METADATA:
        return False
    return allow.covers(host, inner) or allow.covers(host, addr) or is_public(addr)


def _literal(host: str) -> Address | None:
    """The address a host written as an IP stands for, in any form the resolver accepts."""
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        pass
    try:  # inet_aton reads 2130706433, 0x7f.1 and 0177.0.0.1 like the C resolver does
        return ipaddress.IPv4Address(socket.inet_aton(host))
    except (OSError, ValueError):
        return None


def url_problem(url: str, allow: AllowList) -> str | None:
    """Why `url` can't be a webhook URL as written (for a 422), or None. A host name is not
    resolved here: its addresses are checked at each delivery."""
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, TypeError, ValueError):
        return "is not a valid URL"
    if parsed.scheme not in ("http", "https"):
        return "must be http or https"
    if parsed.userinfo:
        return "must not carry credentials (user:password@)"
    if not parsed.host:
        return "has no host"
    addr = _literal(parsed.host)
    if addr is not None and not permitted(parsed.host, addr, allow):
        return "must point at a public address"
    return None


async def resolve(host: str, port: int, allow: AllowList) -> Address:
    """The address to connect to: every address the host has must be permitted (one bad
    answer among good ones is refused too: that is how rebinding attacks look)."""
    addr = _literal(host)
    if addr is not None:
        addrs = [addr]
    else:
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(
                host, port, type=socket.SOCK_STREAM
            )
        except (OSError, UnicodeError) as exc:  # socket.gaierror is an OSError
            raise Refused(DNS_FAILED, "host does not resolve") from exc
        addrs = [ipaddress.ip_address(str(info[4][0]).split("%", 1)[0]) for info in infos]
    if not addrs:
        raise Refused(DNS_FAILED, "host has no address")
    if not all(permitted(host, a, allow) for a in addrs):
        raise Refused(BLOCKED_ADDRESS, "host resolves to an address that is not allowed")
    return addrs[0]


async def pin(url: str, allow: AllowList) -> Target:
    """Check `url` and resolve its host once; raises Refused."""
    problem = url_problem(url, allow)
    if problem is not None:
        category = BLOCKED_ADDRESS if problem.endswith("public address") else BLOCKED_URL
        raise Refused(category, "webhook_url " + problem)
    parsed = httpx.URL(url)
    https = parsed.scheme == "https"
    host = _normal_host(parsed.raw_host.decode("ascii"))  # IDNA-encoded, no brackets
    addr = await resolve(host, parsed.port or (443 if https else 80), allow)
    return Target(
        url=parsed.copy_with(host=str(addr)),
        host_header=parsed.netloc.decode("ascii"),
        sni_hostname=host if https else None,
    )
