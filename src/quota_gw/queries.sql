-- The gateway's SQL, every statement named once (read by queries.py; used by store.py).
-- A block starts with `-- <name> --` and a comment line saying what it does; $n are its
-- arguments in the order the store passes them. Aggregates of the ledger are not restated
-- here: "usage" is defined by the rollups of migration 003 and read through its views.

-- org_exists --
-- 1 when the org exists
SELECT 1 FROM orgs WHERE org_id = $1;

-- org_plan --
-- The org's plan, or NULL when there is no such org
SELECT plan FROM orgs WHERE org_id = $1;

-- insert_org --
-- A new org; an existing id is a unique violation
INSERT INTO orgs (org_id, name, plan) VALUES ($1, $2, $3);

-- update_org_plan --
-- The org's plan; NULL when there is no such org
UPDATE orgs SET plan = $2, updated_at = now() WHERE org_id = $1 RETURNING plan;

-- list_orgs --
-- A page of orgs by id, after the id $1 (NULL: from the first), at most $2
SELECT org_id, name, plan, created_at FROM orgs
WHERE $1::text IS NULL OR org_id > $1 ORDER BY org_id LIMIT $2;

-- org_entitlements --
-- The org's plan and its entitlements (NULL: none), or no row when there is no such org
SELECT o.plan, e.entitlements::text AS entitlements, e.updated_at
FROM orgs o LEFT JOIN org_entitlements e USING (org_id) WHERE o.org_id = $1;

-- upsert_entitlements --
-- The org's override of its plan's layers (migration 009), replacing the one it had
INSERT INTO org_entitlements (org_id, entitlements) VALUES ($1, $2::jsonb)
ON CONFLICT (org_id) DO UPDATE SET entitlements = EXCLUDED.entitlements, updated_at = now();

-- delete_entitlements --
-- Removes the org's override: its plan's layers again
DELETE FROM org_entitlements WHERE org_id = $1;

-- upsert_user --
-- A user and their team; true when the user existed (the team is replaced)
INSERT INTO users (org_id, user_id, team) VALUES ($1, $2, $3)
ON CONFLICT (org_id, user_id) DO UPDATE SET team = EXCLUDED.team
RETURNING (xmax <> 0);

-- insert_key --
-- An API key, by the hash of its secret (the key itself is never stored)
INSERT INTO api_keys (key_id, org_id, user_id, key_hash, key_prefix, scopes) VALUES ($1, $2, $3, $4, $5, $6);

-- list_keys --
-- The org's keys, oldest first
SELECT key_id, user_id, key_prefix, scopes, created_at, revoked_at FROM api_keys
WHERE org_id = $1 ORDER BY created_at;

-- revoke_key --
-- Revokes a key (the first revocation time stays); its hash, NULL when there is no such key
UPDATE api_keys SET revoked_at = coalesce(revoked_at, now()) WHERE key_id = $1 RETURNING key_hash;

-- upsert_sub_quota --
-- A user's or team's cap per period on one meter
INSERT INTO sub_quotas (org_id, meter, scope, subject, quota) VALUES ($1, $2, $3, $4, $5)
ON CONFLICT (org_id, meter, scope, subject) DO UPDATE SET quota = EXCLUDED.quota, updated_at = now();

-- delete_sub_quota --
-- Removes a user's or team's cap
DELETE FROM sub_quotas WHERE org_id = $1 AND meter = $2 AND scope = $3 AND subject = $4;

-- upsert_webhook --
-- The org's low-balance webhook URL and its signing secret
INSERT INTO org_webhooks (org_id, url, secret) VALUES ($1, $2, $3)
ON CONFLICT (org_id) DO UPDATE SET url = EXCLUDED.url, secret = EXCLUDED.secret, updated_at = now();

-- webhook_deliveries --
-- The org's delivery attempts, newest first, at most $2
SELECT d.*, o.delivered_at FROM webhook_deliveries d LEFT JOIN webhook_outbox o USING (event_id)
WHERE d.org_id = $1 ORDER BY d.created_at DESC, d.id DESC LIMIT $2;

-- usage_events --
-- The org's events, newest first: {where} is the store's filters (org_id = $1 AND ...), ${limit} the page
SELECT event_id, ts, kind, user_id, key_id, meter, feature, delta, delta_purchased, cost,
       balance_after, metadata::text AS metadata, sources
FROM usage_events WHERE {where}
ORDER BY ts DESC, event_id DESC LIMIT ${limit};

-- usage_by_day --
-- The org's usage per UTC day, meter and feature from the day $2 on (the documented view)
SELECT day, meter, feature, calls, tokens, refunded, denied
FROM usage_by_feature_day WHERE org_id = $1 AND day >= $2;

