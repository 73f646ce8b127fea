"""The decision waterfall: a call is paid by layers in order (rate windows and the period
allocation, then the credit layers: grants by earliest expiry, then purchased), inside the one
script of the decision; past a rate window a plan may let it through on credit at a multiple.
Every charge records where its tokens came from (`sources`), a refund puts them back to the same
layers (not to a grant that has expired), `explain` says which layer refused a call and the
`denied` event says the same, and reconcile catches a ledger row whose split does not add up.
Real Redis and Postgres, with a real worker."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator
from datetime import datetime, timezone
from types import SimpleNamespace
from typing import Any

import asyncpg
import httpx
import orjson
import pytest

from conftest import Admin, test_config_data, test_meters
from quota_gw import config as config_mod
from quota_gw.app import create_app
from quota_gw.layout import Layout
from sync_worker.recovery import reconcile, reconcile_main, split_drift
from worker_support import WorkerProc, write_config


def rfc3339(ts: float) -> str:
    return datetime.fromtimestamp(ts, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


async def until(cond: Any, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not await cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.1)


def waterfall_config_data() -> dict[str, Any]:
    data = test_config_data()
    pro = data["plans"]["pro"]
    # The plan: the pro plan, whose users may go past 5 calls a minute on credit, at 2x.
    data["plans"]["pro_overflow"] = {**pro, "rate_limits": {"user": {
        "limit": 5, "window": "1m", "overflow": "credit", "overflow_cost": 2}}}
    data["plans"]["layered"] = {"allocations": {"general": 2}}  # no rate limits
    data["plans"]["capped"] = {"allocations": {"general": 2}, "overflow": "none"}
    return data


@pytest.fixture(scope="module")
async def wf(redis: Any, redis_url: str, database_url: str, prefix: str, tmp_path_factory: Any) -> AsyncIterator[Any]:
    data = waterfall_config_data()
    cfg = config_mod.parse(data, "tests/test_waterfall.py")
    sub = f"{prefix}:wf"
    tmp = tmp_path_factory.mktemp("waterfall")
    worker = WorkerProc(write_config(tmp, data), redis_url, database_url, sub, "waterfall", tmp)
    await worker.start()
    app = create_app(cfg, redis_url, database_url, sub)
    pg = await asyncpg.connect(database_url)
    try:
        async with app.router.lifespan_context(app):
            limits = httpx.Limits(max_connections=1000)
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw",
                                         limits=limits) as client:
                admin = Admin(client)

                async def tenant(plan: str, user: str | None = None) -> tuple[str, dict[str, str]]:
                    org = await admin.org(plan)
                    key = await admin.key(org, user)
                    return org, {"Authorization": f"Bearer {key}"}

                async def drained(event_id: str) -> asyncpg.Record:
                    async def there() -> bool:
                        return bool(await pg.fetchval("SELECT 1 FROM usage_events WHERE event_id = $1::uuid", event_id))
                    await until(there, f"event {event_id} in the ledger")
                    return await pg.fetchrow("SELECT * FROM usage_events WHERE event_id = $1::uuid", event_id)

                yield SimpleNamespace(client=client, admin=admin, tenant=tenant, pg=pg, drained=drained, config=cfg,
                                      layout=Layout(sub, cfg.shards), redis_url=redis_url, database_url=database_url)
    finally:
        await pg.close()
        await worker.kill()


async def spend(wf: Any, h: dict[str, str], units: int = 1, **body: Any) -> httpx.Response:
    return await wf.client.post("/v1/consume", json={"feature": "generate_insight", "units": units, **body}, headers=h)


async def general(wf: Any, h: dict[str, str]) -> dict[str, Any]:
    r = await wf.client.get("/v1/balance", headers=h)
    assert r.status_code == 200, r.text
    return r.json()["meters"]["general"]


async def test_past_5_calls_a_minute_calls_6_to_10_take_2x_from_purchased_and_then_429(wf: Any) -> None:
    org, h = await wf.tenant("pro_overflow", "alice")
    await wf.admin.grant(org, "general", 10)
    for _ in range(5):
        r = await spend(wf, h)
        assert r.status_code == 200, r.text
        assert (r.json()["cost"], r.headers["X-Quota-Source"]) == (1, "allocated")
    b = await general(wf, h)
    assert (b["allocated"], b["purchased"]) == (45, 10)
    c = await wf.client.post("/v1/check", json={"feature": "generate_insight", "explain": True}, headers=h)
    assert c.json()["allowed"] is True and c.json()["cost"] == 2
    assert c.json()["waterfall"] == {"overflow_cost": 2, "layers": [
        {"layer": "rate:user", "had": 0, "gives": 0, "overflow": 2}, {"layer": "purchased", "had": 10, "gives": 2}]}
    events = []
    for i in range(5):  # calls 6-10: past the window, 2x from purchased, the allocation untouched
        r = await spend(wf, h)
        assert r.status_code == 200, (i, r.text)
        assert (r.json()["cost"], r.headers["X-Quota-Source"]) == (2, "purchased")
        events.append(r.json()["event_id"])
        b = await general(wf, h)
        assert (b["allocated"], b["purchased"]) == (45, 10 - 2 * (i + 1))
    r = await spend(wf, h)  # no credit left: 429 as without overflow, nothing taken
    assert r.status_code == 429 and r.json()["code"] == "rate_limited" and "Retry-After" in r.headers
    b = await general(wf, h)
    assert (b["allocated"], b["purchased"]) == (45, 0)
    row = await wf.drained(events[-1])
    assert (row["kind"], row["delta"], row["delta_purchased"], row["cost"], row["sources"]) == \
        ("consume", -2, -2, 2, "purchased:2")

    # Without credit the 6th call is 429, as it always was.
    org2, h2 = await wf.tenant("pro_overflow", "bob")
    assert [(await spend(wf, h2)).status_code for _ in range(6)] == [200] * 5 + [429]
    assert (await general(wf, h2))["allocated"] == 45


async def test_500_concurrent_calls_past_the_window_never_overdraw_a_layer(wf: Any) -> None:
    org, h = await wf.tenant("pro_overflow", "carol")
    await wf.admin.grant(org, "general", 101)  # 50 calls at 2, and 1 token no call can use
    got = await asyncio.gather(*(spend(wf, h) for _ in range(500)))
    codes = [r.status_code for r in got]
    assert set(codes) <= {200, 429}, {r.text for r in got if r.status_code not in (200, 429)}
    ok = [r for r in got if r.status_code == 200]
    by_source = sorted((r.headers["X-Quota-Source"], r.json()["cost"]) for r in ok)
    assert by_source.count(("allocated", 1)) == 5  # the window paid for 5
    assert by_source.count(("purchased", 2)) == 50
    assert len(ok) == 55
    b = await general(wf, h)
    assert (b["allocated"], b["purchased"]) == (45, 1)


async def test_a_consume_split_2_2_rest_is_refunded_to_each_layer(wf: Any) -> None:
    org, h = await wf.tenant("layered")
    g = await wf.admin.grant(org, "general", 2, expires_at=rfc3339(time.time() + 3600))
    lot = g.json()["event_id"]
    await wf.admin.grant(org, "general", 10)
    r = await spend(wf, h, 7)
    assert r.status_code == 200, r.text
    assert r.headers["X-Quota-Source"] == f"allocated,grant:{lot},purchased"
    row = await wf.drained(r.json()["event_id"])
    assert row["sources"] == f"allocated:2,grant:{lot}:2,purchased:3"
    b = await general(wf, h)
    assert (b["allocated"], b["purchased"], b["next_expiry"]) == (0, 7, None)
    splits = await wf.pg.fetch("SELECT layer, delta FROM usage_event_sources WHERE event_id = $1::uuid "
                               "ORDER BY position", r.json()["event_id"])
    assert [(x["layer"], x["delta"]) for x in splits] == [("allocated", -2), (f"grant:{lot}", -2), ("purchased", -3)]

    f = await wf.client.post("/v1/refunds", json={"event_id": r.json()["event_id"]}, headers=h)
    assert f.status_code == 200, f.text
    b = await general(wf, h)
    assert (b["allocated"], b["purchased"], b["next_expiry"]["amount"]) == (2, 12, 2)
    row = await wf.drained(f.json()["event_id"])
    assert (row["delta"], row["sources"]) == (7, f"allocated:2,grant:{lot}:2,purchased:3")
    u = await wf.client.get("/v1/usage", params={"kind": "consume"}, headers=h)
    assert u.json()["events"][0]["sources"] == [{"layer": "allocated", "amount": -2},
                                                {"layer": f"grant:{lot}", "amount": -2},
                                                {"layer": "purchased", "amount": -3}]
    a = await wf.client.get("/v1/analytics", params={"days": 1}, headers=h)
    assert a.json()["by_layer"] == []  # charged and refunded: nothing taken, net
    # The restored grant is spent first again, as before the charge.
    r = await spend(wf, h, 3)
    assert r.status_code == 200 and r.headers["X-Quota-Source"] == f"allocated,grant:{lot}"
    await wf.drained(r.json()["event_id"])
    a = await wf.client.get("/v1/analytics", params={"days": 1}, headers=h)
    assert {(x["layer"], x["tokens"]) for x in a.json()["by_layer"]} == {("allocated", 2), (f"grant:{lot}", 1)}


async def test_an_expired_grants_share_is_not_restored_by_a_refund(wf: Any) -> None:
    org, h = await wf.tenant("layered")
    g = await wf.admin.grant(org, "general", 2, expires_at=rfc3339(time.time() + 3))
    lot = g.json()["event_id"]
    await wf.admin.grant(org, "general", 10)
    r = await spend(wf, h, 7)
    assert r.status_code == 200 and r.headers["X-Quota-Source"] == f"allocated,grant:{lot},purchased"

    async def lapsed() -> bool:
        c = await wf.client.post("/v1/check", json={"feature": "generate_insight", "explain": True}, headers=h)
        return not any(x["layer"] == f"grant:{lot}" for x in c.json()["waterfall"]["layers"])
    await until(lapsed, "the grant's expiry", timeout=15)
    f = await wf.client.post("/v1/refunds", json={"event_id": r.json()["event_id"]}, headers=h)
    assert f.status_code == 200 and f.json()["refunded"] == 5, f.text
    b = await general(wf, h)
    assert (b["allocated"], b["purchased"], b["next_expiry"]) == (2, 10, None)
    row = await wf.drained(f.json()["event_id"])
    assert (row["delta"], row["sources"]) == (5, "allocated:2,purchased:3")
    assert orjson.loads(row["metadata"])["lost"] == 2


async def test_explain_names_the_refusing_layer_and_the_denied_event_says_the_same(wf: Any) -> None:
    org, h = await wf.tenant("capped")  # allocation 2, no credit past it
    await wf.admin.grant(org, "general", 10)
    c = await wf.client.post("/v1/check", json={"feature": "generate_insight", "units": 3, "explain": True},
                             headers=h)
    assert c.status_code == 200 and c.json()["allowed"] is False, c.text
    w = c.json()["waterfall"]
    assert w["refused_by"] == {"layer": "allocated", "had": 2, "reason": "insufficient_balance"}
    assert w["layers"] == [{"layer": "allocated", "had": 2, "gives": 2}]
    r = await spend(wf, h, 3)
    assert r.status_code == 402
    row = await wf.drained(r.json()["event_id"] if "event_id" in r.json() else await denied_id(wf, org))
    meta = orjson.loads(row["metadata"])
    assert (row["kind"], meta["layer"], meta["had"], meta["code"]) == ("denied", "allocated", 2, "insufficient_balance")

    # On a plan with credit, the last credit layer refuses; explain shows each layer's share.
    org, h = await wf.tenant("layered")
    await wf.admin.grant(org, "general", 4)
    c = await wf.client.post("/v1/check", json={"feature": "generate_insight", "units": 5, "explain": True},
                             headers=h)
    w = c.json()["waterfall"]
    assert w["layers"] == [{"layer": "allocated", "had": 2, "gives": 2}, {"layer": "purchased", "had": 4, "gives": 3}]
    assert "refused_by" not in w and c.json()["allowed"] is True
    c = await wf.client.post("/v1/check", json={"feature": "generate_insight", "units": 7, "explain": True},
                             headers=h)
    assert c.json()["waterfall"]["refused_by"] == {"layer": "purchased", "had": 4, "reason": "insufficient_balance"}

    # A rate window without overflow refuses by itself.
    org, h = await wf.tenant("pro", "dave")
    for _ in range(5):
        assert (await spend(wf, h)).status_code == 200
    c = await wf.client.post("/v1/check", json={"feature": "generate_insight", "explain": True}, headers=h)
    w = c.json()["waterfall"]
    assert w["refused_by"] == {"layer": "rate:user", "had": 0, "reason": "rate_limited"}
    assert w["layers"][0] == {"layer": "rate:user", "had": 0, "gives": 0}
    assert (await spend(wf, h)).status_code == 429
    row = await wf.drained(await denied_id(wf, org))
    assert orjson.loads(row["metadata"])["layer"] == "rate:user"


async def denied_id(wf: Any, org: str) -> str:
    """The id of the org's `denied` event, from the stream (the refusal's answer carries none)."""
    async def one() -> bool:
        return bool(await wf.pg.fetchval("SELECT 1 FROM usage_events WHERE org_id = $1 AND kind = 'denied'", org))
    await until(one, "the denied event")
    return str(await wf.pg.fetchval("SELECT event_id FROM usage_events WHERE org_id = $1 AND kind = 'denied'", org))


async def test_reconcile_catches_a_ledger_row_whose_split_does_not_add_up(wf: Any, redis: Any, capsys: Any) -> None:
    org, h = await wf.tenant("layered")
    await wf.admin.grant(org, "general", 10)
    r = await spend(wf, h, 5)
    assert r.status_code == 200
    await wf.drained(r.json()["event_id"])
    assert await split_drift(wf.pg, org) == []
    drift, _ = await reconcile(redis, wf.pg, wf.layout, org=org, meters=test_meters())
    assert drift == []
    await wf.pg.execute("UPDATE usage_events SET sources = 'allocated:2,purchased:2' WHERE event_id = $1::uuid",
                        r.json()["event_id"])
    found = await split_drift(wf.pg, org)
    assert [(d.event_id.replace("-", ""), d.delta, d.split) for d in found] == [(r.json()["event_id"], -5, -4)]
    capsys.readouterr()
    assert await reconcile_main(wf.redis_url, wf.database_url, wf.config, wf.layout, org) == 1
    out = capsys.readouterr().out
    assert re.search(r"delta -5, its sources add up to -4 \(allocated:2,purchased:2\)", out), out


async def test_a_hold_past_the_window_is_committed_from_credit_at_the_multiple(wf: Any) -> None:
    org, h = await wf.tenant("pro_overflow", "erin")
    await wf.admin.grant(org, "general", 10)
    for _ in range(5):
        assert (await spend(wf, h)).status_code == 200
    r = await wf.client.post("/v1/reservations", json={"feature": "generate_insight", "units": 2}, headers=h)
    assert r.status_code == 201 and r.json()["held"] == 4, r.text  # 2 units at 2x
    c = await wf.client.post(f"/v1/reservations/{r.json()['reservation_id']}/commit", json={"units": 1}, headers=h)
    assert c.status_code == 200 and c.headers["X-Quota-Source"] == "purchased", c.text
    b = await general(wf, h)
    assert (b["allocated"], b["purchased"], b["held"]) == (45, 8, 0)


async def test_overflow_none_stops_at_the_allocation_but_a_meter_the_plan_leaves_out_runs_on_credit(wf: Any) -> None:
    org, h = await wf.tenant("capped")
    await wf.admin.grant(org, "general", 10)
    await wf.admin.grant(org, "goal_generation", 6)
    assert (await spend(wf, h, 2)).status_code == 200
    r = await spend(wf, h, 1)
    assert r.status_code == 402 and (await general(wf, h))["purchased"] == 10
    r = await wf.client.post("/v1/consume", json={"feature": "generate_goal"}, headers=h)
    assert r.status_code == 200 and r.headers["X-Quota-Source"] == "purchased", r.text


async def test_an_entitlement_gives_one_org_credit_past_its_plans_allocation(wf: Any, redis: Any) -> None:
    """Enterprise entitlements: the org's own override of its plan's layers (admin), applied by
    the decision with the plan's, restored by rebuild, and no other org on the plan sees it."""
    ent_org, h = await wf.tenant("capped")  # allocation 2, overflow none: 402 past it
    other, h2 = await wf.tenant("capped")
    for org in (ent_org, other):
        await wf.admin.grant(org, "general", 10)
    url = f"/v1/admin/orgs/{ent_org}/entitlements"
    r = await wf.client.put(url, json={"overflow": "credit", "overflow_cost": 2}, headers=wf.admin.h)
    assert r.status_code == 200, r.text
    assert r.json()["entitlements"] == {"overflow": "credit", "overflow_cost": 2}
    assert r.json()["effective"]["overflow"] == "credit" and r.json()["plan"] == "capped"
    assert (await wf.client.get(url, headers=wf.admin.h)).json()["entitlements"] == {"overflow": "credit",
                                                                                       "overflow_cost": 2}
    assert (await spend(wf, h, 2)).status_code == 200
    r = await spend(wf, h, 1)  # past the allocation: paid from purchased, at the entitlement's 2x
    assert r.status_code == 200 and r.headers["X-Quota-Source"] == "purchased", r.text
    assert (await general(wf, h))["purchased"] == 8
    # The other org on the same plan: the plan's behaviour.
    assert (await spend(wf, h2, 2)).status_code == 200
    assert (await spend(wf, h2, 1)).status_code == 402 and (await general(wf, h2))["purchased"] == 10

    # Rebuild restores it from Postgres (into a prefix of its own).
    from sync_worker.recovery import rebuild
    fresh = Layout(f"{wf.layout.prefix}:rb", wf.config.shards)
    await rebuild(redis, wf.pg, wf.config, fresh)
    assert orjson.loads(await redis.hget(fresh.org(ent_org), "entitlements")) == {"overflow": "credit",
                                                                                   "overflow_cost": 2}
    assert await redis.hget(fresh.org(other), "entitlements") is None

    # Removing it restores the plan's behaviour.
    r = await wf.client.delete(url, headers=wf.admin.h)
    assert r.status_code == 200 and r.json()["entitlements"] == {} and r.json()["effective"]["overflow"] == "none"
    assert (await spend(wf, h, 1)).status_code == 402 and (await general(wf, h))["purchased"] == 8


