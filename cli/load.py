"""The demo's buyers: a plan of purchase attempts, and the HTTP load that plays it.

A plan gives each buyer a few steps. Step 1 is a purchase with a fresh Idempotency-Key; later
steps either retry an earlier key with the same body (must get the same answer) or try again
with a new key (must be refused: the per-user limit, or sold out). Some buyers "double-click":
their first request goes out twice at once with the same key. Honest buyers each have their own
device and /24; when risk answers 428 they solve the challenge (risk/solver.py) and retry with
the same key.

A plan can also hold a bot farm (`BotFarm`): a few devices, each cycling through many user ids
from two /24s, rotating addresses inside them, firing with no pause through the opening. Bots
never solve challenges. They are interleaved with honest buyers at the head of the queue, so
they compete for the keys exactly while the sale is selling out.

`play()` runs one partition of the plan over a fixed set of keep-alive connections (one
per lane, cli/http1.py); the demo runs one partition per load process. Results are plain
tuples so they cross process boundaries.
"""

from __future__ import annotations

import asyncio
import math
import random
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, NamedTuple
from urllib.parse import urlsplit

import msgspec

from cli.http1 import Connection, ConnectionLost, build_request
from risk.solver import SOLUTION_HEADER, Unsolvable, solve

FIRST, RETRY, DOUBLE, SECOND, NET_RETRY = "first", "retry", "double", "second", "net_retry"
SOLVED = "solved"  # an honest buyer's retry of a 428 with the solved challenge (same key)
UNPLANNED = frozenset({NET_RETRY, SOLVED})  # extra requests on top of the plan's attempts
MAX_NET_RETRIES = 3  # a transport error or a 5xx is retried with the same Idempotency-Key
BOT_SUBNETS = ("203.0.113", "198.18.23")  # /24s outside risk/data/datacenter_sample.txt
BOT_ATTEMPTS_PER_USER = 2  # a first try, then a second one with a new key
BOT_USERS_PER_DEVICE = 125  # the farm's devices: ceil(users / this), at most MAX_BOT_DEVICES
MAX_BOT_DEVICES = 8


class Attempt(NamedTuple):
    user_id: str
    idem_key: str
    kind: str
    status: int  # 0: no answer (transport error)
    code: str  # problem `code`, "" on success
    order_id: str
    latency_ms: float
    done_at: float  # time.time()
    reasons: str = ""  # risk's reasons of a 403 or 428, comma-separated


# Each step is the keys sent concurrently, with their kinds.
Step = list[tuple[str, str]]


class Buyer(NamedTuple):
    user_id: str
    body: bytes
    steps: list[Step]
    bot: bool = False  # a bot never solves a challenge


@dataclass(frozen=True)
class BotFarm:
    users: int
    devices: int
    subnets: tuple[str, ...]  # CIDR text

    def describe(self) -> str:
        return f"{self.users} user ids on {self.devices} device(s) in {', '.join(self.subnets)}"


@dataclass(frozen=True)
class Plan:
    buyers: list[Buyer]
    farm: BotFarm | None = None

    @property
    def attempts(self) -> int:
        return sum(len(step) for b in self.buyers for step in b.steps)

    @property
    def honest(self) -> int:
        return sum(1 for b in self.buyers if not b.bot)

    @property
    def bot_users(self) -> frozenset[str]:
        return frozenset(b.user_id for b in self.buyers if b.bot)

    def partitions(self, n: int) -> list[list[Buyer]]:
        return [self.buyers[i::n] for i in range(n)]


def default_bots(attempts: int) -> int:
    """The farm's share of the attempts when not given: 10%."""
    return attempts // 10


def make_plan(
    buyers: int,
    attempts: int,
    *,
    bots: int = 0,
    double_click: float = 0.02,
    seed: int = 7,
    run: str | None = None,
) -> Plan:
    """Exactly `attempts` purchase attempts: `bots` of them from a bot farm, the rest spread
    over `buyers` distinct honest users."""
    if bots < 0:
        raise ValueError("bots must be >= 0")
    if attempts - bots < buyers:
        raise ValueError("attempts - bots must be >= buyers (every buyer tries at least once)")
    rng = random.Random(seed)
    run = run or uuid.uuid4().hex[:8]
    honest = _honest_buyers(buyers, attempts - bots, double_click, rng, run)
    rng.shuffle(honest)
    if not bots:
        return Plan(honest)
    farm, farm_buyers = _bot_farm(bots, run)
    # The farm fires through the opening: bots alternate with honest buyers at the head of the
    # queue, in the farm's own order (each device cycling through its users).
    out: list[Buyer] = []
    for i, bot in enumerate(farm_buyers):
        out.append(bot)
        if i < len(honest):
            out.append(honest[i])
    out.extend(honest[len(farm_buyers) :])
    return Plan(out, farm)


