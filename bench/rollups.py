"""The ops queries over raw events (migration 002's views) against the same queries over the
rollups (migration 003), on a generated ledger (issue 13).

    .venv/bin/python bench/rollups.py [--raw 1000000,10000000] [--synthetic 100000000] [--orgs 1000]
                                      [--days 30] [--runs 5] [--write-events 200000]

Uses DATABASE_URL (default postgres@127.0.0.1:5432) to make a scratch database of its own,
migrated, dropped at the end (--keep to keep it).

1. Synthetic (--synthetic): the rollup rows that N events over the same orgs and days would
   produce, generated directly (every (org, feature, hour) bucket gets N / buckets events), and
   the "after" queries over them. Raw events are not generated at that size (disk and time):
   rollups have at most orgs x features x hours rows whatever the event count.
2. Raw ledgers (--raw): usage_events filled server-side (INSERT ... SELECT generate_series, the
   rollup trigger disabled meanwhile) with N events over --days days for --orgs orgs: 4
   features on 4 meters, 85 % consume, 5 % commit, 5 % refund, 5 % denied, in time order like a
   real ledger, plus a period reset per (org, meter). Then the rollups are built from the events
   (qgw_rollup_rebuild, timed), and each query runs over the raw events ("before": 002's views,
   recreated as before_*, and the old GET /v1/admin/top query) and over the rollups ("after":
   003's views and the new admin query). Each size is a fresh ledger over the whole window.
3. Write cost (--write-events): the worker's fast path (COPY of 1,000-line batches straight into
   usage_events, one transaction each) with the rollup trigger on and off, same lines.

Each query: one warm-up, then --runs timed runs (fetching every row); the median is reported
(and the fastest run for the synthetic rollups). The machine is shared: the load average is
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

QUERIES = {
    "top_spenders": ("SELECT * FROM before_top_spenders", "SELECT * FROM top_spenders"),
    "low_balances": ("SELECT * FROM before_low_balances", "SELECT * FROM low_balances"),
    "burn_rates": ("SELECT * FROM before_burn_rates", "SELECT * FROM burn_rates"),
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

# One reset per (org, meter) at the window's start; $3 is the usage an (org, meter) will have at
# the largest size, and the allocation is 0.8 to 1.6 times that (some orgs end under 25 %).
RESETS = """
INSERT INTO usage_events (event_id, ts, kind, org_id, meter, delta, cost, metadata)
SELECT gen_random_uuid(), now() - $2 * interval '1 day' - interval '1 hour', 'reset', o.org_id, m.meter, a.alloc, 0,
       jsonb_build_object('allocation', a.alloc, 'period_end', extract(epoch FROM now() + interval '5 days')::bigint)
FROM orgs o CROSS JOIN unnest($1::text[]) AS m(meter)
CROSS JOIN LATERAL (SELECT ($3 * (0.8 + 0.8 * (hashtext(o.org_id) & 1023) / 1023.0))::bigint AS alloc) a
"""

# The rollups N events would make: every (org, feature, hour) bucket, N / buckets events each.
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
"""


# The rest of the synthetic rollups: days from hours, refusals split over two reasons, and per
# (org, meter) totals with an allocation 0.8 to 1.6 times the window's use (some orgs under 25 %).
SYNTHETIC_REST = """
INSERT INTO usage_daily SELECT org_id, meter, feature, (hour AT TIME ZONE 'UTC')::date, sum(events), sum(calls),
       sum(tokens), sum(refunds), sum(refunded), sum(denied), sum(delta), sum(delta_purchased), sum(purchased_in),
       max(last_event_at)
FROM usage_hourly GROUP BY 1, 2, 3, 4;
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
"""


FASTEST: dict[str, float] = {}  # query -> fastest run (ms), printed beside the median


async def timed(conn: asyncpg.Connection, query: str, runs: int) -> tuple[float, int]:
    rows = await conn.fetch(query)  # warm-up
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        rows = await conn.fetch(query)
        times.append(time.perf_counter() - t0)
    FASTEST[query] = min(times) * 1000
    return statistics.median(times) * 1000, len(rows)


def before_views() -> str:
    """002's views over raw events, renamed before_*."""
    text = (ROOT / "src" / "quota_gw" / "migrations" / "002_audit.sql").read_text()
    text = re.sub(r"^CREATE INDEX[^;]*;", "", text, flags=re.M)
    for name in ("usage_by_feature_day", "top_spenders", "meter_periods", "ledger_balances", "low_balances",
                 "burn_rates"):
        text = re.sub(rf"\b{name}\b", f"before_{name}", text)
    return text


