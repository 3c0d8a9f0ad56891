"""One sale's event stream, consumed by one worker through the shared consumer group.

A sale of several stock buckets has one stream per bucket (its ledger shard, core/keys.py):
each gets consumers of its own; PostgreSQL sees one sale (orders and card keys per sale).

Each step reads one batch with one XREADGROUP on one stream (so it works on Redis Cluster):
first this consumer's own pending entries (id cursor from "0"), after a start or a failure,
then new ones (">"). A batch is written in one PostgreSQL transaction, its delivered orders
are flipped in Redis, its refund requests settled (core/refunds.py: PostgreSQL decides, then
the ledger), and only then is it acked. Entries of dead consumers are taken over
with XAUTOCLAIM; an entry delivered too often is dead-lettered, never dropped.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from redis.exceptions import ResponseError

from core.keys import WORKER_GROUP
from core.ledger import from_ms, now_ms
from core.refunds import RefundTarget, settle
from core.runtime import Runtime
from workers import metrics as worker_metrics
from workers.deadletter import DeadLetter, dead_letter
from workers.events import (
    REFUND_REQUESTED,
    MalformedEvent,
    OrderEvent,
    fold,
    parse_event,
)
from workers.persist import BatchOutcome, persist_batch

log = logging.getLogger(__name__)

Entry = tuple[str, dict[str, str]]
AfterCommit = Callable[[str, BatchOutcome], Awaitable[None]]
"""Test hook: called after a batch's commit and before its ack (a crash there changes nothing)."""

NEW = ">"
BUSY_S = 1.0  # a consumer that handled new entries this recently lingers on a partial read
TOO_MANY_DELIVERIES = "delivered too many times"


