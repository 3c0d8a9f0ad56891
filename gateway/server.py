"""uvicorn's httptools protocol with the two limits it lacks on a request's head (request line
and headers): a size and a time.

Stock uvicorn + httptools accepts headers of any size (4 MiB were served) and never times out a
client that connects and sends nothing or half a head (its keep-alive timer runs only between
requests). Here a head over `MAX_HEAD_BYTES` is answered 400 and the connection closed (the
parser's error path), and a head not complete within `HEAD_TIMEOUT_S` of its first byte (or of
the connection) closes the connection. Bodies are timed by gateway.middleware.BodyLimit.

Run with: uvicorn ... --http gateway.server:BoundedHttpToolsProtocol (cli/main.py, cli/stack.py)
"""

from __future__ import annotations

import asyncio
from asyncio import TimerHandle

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

MAX_HEAD_BYTES = 64 * 1024
HEAD_TIMEOUT_S = 10.0


class HeadTooLarge(Exception):
    """Raised in a parser callback: httptools turns it into the 400-and-close path."""


class BoundedHttpToolsProtocol(HttpToolsProtocol):
    max_head_bytes = MAX_HEAD_BYTES
    head_timeout_s = HEAD_TIMEOUT_S
    _head_timer: TimerHandle | None = None
    _head_bytes = 0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_head_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_head_timer()
        super().connection_lost(exc)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._head_bytes = 0
        if self._head_timer is None:
            self._arm_head_timer()

    def on_url(self, url: bytes) -> None:
        self._count(len(url))
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count(len(name) + len(value) + 4)
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._cancel_head_timer()
        super().on_headers_complete()

    def _count(self, n: int) -> None:
        self._head_bytes += n
        if self._head_bytes > self.max_head_bytes:
            raise HeadTooLarge(f"request head over {self.max_head_bytes} bytes")

    def _arm_head_timer(self) -> None:
        self._head_timer = self.loop.call_later(self.head_timeout_s, self._head_timed_out)

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if not self.transport.is_closing():
            self.transport.close()
