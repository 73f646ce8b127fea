-- Usage over a window in one index probe per org: running totals per org and the same totals as
-- they stood at the end of each hour. Usage since an hour is the running total minus the
-- cumulative row of the last hour before it, so top_spenders and GET /v1/admin/top (without
-- `meter`) read one row and one probe per org whatever the window and however many meters and
-- features an org uses (003's hour and day sums read up to 30 + 24 rows per (org, meter,
-- feature): 150-300 ms at 1,000 orgs on a loaded 2-CPU box, docs/benchmarks.md). Per org, not
-- per (org, meter): measured, a probe costs as much as 20-30 rollup rows, so per (org, meter)
-- over a 7-day window (burn_rates) was no faster than 003's sums, which it still reads.
--
-- Exactly as consistent as the ledger, the same way as 003: the statement-level trigger adds what
-- the statement inserted, in its transaction. Writers on one org are serialized by the
-- usage_running upsert (first, in key order), so a late event that moves older cumulative rows
-- and a batch that opens a new hour for the same org never interleave.
-- `quota-gw reconcile` checks both tables against usage_daily.

-- calls and tokens as in usage_hourly (calls: consume + commit; tokens: their cost net of
-- refunds), all meters and features; only orgs whose calls or tokens moved.
CREATE TABLE IF NOT EXISTS usage_running (
    org_id  text PRIMARY KEY,
    calls   bigint NOT NULL,
    tokens  bigint NOT NULL
) WITH (fillfactor = 70);

-- usage_running as it stood at the end of `hour`, for each hour the org used tokens in.
CREATE TABLE IF NOT EXISTS usage_cumulative (
    org_id  text NOT NULL,
    hour    timestamptz NOT NULL,
    calls   bigint NOT NULL,
    tokens  bigint NOT NULL,
    PRIMARY KEY (org_id, hour)
) WITH (fillfactor = 70);

-- The statements that add the events of `source` to both tables (as qgw_rollup_statements).
-- 1. usage_running, in key order: also the lock that serializes writers per org.
-- 2. A row for each hour the batch opens, at the total before the batch (the last earlier row).
-- 3. The batch's hours added to every row at or after them (normally just the current hour's).
CREATE OR REPLACE FUNCTION qgw_cumulative_statements(source text) RETURNS text[]
LANGUAGE sql IMMUTABLE AS $fn$
    SELECT array_agg(format(q, quote_ident(source)) ORDER BY n) FROM unnest(string_to_array($q$
        INSERT INTO usage_running AS r (org_id, calls, tokens)
        SELECT org_id, count(*) FILTER (WHERE kind IN ('consume', 'commit')), coalesce(sum(cost), 0)
        FROM %1$s WHERE kind IN ('consume', 'commit', 'refund')
        GROUP BY 1 ORDER BY 1
        ON CONFLICT (org_id) DO UPDATE SET calls = r.calls + excluded.calls, tokens = r.tokens + excluded.tokens
        ;;
        INSERT INTO usage_cumulative (org_id, hour, calls, tokens)
        SELECT b.org_id, b.hour, coalesce(p.calls, 0), coalesce(p.tokens, 0)
        FROM (SELECT x.org_id, x.hour
              FROM (SELECT DISTINCT org_id, date_trunc('hour', ts, 'UTC') AS hour
                    FROM %1$s WHERE kind IN ('consume', 'commit', 'refund')) x
              -- most batches add to an hour that has its row: one probe, not the earlier row's too
              WHERE NOT EXISTS (SELECT 1 FROM usage_cumulative e WHERE e.org_id = x.org_id AND e.hour = x.hour)) b
        LEFT JOIN LATERAL (SELECT c.calls, c.tokens FROM usage_cumulative c
                           WHERE c.org_id = b.org_id AND c.hour < b.hour
                           ORDER BY c.hour DESC LIMIT 1) p ON true
        ORDER BY 1, 2
        ON CONFLICT (org_id, hour) DO NOTHING
        ;;
        INSERT INTO usage_cumulative AS r (org_id, hour, calls, tokens)
        SELECT c.org_id, c.hour, sum(b.calls)::bigint, sum(b.tokens)::bigint
        FROM (SELECT org_id, date_trunc('hour', ts, 'UTC') AS hour,
                     count(*) FILTER (WHERE kind IN ('consume', 'commit')) AS calls, coalesce(sum(cost), 0) AS tokens
              FROM %1$s WHERE kind IN ('consume', 'commit', 'refund') GROUP BY 1, 2) b
        -- LATERAL: an index range per org (a plain join on hour >= may be planned as a hash join
        -- over the whole table; docs/benchmarks.md)
        CROSS JOIN LATERAL (SELECT c.org_id, c.hour FROM usage_cumulative c
                            WHERE c.org_id = b.org_id AND c.hour >= b.hour) c
        GROUP BY 1, 2 ORDER BY 1, 2
        -- every row exists (step 2): an upsert finds each through the primary key, never by a join
        ON CONFLICT (org_id, hour) DO UPDATE SET calls = r.calls + excluded.calls, tokens = r.tokens + excluded.tokens
    $q$, ';;')) WITH ORDINALITY AS t(q, n)
