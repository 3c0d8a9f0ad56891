"""Stock buckets: one hot sale's stock split over N ledgers on (usually) different Redis nodes.

A sale created with `stock_buckets` N > 1 has one ledger per bucket (core/ids.py shard ids,
core/keys.py hash tags `{s:<sale>}` and `{s:<sale>:b<b>}`). Each ledger balances on its own:
available + reserved + confirmed + delivered = total. Stock moves between buckets only by
transfers, so the sale never sells more than it has: sum of the buckets' totals <= imported.

- A buyer's home bucket (core.ids.home_bucket) holds their count and Idempotency-Keys, so the
  per-user limit and replays are decided in one script, as in a one-bucket sale.
- Imports are spread over the buckets (Ledger.add_stock, idempotent per import and bucket).
- A home bucket short of stock answers BUCKET_SHORT; `refill` then moves units in from the
  bucket with the most (a transfer), or proves the whole sale empty and marks every bucket
  drained for DRAINED_FOR_MS, so that later buyers hear sold_out from their home bucket in
  one round trip without anyone searching the other buckets.
- A transfer is three one-slot scripts: withdraw.lua (donor: units leave `available`/`total`
  for `transit`, recorded under the transfer id), deposit.lua (recipient: idempotent by id),
  settle.lua (donor: record dropped, `transit` down). A crash between them strands units in
  transit, never sells them twice; `recover` (run by every worker's sweeper) finishes what it
  finds pending.

"Sold out" is proven by a double collect: every bucket's (available, transit, restocks) read
twice in a row, all empty and unchanged. `restocks` counts the events that add units to a
bucket (import, release, deposit), and a withdrawal only moves units from `available` to
`transit` of the same bucket; so if no bucket saw such an event between its two reads and all
were empty at both, there was an instant at which the sale had no unit anywhere.
"""

from __future__ import annotations

import asyncio
import enum
import logging
from dataclasses import dataclass
from typing import Any, cast

from redis.asyncio import Redis

from core.ids import shard_id, ulid
from core.keys import Keys
from core.scripts import ReturnCode, Scripts

log = logging.getLogger(__name__)

DRAINED_FOR_MS = 1000  # how long a proven-empty sale answers sold_out without searching again
REFILL_ROUNDS = 32  # searches of one purchase before it gives up (503, retry with its key)
TRANSIT_WAIT_S = 0.002  # units are in transit between buckets: they land within a round trip
RECOVER_AFTER_MS = 2000  # a transfer pending this long is finished by the recovery pass


class Refill(enum.Enum):
    MOVED = "moved"  # the home bucket may now have the units: reserve there again
    EMPTY = "empty"  # the sale was proven to have no available unit: sold out
    SHORT = "short"  # all that is left sits in the home bucket, fewer than wanted
    GAVE_UP = "gave_up"  # REFILL_ROUNDS searches lost every race for units


@dataclass(frozen=True, slots=True)
class BucketView:
    available: int
    transit: int
    restocks: int


