"""The demo's buyers: a plan of purchase attempts, and the HTTP load that plays it.

A plan gives each buyer a few steps. Step 1 is a purchase with a fresh Idempotency-Key; later
steps either retry an earlier key with the same body (must get the same answer) or try again
with a new key (must be refused: the per-user limit, or sold out). Some buyers "double-click":
their first request goes out twice at once with the same key.

`play()` runs one partition of the plan over one bounded httpx connection pool; the demo runs
one partition per load process. Results are plain tuples so they cross process boundaries.
"""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import NamedTuple

import httpx
import msgspec

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
        ip = f"198.{18 + (i >> 16) % 2}.{(i >> 8) & 255}.{i & 255}"  # RFC 2544 benchmark range
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


async def _purchase(client: httpx.AsyncClient, path: str, user: str, body: bytes, key: str,
                    kind: str, out: list[Attempt]) -> None:
    for attempt in range(MAX_NET_RETRIES + 1):
        t0 = time.perf_counter()
        try:
            r = await client.post(path, content=body, headers={"Idempotency-Key": key})
            status, payload = r.status_code, r.content
        except httpx.HTTPError:
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
        out.append(Attempt(user, key, kind if attempt == 0 else NET_RETRY, status, code,
                           order_id, latency, time.time()))
        if status != 0 and status < 500:
            return


async def play(base_url: str, sale_id: str, api_key: str, buyers: list[Buyer],
               opens_at: float, concurrency: int) -> list[Attempt]:
    """Warm the connection pool, wait for the opening second, then play every buyer's steps,
    `concurrency` buyers at a time."""
    out: list[Attempt] = []
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    headers = {"Authorization": f"Bearer {api_key}", "Content-Type": "application/json"}
    path = f"/v1/sales/{sale_id}/purchase"
    async with httpx.AsyncClient(base_url=base_url, limits=limits, headers=headers,
                                 timeout=httpx.Timeout(30.0, pool=None)) as client:
        await asyncio.gather(*(client.get("/healthz") for _ in range(concurrency)))
        await asyncio.sleep(max(0.0, opens_at - time.time()))
        queue: Iterator[Buyer] = iter(buyers)

        async def lane() -> None:
            for user, body, steps in queue:
                for step in steps:
                    await asyncio.gather(*(
                        _purchase(client, path, user, body, key, kind, out)
                        for key, kind in step))

        await asyncio.gather(*(lane() for _ in range(concurrency)))
    return out


def play_in_process(base_url: str, sale_id: str, api_key: str, buyers: list[Buyer],
                    opens_at: float, concurrency: int) -> list[tuple[object, ...]]:
    """Entry point of a load process (ProcessPoolExecutor): its own uvloop event loop."""
    import uvloop

    result = uvloop.run(play(base_url, sale_id, api_key, buyers, opens_at, concurrency))
    return [tuple(a) for a in result]