async def write_cost(conn: asyncpg.Connection, n: int) -> dict[str, float]:
    """Events/s through the worker's fast path (COPY text lines, 1,000 per transaction), with the
    rollup trigger on and off; fresh event ids each round, best of two rounds each."""
    base = int(time.time()) - 3600

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
    for mode in ("on", "off", "on", "off"):
        await conn.execute(f"ALTER TABLE usage_events {'ENABLE' if mode == 'on' else 'DISABLE'} TRIGGER "
                           "usage_events_rollup")
        batch = lines()
        t0 = time.perf_counter()
        for i in range(0, n, 1000):
            async def src(chunk: list[bytes] = batch[i:i + 1000]) -> Any:
                yield b"".join(chunk)
            async with conn.transaction():
                await conn.copy_to_table("usage_events", source=src(), columns=sql.COLUMNS, **sql.COPY_OPTIONS)
        rate = n / (time.perf_counter() - t0)
        rates[f"trigger {mode}"] = max(rates.get(f"trigger {mode}", 0.0), rate)
    await conn.execute("ALTER TABLE usage_events ENABLE TRIGGER usage_events_rollup")
    return rates


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--raw", default="1000000,10000000", help="raw ledger sizes, comma separated")
    ap.add_argument("--synthetic", type=int, default=100_000_000, help="event count the synthetic rollups stand for")
    ap.add_argument("--orgs", type=int, default=1000)
    ap.add_argument("--days", type=int, default=30)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--write-events", type=int, default=200_000)
    ap.add_argument("--keep", action="store_true", help="keep the scratch database")
    args = ap.parse_args()
    sizes = [int(x) for x in args.raw.split(",") if x]
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
            buckets = args.orgs * 4 * (args.days * 24 + 1)
            per = max(1, args.synthetic // buckets)
            await conn.execute(SYNTHETIC, per, args.orgs, args.days)
            await conn.execute(SYNTHETIC_REST)
            await conn.execute("ANALYZE usage_hourly; ANALYZE usage_daily; ANALYZE denials_hourly; ANALYZE meter_totals")
            stands_for = await conn.fetchval("SELECT sum(events) FROM usage_hourly")
            hourly = await conn.fetchval("SELECT count(*) FROM usage_hourly")
            daily = await conn.fetchval("SELECT count(*) FROM usage_daily")
            print(f"synthetic rollups for {stands_for:,} events ({hourly:,} hourly rows, {daily:,} daily rows, "
                  f"{per} events per (org, feature, hour); made in {time.perf_counter() - t0:.0f} s)", flush=True)
            for q, (_, after) in QUERIES.items():
                a_ms, a_rows = await timed(conn, after, args.runs)
                print(f"  {q:<20} after {a_ms:7.1f} ms, fastest {FASTEST[after]:.1f} ms ({a_rows} rows)", flush=True)
                results.append((f"{stands_for:,} (rollups only)", q, "after", a_ms, a_rows))

        await conn.execute("ALTER TABLE usage_events DISABLE TRIGGER usage_events_rollup")
        for size in sizes:
            # A fresh ledger of `size` events over the whole window.
            await conn.execute("TRUNCATE usage_events")
            t0 = time.perf_counter()
            await conn.execute(RESETS, METERS, args.days, int(size / args.orgs / 4 * 4.25))
            step = 1_000_000
            for lo in range(1, size + 1, step):
                await conn.execute(GENERATE, lo, min(lo + step - 1, size), size, args.orgs, args.days)
            await conn.execute("ANALYZE usage_events")
            gen_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            await conn.execute("SELECT qgw_rollup_rebuild()")
            await conn.execute("ANALYZE usage_hourly; ANALYZE usage_daily; ANALYZE denials_hourly; ANALYZE meter_totals")
            rebuild_s = time.perf_counter() - t0
            n = await conn.fetchval("SELECT count(*) FROM usage_events")
            hourly = await conn.fetchval("SELECT count(*) FROM usage_hourly")
            size_mb = await conn.fetchval("SELECT coalesce(sum(pg_total_relation_size(c.oid)), 0) / 1e6 "
                                          "FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
                                          "WHERE i.inhparent = 'usage_events'::regclass")
            print(f"\n{n:,} raw events ({size_mb:,.0f} MB with indexes; generated in {gen_s:.0f} s); "
                  f"rollups rebuilt in {rebuild_s:.1f} s: {hourly:,} hourly rows", flush=True)
            for q, (before, after) in QUERIES.items():
                b_ms, b_rows = await timed(conn, before, args.runs)
                a_ms, a_rows = await timed(conn, after, args.runs)
                print(f"  {q:<20} before {b_ms:9.1f} ms ({b_rows} rows)   after {a_ms:7.1f} ms ({a_rows} rows)",
                      flush=True)
                results += [(f"{n:,} raw", q, "before", b_ms, b_rows), (f"{n:,} raw", q, "after", a_ms, a_rows)]
        await conn.execute("ALTER TABLE usage_events ENABLE TRIGGER usage_events_rollup")

        if args.write_events:
            rates = await write_cost(conn, args.write_events)
            print(f"\nworker fast path, {args.write_events:,} events in 1,000-line COPY transactions: "
                  + ", ".join(f"{k} {v:,.0f} events/s" for k, v in rates.items()), flush=True)
    finally:
        await conn.close()
        if not args.keep:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()

    print("\n| ledger | query | before (raw events) | after (rollups) |\n|---|---|---|---|")
    table: dict[tuple[str, str], dict[str, float]] = {}
    for ledger, q, side, ms, _ in results:
        table.setdefault((ledger, q), {})[side] = ms
    for (ledger, q), v in table.items():
        b = f"{v['before']:,.0f} ms" if "before" in v else "not measured"
        print(f"| {ledger} | {q} | {b} | {v['after']:,.1f} ms |")


if __name__ == "__main__":
    asyncio.run(main())
