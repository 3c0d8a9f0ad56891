-- Webhook secrets (docs/WEBHOOKS.md): how each channel's secret was shown, and rotation.
--
-- The HMAC key of Flashgate-Signature is the webhook_secret string exactly as the API showed
-- it. Channels created before this migration were shown base64url ('b64url'); new ones are
-- shown `whsec_` + base64 ('whsec', the Standard Webhooks form). The stored bytes don't
-- change, so every existing channel keeps verifying with the string it was given.
ALTER TABLE channels
    ADD COLUMN webhook_secret_form text NOT NULL DEFAULT 'b64url'
        CHECK (webhook_secret_form IN ('whsec', 'b64url'));
ALTER TABLE channels ALTER COLUMN webhook_secret_form SET DEFAULT 'whsec';

-- A rotated-out secret (sealed like webhook_secret, same data key) keeps signing beside the
-- new one until webhook_prev_until, so receivers can switch without losing a delivery.
ALTER TABLE channels
    ADD COLUMN webhook_prev_secret bytea,
    ADD COLUMN webhook_prev_form   text CHECK (webhook_prev_form IN ('whsec', 'b64url')),
    ADD COLUMN webhook_prev_until  timestamptz;
