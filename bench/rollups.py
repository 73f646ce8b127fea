"""The ops queries over raw events (migration 002's views) against the same queries over the
rollups: 003's hour and day sums, and what ships (005's running and cumulative totals, 007's
whole-day burn rates), on a generated ledger (issue 13).

    .venv/bin/python bench/rollups.py [--raw 1000000,10000000] [--synthetic 100000000] [--orgs 1000]
                                      [--days 30] [--history-days 30] [--runs 5] [--write-events 200000]

Uses DATABASE_URL (default postgres@127.0.0.1:5432) to make a scratch database of its own,
migrated, dropped at the end (--keep to keep it).

1. Synthetic (--synthetic): the rollup rows that N events over the same orgs and days would
   produce, generated directly (every (org, feature, hour) bucket gets N / buckets events), and
   the rollup queries (003 and 005) over them. Raw events are not generated at that size (disk and time):
   rollups have at most orgs x features x hours rows whatever the event count.
2. Raw ledgers (--raw): usage_events filled server-side (INSERT ... SELECT generate_series, the
   rollup trigger disabled meanwhile) with N events over --days + --history-days days for --orgs orgs: 4
   features on 4 meters, 85 % consume, 5 % commit, 5 % refund, 5 % denied, in time order like a
   real ledger, plus a period reset per (org, meter). Then the rollups are built from the events
   (qgw_rollup_rebuild, timed), and each query runs over the raw events ("before": 002's views,
   recreated as before_*, and the old GET /v1/admin/top query), over 003's hour and day sums
   (its views' and admin query's SQL, inlined below) and as shipped ("after": top_spenders and
   the admin query over 005's per-org totals; burn_rates over 007's whole UTC days;
   low_balances is still 003's).
   Each size is a fresh ledger over --days + --history-days days: with no history, a 30-day
   window covers the whole ledger and finds no cumulative row before it (a cheaper probe than
   a real deployment's), so by default 30 more days of events precede it.
3. Write cost (--write-events): the worker's fast path (COPY of 1,000-line batches straight into
   usage_events, one transaction each), same lines, under four trigger functions in turn: none,
   003's as shipped (EXECUTE of each statement), 003's statements as static SQL, and what ships
   (003 and 005 statements, static).

Each query: one warm-up, then --runs timed runs (fetching every row), 003 and 005 taking turns
run by run (so the neighbours' load falls on both; the raw-event query runs first, on its own,
since its scans evict the rollups from shared_buffers); the median and the fastest run are
reported. The machine is shared: the load average is
printed; medians move with the neighbours.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import statistics
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import asyncpg

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from quota_gw import db  # noqa: E402
from sync_worker import sql  # noqa: E402

FEATURES = ["generate_insight", "generate_goal", "generate_leads", "chat"]
METERS = ["general", "goal_generation", "lead_generation", "tokens"]

# 003's usage over a window: hour and day sums per (org, meter, feature).
USAGE_003 = "(SELECT org_id, meter, sum(tokens)::bigint AS tokens, sum(calls)::bigint AS calls " \
            "FROM qgw_usage_since(now() - {days} * interval '1 day') {where} GROUP BY 1, 2)"

# name -> (before: raw events, 003: hour and day sums, after: 005 as shipped)
QUERIES = {
    "top_spenders": (
        "SELECT * FROM before_top_spenders",
        f"""SELECT u.org_id, o.name, o.plan, u.tokens_30d, u.calls_30d, rank() OVER (ORDER BY u.tokens_30d DESC)
            FROM (SELECT org_id, sum(tokens)::bigint AS tokens_30d, sum(calls)::bigint AS calls_30d
                  FROM {USAGE_003.format(days=30, where='')} s GROUP BY org_id
                  HAVING sum(calls) > 0 OR sum(tokens) <> 0) u LEFT JOIN orgs o USING (org_id)""",
        "SELECT * FROM top_spenders"),
    "low_balances": ("SELECT * FROM before_low_balances", "SELECT * FROM low_balances",
                     "SELECT * FROM low_balances"),
    "burn_rates": (
        "SELECT * FROM before_burn_rates",
        # 003's view verbatim: usage since the hour seven days ago (days and that day's hours)
        """SELECT b.org_id, b.meter, b.balance, b.allocation, b.period_end, coalesce(u.used_7d, 0) AS used_7d,
                   round(coalesce(u.used_7d, 0) / 7.0, 2) AS burn_per_day,
                   CASE WHEN b.allocation < 0 OR coalesce(u.used_7d, 0) <= 0 THEN NULL
                        ELSE now() + greatest(b.balance, 0) * interval '7 days' / u.used_7d END,
                   CASE WHEN b.allocation < 0 OR coalesce(u.used_7d, 0) <= 0 THEN false
                        ELSE coalesce(now() + greatest(b.balance, 0) * interval '7 days' / u.used_7d
                                      < b.period_end, true) END
            FROM ledger_balances b LEFT JOIN (SELECT org_id, meter, sum(tokens)::bigint AS used_7d
                 FROM qgw_usage_since(now() - interval '7 days') WHERE meter <> '' GROUP BY org_id, meter) u
            USING (org_id, meter)""",
        "SELECT * FROM burn_rates"),  # 007: whole UTC days from the daily rollup
    "GET /v1/admin/top": (
        """SELECT e.org_id, o.name, o.plan, sum(e.cost)::bigint AS tokens,
                  count(*) FILTER (WHERE e.kind IN ('consume', 'commit')) AS calls
           FROM usage_events e LEFT JOIN orgs o USING (org_id)
           WHERE e.ts >= now() - 30 * interval '1 day' AND e.kind IN ('consume', 'commit', 'refund')
           GROUP BY e.org_id, o.name, o.plan ORDER BY tokens DESC, e.org_id LIMIT 20""",
        """SELECT u.org_id, o.name, o.plan, u.tokens, u.calls
           FROM (SELECT org_id, sum(tokens)::bigint AS tokens, sum(calls)::bigint AS calls
                 FROM qgw_usage_since(now() - 30 * interval '1 day')
                 GROUP BY org_id HAVING sum(calls) > 0 OR sum(tokens) <> 0
                 ORDER BY tokens DESC, org_id LIMIT 20) u
           LEFT JOIN orgs o USING (org_id)
           ORDER BY u.tokens DESC, u.org_id""",
        """SELECT u.org_id, o.name, o.plan, u.tokens, u.calls
           FROM (SELECT org_id, tokens, calls FROM qgw_org_usage_since(now() - 30 * interval '1 day')
                 WHERE calls > 0 OR tokens <> 0 ORDER BY tokens DESC, org_id LIMIT 20) u
           LEFT JOIN orgs o USING (org_id)
           ORDER BY u.tokens DESC, u.org_id"""),
}

# Events in time order over the window, ids g in [lo, hi]; $1 lo, $2 hi, $3 the ledger's size
# (positions the events in time), $4 orgs, $5 days.
GENERATE = f"""
INSERT INTO usage_events (event_id, ts, kind, org_id, user_id, key_id, meter, feature, delta, delta_purchased,
                          cost, balance_after, metadata, stream_id)
