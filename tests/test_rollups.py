"""Migration 005's per-org running and cumulative totals: usage over any window from them equals
the sum over the raw events, through batches spanning hours, late events and events without a meter;
`reconcile`'s rollup check reports a cumulative or running row that disagrees, and the rebuild
repairs it."""

from __future__ import annotations

import asyncio
import json
import random
from datetime import datetime, timedelta, timezone
from typing import Any

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


# A generated ledger's events with their metadata (resets carry the period), one statement.
INSERT_FULL = """INSERT INTO usage_events (event_id, ts, kind, org_id, meter, feature, delta, cost, metadata)
                 SELECT gen_random_uuid(), e.ts, e.kind, e.org, e.meter, e.feature, e.delta, e.cost, e.meta::jsonb
                 FROM unnest($1::timestamptz[], $2::text[], $3::text[], $4::text[], $5::text[], $6::bigint[],
                             $7::bigint[], $8::text[]) AS e(ts, kind, org, meter, feature, delta, cost, meta)"""


def generated_ledger(now: datetime) -> list[tuple[Any, ...]]:
    """(ts, kind, org, meter, feature, delta, cost, metadata) over the last 12 days for four orgs:
    a reset per (org, meter) (one unlimited, one org with none), then calls, refunds, refusals
    (which carry the cost they would have had) and calls without a meter, at random times; plus
    events on either side of the burn window's start (00:00 UTC seven days before today) and
    of the hour seven days ago (003's start)."""
    rng = random.Random(13)
    start = datetime.combine(now.date() - timedelta(days=7), datetime.min.time(), timezone.utc)
    period_end = int((now + timedelta(days=4)).timestamp())
    rows: list[tuple[Any, ...]] = []
    orgs = [f"org-burn-{i}" for i in range(4)]
    for org in orgs[:3]:
        for meter, allocation in (("general", rng.randrange(200, 3000)), ("tokens", rng.randrange(200, 3000)),
                                  ("unl", -1)):
            rows.append((now - timedelta(days=12), "reset", org, meter, None, max(allocation, 0), 0,
                         json.dumps({"allocation": allocation, "period_end": period_end})))
    for _ in range(400):
        ts = now - timedelta(seconds=rng.randrange(1, 12 * 86400))
        kind = rng.choice(["consume"] * 6 + ["commit", "refund", "denied"])
        cost = rng.randrange(1, 40)
        cost = -cost if kind == "refund" else cost
        meter = rng.choice(["general", "tokens", "unl", None])
        rows.append((ts, kind, rng.choice(orgs), meter, rng.choice(["f1", "f2"]),
                     0 if kind == "denied" else -cost, cost, None))
    for org in orgs:
        for ts, cost in ((start - timedelta(minutes=1), 1000), (start + timedelta(minutes=1), 70),
                         (now - timedelta(days=7, minutes=-1), 9), (now - timedelta(days=7, minutes=1), 5)):
            rows.append((ts, "consume", org, "general", "f1", -cost, cost, None))
    return rows


def burn_rates_from_events(rows: list[tuple[Any, ...]], at: datetime) -> dict[tuple[str, str], dict[str, Any]]:
    """burn_rates as documented, computed from the events alone: per (org, meter) with a change,
    tokens used since 00:00 UTC seven days before `at`'s day, per day of that window."""
    start = datetime.combine(at.astimezone(timezone.utc).date() - timedelta(days=7), datetime.min.time(),
                             timezone.utc)
    days = (at - start).total_seconds() / 86400
    out: dict[tuple[str, str], dict[str, Any]] = {}
    for ts, kind, org, meter, _, delta, cost, meta in sorted(rows, key=lambda r: r[0]):
        if meter is None:
            continue
        b = out.setdefault((org, meter), {"balance": 0, "allocation": None, "period_end": None, "used_7d": 0,
                                          "changes": 0})
        b["balance"] += delta
        b["changes"] += kind != "denied"
        if kind == "reset":
            m = json.loads(meta)
            b["allocation"], b["period_end"] = m["allocation"], datetime.fromtimestamp(m["period_end"], timezone.utc)
        if kind in ("consume", "commit", "refund") and ts >= start:
            b["used_7d"] += cost
    for b in out.values():
        used, rate = b["used_7d"], b["used_7d"] / days
        b["burn_per_day"] = rate
        b["projected_exhaustion"] = None
        b["exhausts_before_reset"] = False
        if not (b["allocation"] is not None and b["allocation"] < 0) and used > 0:
            runs_out = at + timedelta(days=max(b["balance"], 0) / rate)
            b["projected_exhaustion"] = runs_out
            b["exhausts_before_reset"] = b["period_end"] is None or runs_out < b["period_end"]
        b["window_start"] = start
    return {k: b for k, b in out.items() if b["changes"]}