class SaleConsumer:
    def __init__(
        self,
        rt: Runtime,
        sale_id: str,
        consumer: str,
        after_commit: AfterCommit | None = None,
        shard: str | None = None,
    ) -> None:
        """`shard`: the stock bucket's ledger shard whose stream this reads (default: the
        sale's, i.e. bucket 0)."""
        self.rt = rt
        self.sale_id = sale_id
        self.shard = shard or sale_id
        self.consumer = consumer
        self.after_commit = after_commit
        self.stream = rt.keys.events(self.shard)
        self.cursor = "0"  # own pending entries first; NEW once they are all handled
        self._last_batch_at = float("-inf")  # when this consumer last handled new entries

    async def ensure_group(self) -> None:
        try:
            await self.rt.redis.xgroup_create(self.stream, WORKER_GROUP, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    def restart_from_pending(self) -> None:
        """After a failure: the entries of the failed batch are still ours; read them again."""
        self.cursor = "0"

    # -- reading ----------------------------------------------------------------------------
    async def step(self, block_ms: int | None) -> int:
        """Read and handle one batch; returns how many entries were read (0 = nothing new)."""
        size = self.rt.settings.worker_batch_size
        if self.cursor != NEW:
            entries = await self._read(self.cursor, size, None)
            if entries:
                # Move past what we just read: entries left pending on purpose (short of keys)
                # must wait for the reclaimer, not spin here.
                self.cursor = entries[-1][0]
                await self.handle(entries, redelivered=True)
                return len(entries)
            self.cursor = NEW
        entries = await self._read(NEW, size, block_ms)
        linger_ms = self.rt.settings.worker_linger_ms
        if (
            entries
            and len(entries) < size
            and linger_ms
            and time.monotonic() - self._last_batch_at < BUSY_S
        ):
            # Busy (a batch handled within BUSY_S): a partial batch waits a moment for more
            # entries, so a burst makes fewer, larger transactions. An idle consumer handles
            # the first entry at once, as Nagle's algorithm sends the first segment.
            await asyncio.sleep(linger_ms / 1000)
            entries += await self._read(NEW, size - len(entries), None)
        if entries:
            await self.handle(entries, redelivered=False)
            self._last_batch_at = time.monotonic()
        return len(entries)

    async def _read(self, cursor: str, count: int, block_ms: int | None) -> list[Entry]:
        try:
            reply: Any = await self.rt.redis.xreadgroup(
                WORKER_GROUP, self.consumer, {self.stream: cursor}, count=count, block=block_ms
            )
        except ResponseError as exc:
            if "NOGROUP" not in str(exc):
                raise
            await self.ensure_group()  # the stream was deleted and recreated
            return []
        return list(reply[0][1]) if reply else []

    async def reclaim(self) -> int:
        """Take over entries idle longer than worker_claim_idle_ms (their consumer is gone)."""
        settings, start, handled = self.rt.settings, "0-0", 0
        while True:
            try:
                reply = await self.rt.redis.xautoclaim(
                    self.stream,
                    WORKER_GROUP,
                    self.consumer,
                    min_idle_time=settings.worker_claim_idle_ms,
                    start_id=start,
                    count=settings.worker_batch_size,
                )
            except ResponseError as exc:
                if "NOGROUP" not in str(exc):
                    raise
                # The group is gone: the stream was recreated, or Redis failed over to a
                # replica that never got the group (created after its last replicated write).
                await self.ensure_group()
                return handled
            start, claimed = reply[0], reply[1]
            if claimed:
                log.info("sale %s: reclaimed %d idle entries", self.shard, len(claimed))
                await self.handle(claimed, redelivered=True)
                handled += len(claimed)
            if start in ("0-0", b"0-0"):
                return handled

    async def pending_count(self) -> int:
        """Entries of this sale delivered to some consumer of the group and not yet acked."""
        try:
            summary = await self.rt.redis.xpending(self.stream, WORKER_GROUP)
        except ResponseError as exc:
            if "NOGROUP" not in str(exc):
                raise
            return 0
        return int(summary["pending"])

    async def _deliveries(self, ids: list[str]) -> dict[str, int]:
        async with self.rt.redis.pipeline(transaction=False) as pipe:
            for entry_id in ids:
                pipe.xpending_range(self.stream, WORKER_GROUP, entry_id, entry_id, 1)
            replies = await pipe.execute()
        return {r[0]["message_id"]: int(r[0]["times_delivered"]) for r in replies if r}

    # -- handling ---------------------------------------------------------------------------
    async def _settle_refunds(self, events: list[OrderEvent], at_ms: int) -> None:
        """Finish the refunds requested in this batch (a gateway may have died mid-way; if it
        did not, both steps find the work done and change nothing)."""
        requested = {ev.order_id: ev for ev in events if ev.type == REFUND_REQUESTED}
        for ev in requested.values():
            target = RefundTarget(
                ev.order_id, ev.channel_id, ev.user_id, ev.quantity, from_ms(ev.at_ms)
            )
            async with self.rt.pool.acquire() as conn:
                outcome = await settle(conn, target, from_ms(at_ms), actor="worker")
            await self.rt.ledger.finish_refund(ev.order_id, outcome, at_ms)

    async def handle(self, entries: list[Entry], *, redelivered: bool) -> None:
        """Persist, then mark delivered, then ack (or dead-letter) one batch."""
        started = time.perf_counter()
        letters: list[DeadLetter] = []
        if redelivered:
            counts = await self._deliveries([entry_id for entry_id, _ in entries])
            limit = self.rt.settings.worker_max_deliveries
            keep: list[Entry] = []
            for entry_id, fields in entries:
                n = counts.get(entry_id, 1)
                if n > limit:
                    letters.append(DeadLetter(entry_id, fields or {}, TOO_MANY_DELIVERIES, n))
                else:
                    keep.append((entry_id, fields))
            entries = keep

        events: list[OrderEvent] = []
        for entry_id, fields in entries:
            try:
                events.append(parse_event(self.sale_id, entry_id, fields or {}))
            except MalformedEvent as exc:
                letters.append(DeadLetter(entry_id, fields or {}, f"malformed: {exc}"))

        at_ms = now_ms()  # one clock for PG's delivered_at and Redis's, in whole ms
        now = from_ms(at_ms)
        outcome = BatchOutcome()
        if events:
            async with self.rt.pool.acquire() as conn:
                outcome = await persist_batch(conn, self.sale_id, list(fold(events).values()), now)
        if self.after_commit is not None:
            await self.after_commit(self.sale_id, outcome)

        if outcome.delivered:
            codes = await self.rt.ledger.mark_delivered(outcome.delivered, at_ms)
            odd = sum(1 for c in codes if c < 0)
            if odd:
                log.warning(
                    "sale %s: %d delivered order(s) not deliverable in Redis", self.sale_id, odd
                )
        await self._settle_refunds(events, at_ms)

        short, by_id = set(outcome.short), dict(entries)
        ack: list[str] = []
        for ev in events:
            reason = outcome.rejected.get(ev.order_id)
            if reason is not None:
                letters.append(DeadLetter(ev.entry_id, by_id[ev.entry_id], reason))
            elif ev.type == "confirmed" and ev.order_id in short:
                pass  # left pending: reclaimed and retried until keys arrive, or dead-lettered
            else:
                ack.append(ev.entry_id)
        await dead_letter(self.rt.redis, self.rt.keys, self.shard, letters)
        if ack:
            await self.rt.redis.xack(self.stream, WORKER_GROUP, *ack)
        worker_metrics.batch_done(events, outcome, letters, at_ms, started)
