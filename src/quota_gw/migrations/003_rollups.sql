-- Rollups: the ledger aggregated per (org, meter, feature, hour) and per day, plus running
-- totals per (org, meter). The ops views (redefined here), GET /v1/admin/top and the Grafana
-- dashboards read these instead of scanning usage_events, whose size grows with traffic (views
-- over raw events took seconds at 3 million events); rollups grow with orgs x hours only.
--
-- Exactly as consistent as the ledger: a statement-level trigger on usage_events aggregates the
-- rows a statement actually inserted (its transition table) in the same transaction. The worker's
-- fast path (COPY: all rows or none) and its idempotent path (INSERT ... ON CONFLICT DO NOTHING:
-- a redelivered row is not in the transition table) therefore count each event once, or not at all
-- when the transaction rolls back. Deleting raw events (retention) leaves the rollups alone: they
-- can be kept longer than the events. `quota-gw reconcile` checks rollups against events.
-- Idempotent: every object is created if missing or replaced, and the backfill recomputes.

-- Per (org, meter, feature, UTC hour). meter and feature are '' when the event has none.
-- calls: consume + commit; tokens: what calls were priced at (refunds subtract); refunds and
-- refunded: refund count and tokens given back; denied: refusals; delta, delta_purchased,
-- purchased_in: balance changes, as in ledger_balances; events: every row.
CREATE TABLE IF NOT EXISTS usage_hourly (
    org_id           text NOT NULL,
    meter            text NOT NULL,
    feature          text NOT NULL,
    hour             timestamptz NOT NULL,
    events           bigint NOT NULL DEFAULT 0,
    calls            bigint NOT NULL DEFAULT 0,
    tokens           bigint NOT NULL DEFAULT 0,
    refunds          bigint NOT NULL DEFAULT 0,
    refunded         bigint NOT NULL DEFAULT 0,
    denied           bigint NOT NULL DEFAULT 0,
    delta            bigint NOT NULL DEFAULT 0,
    delta_purchased  bigint NOT NULL DEFAULT 0,
    purchased_in     bigint NOT NULL DEFAULT 0,
    last_event_at    timestamptz NOT NULL,
    PRIMARY KEY (hour, org_id, meter, feature)
) WITH (fillfactor = 70);

-- The same per UTC day: a 30-day window reads 30 rows per (org, meter, feature), not 720.
CREATE TABLE IF NOT EXISTS usage_daily (
    org_id           text NOT NULL,
    meter            text NOT NULL,
    feature          text NOT NULL,
    day              date NOT NULL,
    events           bigint NOT NULL DEFAULT 0,
    calls            bigint NOT NULL DEFAULT 0,
    tokens           bigint NOT NULL DEFAULT 0,
    refunds          bigint NOT NULL DEFAULT 0,
    refunded         bigint NOT NULL DEFAULT 0,
    denied           bigint NOT NULL DEFAULT 0,
    delta            bigint NOT NULL DEFAULT 0,
    delta_purchased  bigint NOT NULL DEFAULT 0,
    purchased_in     bigint NOT NULL DEFAULT 0,
    last_event_at    timestamptz NOT NULL,
    PRIMARY KEY (day, org_id, meter, feature)
) WITH (fillfactor = 70);

