"""HTTP contract: auth, isolation, revocation, bad input as problem+json with no state change."""

from __future__ import annotations

import asyncio

import orjson
import pytest

from quota_gw.layout import Layout, user_key_field
from quota_gw.events import entries


def problem(r, status: int, code: str) -> dict:
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/problem+json"
    body = r.json()
    assert body["status"] == status and body["code"] == code and body["title"] and body["detail"]
    return body


async def test_missing_and_unknown_keys_are_401(client):
    problem(await client.post("/v1/consume", json={"feature": "generate_goal"}), 401, "unauthorized")
    r = await client.post("/v1/consume", json={"feature": "generate_goal"}, headers={"Authorization": "Bearer qgw_nope"})
    problem(r, 401, "unauthorized")
    problem(await client.get("/v1/balance", headers={"Authorization": "Basic abc"}), 401, "unauthorized")


async def test_scopes(client, tenant, admin):
    org, _ = await tenant("pro")
    read_only = {"Authorization": f"Bearer {await admin.key(org, scopes=['read'])}"}
    consume_only = {"Authorization": f"Bearer {await admin.key(org, scopes=['consume'])}"}
    problem(await client.post("/v1/consume", json={"feature": "generate_goal"}, headers=read_only), 403, "forbidden")
    problem(await client.get("/v1/balance", headers=consume_only), 403, "forbidden")
    assert (await client.get("/v1/balance", headers=read_only)).status_code == 200


async def test_isolation_between_orgs(client, tenant, admin):
    org_a, ha = await tenant("starter", general=10)
    org_b, hb = await tenant("starter", general=10)
    ev_b = (await client.post("/v1/consume", json={"feature": "generate_insight"}, headers=hb)).json()["event_id"]
    rid_b = (await client.post("/v1/reservations", json={"feature": "generate_insight", "units": 2}, headers=hb)).json()["reservation_id"]
    # A's key cannot refund, commit or release B's things: they do not exist for A.
    problem(await client.post("/v1/refunds", json={"event_id": ev_b}, headers=ha), 404, "not_found")
    problem(await client.post(f"/v1/reservations/{rid_b}/commit", json={"units": 1}, headers=ha), 404, "not_found")
    problem(await client.delete(f"/v1/reservations/{rid_b}", headers=ha), 404, "not_found")
    # Balance answers only for the key's own org, whatever the caller asks for.
    r = await client.get("/v1/balance", params={"org_id": org_b}, headers=ha)
    assert r.json()["org_id"] == org_a
    # An org header is not a way in either.
    r = await client.post("/v1/consume", json={"feature": "generate_insight"}, headers={**ha, "X-Quota-Org": org_b})
    assert r.status_code == 200
    rb = (await client.get("/v1/balance", headers=hb)).json()["meters"]["general"]
    assert (rb["balance"], rb["held"]) == (7, 2)
    ra = (await client.get("/v1/balance", headers=ha)).json()["meters"]["general"]
    assert ra["balance"] == 9


async def test_user_key_cannot_act_as_another_user(client, tenant, admin):
    org, _ = await tenant("pro")
    hu = {"Authorization": f"Bearer {await admin.key(org, user_id='carol')}"}
    problem(await client.post("/v1/consume", json={"feature": "generate_goal", "user_id": "dave"}, headers=hu),
            403, "forbidden")
    r = await client.post("/v1/consume", json={"feature": "generate_goal"}, headers=hu)
    assert r.status_code == 200


async def test_revoked_key_is_refused_within_one_second(client, tenant, admin):
    org, _ = await tenant("pro")
    r = await client.post(f"/v1/admin/orgs/{org}/keys", json={"scopes": ["consume", "read"]}, headers=admin.h)
    key_id, key = r.json()["key_id"], r.json()["key"]
    h = {"Authorization": f"Bearer {key}"}
    assert (await client.get("/v1/balance", headers=h)).status_code == 200  # now cached in process
    loop = asyncio.get_running_loop()
    assert (await client.delete(f"/v1/admin/keys/{key_id}", headers=admin.h)).status_code == 200
    revoked_at = loop.time()
    while (await client.get("/v1/balance", headers=h)).status_code != 401:
        assert loop.time() - revoked_at < 1.0, "revocation took longer than 1 s"
        await asyncio.sleep(0.02)
    listed = (await client.get(f"/v1/admin/orgs/{org}/keys", headers=admin.h)).json()["keys"]
    assert [k["revoked_at"] is not None for k in listed if k["key_id"] == key_id] == [True]
    assert all("key" not in k and "key_hash" not in k for k in listed)


