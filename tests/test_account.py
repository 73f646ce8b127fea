"""Account routes from the Postgres ledger: GET /v1/usage, GET /v1/analytics, GET
/v1/admin/top, and the dashboard views of migrations 002/003 (analytics reads them). Events go through the real gateway
and a real worker (in-process, never trimming: other tests may read the session's streams)."""

from __future__ import annotations

import asyncio
from datetime import datetime, timedelta, timezone
from typing import Any

import asyncpg
import pytest

from conftest import ADMIN_TOKEN
from quota_gw.layout import Layout, meter_field
from sync_worker.worker import Worker
from worker_support import wait_drained


@pytest.fixture
def drain(redis, redis_url: str, database_url: str, prefix: str, config) -> Any:
    """Runs a worker over the session's streams until everything so far is in Postgres."""

    async def run() -> None:
        layout = Layout(prefix, config.shards)
        w = Worker(redis_url, database_url, layout, "account-tests", block_ms=50, trim=False)
        task = asyncio.create_task(w.run())
        try:
            await wait_drained(redis, layout, 60)
        finally:
            w.stop()
            await task

    return run


async def pages(client: Any, h: dict[str, str], query: str = "", limit: int = 7) -> list[dict[str, Any]]:
    out, cursor = [], None
    while True:
        q = f"/v1/usage?limit={limit}{query}" + (f"&cursor={cursor}" if cursor else "")
        r = await client.get(q, headers=h)
        assert r.status_code == 200, r.text
        body = r.json()
        assert len(body["events"]) <= limit
        out += body["events"]
        cursor = body["next_cursor"]
        if cursor is None:
            return out


async def test_usage_pages_newest_first_filters_and_isolation(client, tenant, admin, drain) -> None:
    org, h = await tenant("bulk", general=50)
    other, oh = await tenant("bulk")
    ids = []
    for i in range(20):
        r = await client.post("/v1/consume", json={"feature": "generate_insight", "units": 1 + i % 2,
                                                   "metadata": {"i": i, "note": "tab\there \"q\" \\ \u00e9"}},
                              headers=h)
        assert r.status_code == 200, r.text
        ids.append(r.json()["event_id"])
    for _ in range(4):
        assert (await client.post("/v1/consume", json={"feature": "generate_goal"}, headers=h)).status_code == 200
    assert (await client.post("/v1/consume", json={"feature": "generate_leads"}, headers=h)).status_code == 403
    assert (await client.post("/v1/refunds", json={"event_id": ids[0]}, headers=h)).status_code == 200
    assert (await client.post("/v1/consume", json={"feature": "generate_insight"}, headers=oh)).status_code == 200
    await drain()

    events = await pages(client, h)
    # grant + 2 resets (first use of each meter) + 20 + 4 consumes + 1 denied + 1 refund
    assert len(events) == 29
    assert len({e["event_id"] for e in events}) == 29
    keys = [(e["ts"], e["event_id"]) for e in events]
    assert keys == sorted(keys, reverse=True)  # newest first, no overlap between pages
    assert set(ids) <= {e["event_id"] for e in events}
    by_id = {e["event_id"]: e for e in events}
    assert by_id[ids[5]]["metadata"] == {"i": 5, "note": "tab\there \"q\" \\ \u00e9"}
    assert by_id[ids[5]]["cost"] == 2 and by_id[ids[5]]["delta"] == -2 and by_id[ids[5]]["feature"] == "generate_insight"
    assert [e["kind"] for e in events].count("denied") == 1
    # Filters
    goal = await pages(client, h, "&feature=generate_goal&kind=consume")
    assert len(goal) == 4 and all(e["feature"] == "generate_goal" for e in goal)
    mid = events[10]["ts"]
    newer = await pages(client, h, f"&since={mid}")
    older = await pages(client, h, f"&until={mid}")
    assert {e["event_id"] for e in newer} | {e["event_id"] for e in older} == set(by_id)
    assert all(e["ts"] >= mid for e in newer) and all(e["ts"] < mid for e in older)
    # Isolation: the other org sees only its own events, and none of these.
    theirs = await pages(client, oh)
    assert theirs and not ({e["event_id"] for e in theirs} & set(by_id))
    # A key without the read scope is refused.
    ck = await admin.key(org, scopes=["consume"])
    assert (await client.get("/v1/usage", headers={"Authorization": f"Bearer {ck}"})).status_code == 403


