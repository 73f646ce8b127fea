"""What the credit lots add to `quota-gw reconcile` (and `rebuild`): the replay of every meter
that ever had a lot (src/sync_worker/lots.py), timed alone and inside reconcile(), on a
generated ledger.

    .venv/bin/python bench/reconcile_lots.py [--orgs 2000] [--events 500000] [--lot-share 4] [--runs 5]

Uses DATABASE_URL (default postgres@127.0.0.1:5432) to make a scratch database of its own,
migrated, dropped at the end, and REDIS_URL (default 127.0.0.1:6379) under a prefix of its own,
deleted at the end. The ledger: --orgs orgs; every --lot-share-th org (0: none) has a purchase
and a grant that expires in a year, each a lot; --events consumes over all orgs (server-side
generate_series, the rollup trigger disabled), an org with lots paying every one from them (its
`sources` naming the grant's lot, or `purchased`, by turns), the others from their allocation.
Redis is filled by `rebuild`, which restores the lots; every check then finds no drift.

Each check: one warm-up, then --runs timed runs taking turns; median and fastest reported. The
machine is shared: the load average is printed; medians move with the neighbours.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

import asyncpg

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from sync_worker import lots  # noqa: E402
from sync_worker.recovery import rebuild, reconcile  # noqa: E402

sys.path.insert(0, str(ROOT / "bench"))
from reconcile_config import scratch, taking_turns  # noqa: E402


async def seed(pg: asyncpg.Connection, orgs: int, events: int, lot_share: int) -> int:
    """Returns how many orgs have lots."""
    await pg.execute("INSERT INTO orgs (org_id, plan) SELECT 'o' || i, 'pro' FROM generate_series(1, $1) i", orgs)
    await pg.execute("ALTER TABLE usage_events DISABLE TRIGGER USER")
    with_lots = 0
    if lot_share:
        with_lots = len(range(1, orgs + 1, lot_share))
        # Per org with lots: a purchase (lot 'p<i>') and a grant expiring in a year (lot: its event id).
        await pg.execute("""
            INSERT INTO usage_events (event_id, ts, kind, org_id, meter, delta, delta_purchased, metadata, stream_id)
            SELECT md5('g' || i)::uuid, now() - interval '2 days', 'grant', 'o' || i, 'general', $2::bigint, $2::bigint,
                   jsonb_build_object('reason', 'bench', 'expires_at',
                                      extract(epoch FROM now() + interval '365 days')::bigint),
                   'bench/' || (extract(epoch FROM now() - interval '2 days') * 1000)::bigint || '-' || i
              FROM generate_series(1, $1, $3) i
            UNION ALL
            SELECT md5('p' || i)::uuid, now() - interval '2 days' + interval '1 ms', 'purchase', 'o' || i, 'general',
                   $2::bigint, $2::bigint, jsonb_build_object('purchase_id', 'p' || i),
                   'bench/' || (extract(epoch FROM now() - interval '2 days') * 1000 + 1)::bigint || '-' || i
              FROM generate_series(1, $1, $3) i""", orgs, events, lot_share)
    await pg.execute("""
        INSERT INTO usage_events (event_id, ts, kind, org_id, meter, feature, delta, delta_purchased, cost,
                                  sources, stream_id)
        SELECT gen_random_uuid(), now() - (n % 86400) * interval '1 second', 'consume', 'o' || o, 'general',
               'generate_insight', -1, CASE WHEN lots THEN -1 ELSE 0 END, 1,
               CASE WHEN NOT lots THEN 'allocated:1' WHEN n % 2 = 0 THEN 'grant:' || replace(md5('g' || o), '-', '') || ':1'
                    ELSE 'purchased:1' END,
               'bench/' || (extract(epoch FROM now() - (n % 86400) * interval '1 second') * 1000)::bigint || '-' || n
          FROM generate_series(1, $1) n,
               LATERAL (SELECT 1 + n % $2 AS o) x,
               LATERAL (SELECT $3 > 0 AND (o - 1) % greatest($3, 1) = 0 AS lots) y""", events, orgs, lot_share)
    await pg.execute("ALTER TABLE usage_events ENABLE TRIGGER USER")
    await pg.execute("ANALYZE")
    return with_lots


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--orgs", type=int, default=2000)
    ap.add_argument("--events", type=int, default=500_000)
    ap.add_argument("--lot-share", type=int, default=4, help="every n-th org has lots (0: none)")
    ap.add_argument("--runs", type=int, default=5)
    a = ap.parse_args()
    async with scratch("lots") as (pg, r, layout, cfg):
        t0 = time.perf_counter()
        with_lots = await seed(pg, a.orgs, a.events, a.lot_share)
        rep = await rebuild(r, pg, cfg, layout)
        replayed = await pg.fetchval("SELECT count(*) FROM usage_events WHERE delta_purchased <> 0")
        print(f"seeded {a.orgs} orgs ({with_lots} with lots), {a.events} events ({replayed} moving purchased "
              f"credit), rebuilt in {time.perf_counter() - t0:.1f}s ({rep.lots} lots)")

        async def full() -> int:
            drift, stats = await reconcile(r, pg, layout)
            assert stats["lots"] == rep.lots
            return len(drift)

        async def lots_alone() -> int:
            now_s = int(time.time())
            found = lots.replay(await pg.fetch(lots.lot_events_sql(False), [], []))
            return sum(len(m.stored(now_s)) for m in found.values()) - rep.lots

        await taking_turns({"reconcile() (balances and lots)": full, "lots alone (query and replay)": lots_alone},
                           a.runs, "reconcile() (balances and lots)", "reconcile()")


if __name__ == "__main__":
    asyncio.run(main())