def _honest_buyers(
    buyers: int, attempts: int, double_click: float, rng: random.Random, run: str
) -> list[Buyer]:
    counts = [attempts // buyers + (1 if i < attempts % buyers else 0) for i in range(buyers)]
    rng.shuffle(counts)
    out: list[Buyer] = []
    for i, n in enumerate(counts):
        user = f"buyer-{run}-{i:06d}"
        # Honest buyers: a subnet each (CGNAT space 100.64.0.0/10 holds 16,384 /24s), so the
        # risk engine's subnet and IP rules see people, not a farm.
        ip = f"100.{64 + (i >> 8) % 64}.{i & 255}.{1 + i % 254}"
        body = msgspec.json.encode(
            {
                "user_id": user,
                "client_ip": ip,
                "device_id": f"dev-{i}",
                "user_agent": "flashgate-demo/1",
            }
        )
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
        out.append(Buyer(user, body, steps))
    return out


def _bot_farm(attempts: int, run: str) -> tuple[BotFarm, list[Buyer]]:
    """`attempts` attempts from ceil(attempts / 2) user ids: a first try and a second try with a
    new key each, on a few devices that rotate addresses inside two /24s. In firing order:
    user j runs on device j % devices, so every device cycles through its users."""
    users = math.ceil(attempts / BOT_ATTEMPTS_PER_USER)
    devices = max(1, min(MAX_BOT_DEVICES, math.ceil(users / BOT_USERS_PER_DEVICE)))
    out: list[Buyer] = []
    left = attempts
    for j in range(users):
        device = j % devices
        subnet = BOT_SUBNETS[device % len(BOT_SUBNETS)]
        ip = f"{subnet}.{1 + (j * 37 + device) % 254}"
        user = f"farm-{run}-{j:06d}"
        body = msgspec.json.encode(
            {
                "user_id": user,
                "client_ip": ip,
                "device_id": f"farm-{run}-dev-{device}",
                "user_agent": "Mozilla/5.0 (farm)",
            }
        )
        n = min(BOT_ATTEMPTS_PER_USER, left)
        left -= n
        steps: list[Step] = [[(f"{user}-k{k + 1}", FIRST if k == 0 else SECOND)] for k in range(n)]
        out.append(Buyer(user, body, steps, bot=True))
    farm = BotFarm(
        users=users, devices=devices, subnets=tuple(f"{s}.0/24" for s in BOT_SUBNETS[:devices])
    )
    return farm, out


class _Lane:
    """One connection, one buyer at a time: the buyer's steps in order."""

    def __init__(
        self, host: str, port: int, sale_id: str, api_key: str, out: list[Attempt]
    ) -> None:
        self.host, self.port, self.out = host, port, out
        self.path = f"/v1/sales/{sale_id}/purchase"
        self.auth = f"Bearer {api_key}"
        self.conns = [Connection(host, port)]  # more only for a double click

    async def warm_up(self) -> None:
        raw = build_request("GET", f"{self.host}:{self.port}", "/healthz", {})
        await self.conns[0].request(raw)

    async def buyer(self, b: Buyer) -> None:
        for step in b.steps:
            while len(self.conns) < len(step):
                self.conns.append(Connection(self.host, self.port))
            await asyncio.gather(
                *(
                    self._purchase(conn, b, key, kind)
                    for conn, (key, kind) in zip(self.conns, step, strict=False)
                )
            )

    async def _purchase(self, conn: Connection, b: Buyer, key: str, kind: str) -> None:
        challenge = await self._send(conn, b.user_id, b.body, key, kind)
        if challenge is None or b.bot:
            return
        try:  # CPU-bound (SHA-256 search): off the event loop
            solution = await asyncio.to_thread(solve, challenge)
        except (Unsolvable, ValueError, KeyError, TypeError):
            return
        await self._send(conn, b.user_id, b.body, key, SOLVED, {SOLUTION_HEADER: solution})

    async def _send(
        self,
        conn: Connection,
        user: str,
        body: bytes,
        key: str,
        kind: str,
        extra: dict[str, str] | None = None,
    ) -> dict[str, Any] | None:
        """One purchase, retried on transport errors and 5xx; the challenge of a 428."""
        raw = build_request(
            "POST",
            f"{self.host}:{self.port}",
            self.path,
            {
                "Authorization": self.auth,
                "Content-Type": "application/json",
                "Idempotency-Key": key,
                **(extra or {}),
            },
            body,
        )
        challenge: Any = None
        for attempt in range(MAX_NET_RETRIES + 1):
            t0 = time.perf_counter()
            try:
                status, payload = await conn.request(raw)
            except (OSError, ConnectionLost, TimeoutError):
                status, payload = 0, b""
            latency = (time.perf_counter() - t0) * 1000
            order_id = code = reasons = ""
            if payload:
                try:
                    doc = msgspec.json.decode(payload)
                    order_id = doc.get("order_id", "") if status < 300 else ""
                    code = doc.get("code", "") if status >= 400 else ""
                    reasons = ",".join(doc.get("reasons") or ()) if status >= 400 else ""
                    challenge = doc.get("challenge") if status == 428 else None
                except (msgspec.DecodeError, AttributeError, TypeError):
                    code = "undecodable"
            self.out.append(
                Attempt(
                    user,
                    key,
                    kind if attempt == 0 else NET_RETRY,
                    status,
                    code,
                    order_id,
                    latency,
                    time.time(),
                    reasons,
                )
            )
            if status != 0 and status < 500:
                return challenge if isinstance(challenge, dict) else None
        return None

    def close(self) -> None:
        for conn in self.conns:
            conn.close()


async def play(
    base_url: str,
    sale_id: str,
    api_key: str,
    buyers: list[Buyer],
    opens_at: float,
    concurrency: int,
) -> list[Attempt]:
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
            for buyer in queue:
                await lane.buyer(buyer)

        await asyncio.gather(*(run(lane) for lane in lanes))
    finally:
        for lane in lanes:
            lane.close()
    return out


def play_in_process(
    base_url: str,
    sale_id: str,
    api_key: str,
    buyers: list[Buyer],
    opens_at: float,
    concurrency: int,
) -> list[tuple[object, ...]]:
    """Entry point of a load process (ProcessPoolExecutor): its own uvloop event loop."""
    import uvloop

    result = uvloop.run(play(base_url, sale_id, api_key, buyers, opens_at, concurrency))
    return [tuple(a) for a in result]
