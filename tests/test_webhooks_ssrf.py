"""#11.7 webhook SSRF: each attack URL replayed against a real dispatcher and a real gateway.

A local listener stands where the attack points (127.0.0.1 and ::1, one port); with the
production policy (no allow-list) it must see no connection at all and the outbox row must say
`blocked_*`. With 127.0.0.0/8 allow-listed (what the other webhook tests run with) the same
listener does get the POST, which shows the listener would have seen the attack.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import ipaddress
import json
import os
import secrets
import ssl
import sys
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from core import egress
from core.runtime import Runtime
from core.settings import ConfigError, Settings
from tests.conftest import ADMIN, ADMIN_TOKEN
from tests.live_gateway import LiveGateway, live_gateway  # noqa: F401
from tests.workers_fixtures import make_channel
from workers.webhooks import Dispatcher

LOOPBACK = (ipaddress.ip_network("127.0.0.0/8"),)


class Listener:
    """Counts TCP connections on 127.0.0.1 and ::1 (one port); answers 200 to what it reads."""

    def __init__(self) -> None:
        self.connections = 0
        self.port = 0
        self.hosts: list[str] = []

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        with contextlib.suppress(Exception):
            head = (await reader.readuntil(b"\r\n\r\n")).decode()
            self.hosts += [
                line.split(":", 1)[1].strip()
                for line in head.split("\r\n")
                if line.lower().startswith("host:")
            ]
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
            await writer.drain()
        writer.close()


@pytest.fixture
async def listener() -> AsyncIterator[Listener]:
    state = Listener()
    v4 = await asyncio.start_server(state.handle, "127.0.0.1", 0)
    state.port = v4.sockets[0].getsockname()[1]
    servers = [v4]
    with contextlib.suppress(OSError):  # no IPv6 loopback here: the v4 listener still counts
        servers.append(await asyncio.start_server(state.handle, "::1", state.port))
    yield state
    for server in servers:
        server.close()
        await server.wait_closed()


def attack_urls(port: int) -> list[str]:
    return [
        f"http://127.0.0.1:{port}/hook",
        f"http://2130706433:{port}/hook",  # decimal loopback
        f"http://0x7f.0.0.1:{port}/hook",  # hex
        f"http://0177.0.0.1:{port}/hook",  # octal (httpx: not a valid URL)
        f"http://127.1:{port}/hook",  # short form
        f"http://0.0.0.0:{port}/hook",  # unspecified: Linux connects it to lo
        f"http://[::1]:{port}/hook",
        f"http://[::ffff:127.0.0.1]:{port}/hook",  # IPv4-mapped IPv6
        f"http://[::ffff:7f00:1]:{port}/hook",
        f"http://[64:ff9b::7f00:1]:{port}/hook",  # NAT64 of loopback
        f"http://localhost:{port}/hook",  # a name that resolves to loopback
        f"http://LOCALHOST.:{port}/hook",
        f"http://user:pw@127.0.0.1:{port}/hook",  # credentials (would go out as Basic auth)
        f"http://user:pw@example.com:{port}/hook",
        "http://169.254.169.254/latest/meta-data/",  # cloud metadata
        "http://[fd00:ec2::254]/latest/meta-data/",
        f"http://10.1.2.3:{port}/hook",  # private
        f"http://100.64.0.1:{port}/hook",  # shared address space (CGNAT)
        f"http://224.0.0.1:{port}/hook",  # multicast
    ]


async def enqueue(rt: Runtime, channel_id: str) -> int:
    row_id: int = await rt.pool.fetchval(
        "INSERT INTO webhook_outbox (channel_id, order_id, event, payload)"
        " VALUES ($1, $2, 'order.delivered', '{}') RETURNING id",
        channel_id,
        "o-" + secrets.token_hex(8),
    )
    return row_id


async def deliver(rt: Runtime, settings: Settings, urls: list[str]) -> dict[str, str | None]:
    """One outbox row per URL, one dispatch; returns url -> last_error (None = delivered)."""
    rows = {}
    for url in urls:
        channel, _ = await make_channel(rt, webhook_url=url)
        rows[url] = (channel, await enqueue(rt, channel))
    async with httpx.AsyncClient(trust_env=False) as http:
        dispatcher = Dispatcher(
            rt.pool, rt.keyring, settings, http, channel_ids=[c for c, _ in rows.values()]
        )
        assert await dispatcher.dispatch_once() == len(urls)
    out: dict[str, str | None] = {}
    for url, (_, row_id) in rows.items():
        row = await rt.pool.fetchrow(
            "SELECT last_error, delivered_at FROM webhook_outbox WHERE id = $1", row_id
        )
        assert row is not None
        out[url] = None if row["delivered_at"] is not None else row["last_error"]
    return out


async def test_webhook_ssrf_attack_urls_are_refused_without_a_connection(
    runtime: Runtime, listener: Listener
) -> None:
    closed = dataclasses.replace(runtime.settings, webhook_allow_nets=(), webhook_allow_hosts=())
    urls = attack_urls(listener.port)
    errors = await deliver(runtime, closed, urls)
    assert listener.connections == 0
    assert errors == {
        url: "blocked_url" if "@" in url or "0177" in url else "blocked_address" for url in urls
    }


async def test_the_listener_would_have_seen_them(runtime: Runtime, listener: Listener) -> None:
    """The control: allow-listed, the loopback forms do reach the listener (and never with
    credentials; metadata stays refused even when its network is allow-listed)."""
    opened = dataclasses.replace(
        runtime.settings, webhook_allow_nets=(*LOOPBACK, ipaddress.ip_network("169.254.0.0/16"))
    )
    port = listener.port
    errors = await deliver(
        runtime,
        opened,
        [
            f"http://2130706433:{port}/hook",
            f"http://[::ffff:127.0.0.1]:{port}/hook",
            f"http://localhost:{port}/hook",
            f"http://user:pw@127.0.0.1:{port}/hook",
            "http://169.254.169.254/latest/meta-data/",
        ],
    )
    assert list(errors.values()) == [None, None, None, "blocked_url", "blocked_address"]
    assert listener.connections == 3
    # Sent to the address that was checked, with the Host the channel registered.
    assert sorted(listener.hosts) == sorted(
        [f"2130706433:{port}", f"[::ffff:127.0.0.1]:{port}", f"localhost:{port}"]
    )


async def test_allow_listed_host_name_is_pinned_to_its_checked_address(listener: Listener) -> None:
    allow = egress.AllowList(hosts=frozenset({"localhost"}))
    target = await egress.pin(f"https://LocalHost:{listener.port}/h?x=1", allow)
    assert target.url.host == "127.0.0.1" or target.url.host == "::1"
    assert (target.url.port, target.url.path, target.url.query) == (listener.port, "/h", b"x=1")
    assert (target.host_header, target.sni_hostname) == (f"localhost:{listener.port}", "localhost")
    with pytest.raises(egress.Refused) as refused:
        await egress.pin(f"http://localhost:{listener.port}/", egress.AllowList())
    assert refused.value.category == "blocked_address"
    with pytest.raises(egress.Refused) as refused:
        await egress.pin("http://no-such-host.invalid/", egress.AllowList())
    assert refused.value.category == "dns_failed"


async def test_last_error_does_not_tell_redis_from_postgres(runtime: Runtime) -> None:
    """Allow-listed or not, a port that isn't an HTTP receiver reads `connect_failed`: the
    outbox no longer names the protocol (RemoteProtocolError vs ReadError) behind a port."""
    redis_port = urlsplit(runtime.settings.redis_url).port
    pg_port = urlsplit(runtime.settings.database_url.reveal()).port
    errors = await deliver(
        runtime,
        runtime.settings,
        [f"http://127.0.0.1:{redis_port}/", f"http://127.0.0.1:{pg_port}/"],
    )
    assert set(errors.values()) == {"connect_failed"}


async def test_redirects_are_not_followed(runtime: Runtime, listener: Listener) -> None:
    async def redirect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(
            f"HTTP/1.1 302 Found\r\nlocation: http://127.0.0.1:{listener.port}/\r\n"
            "content-length: 0\r\nconnection: close\r\n\r\n".encode()
        )
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(redirect, "127.0.0.1", 0)
    async with server:
        url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/hook"
        assert await deliver(runtime, runtime.settings, [url]) == {url: "http_302"}
    assert listener.connections == 0


@pytest.mark.parametrize(
    "url",
    [
        "http://user:pw@shop.example/hooks",
        "https://user@shop.example/hooks",
        "http://169.254.169.254/latest/meta-data/",
        "http://[::ffff:169.254.169.254]/",
        "http://10.0.0.8/hooks",  # not in the tests' allow-list (127.0.0.0/8)
        "http://0x0a000008/hooks",
        "http://[fe80::1]/hooks",
        "http://0.0.0.0/hooks",
        "http:///hooks",
    ],
)
async def test_channel_with_a_refused_webhook_url_is_422(
    client: httpx.AsyncClient, url: str
) -> None:
    r = await client.post(
        "/v1/admin/channels", json={"name": "shop", "webhook_url": url}, headers=ADMIN
    )
    assert r.status_code == 422, r.text
    assert r.headers["content-type"].startswith("application/problem+json")
    assert r.json()["code"] == "invalid_request" and "webhook_url" in r.json()["detail"]


async def test_public_webhook_url_is_accepted(client: httpx.AsyncClient) -> None:
    r = await client.post(
        "/v1/admin/channels",
        headers=ADMIN,
        json={"name": "shop", "webhook_url": "https://shop.example/hooks"},
    )
    assert r.status_code == 201, r.text


def test_allow_list_settings_are_validated() -> None:
    base = {
        "FLASHGATE_REDIS_URL": "redis://x",
        "FLASHGATE_DATABASE_URL": "postgresql://x",
        "FLASHGATE_ADMIN_TOKEN": ADMIN_TOKEN,
        "FLASHGATE_MASTER_KEY": "A" * 43 + "=",
    }
    s = Settings.from_env(
        {
            **base,
            "FLASHGATE_WEBHOOK_ALLOW_NETS": "10.0.0.0/8, fd00::/8",
            "FLASHGATE_WEBHOOK_ALLOW_HOSTS": "Hooks.Shop.svc.cluster.local.",
        }
    )
    assert [str(n) for n in s.webhook_allow_nets] == ["10.0.0.0/8", "fd00::/8"]
    assert s.webhook_allow_hosts == ("hooks.shop.svc.cluster.local",)
    for name, bad in (
        ("FLASHGATE_WEBHOOK_ALLOW_NETS", "10.0.0.1/8"),
        ("FLASHGATE_WEBHOOK_ALLOW_NETS", "not-a-net"),
        ("FLASHGATE_WEBHOOK_ALLOW_HOSTS", "bad host"),
    ):
        with pytest.raises(ConfigError, match=name):
            Settings.from_env({**base, name: bad})


@pytest.mark.parametrize(
    ("addr", "public"),
    [
        ("93.184.215.14", True),
        ("2606:2800:21f:cb07:6820:80da:af6b:8b2c", True),
        ("127.0.0.1", False),
        ("10.0.0.1", False),
        ("172.16.0.1", False),
        ("192.168.1.1", False),
        ("169.254.1.1", False),
        ("100.64.0.1", False),
        ("0.0.0.0", False),
        ("255.255.255.255", False),
        ("224.0.0.1", False),
        ("240.0.0.1", False),
        ("192.0.2.1", False),
        ("::1", False),
        ("::", False),
        ("fe80::1", False),
        ("fc00::1", False),
        ("ff02::1", False),
        ("::ffff:10.0.0.1", False),
        ("64:ff9b::a00:1", False),
        ("2002:7f00:1::", False),
        ("2001:db8::1", False),
    ],
)
def test_public_address_rule(addr: str, public: bool) -> None:
    assert egress.is_public(ipaddress.ip_address(addr)) is public


def _self_signed(tmp: Path, name: str) -> tuple[Path, Path]:
    """A certificate for DNS name `name` only (no IP SAN), and its key, as PEM files."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = tmp / "cert.pem", tmp / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_file, key_file