SELECT gen_random_uuid(), ts, kind, org, 'u' || (g % 7), 'key_bench', meter, feature,
       CASE WHEN kind IN ('consume', 'commit') THEN -units WHEN kind = 'refund' THEN units ELSE 0 END, 0,
       CASE WHEN kind IN ('consume', 'commit') THEN units WHEN kind = 'refund' THEN -units ELSE 0 END, 0,
       CASE WHEN kind = 'denied' THEN
            CASE WHEN g % 3 = 0 THEN '{{"code":"rate_limited"}}' ELSE '{{"code":"insufficient_balance"}}' END::jsonb END,
       NULL
FROM (
    SELECT g,
           now() - $5 * interval '1 day' + (g::float8 / $3) * $5 * interval '1 day' AS ts,
           CASE WHEN r < 0.85 THEN 'consume' WHEN r < 0.90 THEN 'commit' WHEN r < 0.95 THEN 'refund'
                ELSE 'denied' END AS kind,
           'org-' || lpad((1 + (hashint8(g) & 1048575) % $4)::text, 4, '0') AS org,
           (ARRAY{METERS!r})[1 + (g % 4)::int] AS meter,
           (ARRAY{FEATURES!r})[1 + (g % 4)::int] AS feature,
           1 + (g % 9) AS units
    FROM (SELECT g, random() AS r FROM generate_series($1::bigint, $2::bigint) g) s
) e
"""

# One reset per (org, meter) at the ledger's start; $3 is the usage an (org, meter) will have at
# the largest size, and the allocation is 0.8 to 1.6 times that (some orgs end under 25 %).
RESETS = """
INSERT INTO usage_events (event_id, ts, kind, org_id, meter, delta, cost, metadata)
SELECT gen_random_uuid(), now() - $2 * interval '1 day' - interval '1 hour', 'reset', o.org_id, m.meter, a.alloc, 0,
       jsonb_build_object('allocation', a.alloc, 'period_end', extract(epoch FROM now() + interval '5 days')::bigint)
