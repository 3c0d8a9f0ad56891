-- Admin hardening (issue #11, items 9 and 10).

-- #11.9: key_events.request_id is always the server's own request id; what a client sent as
-- X-Request-Id is kept here, sanitized by the gateway (core.logging.client_request_id_from:
-- [A-Za-z0-9._:-], at most 64 characters), and never trusted as the audit id.
ALTER TABLE key_events ADD COLUMN client_request_id text
    CHECK (client_request_id ~ '^[A-Za-z0-9._:-]{1,64}$');

-- #11.10: an import is a job with a progress record (core/card_keys.py). Its row is committed
-- before the keys are read (status 'running'), the keys land in one later transaction
-- ('done', counts set), or none do ('failed', with a reason that never quotes a code).
-- Rows written before this migration, and by callers that insert finished imports, are 'done'.
ALTER TABLE key_imports
    ADD COLUMN status      text NOT NULL DEFAULT 'done'
                           CHECK (status IN ('running', 'done', 'failed')),
    ADD COLUMN normalize   text NOT NULL DEFAULT 'none',
    ADD COLUMN total_lines integer NOT NULL DEFAULT 0,   -- entries in the body
    ADD COLUMN read_lines  integer NOT NULL DEFAULT 0,   -- entries encrypted and staged so far
    ADD COLUMN error       text,
    ADD COLUMN updated_at  timestamptz NOT NULL DEFAULT now(),
    ADD COLUMN finished_at timestamptz,
    ADD COLUMN rejected_lines integer[] NOT NULL DEFAULT '{}';  -- the first 100, 1-based
