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

Every error answered here (400, 408, 431) and every app answer that closes the connection while
the request's body is still arriving (BodyLimit's 413) closes with a "lingering close": FIN
after the answer, the client's remaining input read and dropped for up to LINGER_S. A plain
close() with unread input sends a RST, and the client's kernel may then drop the answer unread
(httpx got ECONNRESET instead of the 413 for a 1 MiB body: issue #11.4).

A protocol error is answered once and logged once, at info, in one line (logger
`flashgate.http`): the request's app task, if one started, sees a disconnect and its writes are
dropped (it used to write after the FIN and log two tracebacks per request: issue #11.3).

Run with: uvicorn ... --http gateway.server:BoundedHttpToolsProtocol (cli/main.py, cli/stack.py)
"""

from __future__ import annotations

import asyncio
import logging
from asyncio import TimerHandle
from collections.abc import Callable

import httptools
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

log = logging.getLogger("flashgate.http")


def configure(*, body_timeout_s: float) -> None:
    """The app's settings for the protocol (uvicorn builds the app before serving)."""
    BoundedHttpToolsProtocol.body_timeout_s = body_timeout_s


class HeadTooLarge(Exception):
    """Raised in a parser callback: httptools turns it into the 400-and-close path."""


class CycleTransport:
    """The transport as a request's cycle (uvicorn's RequestResponseCycle) sees it: a close
    while the request's body is still arriving lingers, and after an error answer the app's
    writes are dropped (it may still be running when the protocol answered for it). One per
    connection; the cycle uses only write, close and is_closing, and write and is_closing are
    the transport's own bound methods (write until an error answer): no wrapper on the hot
    path."""

    __slots__ = ("_protocol", "_transport", "is_closing", "write")
    write: Callable[[bytes | bytearray | memoryview], None]

    def __init__(self, protocol: BoundedHttpToolsProtocol, transport: asyncio.Transport) -> None:
        self._protocol = protocol
        self._transport = transport
        self.write = transport.write
        self.is_closing = transport.is_closing

    def mute(self) -> None:
        self.write = _dropped

    def close(self) -> None:
        protocol = self._protocol
        if protocol._lingering:
            return  # closes at the end of the linger
        if protocol._in_body and not self._transport.is_closing():
            protocol._linger()  # answered before the body was read (413): don't RST it
        else:
            self._transport.close()


def _dropped(data: bytes | bytearray | memoryview) -> None:
    pass


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
    _cycle_transport: CycleTransport

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._cycle_transport = CycleTransport(self, transport)
        self._arm_head_timer()  # a client that connects and sends nothing

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_head_timer()
        self._cancel_body_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        """uvicorn's, except that a parse error is logged once at info (by the answer), not
        as a warning plus the answer."""
        if self._lingering:
            return
        self._unset_keepalive_if_required()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self.send_400_response(str(exc))
            return
        except httptools.HttpParserUpgrade:
            if self._should_upgrade():
                self.handle_websocket_upgrade()
            else:
                self._unsupported_upgrade_warning()
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
        if self.cycle is not None:
            self.cycle.transport = self._cycle_transport  # type: ignore[assignment]

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
        self._send_problem_and_close(err, msg)

    def _unsupported_upgrade_warning(self) -> None:
        """An `Upgrade:` we don't serve (h2c, ...) is served as plain HTTP/1.1: not worth a
        warning per request (uvicorn logs two), which anyone could flood the log with."""
        log.debug("upgrade request ignored")

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
            self._send_problem_and_close(
                errors.RequestTimeout(f"body not received within {self.body_timeout_s:g} s")
            )
        else:
            self.transport.close()

    def _cancel_body_timer(self) -> None:
        if self._body_timer is not None:
            self._body_timer.cancel()
            self._body_timer = None

    def _send_problem_and_close(self, err: errors.FlashgateError, why: str = "") -> None:
        """Answer `err`, log it in one line, and close lingering. The request's app task, if
        one runs, now reads a disconnect and its writes are dropped (CycleTransport)."""
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete:
            cycle.disconnected = True
            cycle.message_event.set()
        log.info(
            "refused at the protocol: %d %s%s",
            err.status,
            err.code,
            f" ({why[:120]})" if why else "",
            extra={"client": self.client[0] if self.client else None},
        )
        body = msgspec.json.encode(
            Problem(
                type=f"https://flashgate.dev/problems/{err.code}",
                title=err.title,
                status=err.status,
                code=err.code,
                detail=err.detail,
            )
        )
        head = [STATUS_LINE[err.status]]
        for name, value in self.server_state.default_headers:
            head.extend([name, b": ", value, b"\r\n"])
        head.append(
            b"content-type: application/problem+json\r\ncontent-length: %d\r\n"
            b"connection: close\r\n\r\n" % len(body)
        )
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
        self._cycle_transport.mute()
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