@pytest.mark.parametrize("query", ["limit=0", "limit=abc", "limit=1001", "since=yesterday", "until=2026-13-01",
                                   "cursor=bm9wZQ", "feature=nope", "kind=spend",
                                   "since=2026-02-01&until=2026-01-01"])
async def test_usage_rejects_bad_parameters(client, tenant, query: str) -> None:
    _, h = await tenant("bulk")
    r = await client.get(f"/v1/usage?{query}", headers=h)
    assert r.status_code == 422, r.text
    assert r.headers["content-type"] == "application/problem+json"
    assert r.json()["code"] == "invalid_request"


async def test_analytics_totals_by_feature_and_day_burn_rate_and_exhaustion(client, tenant, drain) -> None:
    org, h = await tenant("bulk")  # general: 100 allocated
    for _ in range(10):
        assert (await client.post("/v1/consume", json={"feature": "generate_insight", "units": 3},
                                  headers=h)).status_code == 200
    r = await client.post("/v1/consume", json={"feature": "generate_insight", "units": 2}, headers=h)
    assert (await client.post("/v1/refunds", json={"event_id": r.json()["event_id"]}, headers=h)).status_code == 200
    assert (await client.post("/v1/consume", json={"feature": "generate_insight", "units": 500},
                              headers=h)).status_code == 402
    await drain()
    r = await client.get("/v1/analytics?days=30", headers=h)
    assert r.status_code == 200, r.text
    a = r.json()
    f = next(x for x in a["by_feature"] if x["feature"] == "generate_insight")
    assert (f["calls"], f["tokens"], f["refunded"], f["denied"]) == (11, 30, 2, 1)
    assert a["totals"] == {"calls": 11, "tokens": 30}
    assert len(a["by_day"]) == 30
    today = datetime.now(timezone.utc).date().isoformat()
    assert a["by_day"][-1]["date"] == today and a["by_day"][-1]["tokens"] == 30
    assert sum(d["tokens"] for d in a["by_day"]) == 30
    m = a["meters"]["general"]
    assert a["burn_window_days"] == 7 and m["burn_per_day"] == round(30 / 7, 2) and m["balance"] == 70
    runs_out = datetime.fromisoformat(m["projected_exhaustion"])
    expect = datetime.now(timezone.utc) + timedelta(days=70 / (30 / 7))
    assert abs((runs_out - expect).total_seconds()) < 60
    assert m["exhausts_before_reset"] == (runs_out < datetime.fromisoformat(m["period_end"]))
    assert a["meters"]["goal_generation"]["projected_exhaustion"] is None  # nothing used: no burn
    short = (await client.get("/v1/analytics?days=3", headers=h)).json()
    assert short["burn_window_days"] == 3 and short["meters"]["general"]["burn_per_day"] == 10
    for bad in ("days=0", "days=367", "days=x"):
        assert (await client.get(f"/v1/analytics?{bad}", headers=h)).status_code == 422


async def test_analytics_reads_the_rollups_so_it_outlives_the_raw_events(client, tenant, drain,
                                                                         database_url) -> None:
    """Usage is defined once, by the rollups behind `usage_by_feature_day` (migration 003): analytics
    reads them, so deleting an org's raw events (retention) leaves its analytics as they were."""
    org, h = await tenant("bulk")
    for _ in range(4):
        assert (await client.post("/v1/consume", json={"feature": "generate_insight", "units": 5},
                                  headers=h)).status_code == 200
    await drain()
    before = (await client.get("/v1/analytics?days=7", headers=h)).json()
    assert before["totals"] == {"calls": 4, "tokens": 20}
    admin_h = {"Authorization": f"Bearer {ADMIN_TOKEN}"}

    async def burning() -> list[dict]:  # the ops page's burn table (GET /v1/admin/burn), this org's rows
        rows = (await client.get("/v1/admin/burn?days=7&limit=200", headers=admin_h)).json()["orgs"]
        return [(r["meter"], r["tokens"], r["burn_per_day"]) for r in rows if r["org_id"] == org]

    burn_before = await burning()
    assert burn_before == [("general", 20, round(20 / 7, 2))]
    pg = await asyncpg.connect(database_url)
    try:
        assert await pg.execute("DELETE FROM usage_events WHERE org_id = $1", org) != "DELETE 0"
    finally:
        await pg.close()
    try:
        after = (await client.get("/v1/analytics?days=7", headers=h)).json()
        assert after["totals"] == before["totals"] and after["by_day"] == before["by_day"]
        assert after["meters"]["general"]["burn_per_day"] == round(20 / 7, 2)
        assert await burning() == burn_before  # the burn table reads the rollups too
    finally:  # the session's shared ledger again agrees with its rollups (later tests reconcile it)
        pg = await asyncpg.connect(database_url)
        try:
            await pg.execute("SELECT qgw_rollup_rebuild()")
        finally:
            await pg.close()