async def test_https_delivery_to_a_pinned_address_keeps_sni_and_certificate_name(
    runtime: Runtime, listener: Listener, tmp_path: Path
) -> None:
    """The worker connects to the checked IP, yet TLS still names (and verifies) the host the
    channel registered: the certificate below is valid for `localhost` only, not 127.0.0.1."""
    cert_file, key_file = _self_signed(tmp_path, "localhost")
    server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_tls.load_cert_chain(cert_file, key_file)
    server = await asyncio.start_server(listener.handle, "127.0.0.1", 0, ssl=server_tls)
    settings = dataclasses.replace(
        runtime.settings, webhook_allow_nets=(), webhook_allow_hosts=("localhost",)
    )
    async with server:
        port = server.sockets[0].getsockname()[1]
        channel, _ = await make_channel(runtime, webhook_url=f"https://localhost:{port}/hook")
        row_id = await enqueue(runtime, channel)
        client_tls = ssl.create_default_context(cafile=str(cert_file))
        async with httpx.AsyncClient(trust_env=False, verify=client_tls) as http:
            dispatcher = Dispatcher(
                runtime.pool, runtime.keyring, settings, http, channel_ids=[channel]
            )
            assert await dispatcher.dispatch_once() == 1
    row = await runtime.pool.fetchrow("SELECT * FROM webhook_outbox WHERE id = $1", row_id)
    assert row is not None and row["delivered_at"] is not None, row
    assert listener.hosts == [f"localhost:{port}"]


