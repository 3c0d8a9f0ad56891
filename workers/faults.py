"""A test hook, off by default: kill the worker process right after a PostgreSQL commit.

`FLASHGATE_FAULT_AFTER_COMMIT=exit` (with `FLASHGATE_FAULT_AFTER_COMMIT_BATCH=N`, default 1)
makes `flashgate worker` call `os._exit` right after the commit of its Nth batch that
delivered orders, before they are marked delivered in Redis and before the stream ack: the
one crash point a SIGKILL hits only by luck. The fault tests (tests/faults/) use it to prove
that such a crash delivers nothing twice. Never set it in production.
"""

from __future__ import annotations

import logging
import os

from core.settings import Settings
from workers.consumer import AfterCommit
from workers.persist import BatchOutcome

log = logging.getLogger(__name__)

FAULT_EXIT_CODE = 86  # what the process exits with, so a test can tell the hook from a crash


def after_commit_fault(settings: Settings) -> AfterCommit | None:
    """The after-commit hook the settings ask for, or None (the default: no hook)."""
    if settings.fault_after_commit != "exit":
        return None
    batches = 0

    async def exit_after_commit(sale_id: str, outcome: BatchOutcome) -> None:
        nonlocal batches
        if outcome.delivered:
            batches += 1
            if batches >= settings.fault_after_commit_batch:
                log.warning(
                    "fault hook: exiting after the commit of batch %d (sale %s)", batches, sale_id
                )
                logging.shutdown()
                os._exit(FAULT_EXIT_CODE)

    return exit_after_commit
