"""Migration 005's per-org running and cumulative totals: usage over any window from them equals
the sum over the raw events, through batches spanning hours, late events and events without a meter;
`reconcile`'s rollup check reports a cumulative or running row that disagrees, and the rebuild
repairs it."""

from __future__ import annotations

import asyncio
from datetime import datetime, timedelta, timezone

import asyncpg

from sync_worker.recovery import rollup_drift

INSERT = """INSERT INTO usage_events (event_id, ts, kind, org_id, meter, feature, delta, cost)
            SELECT gen_random_uuid(), e.ts, e.kind, e.org, e.meter, 'f', -e.cost, e.cost
            FROM unnest($1::timestamptz[], $2::text[], $3::text[], $4::text[], $5::bigint[])
                 AS e(ts, kind, org, meter, cost)"""


async def write(pg: asyncpg.Connection, rows: list[tuple[datetime, str, str, str | None, int]]) -> None:
    """One statement (one trigger run, like one worker batch)."""
    await pg.execute(INSERT, *[list(c) for c in zip(*rows)])


async def usage_from_events(pg: asyncpg.Connection, org: str, since: datetime) -> tuple[int, int]:
    r = await pg.fetchrow(
        """SELECT count(*) FILTER (WHERE kind IN ('consume', 'commit')) AS calls, coalesce(sum(cost), 0)::bigint AS tokens
           FROM usage_events WHERE org_id = $1 AND kind IN ('consume', 'commit', 'refund')
             AND ts >= date_trunc('hour', $2::timestamptz, 'UTC')""", org, since)
    return r["calls"], r["tokens"]


async def usage_from_totals(pg: asyncpg.Connection, org: str, since: datetime) -> tuple[int, int]:
    r = await pg.fetchrow("SELECT calls, tokens FROM qgw_org_usage_since($2) WHERE org_id = $1", org, since)
    return r["calls"], r["tokens"]


async def test_usage_since_from_totals_equals_the_events(own_database_url: str) -> None:
    org, other = "org-rollups-a", "org-rollups-b"
    now = datetime.now(timezone.utc).replace(minute=30, second=0, microsecond=0)
    h = [now - timedelta(hours=k) for k in range(60)]  # h[k]: k hours ago
    pg = await asyncpg.connect(own_database_url)
    try:
        await write(pg, [(h[50], "consume", org, "general", 3), (h[50], "denied", org, "general", 0),
                         (h[49], "consume", other, "general", 7)])
        # One batch over several hours, two meters, a refund, a commit, an event without a meter.
        await write(pg, [(h[30], "consume", org, "general", 5), (h[29], "commit", org, "general", 4),
                         (h[29], "refund", org, "general", -2), (h[28], "consume", org, "tokens", 11),
                         (h[28], "denied", org, None, 0), (h[27], "consume", org, None, 1)])
        await write(pg, [(h[2], "consume", org, "general", 6), (h[1], "consume", org, "tokens", 8)])
        # Late events: into an hour that already has a row, and into hours with none, before rows
        # that exist (they must move every later cumulative row).
        await write(pg, [(h[29], "consume", org, "general", 10), (h[40], "consume", org, "general", 100),
                         (h[20], "refund", org, "tokens", -3)])
        await write(pg, [(h[0], "consume", org, "general", 1)])
        for k in (0, 1, 2, 3, 20, 21, 28, 29, 30, 35, 40, 41, 50, 51, 59):
            since = h[k] - timedelta(minutes=10)
            assert await usage_from_totals(pg, org, since) == await usage_from_events(pg, org, since), k
        assert await usage_from_totals(pg, other, h[59]) == (1, 7)
        assert await usage_from_totals(pg, org, h[59]) == (10, 144)
        assert (await rollup_drift(pg, org))[0] == []

        # A cumulative row that disagrees is reported against the daily rollup, a running total too.
        await pg.execute("UPDATE usage_cumulative SET tokens = tokens + 5 WHERE org_id = $1 "
                         "AND hour = (SELECT max(hour) FROM usage_cumulative WHERE org_id = $1)", org)
        await pg.execute("UPDATE usage_running SET calls = calls + 1 WHERE org_id = $1", org)
        drift, _ = await rollup_drift(pg, org)
        assert sorted((d.meter, d.field.split(" to ")[0], d.rollup - d.source, d.against) for d in drift) == [
            ("*", "calls", 1, "usage_daily"), ("*", "cumulative tokens", 5, "usage_daily")]
        await pg.execute("SELECT qgw_rollup_rebuild()")  # the repair, from the events
        assert (await rollup_drift(pg, org))[0] == []
        assert await usage_from_totals(pg, org, h[59]) == await usage_from_events(pg, org, h[59])
    finally:
        await pg.close()


async def test_ops_views_read_the_totals(own_database_url: str) -> None:
    """top_spenders (migration 005 redefines it) and GET /v1/admin/top's query agree with the events."""
    org = "org-rollups-views"
    now = datetime.now(timezone.utc)
    pg = await asyncpg.connect(own_database_url)
    try:
        await write(pg, [(now - timedelta(days=40), "consume", org, "general", 1000),
                         (now - timedelta(days=10), "consume", org, "general", 20),
                         (now - timedelta(days=3), "consume", org, "general", 7),
                         (now - timedelta(days=3), "refund", org, "general", -2)])
        top = await pg.fetchrow("SELECT tokens_30d, calls_30d FROM top_spenders WHERE org_id = $1", org)
        assert (top["tokens_30d"], top["calls_30d"]) == (25, 2)
        assert await pg.fetchval("SELECT tokens FROM qgw_org_usage_since(now() - interval '7 days') "
                                 "WHERE org_id = $1", org) == 5
    finally:
        await pg.close()


async def test_concurrent_writers_of_one_org_stay_exact(own_database_url: str) -> None:
    """Two transactions on one org, the first opening a new hour and the second adding a late
    event before it: the second waits for the first's row locks (usage_running's serializes
    writers per org whatever else they share), then sees its rows, so the cumulative rows stay
    exact (written side by side, the new hour's row would miss the late event)."""
    org = "org-rollups-race"
    now = datetime.now(timezone.utc).replace(minute=30, second=0, microsecond=0)
    a, b = await asyncpg.connect(own_database_url), await asyncpg.connect(own_database_url)
    try:
        await write(a, [(now - timedelta(hours=5), "consume", org, "general", 2)])
        ta = a.transaction()
        await ta.start()
        await write(a, [(now, "consume", org, "general", 3)])  # opens the current hour's row
        late = asyncio.create_task(write(b, [(now - timedelta(hours=3), "consume", org, "general", 7)]))
        async with asyncio.timeout(20):  # b waits for a's row locks, not writing beside it
            while not await a.fetchval("SELECT count(*) FROM pg_locks WHERE pid = $1 AND NOT granted",
                                       b.get_server_pid()):
                assert not late.done()
                await asyncio.sleep(0.02)
        await ta.commit()
        await late
        for k in range(0, 7):
            since = now - timedelta(hours=k)
            assert await usage_from_totals(a, org, since) == await usage_from_events(a, org, since), k
        assert (await rollup_drift(a, org))[0] == []
    finally:
        await a.close()
        await b.close()