async def test_keys_survive_a_redis_flush_but_revocations_too(client, tenant, admin, redis, prefix, config, app):
    org, _ = await tenant("pro")
    live = await admin.key(org)
    r = await client.post(f"/v1/admin/orgs/{org}/keys", json={"scopes": ["read"]}, headers=admin.h)
    dead_id, dead = r.json()["key_id"], r.json()["key"]
    await client.delete(f"/v1/admin/keys/{dead_id}", headers=admin.h)
    layout = Layout(prefix, config.shards)
    from quota_gw.auth import hash_key
    await redis.delete(layout.api_key(hash_key(live)), layout.api_key(hash_key(dead)), layout.org(org))
    app.state.ctx.keys._keys.clear()
    app.state.ctx.keys._plans.clear()
    assert (await client.get("/v1/balance", headers={"Authorization": f"Bearer {live}"})).status_code == 200
    assert (await client.get("/v1/balance", headers={"Authorization": f"Bearer {dead}"})).status_code == 401


@pytest.mark.parametrize("body, status, field", [
    ({"feature": "no_such_feature"}, 422, "feature"),
    ({}, 422, "feature"),
    ({"feature": "generate_goal", "units": -1}, 422, "units"),
    ({"feature": "generate_goal", "units": 0}, 422, "units"),
    ({"feature": "generate_goal", "units": 10**15}, 422, "units"),
    ({"feature": "generate_goal", "units": 1.5}, 422, "units"),
    ({"feature": "generate_goal", "units": "3"}, 422, "units"),
    ({"feature": "generate_goal", "units": True}, 422, "units"),
    ({"feature": "generate_goal", "user_id": "bad user!"}, 422, "user_id"),
    ({"feature": "generate_goal", "metadata": [1]}, 422, "metadata"),
    ({"feature": "generate_goal", "metadata": {"x": "y" * 5000}}, 422, "metadata"),
    ({"feature": "generate_goal", "metadata": {"x": "a\u0000b"}}, 422, "metadata"),
])
async def test_bad_input_is_422_and_changes_nothing(client, tenant, redis, prefix, config, body, status, field):
    org, h = await tenant("pro")
    r = await client.post("/v1/consume", json=body, headers=h)
    b = problem(r, status, "invalid_request")
    assert field in b["detail"]
    layout = Layout(prefix, config.shards)
    assert await redis.exists(layout.balances(org)) == 0
    assert not [f for f in entries(await redis.xrange(layout.stream(org))) if f["org"] == org]


async def test_malformed_json_is_400(client, tenant):
    org, h = await tenant("pro")
    for raw in (b"{not json", b"[1,2]", b""):
        r = await client.post("/v1/consume", content=raw, headers={**h, "content-type": "application/json"})
        problem(r, 400, "invalid_request")


async def test_unknown_route_and_method_are_problems(client):
    problem(await client.get("/v1/nope"), 404, "not_found")
    r = await client.get("/v1/consume")
    assert r.status_code == 405 and r.headers["content-type"] == "application/problem+json"


async def test_admin_requires_the_token(client):
    problem(await client.post("/v1/admin/orgs", json={"org_id": "x", "plan": "pro"}), 401, "unauthorized")
    r = await client.post("/v1/admin/orgs", json={"org_id": "x", "plan": "pro"},
                          headers={"Authorization": "Bearer wrong"})
    problem(r, 401, "unauthorized")


async def test_admin_validation(client, admin):
    problem(await client.post("/v1/admin/orgs", json={"org_id": "bad id", "plan": "pro"}, headers=admin.h),
            422, "invalid_request")
    problem(await client.post("/v1/admin/orgs", json={"org_id": "ok-1", "plan": "gold"}, headers=admin.h),
            422, "invalid_request")
    org = await admin.org("pro")
    problem(await client.post("/v1/admin/orgs", json={"org_id": org, "plan": "pro"}, headers=admin.h), 409, "conflict")
    problem(await client.post("/v1/admin/orgs/nobody/keys", json={"scopes": ["read"]}, headers=admin.h), 404, "not_found")
    problem(await client.post(f"/v1/admin/orgs/{org}/keys", json={"scopes": ["root"]}, headers=admin.h),
            422, "invalid_request")
    problem(await client.post(f"/v1/admin/orgs/{org}/grants", json={"meter": "gold", "amount": 5, "reason": "x"},
                              headers=admin.h), 422, "invalid_request")
    problem(await client.post(f"/v1/admin/orgs/{org}/grants", json={"meter": "general", "amount": -5, "reason": "x"},
                              headers=admin.h), 422, "invalid_request")