async def test_burn_rates_equal_the_events_over_whole_days(own_database_url: str) -> None:
    """burn_rates (migration 007: the last 7 full UTC days plus today, from the daily rollup)
    equals the same figures computed from a generated ledger's raw events, in a UTC session and
    in one on another time zone."""
    now = datetime.now(timezone.utc)
    rows = generated_ledger(now)
    pg = await asyncpg.connect(own_database_url)
    try:
        for i in range(0, len(rows), 50):  # several statements, like worker batches
            await pg.execute(INSERT_FULL, *[list(c) for c in zip(*rows[i:i + 50])])
        for zone in ("UTC", "America/Los_Angeles", "Asia/Kolkata"):
            await pg.execute(f"SET TimeZone = '{zone}'")
            got = {(r["org_id"], r["meter"]): r for r in await pg.fetch(
                "SELECT *, now() AS at FROM burn_rates WHERE org_id LIKE 'org-burn-%'")}
            at = next(iter(got.values()))["at"]
            want = burn_rates_from_events(rows, at)
            assert sorted(got) == sorted(want), zone
            for k, w in want.items():
                g = got[k]
                assert (g["balance"], g["allocation"], g["period_end"], g["used_7d"]) == (
                    w["balance"], w["allocation"], w["period_end"], w["used_7d"]), (zone, k)
                assert abs(float(g["burn_per_day"]) - w["burn_per_day"]) <= 0.0051, (zone, k)
                if w["projected_exhaustion"] is None:
                    assert g["projected_exhaustion"] is None, (zone, k)
                else:
                    assert abs((g["projected_exhaustion"] - w["projected_exhaustion"]).total_seconds()) < 1, (zone, k)
                assert g["exhausts_before_reset"] == w["exhausts_before_reset"], (zone, k)
                assert g["window_start"] == w["window_start"], (zone, k)
        # The rows the window's edges decide: 70 in, 1000 out, whatever the hour.
        assert any(w["used_7d"] >= 70 + 9 + 5 for w in want.values())
    finally:
        await pg.close()


async def test_usage_since_does_not_depend_on_the_session_time_zone(own_database_url: str) -> None:
    """qgw_usage_since (003, its day boundary fixed in 007) equals the events from the hour of
    `since` in a session on any time zone: before 007 its hourly part ended off midnight UTC by
    twice the zone's offset (hours counted twice west of UTC, missed east of it)."""
    org = "org-rollups-zone"
    now = datetime.now(timezone.utc).replace(minute=30, second=0, microsecond=0)
    pg = await asyncpg.connect(own_database_url)
    try:
        await write(pg, [(now - timedelta(hours=k), "consume", org, "general", k + 1) for k in range(0, 60, 3)])
        for zone in ("UTC", "America/New_York", "Pacific/Auckland"):
            await pg.execute(f"SET TimeZone = '{zone}'")
            for k in (1, 5, 13, 26, 40, 59):
                since = now - timedelta(hours=k, minutes=10)
                got = await pg.fetchval("SELECT coalesce(sum(tokens), 0)::bigint FROM qgw_usage_since($2) "
                                        "WHERE org_id = $1", org, since)
                assert got == (await usage_from_events(pg, org, since))[1], (zone, k)
    finally:
        await pg.close()
