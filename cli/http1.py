"""A minimal keep-alive HTTP/1.1 client for the demo's purchase burst.

Measured on the 2-core demo machine, httpx spent ~2 ms of CPU per request, so the load
generator, not the gateway, set the pace. This client writes a pre-built request on one
persistent connection and parses the answer with httptools (the parser uvicorn uses): a
fraction of that cost. One request at a time per connection; no pipelining, no TLS, no
redirects, loopback only. Everything else in the CLI uses httpx.
"""

from __future__ import annotations

import asyncio
from typing import cast

import httptools


class ConnectionLost(Exception):
    """The connection closed or broke before a whole answer arrived."""


class _Protocol(asyncio.Protocol):
    def __init__(self) -> None:
        self.parser = httptools.HttpResponseParser(self)
        self.transport: asyncio.Transport | None = None
        self.waiter: asyncio.Future[tuple[int, bytes]] | None = None
        self.body: list[bytes] = []
        self.closed = False

    # asyncio callbacks
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(ConnectionLost(f"bad response: {exc}"))

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._fail(ConnectionLost(str(exc) if exc else "closed by the server"))

    # httptools callbacks
    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result((self.parser.get_status_code(), b"".join(self.body)))
        if not self.parser.should_keep_alive() and self.transport is not None:
            self.transport.close()

    def _fail(self, exc: Exception) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(exc)


class Connection:
    """One persistent connection to host:port; reconnects after a failure."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.proto: _Protocol | None = None

    async def request(self, raw: bytes, timeout_s: float = 30.0) -> tuple[int, bytes]:
        """Send a complete request (head and body); return (status, body)."""
        if self.proto is None or self.proto.closed:
            loop = asyncio.get_running_loop()
            _, self.proto = await loop.create_connection(_Protocol, self.host, self.port)
        proto = self.proto
        proto.body = []
        proto.waiter = asyncio.get_running_loop().create_future()
        assert proto.transport is not None
        proto.transport.write(raw)
        try:
            async with asyncio.timeout(timeout_s):
                return await proto.waiter
        except BaseException:
            self.close()  # a half-read answer must not be taken for the next one
            raise

    def close(self) -> None:
        if self.proto is not None and self.proto.transport is not None:
            self.proto.transport.close()
        self.proto = None


def build_request(
    method: str, host: str, path: str, headers: dict[str, str], body: bytes = b""
) -> bytes:
    head = [f"{method} {path} HTTP/1.1", f"Host: {host}", f"Content-Length: {len(body)}"]
    head += [f"{k}: {v}" for k, v in headers.items()]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body