-- Refusals per hour by reason (the denied event's metadata code: insufficient_balance, forbidden, ...).
CREATE TABLE IF NOT EXISTS denials_hourly (
    org_id   text NOT NULL,
    meter    text NOT NULL,
    feature  text NOT NULL,
    hour     timestamptz NOT NULL,
    reason   text NOT NULL,
    denials  bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (hour, org_id, meter, feature, reason)
) WITH (fillfactor = 70);

-- Running totals per (org, meter) since the first event, and the period in force (the latest
-- reset or plan adjustment carrying an allocation): ledger_balances without a ledger scan.
-- changes: events other than refusals (a meter only ever refused has no balance).
CREATE TABLE IF NOT EXISTS meter_totals (
    org_id             text NOT NULL,
    meter              text NOT NULL,
    allocated          bigint NOT NULL DEFAULT 0,
    purchased          bigint NOT NULL DEFAULT 0,
    purchased_total    bigint NOT NULL DEFAULT 0,
    changes            bigint NOT NULL DEFAULT 0,
    last_event_at      timestamptz NOT NULL,
    allocation         bigint,
    period_end         timestamptz,
    period_changed_at  timestamptz,
    PRIMARY KEY (org_id, meter)
) WITH (fillfactor = 70);

-- The statements that add the events of `source` (a relation with usage_events' columns) to
-- every rollup. Upserts go in key order, so two workers committing overlapping batches lock rows
-- in the same order. Statements, not a function doing it: a trigger's transition table is visible
-- only to the trigger function's own queries.
CREATE OR REPLACE FUNCTION qgw_rollup_statements(source text) RETURNS text[]
LANGUAGE sql IMMUTABLE AS $fn$
    SELECT array_agg(format(q, quote_ident(source)) ORDER BY n) FROM unnest(string_to_array($q$
        INSERT INTO usage_hourly AS r (org_id, meter, feature, hour, events, calls, tokens, refunds, refunded,
                                       denied, delta, delta_purchased, purchased_in, last_event_at)
        SELECT org_id, coalesce(meter, ''), coalesce(feature, ''), date_trunc('hour', ts, 'UTC'),
               count(*),
               count(*) FILTER (WHERE kind IN ('consume', 'commit')),
               coalesce(sum(cost) FILTER (WHERE kind IN ('consume', 'commit', 'refund')), 0),
               count(*) FILTER (WHERE kind = 'refund'),
               coalesce(-sum(cost) FILTER (WHERE kind = 'refund'), 0),
               count(*) FILTER (WHERE kind = 'denied'),
               sum(delta), sum(delta_purchased),
               coalesce(sum(delta_purchased) FILTER (
                   WHERE delta_purchased > 0 AND kind IN ('grant', 'purchase', 'adjust')), 0),
               max(ts)
        FROM %1$s GROUP BY 1, 2, 3, 4 ORDER BY 1, 2, 3, 4
        ON CONFLICT (org_id, meter, feature, hour) DO UPDATE SET
            events = r.events + excluded.events, calls = r.calls + excluded.calls,
            tokens = r.tokens + excluded.tokens, refunds = r.refunds + excluded.refunds,
            refunded = r.refunded + excluded.refunded, denied = r.denied + excluded.denied,
            delta = r.delta + excluded.delta, delta_purchased = r.delta_purchased + excluded.delta_purchased,
            purchased_in = r.purchased_in + excluded.purchased_in,
            last_event_at = greatest(r.last_event_at, excluded.last_event_at)
        ;;
        INSERT INTO usage_daily AS r (org_id, meter, feature, day, events, calls, tokens, refunds, refunded,
                                      denied, delta, delta_purchased, purchased_in, last_event_at)
        SELECT org_id, coalesce(meter, ''), coalesce(feature, ''), (ts AT TIME ZONE 'UTC')::date,
               count(*),
               count(*) FILTER (WHERE kind IN ('consume', 'commit')),
               coalesce(sum(cost) FILTER (WHERE kind IN ('consume', 'commit', 'refund')), 0),
               count(*) FILTER (WHERE kind = 'refund'),
               coalesce(-sum(cost) FILTER (WHERE kind = 'refund'), 0),
               count(*) FILTER (WHERE kind = 'denied'),
               sum(delta), sum(delta_purchased),
               coalesce(sum(delta_purchased) FILTER (
                   WHERE delta_purchased > 0 AND kind IN ('grant', 'purchase', 'adjust')), 0),
               max(ts)
        FROM %1$s GROUP BY 1, 2, 3, 4 ORDER BY 1, 2, 3, 4
        ON CONFLICT (org_id, meter, feature, day) DO UPDATE SET
            events = r.events + excluded.events, calls = r.calls + excluded.calls,
            tokens = r.tokens + excluded.tokens, refunds = r.refunds + excluded.refunds,
            refunded = r.refunded + excluded.refunded, denied = r.denied + excluded.denied,
            delta = r.delta + excluded.delta, delta_purchased = r.delta_purchased + excluded.delta_purchased,
            purchased_in = r.purchased_in + excluded.purchased_in,
            last_event_at = greatest(r.last_event_at, excluded.last_event_at)
        ;;
        INSERT INTO denials_hourly AS r (org_id, meter, feature, hour, reason, denials)
        SELECT org_id, coalesce(meter, ''), coalesce(feature, ''), date_trunc('hour', ts, 'UTC'),
               coalesce(metadata ->> 'code', 'unknown'), count(*)
        FROM %1$s WHERE kind = 'denied' GROUP BY 1, 2, 3, 4, 5 ORDER BY 1, 2, 3, 4, 5
        ON CONFLICT (org_id, meter, feature, hour, reason) DO UPDATE SET denials = r.denials + excluded.denials
        ;;
        INSERT INTO meter_totals AS r (org_id, meter, allocated, purchased, purchased_total, changes,
                                       last_event_at, allocation, period_end, period_changed_at)
        SELECT t.org_id, t.meter, t.allocated, t.purchased, t.purchased_total, t.changes, t.last_event_at,
               p.allocation, p.period_end, p.changed_at
        FROM (
            SELECT org_id, meter,
                   sum(delta - delta_purchased) AS allocated, sum(delta_purchased) AS purchased,
                   coalesce(sum(delta_purchased) FILTER (
                       WHERE delta_purchased > 0 AND kind IN ('grant', 'purchase', 'adjust')), 0) AS purchased_total,
                   count(*) FILTER (WHERE kind <> 'denied') AS changes, max(ts) AS last_event_at
            FROM %1$s WHERE meter IS NOT NULL GROUP BY 1, 2
        ) t
        LEFT JOIN (
            SELECT DISTINCT ON (org_id, meter) org_id, meter,
                   (metadata ->> 'allocation')::bigint AS allocation,
                   to_timestamp((metadata ->> 'period_end')::bigint) AS period_end, ts AS changed_at
            FROM %1$s
            WHERE kind IN ('reset', 'adjust') AND meter IS NOT NULL AND metadata ? 'allocation'
            ORDER BY org_id, meter, ts DESC
        ) p USING (org_id, meter)
        ORDER BY 1, 2
        ON CONFLICT (org_id, meter) DO UPDATE SET
            allocated = r.allocated + excluded.allocated, purchased = r.purchased + excluded.purchased,
            purchased_total = r.purchased_total + excluded.purchased_total, changes = r.changes + excluded.changes,
            last_event_at = greatest(r.last_event_at, excluded.last_event_at),
            allocation = CASE WHEN excluded.period_changed_at >= coalesce(r.period_changed_at, '-infinity')
                              THEN excluded.allocation ELSE r.allocation END,
            period_end = CASE WHEN excluded.period_changed_at >= coalesce(r.period_changed_at, '-infinity')
                              THEN excluded.period_end ELSE r.period_end END,
            period_changed_at = greatest(r.period_changed_at, excluded.period_changed_at)
    $q$, ';;')) WITH ORDINALITY AS t(q, n)
$fn$;

-- The trigger: the rows this statement inserted (COPY or INSERT), nothing a conflict skipped.
CREATE OR REPLACE FUNCTION qgw_rollup_inserted() RETURNS trigger
LANGUAGE plpgsql AS $fn$
DECLARE
    stmt text;
BEGIN
    FOREACH stmt IN ARRAY qgw_rollup_statements('qgw_inserted_events') LOOP
        EXECUTE stmt;
    END LOOP;
    RETURN NULL;
END $fn$;

-- Recomputes every rollup from usage_events (the migration's backfill; also a repair). Holds
-- off writers meanwhile, so no event is counted twice or missed.
CREATE OR REPLACE FUNCTION qgw_rollup_rebuild() RETURNS void
LANGUAGE plpgsql AS $fn$
DECLARE
    stmt text;
BEGIN
    LOCK TABLE usage_events IN SHARE ROW EXCLUSIVE MODE;
    TRUNCATE usage_hourly, usage_daily, denials_hourly, meter_totals;
    FOREACH stmt IN ARRAY qgw_rollup_statements('usage_events') LOOP
        EXECUTE stmt;
    END LOOP;
END $fn$;

-- The transition table's name is the one qgw_rollup_inserted reads.
LOCK TABLE usage_events IN SHARE ROW EXCLUSIVE MODE;
DROP TRIGGER IF EXISTS usage_events_rollup ON usage_events;
CREATE TRIGGER usage_events_rollup AFTER INSERT ON usage_events
    REFERENCING NEW TABLE AS qgw_inserted_events
    FOR EACH STATEMENT EXECUTE FUNCTION qgw_rollup_inserted();
SELECT qgw_rollup_rebuild();

-- Usage since an instant, per (org, meter, feature), from the rollups: whole UTC days after the
-- day `since` falls in, plus that day's hours from the hour `since` falls in (windows start on
-- the hour). meter and feature are '' when the events had none.
CREATE OR REPLACE FUNCTION qgw_usage_since(since timestamptz)
RETURNS TABLE (org_id text, meter text, feature text, calls bigint, tokens bigint, refunded bigint, denied bigint)
LANGUAGE sql STABLE AS $fn$
    SELECT d.org_id, d.meter, d.feature, d.calls, d.tokens, d.refunded, d.denied
    FROM usage_daily d WHERE d.day > (since AT TIME ZONE 'UTC')::date
    UNION ALL
    SELECT h.org_id, h.meter, h.feature, h.calls, h.tokens, h.refunded, h.denied
    FROM usage_hourly h
    WHERE h.hour >= date_trunc('hour', since, 'UTC')
      AND h.hour < ((since AT TIME ZONE 'UTC')::date + 1) AT TIME ZONE 'UTC'
$fn$;

-- The views of 002, same names and columns, now over the rollups.
DROP VIEW IF EXISTS usage_by_feature_day, top_spenders, burn_rates, low_balances, ledger_balances,
    meter_periods, denials_by_reason_day CASCADE;

CREATE VIEW usage_by_feature_day AS
SELECT org_id, day, nullif(meter, '') AS meter, nullif(feature, '') AS feature,
       calls, tokens, refunded, denied
FROM usage_daily
WHERE calls > 0 OR refunds > 0 OR denied > 0;

-- Summed per org first, then joined to the org's name and plan (a thousand rows, not the
-- rollup rows of the window).
CREATE VIEW top_spenders AS
SELECT u.org_id,
       o.name,
       o.plan,
       u.tokens_30d,
       u.calls_30d,
       rank() OVER (ORDER BY u.tokens_30d DESC) AS rank
FROM (
    SELECT org_id, sum(tokens)::bigint AS tokens_30d, sum(calls)::bigint AS calls_30d
    FROM qgw_usage_since(now() - interval '30 days')
    GROUP BY org_id
    HAVING sum(calls) > 0 OR sum(tokens) <> 0
) u
LEFT JOIN orgs o USING (org_id);

CREATE VIEW meter_periods AS
SELECT org_id, meter, allocation, period_end, period_changed_at AS changed_at
FROM meter_totals
WHERE period_changed_at IS NOT NULL;

CREATE VIEW ledger_balances AS
SELECT org_id, meter, allocated, purchased,
       allocated + purchased                     AS balance,
       purchased_total, allocation, period_end, last_event_at
FROM meter_totals
WHERE changes > 0;

CREATE VIEW low_balances AS
SELECT org_id, meter, balance, allocation, purchased, period_end,
       round(100.0 * balance / allocation, 1)    AS percent_left
FROM ledger_balances
WHERE allocation > 0 AND balance * 4 < allocation;

CREATE VIEW burn_rates AS
SELECT b.org_id,
       b.meter,
       b.balance,
       b.allocation,
       b.period_end,
       coalesce(u.used_7d, 0)                                    AS used_7d,
       round(coalesce(u.used_7d, 0) / 7.0, 2)                    AS burn_per_day,
       CASE WHEN b.allocation < 0 OR coalesce(u.used_7d, 0) <= 0 THEN NULL
            ELSE now() + greatest(b.balance, 0) * interval '7 days' / u.used_7d
       END                                                       AS projected_exhaustion,
       CASE WHEN b.allocation < 0 OR coalesce(u.used_7d, 0) <= 0 THEN false
            ELSE coalesce(now() + greatest(b.balance, 0) * interval '7 days' / u.used_7d < b.period_end, true)
       END                                                       AS exhausts_before_reset
FROM ledger_balances b
LEFT JOIN (
    SELECT org_id, meter, sum(tokens)::bigint AS used_7d
    FROM qgw_usage_since(now() - interval '7 days')
    WHERE meter <> ''
    GROUP BY org_id, meter
) u USING (org_id, meter);

-- Denials by reason per UTC day (ops dashboard).
CREATE VIEW denials_by_reason_day AS
SELECT org_id, (hour AT TIME ZONE 'UTC')::date AS day, nullif(meter, '') AS meter,
       nullif(feature, '') AS feature, reason, sum(denials)::bigint AS denials
FROM denials_hourly
GROUP BY 1, 2, 3, 4, 5;
