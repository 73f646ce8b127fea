-- The low-balance mark in one place: the gateway's config (`alerts.thresholds`' highest, or
-- `behaviour.low_balance_percent` when that list is empty; config.Config.low_balance_mark), the
-- same mark GET /v1/balance calls `low`. 002 and 003 wrote it into `low_balances` as 25; the view
-- now reads it from this one-row table, which `migrate` seeds with the config's default and each
-- gateway overwrites with its own config's whenever it connects to Postgres (store.py), so
-- dashboards reading the view (Grafana) agree with the API without knowing the config.

CREATE TABLE low_balance_mark (
    one         boolean PRIMARY KEY DEFAULT true CHECK (one),
    percent     int NOT NULL CHECK (percent BETWEEN 0 AND 100),
    updated_at  timestamptz NOT NULL DEFAULT now()
);

-- Same columns as before; only the mark changed: below `percent` % of the period's allocation.
CREATE OR REPLACE VIEW low_balances AS
SELECT b.org_id, b.meter, b.balance, b.allocation, b.purchased, b.period_end,
       round(100.0 * b.balance / b.allocation, 1)    AS percent_left
FROM ledger_balances b CROSS JOIN low_balance_mark m
WHERE b.allocation > 0 AND b.balance * 100 < b.allocation * m.percent;