class StockBuckets:
    """Bucket counts (learned once per sale: they never change), transfers and refills."""

    def __init__(self, redis: Redis, keys: Keys, scripts: Scripts) -> None:
        self.redis = redis
        self.keys = keys
        self.scripts = scripts
        self._counts: dict[str, int] = {}

    # -- bucket counts ------------------------------------------------------------------------
    def known(self, sale_id: str) -> int:
        """The sale's bucket count as far as this process knows (1 until told otherwise: the
        scripts answer WRONG_BUCKETS to a caller that routed by the wrong count)."""
        return self._counts.get(sale_id, 1)

    def learn(self, sale_id: str, buckets: int) -> None:
        """Remember an existing sale's count (fixed at creation, so never stale)."""
        self._counts[sale_id] = buckets

    async def count(self, sale_id: str) -> int | None:
        """The sale's bucket count, read from bucket 0 if not known yet; None: no such sale."""
        n = self._counts.get(sale_id)
        if n is not None:
            return n
        start, buckets = await self.redis.hmget(self.keys.sale(sale_id), ["start", "buckets"])
        if start is None:
            return None
        self.learn(sale_id, int(buckets or 1))
        return int(buckets or 1)

    async def shards(self, sale_id: str) -> list[str]:
        """The ledger shards of a sale (just the sale id for one bucket or an unknown sale)."""
        n = await self.count(sale_id) or 1
        return [shard_id(sale_id, b) for b in range(n)]

    # -- reading --------------------------------------------------------------------------------
    async def views(self, sale_id: str, buckets: int) -> list[BucketView]:
        """Every bucket's available, transit and restocks: one pipeline (on a cluster, one
        request per node, in parallel)."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for b in range(buckets):
                pipe.hmget(
                    self.keys.sale(shard_id(sale_id, b)), ["available", "transit", "restocks"]
                )
            rows = cast(list[list[Any]], await pipe.execute())
        return [BucketView(*(int(v or 0) for v in row)) for row in rows]

    # -- transfers ------------------------------------------------------------------------------
    async def transfer(self, sale_id: str, donor: int, recipient: int, units: int, now: int) -> int:
        """Move up to `units` available units from bucket `donor` to `recipient`; returns how
        many moved (0: the donor had none left)."""
        transfer_id = f"{recipient}.{ulid(now)}"
        code, moved = await self.withdraw(sale_id, donor, recipient, transfer_id, units, now)
        if code not in (ReturnCode.OK, ReturnCode.REPLAYED) or not moved:
            return 0
        await self.finish(sale_id, donor, transfer_id, recipient, moved)
        return moved

    async def withdraw(
        self, sale_id: str, donor: int, recipient: int, transfer_id: str, units: int, now: int
    ) -> tuple[ReturnCode, int]:
        """Step 1 alone (the tests use it to play a crash right after it)."""
        k, shard = self.keys, shard_id(sale_id, donor)
        code, moved = await self.scripts.withdraw(
            keys=[k.sale(shard), k.transfers(shard), k.transfer_ids(shard)],
            args=[transfer_id, recipient, units, now],
        )
        return ReturnCode(code), int(moved)

    async def finish(
        self, sale_id: str, donor: int, transfer_id: str, recipient: int, units: int
    ) -> None:
        """Steps 2 and 3: deposit (idempotent by id), then settle the donor's record."""
        k = self.keys
        to, frm = shard_id(sale_id, recipient), shard_id(sale_id, donor)
        code = ReturnCode(
            await self.scripts.deposit(keys=[k.sale(to), k.deposits(to)], args=[transfer_id, units])
        )
        if code not in (ReturnCode.OK, ReturnCode.REPLAYED):
            raise RuntimeError(
                f"sale {sale_id}: deposit into bucket {recipient} refused "
                f"({code.name}); transfer {transfer_id} left pending"
            )
        await self.scripts.settle(keys=[k.sale(frm), k.transfers(frm)], args=[transfer_id])

    async def recover(
        self,
        sale_id: str,
        now: int,
        older_than_ms: int = RECOVER_AFTER_MS,
    ) -> int:
        """Finish every transfer of the sale withdrawn more than `older_than_ms` ago and still
        pending (a crash between the steps); returns how many. Safe beside live transfers and
        other recovery passes: every step is idempotent."""
        n = await self.count(sale_id) or 1
        finished = 0
        if n == 1:
            return 0
        for donor in range(n):
            pending = cast(
                dict[str, str],
                await self.redis.hgetall(self.keys.transfers(shard_id(sale_id, donor))),
            )
            for transfer_id, record in pending.items():
                recipient, units, at = (int(v) for v in record.split("|"))
                if now - at < older_than_ms:
                    continue
                await self.finish(sale_id, donor, transfer_id, recipient, units)
                log.info(
                    "sale %s: finished transfer %s (%d units, bucket %d -> %d)",
                    sale_id,
                    transfer_id,
                    units,
                    donor,
                    recipient,
                )
                finished += 1
        return finished

    # -- a home bucket short of stock -------------------------------------------------------------
    async def refill(self, sale_id: str, buckets: int, home: int, want: int, now: int) -> Refill:
        """Get `want` units (the quantity asked for) into the home bucket, or prove that the
        sale can't supply them."""
        for _ in range(REFILL_ROUNDS):
            seen = await self.views(sale_id, buckets)
            have = seen[home].available
            if have >= want:
                return Refill.MOVED  # someone brought units in meanwhile
            donors = [b for b in range(buckets) if b != home and seen[b].available > 0]
            if donors:
                # From the fullest bucket, half of what it has (at least what is missing), so
                # that a bucket running dry doesn't come back for every unit.
                donor = max(donors, key=lambda b: seen[b].available)
                units = max(want - have, seen[donor].available // 2)
                if await self.transfer(sale_id, donor, home, units, now):
                    return Refill.MOVED
                continue  # the donor emptied meanwhile: look again
            if any(v.transit for v in seen):
                await asyncio.sleep(TRANSIT_WAIT_S)  # units in flight land within a round trip
                continue
            if await self.views(sale_id, buckets) != seen:
                continue  # something moved between the reads: not proven, look again
            if have == 0:
                await self.mark_drained(sale_id, seen, now)
                return Refill.EMPTY
            return Refill.SHORT
        log.warning(
            "sale %s: gave up refilling bucket %d after %d rounds", sale_id, home, REFILL_ROUNDS
        )
        return Refill.GAVE_UP

    async def mark_drained(self, sale_id: str, seen: list[BucketView], now: int) -> None:
        until = now + DRAINED_FOR_MS
        await asyncio.gather(
            *[
                self.scripts.mark_drained(
                    keys=[self.keys.sale(shard_id(sale_id, b))], args=[view.restocks, until]
                )
                for b, view in enumerate(seen)
            ]
        )

    async def undrain(self, sale_id: str) -> None:
        """Clear every bucket's drained mark (after units came back in one bucket: its buyers
        see them at once; this lets the other buckets' buyers search for them too)."""
        n = await self.count(sale_id) or 1
        if n == 1:
            return
        async with self.redis.pipeline(transaction=False) as pipe:
            for b in range(n):
                pipe.hdel(self.keys.sale(shard_id(sale_id, b)), "drained_until")
            await pipe.execute()
