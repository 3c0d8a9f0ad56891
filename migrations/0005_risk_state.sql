-- The risk engine's admin state, kept in PostgreSQL as well as Redis (risk/durable.py).
-- Redis is what the hot path reads; these rows are what survives Redis: after Redis lost its
-- data, `flashgate reconcile` writes the block/allow lists and the sales' overrides back.

CREATE TABLE risk_list_entries (
    action    text NOT NULL CHECK (action IN ('allow', 'block')),
    kind      text NOT NULL CHECK (kind IN ('user', 'device', 'ip', 'cidr')),
    entry     text NOT NULL,
    added_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (action, kind, entry)
);

-- A sale's override of risk/rules.json (validated before it is stored); no row = none.
CREATE TABLE risk_overrides (
    sale_id     text PRIMARY KEY,
    override    jsonb NOT NULL,
    updated_at  timestamptz NOT NULL DEFAULT now()
);
