"""core/autopipeline.py against a real Redis: replies in order under concurrency, shared
writes, script cache flushes, error replies, lost and stalled connections, AUTH and SELECT."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from collections.abc import AsyncIterator
from urllib.parse import urlsplit

import hiredis
import pytest
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from core.autopipeline import AutoPipeline, PipelinedScript
from core.runtime import Runtime
from core.settings import Settings

ECHO = "return {ARGV[1], redis.call('INCR', KEYS[1])}"


@pytest.fixture
async def pipe(settings: Settings) -> AsyncIterator[AutoPipeline]:
    p = AutoPipeline.from_url(settings.redis_url, timeout_s=2.0, connections=2)
    yield p
    await p.aclose()


def key(settings: Settings, name: str) -> str:
    return f"{settings.key_prefix}:{{ap}}:{name}:{secrets.token_hex(4)}"


async def test_concurrent_calls_get_their_own_replies_and_share_writes(
    pipe: AutoPipeline, settings: Settings, redis: Redis
) -> None:
    script = PipelinedScript(pipe, ECHO)
    counter = key(settings, "n")
    replies = await asyncio.gather(
        *(script(keys=[counter], args=[f"req-{i}"]) for i in range(3000))
    )
    assert [r[0] for r in replies] == [f"req-{i}" for i in range(3000)]
    assert sorted(r[1] for r in replies) == list(range(1, 3001))  # each ran exactly once
    assert int(await redis.get(counter)) == 3000
    writes = sum(c.writes for c in pipe.connections)
    assert writes < 3000 / 10, writes  # calls made in one event-loop turn went out together
    await redis.delete(counter)


async def test_script_survives_a_flushed_script_cache(
    pipe: AutoPipeline, settings: Settings, redis: Redis, runtime: Runtime
) -> None:
    script = PipelinedScript(pipe, ECHO + " -- flush " + secrets.token_hex(4))
    counter = key(settings, "f")
    await redis.script_flush()
    assert await redis.script_exists(script.sha) == [False]
    results = await asyncio.gather(*(script(keys=[counter], args=["x"]) for _ in range(50)))
    assert sorted(r[1] for r in results) == list(range(1, 51))
    assert await redis.script_exists(script.sha) == [True]  # EVAL put it back
    await redis.delete(counter)
    await runtime.ledger.scripts.load(runtime.redis)  # as readiness would, for later tests


async def test_an_error_reply_fails_only_its_own_call(
    pipe: AutoPipeline, settings: Settings
) -> None:
    bad = PipelinedScript(pipe, "return redis.error_reply('BOOM no such thing')")
    good = PipelinedScript(pipe, ECHO)
    counter = key(settings, "e")
    results = await asyncio.gather(
        *(bad() if i % 3 == 0 else good(keys=[counter], args=[str(i)]) for i in range(30)),
        return_exceptions=True,
    )
    for i, result in enumerate(results):
        if i % 3 == 0:
            assert isinstance(result, ResponseError) and "BOOM" in str(result)
        else:
            assert isinstance(result, list) and result[0] == str(i)
    assert await pipe.execute("DEL", counter) == 1


async def test_a_killed_connection_fails_calls_in_flight_then_reconnects(
    pipe: AutoPipeline, settings: Settings, redis: Redis
) -> None:
    await pipe.warm_up()
    name = "ap-" + secrets.token_hex(4)
    # Name both connections, to kill exactly these.
    await asyncio.gather(
        *(c.call(hiredis.pack_command(("CLIENT", "SETNAME", name))) for c in pipe.connections)
    )
    blocked = asyncio.gather(
        *(pipe.execute("BLPOP", key(settings, "never"), 5) for _ in range(4)),
        return_exceptions=True,
    )
    await asyncio.sleep(0.1)
    clients = await redis.client_list()
    ids = [c["id"] for c in clients if c.get("name") == name]
    assert len(ids) == 2
    for client_id in ids:
        await redis.client_kill_filter(_id=client_id)
    results = await asyncio.wait_for(blocked, 2)
    assert all(isinstance(r, RedisConnectionError) for r in results), results
    assert await pipe.execute("PING") == "PONG"  # the slots reconnect on their next call
    assert await pipe.execute("PING") == "PONG"


class PausableProxy:
    """A TCP proxy to Redis that can stop forwarding (a stalled network, not a dropped one)."""

    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        self.flowing = asyncio.Event()
        self.flowing.set()
        self.server: asyncio.Server | None = None
        self.tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return int(self.server.sockets[0].getsockname()[1])

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(*self.target)

        async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError, asyncio.CancelledError):
                while data := await src.read(65536):
                    await self.flowing.wait()
                    dst.write(data)
                    await dst.drain()
            dst.close()

        for t in (pump(reader, up_writer), pump(up_reader, writer)):
            task = asyncio.ensure_future(t)
            self.tasks.add(task)

    async def close(self) -> None:
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        if self.server is not None:
            self.server.close()


async def test_a_stalled_connection_times_out_instead_of_hanging(settings: Settings) -> None:
    parts = urlsplit(settings.redis_url)
    proxy = PausableProxy(parts.hostname or "127.0.0.1", parts.port or 6379)
    port = await proxy.start()
    pipe = AutoPipeline("127.0.0.1", port, timeout_s=0.3, connections=1)
    try:
        assert await pipe.execute("PING") == "PONG"
        proxy.flowing.clear()
        loop = asyncio.get_running_loop()
        started = loop.time()
        results = await asyncio.gather(
            *(pipe.execute("PING") for _ in range(20)), return_exceptions=True
        )
        waited = loop.time() - started
        assert all(isinstance(r, RedisTimeoutError) for r in results), results
        assert 0.25 <= waited < 1.5, waited
        proxy.flowing.set()
        assert await pipe.execute("PING") == "PONG"  # a new connection, in step again
    finally:
        await pipe.aclose()
        await proxy.close()


async def test_unreachable_server_is_a_connection_error() -> None:
    pipe = AutoPipeline("127.0.0.1", 1, timeout_s=0.5, connections=1)
    with pytest.raises(RedisConnectionError):
        await pipe.execute("PING")
    await pipe.aclose()


async def test_auth_and_database_from_the_url(settings: Settings, redis: Redis) -> None:
    user, password = "ap-" + secrets.token_hex(4), secrets.token_hex(12)
    await redis.acl_setuser(
        user, enabled=True, passwords=[f"+{password}"], commands=["+@all"], keys=["*"]
    )
    parts = urlsplit(settings.redis_url)
    url = f"redis://{user}:{password}@{parts.hostname}:{parts.port}/3"
    pipe = AutoPipeline.from_url(url, timeout_s=2.0, connections=1)
    try:
        probe = key(settings, "db")
        assert await pipe.execute("SET", probe, "in-3") == "OK"
        assert f"user={user}" in await pipe.execute("CLIENT", "INFO")
        assert await redis.get(probe) is None  # not in the test client's database
        assert await pipe.execute("GET", probe) == "in-3"
        await pipe.execute("DEL", probe)
        wrong = AutoPipeline.from_url(url.replace(password, "wrong"), timeout_s=2.0, connections=1)
        with pytest.raises(ResponseError):
            await wrong.execute("PING")
        await wrong.aclose()
    finally:
        await pipe.aclose()
        await redis.acl_deluser(user)