async def test_quota_headers_on_decisions(client, tenant):
    org, h = await tenant("pro")
    r = await client.post("/v1/consume", json={"feature": "forecast_revenue", "user_id": "q"}, headers=h)
    assert r.status_code == 200
    assert r.headers["X-Quota-Remaining"] == "26"
    assert (r.headers["RateLimit-Limit"], r.headers["RateLimit-Remaining"]) == ("5", "4")
    assert 0 < int(r.headers["RateLimit-Reset"]) <= 60


async def test_pricing_and_balance_shapes(client, tenant):
    org, h = await tenant("pro")
    p = (await client.get("/v1/pricing", headers=h)).json()
    assert p["features"]["generate_goal"] == {"meter": "goal_generation", "cost": 3}
    assert p["plans"]["enterprise"]["allocations"]["tokens"] == "unlimited"
    b = (await client.get("/v1/balance", headers=h)).json()
    assert b["plan"] == "pro"
    m = b["meters"]["goal_generation"]
    assert {"balance", "allocated", "purchased", "used", "limit", "period_end", "low"} <= set(m)


async def test_unknown_users_are_registered_unless_config_says_otherwise(client, tenant, redis, prefix, config):
    org, h = await tenant("pro")
    assert (await client.post("/v1/consume", json={"feature": "generate_goal", "user_id": "newbie"}, headers=h)).status_code == 200
    # Registered: its field in the balance hash, holding its rate window (the pro plan has one).
    assert (await redis.hget(Layout(prefix, config.shards).balances(org), user_key_field("newbie")) or "x").isdigit()


async def test_health_and_readiness(client):
    assert (await client.get("/healthz")).status_code == 200
    r = await client.get("/readyz")
    assert r.status_code == 200 and r.json()["redis"] == "ok" and r.json()["postgres"] == "ok"
    assert "quota_gw_decisions_total" in (await client.get("/metrics")).text


# -- admin writes check what their script answered; a reused key with another body is 422 ------

async def test_grant_with_a_reused_idempotency_key_and_another_body_is_422(client, admin):
    org = await admin.org("starter")
    url = f"/v1/admin/orgs/{org}/grants"
    first = await client.post(url, json={"meter": "general", "amount": 5, "reason": "r", "idempotency_key": "g1"},
                              headers=admin.h)
    assert first.status_code == 201
    for other in ({"amount": 7, "reason": "r"}, {"amount": 5, "reason": "another reason"}):
        r = await client.post(url, json={"meter": "general", "idempotency_key": "g1", **other}, headers=admin.h)
        problem(r, 422, "invalid_request")
    again = await client.post(url, json={"meter": "general", "amount": 5, "reason": "r"},
                              headers={**admin.h, "Idempotency-Key": "g1"})
    assert again.status_code == 201 and again.json() == first.json()
    assert again.headers["Idempotent-Replayed"] == "true"
    b = (await client.get(f"/v1/admin/orgs/{org}/balance", headers=admin.h)).json()["meters"]["general"]
    assert b["purchased"] == 5


async def test_reused_key_with_another_body_is_refused_on_every_decision_that_takes_one(client, tenant):
    org, h = await tenant("starter", general=100)

    async def same_then_other(url: str, body: dict, other: dict, status: int = 422,
                              code: str = "invalid_request") -> dict:
        first = await client.post(url, json=body, headers=h)
        assert first.status_code in (200, 201), first.text
        again = await client.post(url, json={**body}, headers=h)
        assert again.json() == first.json() and again.headers["Idempotent-Replayed"] == "true"
        problem(await client.post(url, json={**body, **other}, headers=h), status, code)
        return first.json()

    c = {"feature": "generate_insight", "units": 2, "idempotency_key": "c1", "metadata": {"a": 1, "b": 2}}
    consumed = await same_then_other("/v1/consume", c, {"metadata": {"a": 1, "b": 3}})
    problem(await client.post("/v1/consume", json={**c, "units": 3}, headers=h), 422, "invalid_request")
    # The same metadata with its keys in another order is the same request.
    r = await client.post("/v1/consume", json={**c, "metadata": {"b": 2, "a": 1}}, headers=h)
    assert r.status_code == 200 and r.json() == consumed
    rv = {"feature": "generate_insight", "units": 2, "ttl_s": 60, "idempotency_key": "r1"}
    rid = (await same_then_other("/v1/reservations", rv, {"ttl_s": 61}))["reservation_id"]
    # A commit or refund is keyed by its reservation or event: another body is a conflict with it.
    await same_then_other(f"/v1/reservations/{rid}/commit", {"units": 1}, {"units": 2}, 409, "conflict")
    await same_then_other("/v1/refunds", {"event_id": consumed["event_id"], "metadata": {"why": "x"}},
                          {"metadata": {"why": "y"}}, 409, "conflict")
    b = (await client.get("/v1/balance", headers=h)).json()["meters"]["general"]
    assert (b["balance"], b["held"]) == (99, 0)  # 2 consumed and refunded, 1 committed