FROM orgs o CROSS JOIN unnest($1::text[]) AS m(meter)
CROSS JOIN LATERAL (SELECT ($3 * (0.8 + 0.8 * (hashtext(o.org_id) & 1023) / 1023.0))::bigint AS alloc) a
"""

# The rollups N events would make: every (org, feature, hour) bucket, N / buckets events each.
# Written in time order, as the trigger writes them (an hour's and a day's rows are made during
# that hour and day), so a window's rows share pages as they do in a real deployment; written
# org by org instead, a 7-day read of usage_daily touched 6x the pages (docs/benchmarks.md).
SYNTHETIC = f"""
INSERT INTO usage_hourly (org_id, meter, feature, hour, events, calls, tokens, refunds, refunded, denied,
                          delta, delta_purchased, purchased_in, last_event_at)
SELECT org, meter, feature, hour, per, calls, tokens, refunds, refunds * 5, per - calls - refunds,
       -tokens, 0, 0, hour + interval '59 minutes'
FROM (
    SELECT 'org-' || lpad(o::text, 4, '0') AS org, (ARRAY{METERS!r})[f] AS meter,
           (ARRAY{FEATURES!r})[f] AS feature, h AS hour, $1::bigint AS per,
           round($1 * 0.90)::bigint AS calls, round($1 * 0.05)::bigint AS refunds,
           (round($1 * 0.90) * 5 - round($1 * 0.05) * 5)::bigint AS tokens
    FROM generate_series(1, $2) o, generate_series(1, 4) f,
         generate_series(date_trunc('hour', now() - $3 * interval '1 day', 'UTC'), now(), interval '1 hour') h
) s
ORDER BY hour, org, feature
"""


# The rest of the synthetic rollups: days from hours, refusals split over two reasons, and per
# (org, meter) totals with an allocation 0.8 to 1.6 times the window's use (some orgs under 25 %).
SYNTHETIC_REST = """
INSERT INTO usage_daily SELECT org_id, meter, feature, (hour AT TIME ZONE 'UTC')::date, sum(events), sum(calls),
       sum(tokens), sum(refunds), sum(refunded), sum(denied), sum(delta), sum(delta_purchased), sum(purchased_in),
       max(last_event_at)
FROM usage_hourly GROUP BY 1, 2, 3, 4 ORDER BY 4, 1, 2, 3;
INSERT INTO denials_hourly SELECT org_id, meter, feature, hour, r.reason, denied / 2
FROM usage_hourly, unnest(ARRAY['insufficient_balance', 'rate_limited']) AS r(reason);
INSERT INTO meter_totals (org_id, meter, allocated, purchased, purchased_total, changes, last_event_at, allocation,
                          period_end, period_changed_at)
