"""Auto-pipelining: the commands that concurrent requests send to Redis share one write and one
read, on a few multiplexed connections, instead of one pooled connection each.

Why not redis-py here: a redis-py call checks a connection out of the pool, writes it with its
own syscall, reads its own reply under its own asyncio timeout and checks the connection back
in; on the purchase path that was ~40 us of the gateway's CPU per script call (bench of
2026-12-01, `docs/PERFORMANCE.md`), a quarter of a purchase. Redis answers the commands of one
connection in order, so one connection can carry every request in flight: each call appends its
packed command (hiredis, C) to a buffer and a future to a FIFO; the buffer goes out in one
`transport.write` per event-loop turn, and replies, parsed by hiredis's reader, resolve the
futures in order (~2-3 us per call). Libraries that do this (valkey-glide: a Rust core behind
FFI; coredis) bring a second client with its own semantics for one hot path; this module is
small, and redis-py stays the client of everything else (admin, workers' streams, clusters).

Failure semantics match redis-py's: a lost connection fails every call in flight with
ConnectionError; a reply that doesn't come within `timeout_s` fails the connection's calls in
flight with TimeoutError and drops the connection (a stalled server must not hang requests);
the next call reconnects. As with any client, a failed call may or may not have run: the
purchase path's Idempotency-Key makes a retry safe.

Replicas (`wait_replicas` > 0): Redis replicates asynchronously, so a promoted replica can miss
the last writes its primary acknowledged. Each flushed buffer is followed by one
`WAIT <replicas> <timeout>` on the same connection, and the buffer's replies are held until
it answers: a caller learns its script's result only once the script's writes are on that many
replicas. When fewer acknowledge in time, every call of the buffer fails with
`NotReplicated` (the scripts did run on the primary: a retry with the same Idempotency-Key
gets the same order, and waits for its replication again). One WAIT per buffer, not per call:
concurrent purchases share it.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import ssl
from collections import deque
from collections.abc import Callable
from typing import Any, cast
from urllib.parse import unquote, urlsplit

import hiredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

# A waiter of the connection's FIFO: the caller's future, or None for the WAIT that closes a
# buffer; and when it was sent.
_Waiter = tuple["asyncio.Future[Any] | None", float]


class NotReplicated(RedisTimeoutError):
    """The command ran on the primary, but fewer replicas than required acknowledged its
    writes within the wait: answered as 503 with Retry-After; retry with the same key."""


def _pack(args: tuple[Any, ...]) -> bytes:
    """RESP for one command, packed in C (str, bytes, int and float arguments)."""
    packed: bytes = hiredis.pack_command(cast(Any, args))
    return packed


def _reply_error(message: str) -> ResponseError:
    if message.startswith("NOSCRIPT"):
        return NoScriptError(message)
    return ResponseError(message)


class _Connection(asyncio.Protocol):
    """One TCP connection: calls in, replies out, strictly in order."""

    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self.wait = b""  # the packed WAIT that closes each buffer, once replicas are required
        self.wait_replicas = 0
        self.held: list[tuple[asyncio.Future[Any], Any]] = []  # replies waiting for their WAIT
        self.loop = asyncio.get_running_loop()
        self.reader = hiredis.Reader(encoding="utf-8", replyError=_reply_error)
        self.transport: asyncio.Transport | None = None
        self.waiters: deque[_Waiter] = deque()
        self.buffer: list[bytes] = []
        self.flush_scheduled = False
        self.timer: asyncio.TimerHandle | None = None
        self.closed = False
        self.writes = 0  # buffers written (fewer than calls when concurrent calls share one)

    # -- asyncio.Protocol ---------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses

    def data_received(self, data: bytes) -> None:
        self.reader.feed(data)
        waiters = self.waiters
        while True:
            try:
                reply = self.reader.gets()
            except hiredis.ProtocolError:
                self._fail(RedisConnectionError("Redis protocol error"))
                return
            if reply is False:
                return
            if not waiters:  # a reply nobody asked for: the stream is out of step
                self._fail(RedisConnectionError("unexpected reply from Redis"))
                return
            future, _ = waiters.popleft()
            if future is None:  # the WAIT that closes a buffer: release its replies
                self._release(reply)
            elif self.wait:
                self.held.append((future, reply))
            else:
                _resolve(future, reply)

    def _release(self, acked: Any) -> None:
        held, self.held = self.held, []
        if isinstance(acked, int) and acked >= self.wait_replicas:
            for future, reply in held:
                _resolve(future, reply)
            return
        exc = NotReplicated(f"{acked} of {self.wait_replicas} replicas acknowledged in time")
        for future, _ in held:
            if not future.done():
                future.set_exception(exc)

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(RedisConnectionError("Connection closed by server."))

    # -- calls --------------------------------------------------------------------------
    def call(self, packed: bytes) -> asyncio.Future[Any]:
        if self.closed:
            raise RedisConnectionError("Connection closed.")
        future = self.loop.create_future()
        self.buffer.append(packed)
        self.waiters.append((future, self.loop.time()))
        if not self.flush_scheduled:
            self.flush_scheduled = True
            self.loop.call_soon(self._flush)
        return future

    def _flush(self) -> None:
        self.flush_scheduled = False
        if self.closed:
            return
        if self.transport is None:
            self._fail(RedisConnectionError("Not connected."))
            return
        if self.wait:
            self.buffer.append(self.wait)
            self.waiters.append((None, self.loop.time()))
        self.transport.write(b"".join(self.buffer))
        self.buffer.clear()
        self.writes += 1
        if self.timer is None:
            self.timer = self.loop.call_later(self.timeout_s, self._check_stall)

    def _check_stall(self) -> None:
        """One timer per connection, not one per call: the oldest call in flight decides."""
        self.timer = None
        if not self.waiters or self.closed:
            return
        overdue = self.waiters[0][1] + self.timeout_s - self.loop.time()
        if overdue <= 0:
            self._fail(RedisTimeoutError("Timeout reading from Redis"))
        else:
            self.timer = self.loop.call_later(overdue, self._check_stall)

    def _fail(self, exc: Exception) -> None:
        was_closed, self.closed = self.closed, True
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        pending = [f for f, _ in self.held] + [f for f, _ in self.waiters if f is not None]
        self.held.clear()
        self.waiters.clear()
        for future in pending:
            if not future.done():
                future.set_exception(exc)
        self.buffer.clear()
        if self.transport is not None and not was_closed:
            self.transport.abort()


def _info_field(info: str, name: str) -> str:
    for line in info.splitlines():
        if line.startswith(name + ":"):
            return line.split(":", 1)[1].strip()
    return ""


def _connected_replicas(info: str) -> int:
    return int(_info_field(info, "connected_slaves") or 0)


def _resolve(future: asyncio.Future[Any], reply: Any) -> None:
    if future.done():  # its caller may have been cancelled
        return
    if isinstance(reply, ResponseError):
        future.set_exception(reply)
    else:
        future.set_result(reply)


class AutoPipeline:
    """`connections` multiplexed connections to one Redis server, used in turn.

    More than one keeps a slow reply (a big batch script) from holding up every request behind
    it; one event loop gains nothing from many more.
    """

    def __init__(
        self,
        host: str,
        port: int,
        *,
        db: int = 0,
        username: str | None = None,
        password: str | None = None,
        ssl_context: ssl.SSLContext | None = None,
        timeout_s: float = 2.0,
        connections: int = 2,
        wait_replicas: int | None = 0,
        wait_timeout_ms: int = 100,
    ) -> None:
        """`wait_replicas`: replicas that must acknowledge each buffer's writes before its
        replies are released (0: none; None: 1 when the server has a replica connected as this
        connection opens, else 0)."""
        self.host, self.port, self.db = host, port, db
        self.wait_replicas, self.wait_timeout_ms = wait_replicas, wait_timeout_ms
        self.username, self.password = username, password
        self.ssl_context = ssl_context
        self.timeout_s = timeout_s
        self._slots: list[_Connection | None] = [None] * max(1, connections)
        self._connecting: list[asyncio.Task[_Connection] | None] = [None] * len(self._slots)
        self._turn = itertools.cycle(range(len(self._slots)))
        # Told the primary's identity (INFO replication: master_replid) as each connection
        # opens, before it carries any call: core/failover.py pauses the sales on a new one.
        self.on_identity: Callable[[str], None] | None = None
        # Run before each call is sent, once its connection is open; may raise to refuse it
        # (the gateway's failover pause: a call that reconnected to a new primary is refused
        # by the identity check that connection just made). No round trip.
        self.gate: Callable[[], None] | None = None
        self._replicated: set[str] = set()  # primaries (master_replid) seen with a replica

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        timeout_s: float,
        connections: int,
        wait_replicas: int | None = 0,
        wait_timeout_ms: int = 100,
    ) -> AutoPipeline:
        """redis:// or rediss:// URLs (host, port, /db, user:password), as redis-py reads them."""
        parts = urlsplit(url)
        if parts.scheme not in ("redis", "rediss") or not parts.hostname:
            raise ValueError(f"auto-pipelining needs a redis:// or rediss:// URL, not {url!r}")
        path = parts.path.strip("/")
        return cls(
            parts.hostname,
            parts.port or 6379,
            db=int(path) if path else 0,
            username=unquote(parts.username) if parts.username else None,
            password=unquote(parts.password) if parts.password else None,
            ssl_context=ssl.create_default_context() if parts.scheme == "rediss" else None,
            timeout_s=timeout_s,
            connections=connections,
            wait_replicas=wait_replicas,
            wait_timeout_ms=wait_timeout_ms,
        )

    async def execute(self, *args: Any) -> Any:
        """One command; its reply decoded as redis-py does with decode_responses=True."""
        packed = _pack(args)
        i = next(self._turn)
        conn = self._slots[i]
        if conn is None or conn.closed:
            conn = await self._connect(i)
        if self.gate is not None:
            self.gate()
        return await conn.call(packed)

    async def _connect(self, i: int) -> _Connection:
        """Concurrent callers of a dead slot share one connection attempt."""
        task = self._connecting[i]
        if task is None:
            task = self._connecting[i] = asyncio.ensure_future(self._open())
            task.add_done_callback(lambda _: self._connecting.__setitem__(i, None))
        conn = await asyncio.shield(task)
        self._slots[i] = conn
        return conn

    async def _open(self) -> _Connection:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.timeout_s):
                _, conn = await loop.create_connection(
                    lambda: _Connection(self.timeout_s), self.host, self.port, ssl=self.ssl_context
                )
        except (OSError, TimeoutError) as exc:
            raise RedisConnectionError(f"Error connecting to Redis: {type(exc).__name__}") from None
        greeting = []
        if self.password is not None:
            auth = (self.username, self.password) if self.username else (self.password,)
            greeting.append(conn.call(_pack(("AUTH", *auth))))
        if self.db:
            greeting.append(conn.call(_pack(("SELECT", self.db))))
        try:
            await asyncio.gather(*greeting)
            replicas, info = self.wait_replicas, ""
            if replicas is None or self.on_identity is not None:
                info = str(await conn.call(_pack(("INFO", "replication"))))
            if replicas is None:  # auto: wait for one replica wherever the primary has one
                primary = _info_field(info, "master_replid")
                if _connected_replicas(info) > 0:
                    self._replicated.add(primary)
                # Sticky per primary: a reconnect to a primary that had a replica keeps
                # waiting for one even while its link is down (503s, never an unreplicated
                # 201); a new primary (a failover, a restart) decides afresh.
                replicas = 1 if primary in self._replicated else 0
            if self.on_identity is not None:  # before any caller's command goes out on it
                self.on_identity(_info_field(info, "master_replid"))
        except BaseException:  # refused AUTH, a lost connection: nothing half-open stays
            conn._fail(RedisConnectionError("Connection closed."))
            raise
        if replicas:
            conn.wait = _pack(("WAIT", replicas, self.wait_timeout_ms))
            conn.wait_replicas = replicas
        return conn

    @property
    def connections(self) -> list[_Connection]:
        """The open connections (for tests and diagnostics)."""
        return [c for c in self._slots if c is not None and not c.closed]

    async def warm_up(self) -> None:
        """Connect every slot now, not on the opening second's first purchases."""
        for i in range(len(self._slots)):
            await self._connect(i)

    async def aclose(self) -> None:
        for conn in self._slots:
            if conn is not None and not conn.closed:
                with contextlib.suppress(Exception):
                    conn._fail(RedisConnectionError("Connection closed."))
        self._slots = [None] * len(self._slots)


class PipelinedScript:
    """A Lua script run through an AutoPipeline, called like redis-py's AsyncScript:
    `await script(keys=[...], args=[...])`. EVALSHA; after a SCRIPT FLUSH (NOSCRIPT), EVAL of
    the source, which also puts it back in the server's cache."""

    def __init__(self, pipe: AutoPipeline, source: str) -> None:
        self.pipe = pipe
        self.script = source
        self.sha = hashlib.sha1(source.encode()).hexdigest()

    async def __call__(
        self, keys: list[Any] | tuple[Any, ...] = (), args: list[Any] | tuple[Any, ...] = ()
    ) -> Any:
        try:
            return await self.pipe.execute("EVALSHA", self.sha, len(keys), *keys, *args)
        except NoScriptError:
            return await self.pipe.execute("EVAL", self.script, len(keys), *keys, *args)