# -- required fields are required ---------------------------------------------------------------

async def test_missing_required_fields_are_422_never_a_default(client, admin, tenant):
    org, h = await tenant("pro")
    await admin.quota(org, "general", 9, user_id="kim")
    cases = [
        ("PUT", f"/v1/admin/orgs/{org}/plan", {}, "plan"),
        ("POST", f"/v1/admin/orgs/{org}/users", {}, "user_id"),
        ("PUT", f"/v1/admin/orgs/{org}/quotas", {"meter": "general", "user_id": "kim"}, "limit"),
        ("POST", f"/v1/admin/orgs/{org}/grants", {"meter": "general", "reason": "x"}, "amount"),
        ("POST", f"/v1/admin/orgs/{org}/grants", {"meter": "general", "amount": 1}, "reason"),
        ("POST", f"/v1/admin/orgs/{org}/grants", {"amount": 1, "reason": "x"}, "meter"),
    ]
    for method, url, body, field in cases:
        r = await client.request(method, url, json=body, headers=admin.h)
        assert problem(r, 422, "invalid_request")["field"] == field, (url, r.text)
    for url, body, field in [("/v1/reservations", {"feature": "generate_insight"}, "units"),
                             ("/v1/check", {"units": 1}, "feature"),
                             ("/v1/consume", {}, "feature"),
                             ("/v1/refunds", {}, "event_id")]:
        assert problem(await client.post(url, json=body, headers=h), 422, "invalid_request")["field"] == field
    rid = (await client.post("/v1/reservations", json={"feature": "generate_insight", "units": 1}, headers=h)).json()
    r = await client.post(f"/v1/reservations/{rid['reservation_id']}/commit", json={}, headers=h)
    assert problem(r, 422, "invalid_request")["field"] == "units"
    # Nothing moved: same plan, the sub-quota kept.
    assert (await client.get("/v1/balance", headers=h)).json()["plan"] == "pro"
    r = await client.post("/v1/check", json={"feature": "generate_insight", "units": 10, "user_id": "kim"}, headers=h)
    assert r.json()["allowed"] is False
    # An explicit null still removes the sub-quota.
    r = await client.put(f"/v1/admin/orgs/{org}/quotas", json={"meter": "general", "user_id": "kim", "limit": None},
                         headers=admin.h)
    assert r.status_code == 200


# -- names match in full; what Postgres refuses is a 4xx ------------------------------------------

async def test_names_with_a_trailing_newline_are_refused(client, admin, tenant, redis, prefix, config):
    org, h = await tenant("pro")
    r = await client.post("/v1/consume", json={"feature": "generate_insight", "user_id": "u0\n"}, headers=h)
    assert problem(r, 422, "invalid_request")["field"] == "user_id"
    assert (await client.get("/v1/balance", headers=h)).json()["meters"]["general"]["used"] == 0
    assert not await redis.hexists(Layout(prefix, config.shards).balances(org), user_key_field("u0\n"))
    r = await client.post("/v1/admin/orgs", json={"org_id": "a\n", "plan": "pro"}, headers=admin.h)
    assert problem(r, 422, "invalid_request")["field"] == "org_id"
    for body, field in [({"user_id": "u\n"}, "user_id"), ({"user_id": "u", "team": "t\n"}, "team")]:
        r = await client.post(f"/v1/admin/orgs/{org}/users", json=body, headers=admin.h)
        assert problem(r, 422, "invalid_request")["field"] == field
    r = await client.put(f"/v1/admin/orgs/{org}/quotas", json={"meter": "general", "team": "t\n", "limit": 1},
                         headers=admin.h)
    assert problem(r, 422, "invalid_request")["field"] == "team"


