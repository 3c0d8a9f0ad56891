"""uvicorn's httptools protocol with the two limits it lacks on a request's head (request line
and headers): a size and a time.

Stock uvicorn + httptools accepts headers of any size (4 MiB were served) and never times out a
client that connects and sends nothing or half a head (its keep-alive timer runs only between
requests). Here a head over `MAX_HEAD_BYTES` is answered 400 and the connection closed (the
parser's error path), and a head not complete within `HEAD_TIMEOUT_S` of its first byte (or of
the connection) closes the connection. A body not complete within `body_timeout_s` of its head
(FLASHGATE_BODY_TIMEOUT_S, set by the app: `configure`) is answered 408 `request_timeout` if no
response has started, and the connection closed: uvicorn has no body-read timeout of its own.
Timers are armed only while a head or a body is incomplete after a read.

Run with: uvicorn ... --http gateway.server:BoundedHttpToolsProtocol (cli/main.py, cli/stack.py)
"""

from __future__ import annotations

import asyncio
from asyncio import TimerHandle

import msgspec
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from core import errors
from gateway.models import Problem

MAX_HEAD_BYTES = 64 * 1024
HEAD_TIMEOUT_S = 10.0
BODY_TIMEOUT_S = 10.0
# After an error answer the connection is half-closed and what the client still sends is read
# and dropped for up to this long ("lingering close", as nginx does): closing a socket with
# unread input sends a RST, which can make the client's kernel discard the answer unread.
LINGER_S = 2.0


def configure(*, body_timeout_s: float) -> None:
    """The app's settings for the protocol (uvicorn builds the app before serving)."""
    BoundedHttpToolsProtocol.body_timeout_s = body_timeout_s


class HeadTooLarge(Exception):
    """Raised in a parser callback: httptools turns it into the 400-and-close path."""


class BoundedHttpToolsProtocol(HttpToolsProtocol):
    """The head is counted as the parser hands it over (exact, so memory stays bounded); the
    timer is armed only while a head is incomplete after a read, so the usual request, whose
    head arrives in one read, pays no timer (measured: ~5 us a request with one armed and
    cancelled per request, +10% on the trivial endpoint)."""

    max_head_bytes = MAX_HEAD_BYTES
    head_timeout_s = HEAD_TIMEOUT_S
    body_timeout_s = BODY_TIMEOUT_S
    _head_timer: TimerHandle | None = None
    _body_timer: TimerHandle | None = None
    _head_bytes = 0
    _in_head = True  # a head has begun (or the connection is new) and is not complete yet
    _in_body = False  # a head is complete, its body is not
    _lingering = False  # an error was answered: input is dropped until the close

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_head_timer()  # a client that connects and sends nothing

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_head_timer()
        self._cancel_body_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._lingering:
            return
        super().data_received(data)
        if self._in_head:
            if self._head_timer is None and not self.transport.is_closing():
                self._arm_head_timer()  # half a head so far: it has HEAD_TIMEOUT_S to finish
        elif self._in_body and self._body_timer is None and not self.transport.is_closing():
            self._body_timer = self.loop.call_later(self.body_timeout_s, self._body_timed_out)

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
        self._in_body = True
        if self._head_timer is not None:
            self._cancel_head_timer()
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        self._in_body = False
        if self._body_timer is not None:
            self._cancel_body_timer()
        super().on_message_complete()

    def send_400_response(self, msg: str) -> None:
        """What the parser refused, as problem+json like every other error: 431
        `headers_too_large` past the head limit, else 400 `malformed_request` (not HTTP/1.1)."""
        err: errors.FlashgateError
        if self._head_bytes > self.max_head_bytes:
            err = errors.HeadersTooLarge(f"over {self.max_head_bytes} bytes")
        else:
            err = errors.MalformedRequest("the request is not valid HTTP/1.1")
        self._send_problem_and_close(err)

    def _body_timed_out(self) -> None:
        self._body_timer = None
        if not self._in_body or self.transport.is_closing():
            return
        cycle = self.cycle
        answer = cycle is not None and not cycle.response_started
        if cycle is not None:  # the app's receive() now says disconnect; its sends are dropped
            cycle.disconnected = True
            cycle.message_event.set()
        if answer:
            self._send_problem_and_close(errors.RequestTimeout(
                f"body not received within {self.body_timeout_s:g} s"))
        else:
            self.transport.close()

    def _cancel_body_timer(self) -> None:
        if self._body_timer is not None:
            self._body_timer.cancel()
            self._body_timer = None

    def _send_problem_and_close(self, err: errors.FlashgateError) -> None:
        body = msgspec.json.encode(Problem(
            type=f"https://flashgate.dev/problems/{err.code}", title=err.title,
            status=err.status, code=err.code, detail=err.detail))
        head = [STATUS_LINE[err.status]]
        for name, value in self.server_state.default_headers:
            head.extend([name, b": ", value, b"\r\n"])
        head.append(b"content-type: application/problem+json\r\ncontent-length: %d\r\n"
                    b"connection: close\r\n\r\n" % len(body))
        self.transport.write(b"".join(head) + body)
        self._linger()

    def _linger(self) -> None:
        """Send the answer and a FIN, drop the client's input, close within LINGER_S (or
        when the client closes: eof_received's default closes the transport)."""
        self._cancel_head_timer()
        self._cancel_body_timer()
        transport = self.transport
        if transport.is_closing() or not transport.can_write_eof():
            transport.close()
            return
        self._lingering = True
        transport.write_eof()
        transport.resume_reading()  # uvicorn may have paused reading on a large body
        self.loop.call_later(LINGER_S, transport.close)

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