async def test_entitlements_bodies_are_validated_field_by_field(wf: Any) -> None:
    org, _ = await wf.tenant("capped")
    url = f"/v1/admin/orgs/{org}/entitlements"
    for body, field in [({"overflow": "sometimes"}, "overflow"), ({"overflow_cost": 0}, "overflow_cost"),
                        ({"overflow_cost": "2"}, "overflow_cost"), ({"credit_order": ["grants"]}, "credit_order"),
                        ({"rate_limits": {"user": {"overflow_cost": 1001}}}, "rate_limits.user.overflow_cost"),
                        ({"allocations": {"general": 5}}, "allocations")]:
        r = await wf.client.put(url, json=body, headers=wf.admin.h)
        assert r.status_code == 422 and r.json()["field"] == field, (body, r.text)
        assert r.headers["content-type"].startswith("application/problem+json")
    for method in ("GET", "PUT", "DELETE"):
        r = await wf.client.request(method, "/v1/admin/orgs/no-such-org/entitlements", json={}, headers=wf.admin.h)
        assert r.status_code == 404, (method, r.text)
    r = await wf.client.put(url, json={}, headers=wf.admin.h)  # {}: no override
    assert r.status_code == 200 and r.json()["entitlements"] == {}


async def test_reconcile_ties_usage_monetization_and_balance_changes_and_catches_each_tampered(
        wf: Any, capsys: Any) -> None:
    """The three records (docs/design.md): a clean org ties out and reconcile exits 0; a row
    tampered in each record in turn is caught (exit 1), including a split whose total still
    equals its delta (which the per-row split check passes)."""
    from sync_worker.recovery import tie_out_drift
    org, h = await wf.tenant("layered")
    await wf.admin.grant(org, "general", 10)
    e1 = (await spend(wf, h, 5)).json()["event_id"]  # allocated:2,purchased:3
    e2 = (await spend(wf, h, 1)).json()["event_id"]  # purchased:1
    f = await wf.client.post("/v1/refunds", json={"event_id": e2}, headers=h)
    assert f.status_code == 200, f.text
    for e in (e1, e2, f.json()["event_id"]):
        await wf.drained(e)
    assert await tie_out_drift(wf.pg, org) == []
    capsys.readouterr()
    assert await reconcile_main(wf.redis_url, wf.database_url, wf.config, wf.layout, org) == 0
    assert "three records: 0 (org, day) periods" in capsys.readouterr().out

    async def caught(column: str, tampered: Any, event_id: str) -> list[tuple[str, int, int]]:
        was = await wf.pg.fetchval(f"SELECT {column} FROM usage_events WHERE event_id = $1::uuid", event_id)
        await wf.pg.execute(f"UPDATE usage_events SET {column} = $2 WHERE event_id = $1::uuid", event_id, tampered)
        try:
            found = [(d.check, d.left, d.right) for d in await tie_out_drift(wf.pg, org)]
            capsys.readouterr()
            assert await reconcile_main(wf.redis_url, wf.database_url, wf.config, wf.layout, org) == 1
            assert "three records: 1 (org, day) periods" in capsys.readouterr().out
            return found
        finally:
            await wf.pg.execute(f"UPDATE usage_events SET {column} = $2 WHERE event_id = $1::uuid", event_id, was)

    # Usage: the charge says it was priced at 6, its layers took 5 (the day's charges: 7 vs 6).
    assert await caught("cost", 6, e1) == [("usage = monetization", 7, 6)]
    # Monetization: the split still adds up to the delta (split_drift passes) but says allocated paid 3.
    await wf.pg.execute("UPDATE usage_events SET sources = 'allocated:3,purchased:2' WHERE event_id = $1::uuid", e1)
    assert await split_drift(wf.pg, org) == []
    await wf.pg.execute("UPDATE usage_events SET sources = 'allocated:2,purchased:3' WHERE event_id = $1::uuid", e1)
    assert await caught("sources", "allocated:3,purchased:2", e1) == [
        ("monetization = balance", -3, -2), ("monetization = balance", -2, -3)]
    # Balance changes: the ledger says 2 of the 5 came from purchased credit, the split says 3.
    assert await caught("delta_purchased", -2, e1) == [
        ("monetization = balance", -2, -3), ("monetization = balance", -3, -2)]
    # A refund whose usage is not its charge's.
    assert await caught("cost", -2, f.json()["event_id"]) == [("refund = charge", 2, 1)]
    assert await tie_out_drift(wf.pg, org) == []


def test_the_source_header_names_the_paying_layers_also_when_remembered() -> None:
    from quota_gw.decisions import Decision

    def layers(sources: str) -> str:
        return Decision(status=200, code="", cost=3, remaining=10, event_id="e", retry_after_ms=0, rl_limit=-1,
                        rl_remaining=-1, rl_reset=0, replay=False, would="", extra={}, sources=sources,
                        detail="").headers()["X-Quota-Source"]

    for _ in range(2):  # made, then remembered
        assert layers("allocated:2,grant:lot_1:2,purchased:1") == "allocated,grant:lot_1,purchased"
        assert layers("purchased:2") == "purchased"
    assert [layers(f"grant:lot_{i}:1") for i in range(5000)][-1] == "grant:lot_4999"  # past the memory's bound