async def test_what_postgres_cannot_store_is_a_4xx_naming_the_field(client, admin):
    r = await client.post("/v1/admin/orgs", json={"org_id": "nul-name", "name": "a\u0000b", "plan": "pro"},
                          headers=admin.h)
    assert problem(r, 422, "invalid_request")["field"] == "name"
    org = await admin.org("pro")
    r = await client.post(f"/v1/admin/orgs/{org}/grants", json={"meter": "general", "amount": 1, "reason": "a\u0000"},
                          headers=admin.h)
    assert problem(r, 422, "invalid_request")["field"] == "reason"
    for method, url in [("GET", "/v1/admin/orgs/a%00b/keys"), ("GET", "/v1/admin/orgs/a%00b/balance"),
                        ("DELETE", "/v1/admin/keys/k%00"), ("PUT", "/v1/admin/orgs/a%00b/plan"),
                        ("PUT", "/v1/admin/orgs/a%0A/plan")]:
        problem(await client.request(method, url, json={"plan": "pro"}, headers=admin.h), 404, "not_found")


# -- metadata depth, body size ---------------------------------------------------------------------

def nested(depth: int) -> dict:
    m: dict = {"leaf": 1}
    for _ in range(depth - 1):
        m = {"x": m}
    return m


@pytest.mark.parametrize("depth", [33, 300, 1000])
async def test_metadata_nested_deeper_than_32_is_422_naming_metadata(client, tenant, depth):
    org, h = await tenant("pro")
    raw = orjson.dumps({"feature": "generate_insight", "metadata": {"a": [1]}}).replace(
        b'{"a":[1]}', b'{"a":' * depth + b"1" + b"}" * depth)
    r = await client.post("/v1/consume", content=raw, headers={**h, "content-type": "application/json"})
    assert 400 <= r.status_code < 500, r.text
    if depth < 1000:  # (deeper than the JSON parser takes at all: 400 malformed)
        assert problem(r, 422, "invalid_request")["field"] == "metadata"
    assert (await client.get("/v1/balance", headers=h)).json()["meters"]["general"]["used"] == 0
    r = await client.post("/v1/consume", json={"feature": "generate_insight", "metadata": nested(32)}, headers=h)
    assert r.status_code == 200, r.text


async def test_request_bodies_over_64_kib_are_413(client, tenant, admin):
    org, h = await tenant("pro")
    big = {"feature": "generate_insight", "metadata": {"pad": "x" * 70_000}}
    problem(await client.post("/v1/consume", json=big, headers=h), 413, "invalid_request")
    r = await client.post(f"/v1/admin/orgs/{org}/grants", json={"meter": "general", "amount": 1, "reason": "x" * 70_000},
                          headers=admin.h)
    problem(r, 413, "invalid_request")

    async def chunks():  # no Content-Length: counted while it streams
        for _ in range(20):
            yield b" " * 8192

    problem(await client.post("/v1/check", content=chunks(), headers={**h, "content-type": "application/json"}),
            413, "invalid_request")
    assert (await client.get("/v1/balance", headers=h)).json()["meters"]["general"]["used"] == 0
    assert (await client.post("/v1/check", json={"feature": "generate_insight", "pad": "x" * 60_000},
                              headers=h)).status_code == 200


async def test_postgres_refusals_under_the_checks_are_4xx_naming_the_column(app):
    """The net under the routes' own checks (pg_errors), on real Postgres refusals."""
    from starlette.requests import Request

    from quota_gw.admin import pg_errors
    from quota_gw.problems import Problem

    db = app.state.ctx.db
    statements = {
        "org_id": ("INSERT INTO orgs (org_id, plan) VALUES ($1, 'pro')", "a\n"),  # the table's check
        "plan": ("INSERT INTO orgs (org_id, plan) VALUES ($1, NULL)", "no-plan"),  # NOT NULL
        "org_id ": ("INSERT INTO users (org_id, user_id) VALUES ($1, 'u')", "no-such-org"),  # foreign key
        "body": ("SELECT 1 WHERE $1::text = ''", "a\x00b"),  # a value Postgres cannot hold
    }
    for field, (sql, arg) in statements.items():
        async def route(request: Request, sql: str = sql, arg: str = arg) -> None:
            await db.execute(sql, arg)

        with pytest.raises(Problem) as e:
            await pg_errors(route)(Request({"type": "http", "method": "POST", "path": "/", "headers": []}))
        assert 400 <= e.value.status < 500 and e.value.extra["field"] == field.strip(), (sql, e.value.detail)