async def test_admin_top_spenders_and_dashboard_views(client, tenant, drain, database_url, redis, prefix,
                                                       config) -> None:
    big, bh = await tenant("bulk")
    small, sh = await tenant("bulk")
    for _ in range(9):
        await client.post("/v1/consume", json={"feature": "generate_insight", "units": 9}, headers=bh)
    await client.post("/v1/consume", json={"feature": "generate_insight", "units": 2}, headers=sh)
    await drain()
    admin_h = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    assert (await client.get("/v1/admin/top?days=1", headers=bh)).status_code == 401
    r = await client.get("/v1/admin/top?days=1&limit=1000&meter=general", headers=admin_h)
    assert r.status_code == 200, r.text
    ranked = {o["org_id"]: o for o in r.json()["orgs"]}
    assert ranked[big]["tokens"] == 81 and ranked[big]["calls"] == 9 and ranked[big]["plan"] == "bulk"
    assert ranked[small]["tokens"] == 2 and ranked[big]["rank"] < ranked[small]["rank"]
    # All meters (migration 005's per-org totals): the same figures here, where only `general` moved.
    r = await client.get("/v1/admin/top?days=1&limit=1000", headers=admin_h)
    every = {o["org_id"]: o for o in r.json()["orgs"]}
    assert (every[big]["tokens"], every[big]["calls"], every[small]["tokens"]) == (81, 9, 2)
    assert (await client.get("/v1/admin/top?days=0", headers=admin_h)).status_code == 422

    pg = await asyncpg.connect(database_url)
    try:
        bal = await pg.fetchrow("SELECT * FROM ledger_balances WHERE org_id = $1 AND meter = 'general'", big)
        live = await redis.hgetall(Layout(prefix, config.shards).balances(big))
        assert (bal["allocated"], bal["purchased"], bal["balance"]) == (
            int(live[meter_field("general", "allocated")]), int(live[meter_field("general", "purchased")]), 19)
        assert bal["allocation"] == 100 and bal["period_end"] > datetime.now(timezone.utc)
        low = await pg.fetchrow("SELECT * FROM low_balances WHERE org_id = $1", big)
        assert low["meter"] == "general" and low["percent_left"] == 19
        assert not await pg.fetchval("SELECT count(*) FROM low_balances WHERE org_id = $1", small)
        day = await pg.fetchrow("SELECT * FROM usage_by_feature_day WHERE org_id = $1", big)
        assert (day["feature"], day["calls"], day["tokens"]) == ("generate_insight", 9, 81)
        top = await pg.fetchrow("SELECT * FROM top_spenders WHERE org_id = $1", big)
        assert top["tokens_30d"] == 81
        burn = await pg.fetchrow("SELECT *, now() AS at FROM burn_rates WHERE org_id = $1 AND meter = 'general'", big)
        window_days = (burn["at"] - burn["window_start"]) / timedelta(days=1)  # 7 full UTC days + today (007)
        assert burn["used_7d"] == 81 and abs(float(burn["burn_per_day"]) - 81 / window_days) <= 0.0051
        assert burn["projected_exhaustion"] is not None
    finally:
        await pg.close()


@pytest.mark.parametrize("query, field", [
    ("since=0001-01-01T00:00:00%2B14:00", "since"), ("until=0001-01-01T00:00:00%2B14:00", "until"),
    ("since=9999-12-31T23:59:59-14:00", "since"), ("until=9999-12-31T23:59:59-14:00", "until"),
    ("since=99999999999999", "since"), ("user_id=a%0A", "user_id"), ("user_id=a%00b", "user_id"),
])
async def test_usage_parameters_out_of_range_are_422_naming_the_parameter(client, tenant, query: str, field: str) -> None:
    _, h = await tenant("bulk")
    r = await client.get(f"/v1/usage?{query}", headers=h)
    assert r.status_code == 422, r.text
    assert r.headers["content-type"] == "application/problem+json"
    assert r.json()["code"] == "invalid_request" and r.json()["field"] == field


async def test_usage_dates_at_the_edges_of_the_range_work(client, tenant) -> None:
    _, h = await tenant("bulk")
    r = await client.get("/v1/usage?since=0001-01-02T00:00:00Z&until=9999-12-29T00:00:00%2B14:00", headers=h)
    assert r.status_code == 200, r.text
