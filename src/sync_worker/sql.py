"""The worker's SQL: the ledger columns it writes and its two write paths.

Fast path: COPY a batch straight into `usage_events`. The primary key (event_id, ts) refuses a
row that is already there, so a redelivered event can never be written twice: the COPY fails
with a unique violation and the batch goes the idempotent path instead, COPY into a
per-connection temp table and INSERT ... SELECT ... ON CONFLICT DO NOTHING. Redelivery is rare
(crashes, claims), so the ledger is written at nearly raw COPY speed (docs/benchmarks.md).
"""

from __future__ import annotations

from quota_gw import events

# Order of the COPY text lines the worker builds: the order of the entry's own fields
# (quota_gw/events.py), so a line is the entry's values joined, plus the stream id.
COLUMNS = (*events.COLUMNS, events.STREAM_ID_COLUMN)
# COPY options: an empty field is NULL (the scripts write '' for "none": no user, no metadata),
# so a line needs no per-field NULL markers. An empty org, kind or amount breaks a NOT NULL
# constraint: that entry is poison.
COPY_OPTIONS = {"format": "text", "null": ""}

STAGE = "qgw_stage"

# Temp tables live per connection, are never WAL-logged and are emptied at each commit.
CREATE_STAGE = f"""
CREATE TEMP TABLE IF NOT EXISTS {STAGE} (LIKE usage_events INCLUDING DEFAULTS) ON COMMIT DELETE ROWS
"""

_cols = ", ".join(COLUMNS)
# ORDER BY: two workers inserting overlapping batches take row locks in the same order (no deadlock).
INSERT_STAGED = f"""
INSERT INTO usage_events ({_cols})
SELECT {_cols} FROM {STAGE} ORDER BY event_id
ON CONFLICT (event_id, ts) DO NOTHING
"""

PARTITIONS_LOCK = 0x71677702

# One month back and three ahead; a month that already has rows in the default partition
# cannot get its own partition (logged, harmless: rows stay in the default partition).
ENSURE_PARTITIONS = "SELECT qgw_ensure_partitions((now() - interval '1 month')::date, $1)"
