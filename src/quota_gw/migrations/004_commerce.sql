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
