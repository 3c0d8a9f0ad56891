"""The dead-letter stream: entries the workers give up on are moved there, never dropped.

Each dead letter keeps the original fields, plus why (`dl_reason`), where it came from
(`dl_src`, the original entry id) and how often it was delivered (`dl_deliveries`). The copy
and the ack run in one MULTI: both keys carry the sale's hash tag, so this works on Cluster.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis

from core.keys import WORKER_GROUP, Keys

log = logging.getLogger(__name__)

DEAD_LETTER_MAXLEN = 100_000  # approximate cap; operators drain it long before


@dataclass(frozen=True, slots=True)
class DeadLetter:
    entry_id: str
    fields: dict[str, str]
    reason: str
    deliveries: int = 1


async def dead_letter(redis: Redis, keys: Keys, sale_id: str, letters: list[DeadLetter]) -> None:
    """Copy the entries to the sale's dead-letter stream and ack them, atomically. `sale_id`
    is the ledger shard of the stream (the sale, or one of its stock buckets)."""
    if not letters:
        return
    async with redis.pipeline(transaction=True) as pipe:
        for dl in letters:
            fields: dict[Any, Any] = {
                **dl.fields,
                "dl_reason": dl.reason,
                "dl_src": dl.entry_id,
                "dl_deliveries": dl.deliveries,
            }
            pipe.xadd(
                keys.dead_letters(sale_id),
                fields,
                maxlen=DEAD_LETTER_MAXLEN,
                approximate=True,
            )
        pipe.xack(keys.events(sale_id), WORKER_GROUP, *[dl.entry_id for dl in letters])
        await pipe.execute()
    for dl in letters:
        # The entry id and the reason only: fields may hold user ids, never printed in bulk.
        log.warning("sale %s: entry %s dead-lettered: %s", sale_id, dl.entry_id, dl.reason)
