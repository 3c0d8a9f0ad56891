-- Flashgate schema, version 1.
-- PostgreSQL is the durable record: channels, sales, encrypted card keys, orders and the
-- webhook outbox. Redis holds the live stock ledger; workers copy order events here.

CREATE TABLE channels (
    channel_id      text PRIMARY KEY,
    name            text NOT NULL,
    api_key_hash    bytea NOT NULL UNIQUE,           -- sha256 of the API key; the key itself is shown once
    webhook_url     text,
    webhook_secret  bytea NOT NULL,                   -- sealed (AES-GCM) with a data key
    webhook_dek_id  text NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE sales (
    sale_id             text PRIMARY KEY,
    sku                 text NOT NULL,
    name                text NOT NULL,
    starts_at           timestamptz NOT NULL,
    ends_at             timestamptz NOT NULL,
    per_user_limit      integer NOT NULL CHECK (per_user_limit > 0),
    reservation_ttl_s   integer NOT NULL CHECK (reservation_ttl_s > 0),
    created_at          timestamptz NOT NULL DEFAULT now(),
    CHECK (ends_at > starts_at)
);

-- Envelope encryption: data keys (DEKs) wrapped by a master key; master_key_id says which,
-- so the master key can rotate by rewrapping these rows only.
CREATE TABLE data_keys (
    dek_id          text PRIMARY KEY,
    purpose         text NOT NULL CHECK (purpose IN ('card_keys', 'fingerprint', 'webhook')),
    master_key_id   text NOT NULL,
    wrapped         bytea NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE key_imports (
    import_id       bigserial PRIMARY KEY,
    sale_id         text NOT NULL REFERENCES sales,
    imported        integer NOT NULL,
    duplicates      integer NOT NULL,
    rejected        integer NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now(),
    stocked_at      timestamptz                       -- set once Redis stock includes this import
);

CREATE TABLE card_keys (
    key_id          bigserial PRIMARY KEY,
    sale_id         text NOT NULL REFERENCES sales,
    import_id       bigint NOT NULL REFERENCES key_imports,
    fingerprint     bytea NOT NULL UNIQUE,            -- keyed hash (HMAC-SHA256): dedup without plaintext
    dek_id          text NOT NULL REFERENCES data_keys,
    nonce           bytea NOT NULL,
    ciphertext      bytea NOT NULL,
    order_id        text,                             -- NULL while free
    allocated_at    timestamptz
);
CREATE INDEX card_keys_free ON card_keys (sale_id, key_id) WHERE order_id IS NULL;
CREATE INDEX card_keys_order ON card_keys (order_id) WHERE order_id IS NOT NULL;

CREATE TABLE orders (
    order_id        text PRIMARY KEY,
    sale_id         text NOT NULL REFERENCES sales,
    channel_id      text NOT NULL REFERENCES channels,
    user_id         text NOT NULL,
    quantity        integer NOT NULL CHECK (quantity > 0),
    status          text NOT NULL CHECK (status IN
                        ('reserved', 'confirmed', 'delivered', 'expired', 'cancelled')),
    payment_ref     text,
    reserved_at     timestamptz NOT NULL,
    confirmed_at    timestamptz,
    delivered_at    timestamptz,
    ended_at        timestamptz,
    updated_at      timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX orders_sale_status ON orders (sale_id, status);

CREATE TABLE webhook_outbox (
    id              bigserial PRIMARY KEY,
    channel_id      text NOT NULL REFERENCES channels,
    order_id        text NOT NULL,
    event           text NOT NULL,
    payload         bytea NOT NULL,
    attempts        integer NOT NULL DEFAULT 0,
    next_attempt_at timestamptz NOT NULL DEFAULT now(),
    delivered_at    timestamptz,
    failed_at       timestamptz,
    last_error      text,
    UNIQUE (order_id, event)
);
CREATE INDEX webhook_outbox_due ON webhook_outbox (next_attempt_at)
    WHERE delivered_at IS NULL AND failed_at IS NULL;