$fn$;

-- Both tables from usage_hourly (which outlives raw events): the backfill, and part of the repair.
CREATE OR REPLACE FUNCTION qgw_cumulative_rebuild() RETURNS void
LANGUAGE plpgsql AS $fn$
BEGIN
    TRUNCATE usage_running, usage_cumulative;
    INSERT INTO usage_cumulative (org_id, hour, calls, tokens)
    SELECT org_id, hour, sum(sum(calls)) OVER w, sum(sum(tokens)) OVER w
    FROM usage_hourly WHERE calls <> 0 OR refunds <> 0 OR tokens <> 0
    GROUP BY 1, 2
    WINDOW w AS (PARTITION BY org_id ORDER BY hour)
    ORDER BY 1, 2;
    INSERT INTO usage_running (org_id, calls, tokens)
    SELECT DISTINCT ON (org_id) org_id, calls, tokens
    FROM usage_cumulative ORDER BY org_id, hour DESC;
END $fn$;

-- 003's repair, now also for these two.
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
    PERFORM qgw_cumulative_rebuild();
END $fn$;

-- The trigger function with every statement written out (static SQL: PL/pgSQL plans it once per
-- session and reuses the plan; EXECUTE planned all seven again for every batch). Generated from
-- the two statement lists, so they stay the one source.
LOCK TABLE usage_events IN SHARE ROW EXCLUSIVE MODE;
DO $do$
BEGIN
    EXECUTE format($f$CREATE OR REPLACE FUNCTION qgw_rollup_inserted() RETURNS trigger
        LANGUAGE plpgsql AS $body$
        BEGIN
            %s;
            RETURN NULL;
        END $body$$f$,
        array_to_string(qgw_rollup_statements('qgw_inserted_events')
                        || qgw_cumulative_statements('qgw_inserted_events'), E';\n'));
END $do$;
SELECT qgw_cumulative_rebuild();

-- Usage since an instant per org, from the hour `since` falls in (as qgw_usage_since): the
-- running total minus the cumulative row of the last hour before that.
CREATE OR REPLACE FUNCTION qgw_org_usage_since(since timestamptz)
RETURNS TABLE (org_id text, calls bigint, tokens bigint)
LANGUAGE sql STABLE AS $fn$
    SELECT t.org_id, t.calls - coalesce(b.calls, 0), t.tokens - coalesce(b.tokens, 0)
    FROM usage_running t
    LEFT JOIN LATERAL (SELECT c.calls, c.tokens FROM usage_cumulative c
                       WHERE c.org_id = t.org_id AND c.hour < date_trunc('hour', since, 'UTC')
                       ORDER BY c.hour DESC LIMIT 1) b ON true
$fn$;

-- 003's view, same columns, over qgw_org_usage_since.
CREATE OR REPLACE VIEW top_spenders AS
SELECT u.org_id,
       o.name,
       o.plan,
       u.tokens_30d,
       u.calls_30d,
       rank() OVER (ORDER BY u.tokens_30d DESC) AS rank
FROM (
    SELECT org_id, tokens AS tokens_30d, calls AS calls_30d
    FROM qgw_org_usage_since(now() - interval '30 days')
    WHERE calls > 0 OR tokens <> 0
) u
LEFT JOIN orgs o USING (org_id);