-- spend_by_layer --
-- Tokens the org's charges took from each layer of each meter since $2, net of refunds (migration 008)
SELECT meter, layer, -sum(delta)::bigint AS tokens
FROM usage_event_sources WHERE org_id = $1 AND ts >= $2 AND kind IN ('consume', 'commit', 'refund')
GROUP BY meter, layer HAVING sum(delta) <> 0 ORDER BY meter, tokens DESC, layer;

-- usage_by_meter_since --
-- Tokens the org's calls were priced at per meter since $2 (rollups: from the hour $2 falls in)
SELECT meter, sum(tokens)::bigint AS tokens
FROM qgw_usage_since($2) WHERE org_id = $1 AND meter <> ''
GROUP BY meter;

-- top_orgs_all_meters --
-- Orgs by tokens used over the last $1 days (from the hour), at most $2: one probe per org in the
-- running and cumulative totals (migration 005)
SELECT u.org_id, o.name, o.plan, u.tokens, u.calls
FROM (SELECT org_id, tokens, calls FROM qgw_org_usage_since(now() - $1 * interval '1 day')
      WHERE calls > 0 OR tokens <> 0
      ORDER BY tokens DESC, org_id LIMIT $2) u
LEFT JOIN orgs o USING (org_id)
ORDER BY u.tokens DESC, u.org_id;

-- burn_by_org_meter --
-- Tokens per (org, meter) over the last $1 days (rollups: from the hour), the largest first, at most $2
SELECT u.org_id, o.name, o.plan, u.meter, sum(u.tokens)::bigint AS tokens
FROM qgw_usage_since(now() - $1 * interval '1 day') u JOIN orgs o USING (org_id)
WHERE u.meter <> ''
GROUP BY u.org_id, o.name, o.plan, u.meter HAVING sum(u.tokens) > 0
ORDER BY tokens DESC, u.org_id, u.meter LIMIT $2;

-- top_orgs_one_meter --
-- Orgs by tokens used of meter $3 over the last $1 days (003's hour and day sums), at most $2
SELECT u.org_id, o.name, o.plan, u.tokens, u.calls
FROM (SELECT org_id, sum(tokens)::bigint AS tokens, sum(calls)::bigint AS calls
      FROM qgw_usage_since(now() - $1 * interval '1 day')
      WHERE meter = $3
      GROUP BY org_id HAVING sum(calls) > 0 OR sum(tokens) <> 0
      ORDER BY tokens DESC, org_id LIMIT $2) u
LEFT JOIN orgs o USING (org_id)
ORDER BY u.tokens DESC, u.org_id;

-- insert_purchase --
-- A pending purchase for a checkout this gateway opened
INSERT INTO purchases (purchase_id, org_id, pack, meter, tokens, amount_cents, currency, checkout_id,
                       user_id, key_id)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) RETURNING *;

-- record_purchase --
-- A purchase for a paid session (a payment link: no pending row); nothing when it is known
INSERT INTO purchases (purchase_id, org_id, pack, meter, tokens, amount_cents, currency, checkout_id)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8) ON CONFLICT DO NOTHING;

-- list_purchases --
-- The org's purchases, newest first
SELECT * FROM purchases WHERE org_id = $1 ORDER BY created_at DESC, purchase_id LIMIT 500;

-- purchase_by_checkout --
SELECT * FROM purchases WHERE checkout_id = $1;

-- purchase_by_payment_intent --
SELECT * FROM purchases WHERE payment_intent = $1;

-- purchase_by_id --
SELECT * FROM purchases WHERE purchase_id = $1;

-- expire_purchase --
-- A pending checkout that expired
UPDATE purchases SET status = 'expired', updated_at = now() WHERE checkout_id = $1 AND status = 'pending';

-- mark_purchase_paid --
-- A pending (or expired) purchase, credited
UPDATE purchases SET status = 'paid', paid_at = now(), updated_at = now(),
       stripe_event_id = coalesce(stripe_event_id, $2), event_id = $3::uuid,
       payment_intent = coalesce(payment_intent, $4)
WHERE purchase_id = $1 AND status IN ('pending', 'expired');

-- mark_purchase_refunded --
UPDATE purchases SET status = 'refunded', updated_at = now() WHERE purchase_id = $1;

-- seed_low_balance_mark --
-- The low-balance mark the views read, until a gateway records its config's (migrate)
INSERT INTO low_balance_mark (percent) VALUES ($1) ON CONFLICT DO NOTHING;

-- record_low_balance_mark --
-- The low-balance mark of the gateway's config (each time it connects to Postgres)
INSERT INTO low_balance_mark (percent) VALUES ($1)
ON CONFLICT (one) DO UPDATE SET percent = EXCLUDED.percent, updated_at = now()
WHERE low_balance_mark.percent IS DISTINCT FROM EXCLUDED.percent;