SELECT org_id, meter, a.alloc + used, 0, 0, changes, last_at, a.alloc, now() + interval '5 days',
       now() - interval '30 days'
FROM (SELECT org_id, meter, sum(delta) AS used, sum(events - denied) AS changes, max(last_event_at) AS last_at,
             -sum(delta) AS spent
      FROM usage_hourly GROUP BY 1, 2) t
CROSS JOIN LATERAL (SELECT (t.spent * (0.8 + 0.8 * (hashtext(t.org_id) & 1023) / 1023.0))::bigint AS alloc) a;
SELECT qgw_cumulative_rebuild();
"""


async def side_by_side(conn: asyncpg.Connection, queries: list[str], runs: int) -> list[tuple[float, float, int]]:
    """(median ms, fastest ms, rows) of each query, the queries taking turns run by run."""
    rows = [len(await conn.fetch(q)) for q in queries]  # warm-up
    times: list[list[float]] = [[] for _ in queries]
    for _ in range(runs):
        for i, q in enumerate(queries):
            t0 = time.perf_counter()
            await conn.fetch(q)
            times[i].append((time.perf_counter() - t0) * 1000)
    return [(statistics.median(t), min(t), n) for t, n in zip(times, rows)]


ANALYZE = ("ANALYZE usage_hourly; ANALYZE usage_daily; ANALYZE denials_hourly; ANALYZE meter_totals; "
           "ANALYZE usage_running; ANALYZE usage_cumulative")


def before_views() -> str:
    """002's views over raw events, renamed before_*."""
    text = (ROOT / "src" / "quota_gw" / "migrations" / "002_audit.sql").read_text()
    text = re.sub(r"^CREATE INDEX[^;]*;", "", text, flags=re.M)
    for name in ("usage_by_feature_day", "top_spenders", "meter_periods", "ledger_balances", "low_balances",
                 "burn_rates"):
        text = re.sub(rf"\b{name}\b", f"before_{name}", text)
    return text


# The trigger function as 003 shipped it: each statement planned again by EXECUTE, every batch.
TRIGGER_003_EXECUTE = """CREATE OR REPLACE FUNCTION qgw_rollup_inserted() RETURNS trigger LANGUAGE plpgsql AS $fn$
DECLARE stmt text;
BEGIN
    FOREACH stmt IN ARRAY qgw_rollup_statements('qgw_inserted_events') LOOP EXECUTE stmt; END LOOP;
    RETURN NULL;
END $fn$"""


def trigger_static(*lists: str) -> str:
    """The trigger function with the statements of the given lists written out (005's way)."""
    parts = " || ".join(f"{f}('qgw_inserted_events')" for f in lists)
    return f"""DO $do$ BEGIN EXECUTE format($f$CREATE OR REPLACE FUNCTION qgw_rollup_inserted() RETURNS trigger
        LANGUAGE plpgsql AS $body$ BEGIN %s; RETURN NULL; END $body$$f$, array_to_string({parts}, E';\n'));
    END $do$"""


