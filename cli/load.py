"""The demo's buyers: a plan of purchase attempts, and the HTTP load that plays it.

A plan gives each buyer a few steps. Step 1 is a purchase with a fresh Idempotency-Key; later
steps either retry an earlier key with the same body (must get the same answer) or try again
with a new key (must be refused: the per-user limit, or sold out). Some buyers "double-click":
their first request goes out twice at once with the same key.

`play()` runs one partition of the plan over a fixed set of keep-alive connections (one
per lane, cli/http1.py); the demo runs one partition per load process. Results are plain
tuples so they cross process boundaries.
"""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import NamedTuple
from urllib.parse import urlsplit

import msgspec

from cli.http1 import Connection, ConnectionLost, build_request

FIRST, RETRY, DOUBLE, SECOND, NET_RETRY = "first", "retry", "double", "second", "net_retry"
MAX_NET_RETRIES = 3  # a transport error or a 5xx is retried with the same Idempotency-Key


class Attempt(NamedTuple):
    user_id: str
    idem_key: str
    kind: str
    status: int  # 0: no answer (transport error)
    code: str  # problem `code`, "" on success
    order_id: str
    latency_ms: float
    done_at: float  # time.time()


# A buyer: (user_id, body, steps); each step is the keys sent concurrently, with their kinds.
Step = list[tuple[str, str]]
Buyer = tuple[str, bytes, list[Step]]


@dataclass(frozen=True)
class Plan:
    buyers: list[Buyer]

    @property
    def attempts(self) -> int:
        return sum(len(step) for _, _, steps in self.buyers for step in steps)

    def partitions(self, n: int) -> list[list[Buyer]]:
        return [self.buyers[i::n] for i in range(n)]


def make_plan(buyers: int, attempts: int, *, double_click: float = 0.02, seed: int = 7,
              run: str | None = None) -> Plan:
    """Exactly `attempts` purchase attempts spread over `buyers` distinct users."""
    if attempts < buyers:
        raise ValueError("attempts must be >= buyers (every buyer tries at least once)")
    rng = random.Random(seed)
    run = run or uuid.uuid4().hex[:8]
    counts = [attempts // buyers + (1 if i < attempts % buyers else 0) for i in range(buyers)]
    rng.shuffle(counts)
    out: list[Buyer] = []
    for i, n in enumerate(counts):
        user = f"buyer-{run}-{i:06d}"
        # Honest buyers: a subnet each (CGNAT space 100.64.0.0/10 holds 16,384 /24s), so the
        # risk engine's subnet and IP rules see people, not a farm.
        ip = f"100.{64 + (i >> 8) % 64}.{i & 255}.{1 + i % 254}"
        body = msgspec.json.encode({"user_id": user, "client_ip": ip, "device_id": f"dev-{i}",
                                    "user_agent": "flashgate-demo/1"})
        keys = [f"{user}-k1"]
        steps: list[Step] = []
        if n >= 2 and rng.random() < double_click:
            steps.append([(keys[0], FIRST), (keys[0], DOUBLE)])
            n -= 2
        else:
            steps.append([(keys[0], FIRST)])
            n -= 1
        for _ in range(n):
            if rng.random() < 0.5:
                steps.append([(rng.choice(keys), RETRY)])
            else:
                keys.append(f"{user}-k{len(keys) + 1}")
                steps.append([(keys[-1], SECOND)])
        out.append((user, body, steps))
    rng.shuffle(out)
    return Plan(out)


class _Lane:
    """One connection, one buyer at a time: the buyer's steps in order."""

    def __init__(self, host: str, port: int, sale_id: str, api_key: str,
                 out: list[Attempt]) -> None:
        self.host, self.port, self.out = host, port, out
        self.path = f"/v1/sales/{sale_id}/purchase"
        self.auth = f"Bearer {api_key}"
        self.conns = [Connection(host, port)]  # more only for a double click

    async def warm_up(self) -> None:
        raw = build_request("GET", f"{self.host}:{self.port}", "/healthz", {})
        await self.conns[0].request(raw)

    async def buyer(self, user: str, body: bytes, steps: list[Step]) -> None:
        for step in steps:
            while len(self.conns) < len(step):
                self.conns.append(Connection(self.host, self.port))
            await asyncio.gather(*(self._purchase(conn, user, body, key, kind)
                                   for conn, (key, kind) in zip(self.conns, step, strict=False)))

    async def _purchase(self, conn: Connection, user: str, body: bytes, key: str,
                        kind: str) -> None:
        raw = build_request("POST", f"{self.host}:{self.port}", self.path, {
            "Authorization": self.auth, "Content-Type": "application/json",
            "Idempotency-Key": key}, body)
        for attempt in range(MAX_NET_RETRIES + 1):
            t0 = time.perf_counter()
            try:
                status, payload = await conn.request(raw)
            except (OSError, ConnectionLost, TimeoutError):
                status, payload = 0, b""
            latency = (time.perf_counter() - t0) * 1000
            order_id = code = ""
            if payload:
                try:
                    doc = msgspec.json.decode(payload)
                    order_id = doc.get("order_id", "") if status < 300 else ""
                    code = doc.get("code", "") if status >= 400 else ""
                except (msgspec.DecodeError, AttributeError):
                    code = "undecodable"
            self.out.append(Attempt(user, key, kind if attempt == 0 else NET_RETRY, status, code,
                                    order_id, latency, time.time()))
            if status != 0 and status < 500:
                return

    def close(self) -> None:
        for conn in self.conns:
            conn.close()


async def play(base_url: str, sale_id: str, api_key: str, buyers: list[Buyer],
               opens_at: float, concurrency: int) -> list[Attempt]:
    """Open `concurrency` connections, wait for the opening second, then play every buyer's
    steps, `concurrency` buyers at a time."""
    url = urlsplit(base_url)
    host, port = url.hostname or "127.0.0.1", url.port or 80
    out: list[Attempt] = []
    lanes = [_Lane(host, port, sale_id, api_key, out) for _ in range(concurrency)]
    try:
        await asyncio.gather(*(lane.warm_up() for lane in lanes))
        await asyncio.sleep(max(0.0, opens_at - time.time()))
        queue: Iterator[Buyer] = iter(buyers)

        async def run(lane: _Lane) -> None:
            for user, body, steps in queue:
                await lane.buyer(user, body, steps)

        await asyncio.gather(*(run(lane) for lane in lanes))
    finally:
        for lane in lanes:
            lane.close()
    return out


def play_in_process(base_url: str, sale_id: str, api_key: str, buyers: list[Buyer],
                    opens_at: float, concurrency: int) -> list[tuple[object, ...]]:
    """Entry point of a load process (ProcessPoolExecutor): its own uvloop event loop."""
    import uvloop

    result = uvloop.run(play(base_url, sale_id, api_key, buyers, opens_at, concurrency))
    return [tuple(a) for a in result]
