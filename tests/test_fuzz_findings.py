"""Defects the schemathesis run (test_openapi_fuzz.py) found, one rule each, on the in-process
app: input the gateway ignored or mis-read instead of refusing, a 500, a wrong Allow header,
and a route lookup answered before authentication."""

from __future__ import annotations

from test_api import problem

from quota_gw.layout import Layout
from quota_gw.events import entries


async def stream_len(redis, prefix, config, org) -> int:
    return len([f for f in entries(await redis.xrange(Layout(prefix, config.shards).stream(org))) if f["org"] == org])


async def test_key_scopes_that_are_not_strings_are_422_not_500(client, admin):
    org = await admin.org("pro")
    for scopes in ([{}], [["read"]], [1], ["read", None]):
        r = await client.post(f"/v1/admin/orgs/{org}/keys", json={"scopes": scopes}, headers=admin.h)
        assert problem(r, 422, "invalid_request")["field"] == "scopes", scopes


async def test_405_allows_every_method_of_the_path(client, admin):
    r = await client.request("OPTIONS", "/v1/admin/orgs/some-org/keys", headers=admin.h)
    assert r.status_code == 405 and r.headers["content-type"] == "application/problem+json"
    assert set(r.headers["Allow"].split(", ")) == {"GET", "HEAD", "POST"}
    r = await client.get("/v1/consume")
    assert r.status_code == 405 and r.headers["Allow"] == "POST"


async def test_authorize_tells_no_route_only_to_a_caller_with_a_key(client, tenant):
    r = await client.get("/v1/authorize", headers={"X-Original-URI": "/nowhere"})
    assert problem(r, 401, "unauthorized") and r.headers["X-Quota-Status"] == "401"
    _, h = await tenant("pro")
    r = await client.get("/v1/authorize", headers={**h, "X-Original-URI": "/nowhere"})
    assert problem(r, 404, "not_found") and r.headers["X-Quota-Status"] == "404"


async def test_integral_json_numbers_are_integers(client, tenant, admin):
    org, h = await tenant("pro")
    r = await client.post("/v1/consume", json={"feature": "generate_goal", "units": 2.0}, headers=h)
    assert r.status_code == 200 and r.json()["cost"] == 6
    r = await client.post("/v1/consume", json={"feature": "generate_goal", "units": 1.5}, headers=h)
    assert problem(r, 422, "invalid_request")["field"] == "units"
    r = await client.put(f"/v1/admin/orgs/{org}/quotas", json={"meter": "general", "team": "t", "limit": 118.0},
                         headers=admin.h)
    assert r.status_code == 200 and r.json()["limit"] == 118


async def test_invalid_user_header_is_refused_even_when_the_body_names_the_user(client, tenant, redis, prefix, config):
    org, h = await tenant("pro")
    for header in ("", "not a name", "x" * 65):
        r = await client.post("/v1/consume", json={"feature": "generate_goal", "user_id": "u1"},
                              headers={**h, "X-Quota-User": header})
        assert problem(r, 422, "invalid_request")["field"] == "user_id"
    assert await stream_len(redis, prefix, config, org) == 0


async def test_idempotency_key_that_is_not_a_key_is_refused_not_dropped(client, tenant, redis, prefix, config):
    """`"idempotency_key": ""` (or 0, or false) used to mean "no key": a retry then charged twice."""
    org, h = await tenant("pro")
    for key in ("", 0, False, [], "a\x01b", "k" * 201):
        r = await client.post("/v1/consume", json={"feature": "generate_goal", "idempotency_key": key}, headers=h)
        assert problem(r, 422, "invalid_request")["field"] == "idempotency_key", key
    r = await client.post("/v1/consume", json={"feature": "generate_goal", "idempotency_key": "ok"},
                          headers={**h, "Idempotency-Key": "bad\x7f"})
    assert problem(r, 422, "invalid_request")["field"] == "idempotency_key"
    assert await stream_len(redis, prefix, config, org) == 0
    # null is absent: the header's key applies, and a retry replays.
    for _ in range(2):
        r = await client.post("/v1/consume", json={"feature": "generate_goal", "idempotency_key": None},
                              headers={**h, "Idempotency-Key": "k-1"})
        assert r.status_code == 200
    assert r.headers["Idempotent-Replayed"] == "true"


async def test_refund_takes_only_the_event_id_spellings_the_api_answers(client, tenant):
    org, h = await tenant("pro")
    eid = (await client.post("/v1/consume", json={"feature": "generate_goal"}, headers=h)).json()["event_id"]
    dashed = f"{eid[:8]}-{eid[8:12]}-{eid[12:16]}-{eid[16:20]}-{eid[20:]}"
    for odd in ("{" + eid + "}", "urn:uuid:" + dashed, eid[:4] + "-" + eid[4:]):
        r = await client.post("/v1/refunds", json={"event_id": odd}, headers=h)
        assert problem(r, 422, "invalid_request")["field"] == "event_id", odd
    assert (await client.post("/v1/refunds", json={"event_id": dashed}, headers=h)).status_code == 200


async def test_a_settled_reservation_says_how_it_was_settled(client, tenant):
    """The messages were built as op .. 'ed' ("already commited", "already releaseed")."""
    _, h = await tenant("pro")
    for first, then, word in (("commit", "release", "committed"), ("release", "commit", "released")):
        r = await client.post("/v1/reservations", json={"feature": "generate_goal", "units": 1}, headers=h)
        rid = r.json()["reservation_id"]

        async def settle(op: str, units: int = 1, rid: str = rid):
            if op == "commit":
                return await client.post(f"/v1/reservations/{rid}/commit", json={"units": units}, headers=h)
            return await client.delete(f"/v1/reservations/{rid}", headers=h)

        assert (await settle(first)).status_code == 200
        assert problem(await settle(then), 409, "conflict")["detail"] == f"reservation already {word}"
        if first == "commit":  # a retry with another body
            assert problem(await settle("commit", 0), 409, "conflict")["detail"].startswith("reservation already")


async def test_ops_activity_reads_the_ledger_through_the_lazy_pool(client, admin):
    """activity.py took a connection with acquire(), which the lazily connected db.Database
    (the availability branch) does not have: every GET /v1/admin/activity was a 500."""
    r = await client.get("/v1/admin/activity", params={"minutes": 3}, headers=admin.h)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["minutes"] == 3 and len(body["by_minute"]) == 3 and body["source"] == "usage_events"


async def test_alert_webhook_url_with_a_control_character_is_refused(client, admin):
    """A URL with an ASCII control character (which httpx cannot send) was stored, then failed
    at every delivery; control characters are refused, as the document's pattern says."""
    org = await admin.org("pro")
    for url in ("https://hooks.example/a\x7fb", "https://hooks.example/\x85", "http://a\x1d.example/x",
                "https://hooks.example/\x9f"):
        r = await client.put(f"/v1/admin/orgs/{org}/webhook", json={"url": url}, headers=admin.h)
        assert problem(r, 422, "invalid_request")["field"] == "url", url
    r = await client.put(f"/v1/admin/orgs/{org}/webhook", json={"url": "https://hooks.example/quota?x=1"},
                         headers=admin.h)
    assert r.status_code == 200 and r.json()["secret"].startswith("whsec_")
