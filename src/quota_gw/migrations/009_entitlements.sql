-- Enterprise entitlements: an org's own override of its plan's waterfall layers (overflow,
-- overflow_cost, credit_order, and each rate window's overflow / overflow_cost), set by admin
-- (PUT /v1/admin/orgs/{org_id}/entitlements). Only what differs from the plan is stored; no row
-- is no override. Postgres is the source of truth: the org's Redis hash holds the same value as
-- canonical text (field `entitlements`), which `quota-gw rebuild` writes back from here.

CREATE TABLE org_entitlements (
    org_id        text PRIMARY KEY REFERENCES orgs ON DELETE CASCADE,
    entitlements  jsonb NOT NULL CHECK (jsonb_typeof(entitlements) = 'object'),
    updated_at    timestamptz NOT NULL DEFAULT now()
);