async def write_cost(conn: asyncpg.Connection, n: int) -> dict[str, float]:
    """Events/s through the worker's fast path (COPY text lines, 1,000 per transaction) under each
    trigger function in turn; fresh event ids each round, best of two rounds each."""
    base = int(time.time()) - 3600
    shipped = await conn.fetchval("SELECT pg_get_functiondef('qgw_rollup_inserted'::regproc)")
    modes = {
        "no trigger": None,
        "003 (EXECUTE)": TRIGGER_003_EXECUTE,
        "003 static": trigger_static("qgw_rollup_statements"),
        "003 + 005 static (shipped)": shipped,
    }

    def lines() -> list[bytes]:
        out = []
        for i in range(n):
            ts = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(base + i // 100))
            meta = '{"code":"insufficient_balance"}' if i % 20 == 0 else ""
            kind = "denied" if meta else "consume"
            out.append(f"{uuid.uuid4().hex}\t{kind}\torg-{1 + i % 1000:04d}\tu{i % 7}\tkey_bench_w\t{METERS[i % 4]}\t"
                       f"{FEATURES[i % 4]}\t-3\t0\t3\t0\t{ts}.{i % 100:06d}+00\t{meta}\tbench/{i}-0\n".encode())
        return out

    rates: dict[str, float] = {}
    try:
        for _ in range(2):
            for mode, function in modes.items():
                await conn.execute(f"ALTER TABLE usage_events {'DISABLE' if function is None else 'ENABLE'} TRIGGER "
                                   "usage_events_rollup")
                if function is not None:
                    await conn.execute(function)
                batch = lines()
                t0 = time.perf_counter()
                for i in range(0, n, 1000):
                    async def src(chunk: list[bytes] = batch[i:i + 1000]) -> Any:
                        yield b"".join(chunk)
                    async with conn.transaction():
                        await conn.copy_to_table("usage_events", source=src(), columns=sql.COLUMNS, **sql.COPY_OPTIONS)
                rates[mode] = max(rates.get(mode, 0.0), n / (time.perf_counter() - t0))
    finally:
        await conn.execute(shipped)
        await conn.execute("ALTER TABLE usage_events ENABLE TRIGGER usage_events_rollup")
    return rates


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--raw", default="1000000,10000000", help="raw ledger sizes, comma separated")
    ap.add_argument("--synthetic", type=int, default=100_000_000, help="event count the synthetic rollups stand for")
    ap.add_argument("--orgs", type=int, default=1000)
    ap.add_argument("--days", type=int, default=30, help="the ops windows' days (30 for top spenders)")
    ap.add_argument("--history-days", type=int, default=30, help="days of ledger before the window")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--write-events", type=int, default=200_000)
    ap.add_argument("--keep", action="store_true", help="keep the scratch database")
    args = ap.parse_args()
    sizes = [int(x) for x in args.raw.split(",") if x]
    span = args.days + args.history_days  # the ledger's days
    print(f"load average at start: {' '.join(f'{x:.1f}' for x in os.getloadavg())} on {os.cpu_count()} CPUs", flush=True)

    admin_url = os.environ.get("DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
    name = f"qgw_bench_rollups_{os.getpid()}"
    admin = await asyncpg.connect(admin_url)
    await admin.execute(f'CREATE DATABASE "{name}"')
    url = admin_url.rsplit("/", 1)[0] + "/" + name
    conn = await asyncpg.connect(url, command_timeout=3600)
    results: list[tuple[str, str, str, float, int]] = []
    try:
        await db.migrate(conn)
        await conn.execute(before_views())
        await conn.execute("INSERT INTO orgs (org_id, name, plan) SELECT 'org-' || lpad(o::text, 4, '0'), "
                           "'Org ' || o, 'pro' FROM generate_series(1, $1) o", args.orgs)

        if args.synthetic:
            t0 = time.perf_counter()
            buckets = args.orgs * 4 * (span * 24 + 1)
            per = max(1, args.synthetic // buckets)
            await conn.execute(SYNTHETIC, per, args.orgs, span)
            await conn.execute(SYNTHETIC_REST)
            await conn.execute(ANALYZE)
            stands_for = await conn.fetchval("SELECT sum(events) FROM usage_hourly")
            hourly = await conn.fetchval("SELECT count(*) FROM usage_hourly")
            daily = await conn.fetchval("SELECT count(*) FROM usage_daily")
            print(f"synthetic rollups for {stands_for:,} events ({hourly:,} hourly rows, {daily:,} daily rows, "
                  f"{per} events per (org, feature, hour); made in {time.perf_counter() - t0:.0f} s)", flush=True)
            for q, (_, r003, after) in QUERIES.items():
                (m3, f3, n3), (m5, f5, n5) = await side_by_side(conn, [r003, after], args.runs)
                print(f"  {q:<20} 003 {m3:7.1f} ms (fastest {f3:.1f}, {n3} rows)   "
                      f"shipped {m5:7.1f} ms (fastest {f5:.1f}, {n5} rows)   {m3 / m5:.1f}x", flush=True)
                results += [(f"{stands_for:,} (rollups only)", q, "003", m3, f3),
                            (f"{stands_for:,} (rollups only)", q, "after", m5, f5)]

        await conn.execute("ALTER TABLE usage_events DISABLE TRIGGER usage_events_rollup")
        for size in sizes:
            # A fresh ledger of `size` events over the whole window.
            await conn.execute("TRUNCATE usage_events")
            t0 = time.perf_counter()
            await conn.execute(RESETS, METERS, span, int(size / args.orgs / 4 * 4.25))
            step = 1_000_000
            for lo in range(1, size + 1, step):
                await conn.execute(GENERATE, lo, min(lo + step - 1, size), size, args.orgs, span)
            await conn.execute("ANALYZE usage_events")
            gen_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            await conn.execute("SELECT qgw_rollup_rebuild()")
            await conn.execute(ANALYZE)
            rebuild_s = time.perf_counter() - t0
            n = await conn.fetchval("SELECT count(*) FROM usage_events")
            hourly = await conn.fetchval("SELECT count(*) FROM usage_hourly")
            size_mb = await conn.fetchval("SELECT coalesce(sum(pg_total_relation_size(c.oid)), 0) / 1e6 "
                                          "FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
                                          "WHERE i.inhparent = 'usage_events'::regclass")
            print(f"\n{n:,} raw events ({size_mb:,.0f} MB with indexes; generated in {gen_s:.0f} s); "
                  f"rollups rebuilt in {rebuild_s:.1f} s: {hourly:,} hourly rows", flush=True)
            for q, (before, r003, after) in QUERIES.items():
                # The raw scans first, on their own: interleaved, they evict the rollups from
                # shared_buffers before every rollup run (a dashboard reads warm rollups).
                ((mb, fb, nb),) = await side_by_side(conn, [before], args.runs)
                (m3, f3, n3), (m5, f5, n5) = await side_by_side(conn, [r003, after], args.runs)
                print(f"  {q:<20} before {mb:9.1f} ms ({nb} rows)   003 {m3:7.1f} ms ({n3} rows)   "
                      f"shipped {m5:7.1f} ms ({n5} rows)   before/shipped {mb / m5:,.0f}x", flush=True)
                results += [(f"{n:,} raw", q, "before", mb, fb), (f"{n:,} raw", q, "003", m3, f3),
                            (f"{n:,} raw", q, "after", m5, f5)]
        await conn.execute("ALTER TABLE usage_events ENABLE TRIGGER usage_events_rollup")

        if args.write_events:
            rates = await write_cost(conn, args.write_events)
            off = rates["no trigger"]
            print(f"\nworker fast path, {args.write_events:,} events in 1,000-line COPY transactions "
                  "(every line of a batch another org: the worst case):", flush=True)
            for k, v in rates.items():
                print(f"  {k:<28} {v:8,.0f} events/s  {v / off:.2f}x", flush=True)
    finally:
        await conn.close()
        if not args.keep:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()

    print("\nmedian (fastest) of each; the sides of a row ran in turns")
    print("| ledger | query | before (raw events) | 003 (hour/day sums) | after (shipped) |\n|---|---|---|---|---|")
    table: dict[tuple[str, str], dict[str, tuple[float, float]]] = {}
    for ledger, q, side, ms, fastest in results:
        table.setdefault((ledger, q), {})[side] = (ms, fastest)
    for (ledger, q), v in table.items():
        cells = [f"{v[k][0]:,.1f} ms ({v[k][1]:,.1f})" if k in v else "not measured" for k in ("before", "003", "after")]
        print(f"| {ledger} | {q} | {' | '.join(cells)} |")


if __name__ == "__main__":
    asyncio.run(main())
