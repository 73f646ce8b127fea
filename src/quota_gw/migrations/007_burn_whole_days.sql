-- burn_rates over whole UTC days: the last 7 full days plus today so far, read from the daily
-- rollup alone. 003's view summed usage since the hour seven days ago, which is 7 daily rows plus
-- up to 24 hourly rows per (org, meter, feature); at 1,000 orgs x 4 features that was up to
-- 124,000 rows and 110-280 ms at 100 million events on a loaded 2-CPU box, over the 100 ms the
-- ops dashboards need. Whole days are 8 daily rows per (org, meter, feature), 32,000 rows: no
-- new rollup and no cost on the write path (docs/benchmarks.md).
--
-- The meaning, stated once (docs/design.md): used_7d is the tokens used since 00:00 UTC seven
-- days before today (so 7 to 8 days of usage), burn_per_day divides it by that window's length
-- in days, and projected_exhaustion spends the balance at that rate. The window starts at
-- window_start, a column added at the end. The other columns are 003's, same names and types.
-- Per-org reads (GET /v1/analytics) still use qgw_usage_since: a single org's hours are cheap.

-- 003's qgw_usage_since, its day boundary fixed: `date AT TIME ZONE 'UTC'` casts the date to a
-- timestamptz in the session's time zone first, so in a session not on UTC the hourly part ended
-- off midnight UTC by twice the zone's offset: hours the daily part also counts were counted
-- twice (west of UTC) or the first day's hours not at all (east). A date made a timestamp first
-- is midnight UTC whatever the session's zone.
CREATE OR REPLACE FUNCTION qgw_usage_since(since timestamptz)
RETURNS TABLE (org_id text, meter text, feature text, calls bigint, tokens bigint, refunded bigint, denied bigint)
LANGUAGE sql STABLE AS $fn$
    SELECT d.org_id, d.meter, d.feature, d.calls, d.tokens, d.refunded, d.denied
    FROM usage_daily d WHERE d.day > (since AT TIME ZONE 'UTC')::date
    UNION ALL
    SELECT h.org_id, h.meter, h.feature, h.calls, h.tokens, h.refunded, h.denied
    FROM usage_hourly h
    WHERE h.hour >= date_trunc('hour', since, 'UTC')
      AND h.hour < ((since AT TIME ZONE 'UTC')::date + 1)::timestamp AT TIME ZONE 'UTC'
$fn$;

CREATE OR REPLACE VIEW burn_rates AS
SELECT b.org_id,
       b.meter,
       b.balance,
       b.allocation,
       b.period_end,
       coalesce(u.used_7d, 0)                                    AS used_7d,
       round(coalesce(u.used_7d, 0) / w.days, 2)                 AS burn_per_day,
       CASE WHEN b.allocation < 0 OR coalesce(u.used_7d, 0) <= 0 THEN NULL
            ELSE now() + greatest(b.balance, 0) * (now() - w.start) / u.used_7d
       END                                                       AS projected_exhaustion,
       CASE WHEN b.allocation < 0 OR coalesce(u.used_7d, 0) <= 0 THEN false
            ELSE coalesce(now() + greatest(b.balance, 0) * (now() - w.start) / u.used_7d < b.period_end, true)
       END                                                       AS exhausts_before_reset,
       w.start                                                   AS window_start
FROM ledger_balances b
CROSS JOIN (
    -- 00:00 UTC seven days before today, and the window's length in days up to now
    SELECT s.start, extract(epoch FROM now() - s.start) / 86400 AS days
    FROM (SELECT ((now() AT TIME ZONE 'UTC')::date - 7)::timestamp AT TIME ZONE 'UTC' AS start) s
) w
LEFT JOIN (
    SELECT org_id, meter, sum(tokens)::bigint AS used_7d
    FROM usage_daily
    WHERE day >= (now() AT TIME ZONE 'UTC')::date - 7 AND meter <> ''
    GROUP BY org_id, meter
) u USING (org_id, meter);
