-- Views for dashboards and operators over the ledger (usage_events), documented in the README
-- ("Postgres views"). Every figure is integer tokens. "Usage" is what calls were priced at:
-- consume and commit add their cost, a refund subtracts it (its cost is negative).

-- Time-range scans across all orgs (top spenders, retention) without a B-tree on ts: the ledger
-- is appended in time order, so a BRIN index is tiny and effective.
CREATE INDEX usage_events_ts_brin ON usage_events USING brin (ts);

-- Usage per org, UTC day, meter and feature.
CREATE VIEW usage_by_feature_day AS
SELECT org_id,
       (ts AT TIME ZONE 'UTC')::date                                            AS day,
       meter,
       feature,
       count(*) FILTER (WHERE kind IN ('consume', 'commit'))                     AS calls,
       coalesce(sum(cost) FILTER (WHERE kind IN ('consume', 'commit', 'refund')), 0)::bigint AS tokens,
       coalesce(-sum(cost) FILTER (WHERE kind = 'refund'), 0)::bigint           AS refunded,
       count(*) FILTER (WHERE kind = 'denied')                                  AS denied
FROM usage_events
WHERE kind IN ('consume', 'commit', 'refund', 'denied')
GROUP BY 1, 2, 3, 4;

-- Orgs ranked by tokens used over the last 30 days (all meters; GET /v1/admin/top takes any window).
CREATE VIEW top_spenders AS
SELECT e.org_id,
       o.name,
       o.plan,
       sum(e.cost)::bigint                                      AS tokens_30d,
       count(*) FILTER (WHERE e.kind IN ('consume', 'commit'))  AS calls_30d,
       rank() OVER (ORDER BY sum(e.cost) DESC)                  AS rank
FROM usage_events e
LEFT JOIN orgs o USING (org_id)
WHERE e.ts >= now() - interval '30 days' AND e.kind IN ('consume', 'commit', 'refund')
GROUP BY e.org_id, o.name, o.plan;

-- The period each meter is in: the latest reset (a new period) or plan adjustment, whose
-- metadata carries the allocation (-1 unlimited) and the period end.
CREATE VIEW meter_periods AS
SELECT DISTINCT ON (org_id, meter)
       org_id,
       meter,
       (metadata ->> 'allocation')::bigint                       AS allocation,
       to_timestamp((metadata ->> 'period_end')::bigint)         AS period_end,
       ts                                                        AS changed_at
FROM usage_events
WHERE kind IN ('reset', 'adjust') AND metadata ? 'allocation'
ORDER BY org_id, meter, ts DESC;

-- Balances derived from the ledger alone: sum(delta - delta_purchased) is what is left of the
-- allocation, sum(delta_purchased) the purchased credit (what Redis holds as `a` and `p`, up to
-- the events not yet drained; `quota-gw reconcile` compares the two).
CREATE VIEW ledger_balances AS
SELECT b.org_id,
       b.meter,
       b.allocated,
       b.purchased,
       b.allocated + b.purchased                                 AS balance,
       b.purchased_total,
       p.allocation,
       p.period_end,
       b.last_event_at
FROM (
    SELECT org_id, meter,
           sum(delta - delta_purchased)::bigint                  AS allocated,
           sum(delta_purchased)::bigint                          AS purchased,
           coalesce(sum(delta_purchased) FILTER (
               WHERE delta_purchased > 0 AND kind IN ('grant', 'purchase', 'adjust')), 0)::bigint AS purchased_total,
           max(ts)                                               AS last_event_at
    FROM usage_events
    WHERE meter IS NOT NULL
    GROUP BY org_id, meter
) b
LEFT JOIN meter_periods p USING (org_id, meter);

-- Meters below a quarter of their period's allocation (the gateway's default low-balance mark).
CREATE VIEW low_balances AS
SELECT org_id, meter, balance, allocation, purchased, period_end,
       round(100.0 * balance / allocation, 1)                    AS percent_left
FROM ledger_balances
WHERE allocation > 0 AND balance * 4 < allocation;

-- Burn rate (tokens a day, averaged over the last 7 days) and when the balance runs out at that
-- rate; exhausts_before_reset says whether that comes before the allocation refills.
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
    SELECT org_id, meter, sum(cost)::bigint AS used_7d
    FROM usage_events
    WHERE ts >= now() - interval '7 days' AND kind IN ('consume', 'commit', 'refund')
    GROUP BY org_id, meter
) u USING (org_id, meter);
