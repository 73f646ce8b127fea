"""Credit that expires (issue 12): `expires_at` on an admin grant makes a credit lot that stops
counting at its expiry, lazily inside the scripts, with an `expire` event saying what lapsed;
spending takes allocated first, then lots by earliest expiry. Uses test_alerts' gateway, with its
own key prefix and a real worker, so the ledger and `reconcile` can be checked."""

from __future__ import annotations

import time
from datetime import datetime, timezone
from typing import Any

import orjson

from conftest import test_meters
from quota_gw.events import entries
from quota_gw.layout import Layout, meter_field
from sync_worker.recovery import reconcile
from test_alerts import env, spend, until  # noqa: F401 - the module's gateway fixture


def rfc3339(ts: float) -> str:
    return datetime.fromtimestamp(ts, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


async def general(env: Any, h: dict[str, str]) -> dict[str, Any]:
    r = await env.client.get("/v1/balance", headers=h)
    assert r.status_code == 200, r.text
    return r.json()["meters"]["general"]


async def test_a_grant_expiring_in_2s_lapses_by_what_is_unspent_and_reconcile_stays_clean(
        env: Any, redis: Any, prefix: str) -> None:
    org, h, _ = await env.tenant()
    assert (await spend(env, h, 50)).status_code == 200  # the allocation: spent first
    expires = int(time.time()) + 3
    r = await env.client.post(f"/v1/admin/orgs/{org}/grants", headers=env.admin.h, json={
        "meter": "general", "amount": 10, "reason": "trial", "expires_at": rfc3339(expires)})
    assert r.status_code == 201, r.text
    b = await general(env, h)
    assert b["next_expiry"] == {"at": rfc3339(expires), "amount": 10}
    assert (await spend(env, h, 4)).status_code == 200
    assert (await general(env, h))["balance"] == 6

    async def lapsed() -> bool:
        return (await general(env, h))["purchased"] == 0
    await until(lapsed, "the grant's expiry", timeout=15)
    assert (await general(env, h))["next_expiry"] is None
    assert (await spend(env, h, 1)).status_code == 402
    await env.admin.grant(org, "general", 5)  # a write: the lapse is recorded
    b = await general(env, h)
    assert (b["purchased"], b["balance"]) == (5, 5)

    async def recorded() -> bool:
        return bool(await env.pg.fetchval(
            "SELECT 1 FROM usage_events WHERE org_id = $1 AND kind = 'grant' AND delta = 5", org))
    await until(recorded, "the ledger")
    row = await env.pg.fetchrow("SELECT delta, delta_purchased, metadata FROM usage_events "
                                "WHERE org_id = $1 AND kind = 'expire'", org)
    assert row["delta"] == -6 and row["delta_purchased"] == -6
    assert '"expired": 6' in row["metadata"] or '"expired":6' in row["metadata"]
    drift, _ = await reconcile(redis, env.pg, Layout(f"{prefix}:al", 16), org=org, meters=test_meters())
    assert drift == []


async def test_spending_takes_the_lot_that_expires_first(env: Any) -> None:
    org, h, _ = await env.tenant()
    assert (await spend(env, h, 50)).status_code == 200
    late, soon = int(time.time()) + 3600, int(time.time()) + 600
    for amount, at in ((10, late), (7, soon)):
        r = await env.client.post(f"/v1/admin/orgs/{org}/grants", headers=env.admin.h, json={
            "meter": "general", "amount": amount, "reason": "lots", "expires_at": rfc3339(at)})
        assert r.status_code == 201, r.text
    assert (await general(env, h))["next_expiry"] == {"at": rfc3339(soon), "amount": 7}
    assert (await spend(env, h, 5)).status_code == 200
    assert (await general(env, h))["next_expiry"] == {"at": rfc3339(soon), "amount": 2}
    assert (await spend(env, h, 4)).status_code == 200  # 2 of the soon lot, then 2 of the late one
    assert (await general(env, h))["next_expiry"] == {"at": rfc3339(late), "amount": 8}


async def test_a_commit_after_a_lots_expiry_does_not_spend_it(env: Any, redis: Any, prefix: str) -> None:
    """A hold taken while a grant was live, committed after its expiry with no decision between:
    the commit sees the lot lapsed (and records its `expire`), as a consume would, and charges
    only what is left (nothing here); it must not spend the expired credit."""
    org, h, _ = await env.tenant()
    assert (await spend(env, h, 50)).status_code == 200
    r = await env.client.post(f"/v1/admin/orgs/{org}/grants", headers=env.admin.h, json={
        "meter": "general", "amount": 10, "reason": "trial", "expires_at": rfc3339(time.time() + 600)})
    assert r.status_code == 201, r.text
    r = await env.client.post("/v1/reservations", json={"feature": "generate_insight", "units": 6}, headers=h)
    assert r.status_code == 201, r.text
    rid = r.json()["reservation_id"]
    # The lot falls due (aged in place, not slept): its expiry moved into the past.
    bal, lots = Layout(f"{prefix}:al", 16).balances(org), meter_field("general", "lots")
    stored = orjson.loads(await redis.hget(bal, lots))
    await redis.hset(bal, lots, orjson.dumps([{**lot, "x": int(time.time()) - 1} for lot in stored]))
    r = await env.client.post(f"/v1/reservations/{rid}/commit", json={"units": 6}, headers=h)
    assert r.status_code == 200, r.text
    assert r.json()["cost"] == 0 and "X-Quota-Source" not in r.headers
    b = await general(env, h)
    assert (b["purchased"], b["balance"], b["held"]) == (0, 0, 0)
    events = entries(await redis.xrange(Layout(f"{prefix}:al", 16).stream(org)))
    expired = [e for e in events if e["org"] == org and e["kind"] == "expire"]
    assert [(int(e["delta"]), orjson.loads(e["meta"])["expired"]) for e in expired] == [(-10, 10)]


async def test_expires_at_must_be_a_future_rfc3339_time(env: Any) -> None:
    org, _, _ = await env.tenant()
    for bad in ("tomorrow", "2020-01-01T00:00:00Z", "2030-01-01 00:00:00", 12):
        r = await env.client.post(f"/v1/admin/orgs/{org}/grants", headers=env.admin.h, json={
            "meter": "general", "amount": 1, "reason": "x", "expires_at": bad})
        assert r.status_code == 422 and r.json()["field"] == "expires_at", (bad, r.text)



