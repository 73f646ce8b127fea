-- Core schema: tenants, keys, sub-quotas, purchases and the ledger.

CREATE TABLE orgs (
    org_id      text PRIMARY KEY CHECK (org_id ~ '^[A-Za-z0-9_.-]{1,64}$'),
    name        text,
    plan        text NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE users (
    org_id      text NOT NULL REFERENCES orgs ON DELETE CASCADE,
    user_id     text NOT NULL,
    team        text,
    created_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (org_id, user_id)
);

CREATE TABLE api_keys (
    key_id      text PRIMARY KEY,
    org_id      text NOT NULL REFERENCES orgs ON DELETE CASCADE,
    user_id     text,
    key_hash    text NOT NULL UNIQUE,       -- sha256 hex of the key; the key itself is never stored
    key_prefix  text NOT NULL,              -- first characters, to recognise a key in a list
    scopes      text[] NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    revoked_at  timestamptz
);
CREATE INDEX api_keys_org ON api_keys (org_id);

-- Per-period caps of a user or a team inside an org, per meter.
CREATE TABLE sub_quotas (
    org_id      text NOT NULL REFERENCES orgs ON DELETE CASCADE,
    meter       text NOT NULL,
    scope       text NOT NULL CHECK (scope IN ('user', 'team')),
    subject     text NOT NULL,
    quota       bigint NOT NULL CHECK (quota >= 0),
    updated_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (org_id, meter, scope, subject)
);

CREATE TABLE purchases (
    purchase_id       text PRIMARY KEY,
    org_id            text NOT NULL REFERENCES orgs ON DELETE CASCADE,
    pack              text NOT NULL,
    meter             text NOT NULL,
    tokens            bigint NOT NULL,
    amount_cents      bigint NOT NULL,
    currency          text NOT NULL,
    status            text NOT NULL DEFAULT 'pending',
    checkout_id       text UNIQUE,
    stripe_event_id   text UNIQUE,
    event_id          uuid,
    created_at        timestamptz NOT NULL DEFAULT now(),
    paid_at           timestamptz
);

-- The ledger. Every balance change (and every refusal, delta 0) is one row, once.
-- The primary key includes ts because a partitioned table's unique keys must hold the
-- partition key; an event's ts is fixed when Redis writes it, so a redelivered event has the
-- same (event_id, ts) and ON CONFLICT drops it.
CREATE TABLE usage_events (
    event_id         uuid NOT NULL,
    ts               timestamptz NOT NULL,
    kind             text NOT NULL,
    org_id           text NOT NULL,
    user_id          text,
    key_id           text,
    meter            text,
    feature          text,
    delta            bigint NOT NULL,            -- signed change of allocated + purchased
    delta_purchased  bigint NOT NULL DEFAULT 0,  -- the part of delta that hit purchased credit
    cost             bigint NOT NULL DEFAULT 0,  -- tokens the call was priced at (usage analytics)
    balance_after    bigint,
    metadata         jsonb,
    stream_id        text,                       -- '<stream>/<entry id>', for tracing
    PRIMARY KEY (event_id, ts)
) PARTITION BY RANGE (ts);
CREATE INDEX usage_events_org_ts ON usage_events (org_id, ts DESC);
CREATE TABLE usage_events_default PARTITION OF usage_events DEFAULT;

-- Monthly partitions, made ahead by the migration and by the worker.
CREATE FUNCTION qgw_ensure_partitions(start_month date, months int) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    m date := date_trunc('month', start_month)::date;
    name text;
BEGIN
    FOR i IN 0 .. months - 1 LOOP
        name := format('usage_events_%s', to_char(m, 'YYYY_MM'));
        IF to_regclass(name) IS NULL THEN
            EXECUTE format('CREATE TABLE %I PARTITION OF usage_events FOR VALUES FROM (%L) TO (%L)',
                           name, m, (m + interval '1 month')::date);
        END IF;
        m := (m + interval '1 month')::date;
    END LOOP;
END $$;

SELECT qgw_ensure_partitions((now() - interval '1 month')::date, 4);
