-- Redis failover detection (core/failover.py): the identity (master_replid) of the Redis
-- primary whose ledger was last merged with PostgreSQL, per deployment (its key prefix).
-- A process that finds Redis answering with another identity pauses the sales until a merge
-- has brought PostgreSQL's orders back into that primary and recorded it here.
CREATE TABLE redis_epochs (
    deployment      text PRIMARY KEY,                 -- FLASHGATE_KEY_PREFIX
    identity        text NOT NULL,                    -- INFO replication: master_replid
    merged_at       timestamptz NOT NULL DEFAULT now(),
    orders_merged   integer NOT NULL DEFAULT 0,       -- by the merge that recorded it
    merge_seconds   double precision NOT NULL DEFAULT 0
);
