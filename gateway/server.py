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
    """The head is counted as the parser hands it over (exact, so memory stays bounded); the
    timer is armed only while a head is incomplete after a read, so the usual request, whose
    head arrives in one read, pays no timer (measured: ~5 us a request with one armed and
    cancelled per request, +10% on the trivial endpoint)."""

    max_head_bytes = MAX_HEAD_BYTES
    head_timeout_s = HEAD_TIMEOUT_S
    _head_timer: TimerHandle | None = None
    _head_bytes = 0
    _in_head = True  # a head has begun (or the connection is new) and is not complete yet

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_head_timer()  # a client that connects and sends nothing

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_head_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self._in_head and self._head_timer is None and not self.transport.is_closing():
            self._arm_head_timer()  # half a head so far: it has HEAD_TIMEOUT_S to finish

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._head_bytes = 0
        self._in_head = True

    def on_url(self, url: bytes) -> None:
        self._count(len(url))
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count(len(name) + len(value) + 4)
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._in_head = False
        if self._head_timer is not None:
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
        if self._in_head and not self.transport.is_closing():
            self.transport.close()