async def test_served_gateway_refuses_ssrf_webhook_urls_and_the_cli_rotates(
    live_gateway: LiveGateway,
) -> None:  # noqa: F811
    """Over a real uvicorn: attack URLs at channel creation are 422 problem+json; then
    `flashgate channel rotate-secret` gets a new whsec_ secret for a channel."""
    async with httpx.AsyncClient(base_url=live_gateway.url) as c:
        for url in (
            "http://user:pw@shop.example/h",
            "http://2130706433/h",
            "http://[::ffff:169.254.169.254]/latest/meta-data/",
        ):
            r = await c.post(
                "/v1/admin/channels",
                headers=live_gateway.admin,
                json={"name": "shop", "webhook_url": url},
            )
            assert (r.status_code, r.json()["code"]) == (422, "invalid_request"), r.text
        r = await c.post("/v1/admin/channels", json={"name": "shop"}, headers=live_gateway.admin)
        assert r.status_code == 201, r.text
    channel = r.json()
    env = {
        **os.environ,
        "FLASHGATE_URL": live_gateway.url,
        "FLASHGATE_ADMIN_TOKEN": live_gateway.admin["Authorization"].split()[1],
    }
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "cli.main",
        "channel",
        "rotate-secret",
        channel["channel_id"],
        "--overlap-s",
        "60",
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()
    rotated = json.loads(out)
    assert rotated["channel_id"] == channel["channel_id"]
    assert rotated["webhook_secret"].startswith("whsec_")
    assert rotated["webhook_secret"] != channel["webhook_secret"]
