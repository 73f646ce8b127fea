-- Selling credit: purchases through Stripe Checkout (001 made the table; this adds who bought,
-- the payment it became and when its status changed). The status is one of four; a webhook moves
-- it, never back to pending.

ALTER TABLE purchases
    ADD COLUMN user_id         text,
    ADD COLUMN key_id          text,
    ADD COLUMN payment_intent  text,
    ADD COLUMN updated_at      timestamptz NOT NULL DEFAULT now(),
    ADD CONSTRAINT purchases_status_check CHECK (status IN ('pending', 'paid', 'expired', 'refunded'));

CREATE INDEX purchases_org_created ON purchases (org_id, created_at DESC);
CREATE INDEX purchases_payment_intent ON purchases (payment_intent) WHERE payment_intent IS NOT NULL;

-- Low-balance alerts delivered to each org's webhook (quota-gw notifier). The signing secret is
-- kept as given (it signs every delivery); the admin API shows it once, when it is set.
CREATE TABLE org_webhooks (
    org_id      text PRIMARY KEY REFERENCES orgs ON DELETE CASCADE,
    url         text NOT NULL,
    secret      text NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now()
);

-- One row per alert event to deliver, until a 2xx: the body is fixed when queued, so every
-- retry sends the same event id and bytes.
CREATE TABLE webhook_outbox (
    event_id         uuid PRIMARY KEY,
    org_id           text NOT NULL REFERENCES orgs ON DELETE CASCADE,
    body             jsonb NOT NULL,
    event_ts         timestamptz NOT NULL,  -- deliveries due together go in the ledger's order
    attempts         int NOT NULL DEFAULT 0,
    next_attempt_at  timestamptz NOT NULL DEFAULT now(),
    delivered_at     timestamptz,
    created_at       timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX webhook_outbox_due ON webhook_outbox (next_attempt_at) WHERE delivered_at IS NULL;

-- Every attempt, answered or not.
CREATE TABLE webhook_deliveries (
    id           bigserial PRIMARY KEY,
    event_id     uuid NOT NULL,
    org_id       text NOT NULL REFERENCES orgs ON DELETE CASCADE,
    url          text NOT NULL,
    attempt      int NOT NULL,
    status       int,             -- the receiver's HTTP status; NULL: no answer (see error)
    error        text,
    duration_ms  int NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX webhook_deliveries_org ON webhook_deliveries (org_id, created_at DESC, id DESC);
