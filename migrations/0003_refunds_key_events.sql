-- Security (issue #6, section 3): refunds, voided card keys, and the append-only key log.

-- Refunds. An order refunded before delivery gives its units back to the stock
-- (refund_outcome 'returned'); one refunded after its keys were committed has them voided,
-- never resold (refund_outcome 'voided'). PostgreSQL decides which, under the order's row lock
-- (core/refunds.py), so a worker delivering the order at the same moment is serialised with it.
ALTER TABLE orders DROP CONSTRAINT orders_status_check;
ALTER TABLE orders ADD CONSTRAINT orders_status_check CHECK (status IN
    ('reserved', 'confirmed', 'delivered', 'expired', 'cancelled', 'refunded'));
ALTER TABLE orders
    ADD COLUMN refunded_at    timestamptz,
    ADD COLUMN refund_outcome text CHECK (refund_outcome IN ('returned', 'voided'));

-- A voided key keeps its order_id (so it is never free again) and is never revealed.
ALTER TABLE card_keys ADD COLUMN voided_at timestamptz;

-- Every change of a card key's life, written in the same transaction as the change itself.
-- `actor`: 'admin', 'worker', 'gateway' or 'channel:<id>'; `request_id` from core.logging's
-- context when an HTTP request caused it. Never the key itself.
CREATE TABLE key_events (
    id          bigserial PRIMARY KEY,
    key_id      bigint NOT NULL REFERENCES card_keys,
    order_id    text,
    event       text NOT NULL CHECK (event IN
                    ('imported', 'allocated', 'delivered', 'revealed', 'voided')),
    actor       text NOT NULL,
    request_id  text,
    at          timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX key_events_key ON key_events (key_id, id);
-- No index by order: an order's events are found through its keys (card_keys_order, then
-- key_events_key); a second index on every event cost the workers' batches more than it saves.

-- Append-only: UPDATE, DELETE and TRUNCATE are refused for every role, the owner included.
CREATE FUNCTION key_events_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'key_events is append-only: % refused', TG_OP
        USING ERRCODE = 'insufficient_privilege';
END;
$$;
CREATE TRIGGER key_events_no_update_delete BEFORE UPDATE OR DELETE ON key_events
    FOR EACH ROW EXECUTE FUNCTION key_events_append_only();
CREATE TRIGGER key_events_no_truncate BEFORE TRUNCATE ON key_events
    FOR EACH STATEMENT EXECUTE FUNCTION key_events_append_only();
