"""The invariants of SPEC §3 on the hot path: no overspend, idempotency, refused calls cost
nothing, period refresh. Real Redis, real concurrency (1,000 requests in flight at once)."""

from __future__ import annotations

import asyncio
import random

import httpx
import orjson
import pytest

from conftest import ADMIN_TOKEN, test_config_data
from quota_gw import config as config_mod
from quota_gw import events
from quota_gw.app import create_app
from quota_gw.layout import HOLDS_DUE, Layout, meter_field, quota_field, quota_subject


async def balance(client: httpx.AsyncClient, h: dict[str, str], meter: str) -> dict:
    r = await client.get("/v1/balance", headers=h)
    assert r.status_code == 200, r.text
    return r.json()["meters"][meter]


async def stream_kinds(redis, layout: Layout, org: str) -> list[dict]:
    entries = await redis.xrange(layout.stream(org))
    return [f for f in events.entries(entries) if f["org"] == org]


async def test_no_overspend_1000_concurrent_consumes(client, tenant):
    org, h = await tenant("starter", general=100)  # starter allocates nothing: only purchased credit

    async def one(i: int) -> int:
        r = await client.post("/v1/consume", json={"feature": "generate_insight"}, headers=h)
        return r.status_code

    codes = await asyncio.gather(*(one(i) for i in range(1000)))
    assert codes.count(200) == 100
    assert codes.count(402) == 900
    b = await balance(client, h, "general")
    assert b["balance"] == 0 and b["purchased"] == 0 and b["used"] == 100


async def test_no_overspend_user_sub_quota_and_org_balance_at_once(client, tenant, admin):
    # Org has 100 (bulk plan). Two users capped at 30 each plus uncapped traffic: the org
    # balance and both sub-quotas must all hold at once.
    org, h = await tenant("bulk")
    await admin.quota(org, "general", 30, user_id="alice")
    await admin.quota(org, "general", 30, user_id="bob")

    async def one(i: int) -> tuple[str, int]:
        user = ("alice", "bob", f"u{i % 50}")[i % 3]
        r = await client.post("/v1/consume", json={"feature": "generate_insight", "user_id": user}, headers=h)
        return user, r.status_code

    results = await asyncio.gather(*(one(i) for i in range(1000)))
    ok = [u for u, s in results if s == 200]
    assert all(s in (200, 402) for _, s in results)
    assert ok.count("alice") <= 30 and ok.count("bob") <= 30
    assert len(ok) == 100  # the org balance is the binding level overall
    b = await balance(client, h, "general")
    assert b["balance"] == 0


async def test_no_overspend_team_quota(client, tenant, admin):
    org, h = await tenant("bulk")
    for u in ("t1", "t2", "t3"):
        await admin.user(org, u, team="red")
    await admin.quota(org, "general", 7, team="red")
    results = await asyncio.gather(*(client.post(
        "/v1/consume", json={"feature": "generate_insight", "user_id": f"t{1 + i % 3}"}, headers=h)
        for i in range(60)))
    assert [r.status_code for r in results].count(200) == 7
    denied = [r.json() for r in results if r.status_code == 402]
    assert denied and all("team red" in d["detail"] for d in denied)


async def test_no_overspend_with_reservations_mixed_in(client, tenant):
    org, h = await tenant("starter", general=100)
    held: list[str] = []

    async def one(i: int) -> tuple[str, int, int]:
        kind = i % 4
        if kind == 0:
            r = await client.post("/v1/reservations", json={"feature": "generate_insight", "units": 3}, headers=h)
            if r.status_code == 201:
                held.append(r.json()["reservation_id"])
                return "reserve", 201, 3
            return "reserve", r.status_code, 0
        r = await client.post("/v1/consume", json={"feature": "generate_insight"}, headers=h)
        return "consume", r.status_code, 1 if r.status_code == 200 else 0

    results = await asyncio.gather(*(one(i) for i in range(1000)))
    assert {s for _, s, _ in results} <= {200, 201, 402}
    spent = sum(c for _, _, c in results)
    assert spent == 100  # holds + charges fill the balance exactly, never more
    b = await balance(client, h, "general")
    assert b["balance"] == 0 and b["held"] == 3 * len(held)

    # Commit some holds partly, release the rest: the unused part comes back, nothing else.
    random.shuffle(held)
    half = len(held) // 2
    commits = await asyncio.gather(*(client.post(f"/v1/reservations/{rid}/commit", json={"units": 1}, headers=h)
                                     for rid in held[:half]))
    releases = await asyncio.gather(*(client.delete(f"/v1/reservations/{rid}", headers=h) for rid in held[half:]))
    assert all(r.status_code == 200 for r in commits + releases)
    assert all(r.json()["cost"] == 1 and r.json()["released"] == 2 for r in commits)
    b = await balance(client, h, "general")
    assert b["held"] == 0
    assert b["balance"] == 2 * half + 3 * (len(held) - half)


async def test_commit_never_charges_more_than_the_hold(client, tenant):
    org, h = await tenant("starter", general=10)
    r = await client.post("/v1/reservations", json={"feature": "generate_insight", "units": 4}, headers=h)
    rid = r.json()["reservation_id"]
    r = await client.post(f"/v1/reservations/{rid}/commit", json={"units": 9}, headers=h)
    assert r.status_code == 200 and r.json()["cost"] == 4
    assert (await balance(client, h, "general"))["balance"] == 6


async def test_settling_twice_returns_the_first_answer(client, tenant):
    org, h = await tenant("starter", general=10)
    rid = (await client.post("/v1/reservations", json={"feature": "generate_insight", "units": 5}, headers=h)).json()["reservation_id"]
    first = await client.post(f"/v1/reservations/{rid}/commit", json={"units": 2}, headers=h)
    again = await client.post(f"/v1/reservations/{rid}/commit", json={"units": 2}, headers=h)
    assert again.json() == first.json() and again.headers["Idempotent-Replayed"] == "true"
    late_release = await client.delete(f"/v1/reservations/{rid}", headers=h)
    assert late_release.status_code == 409
    assert (await balance(client, h, "general"))["balance"] == 8


async def test_expired_reservation_returns_its_hold(client, tenant, redis, config, prefix):
    org, h = await tenant("starter", general=10)
    r = await client.post("/v1/reservations", json={"feature": "generate_insight", "units": 6, "ttl_s": 1}, headers=h)
    rid = r.json()["reservation_id"]
    layout = Layout(prefix, config.shards)
    # Age the hold instead of sleeping: the expiry is a score in the org's expiry set, and the
    # earliest one is kept beside the balances.
    await redis.zadd(layout.expiries(org), {rid: 1})
    await redis.hset(layout.balances(org), HOLDS_DUE, 1)
    r = await client.post("/v1/consume", json={"feature": "generate_insight", "units": 10}, headers=h)
    assert r.status_code == 200, r.text  # the sweep returned the 6 before deciding
    assert (await client.post(f"/v1/reservations/{rid}/commit", json={"units": 1}, headers=h)).status_code == 404
    released = [f for f in await stream_kinds(redis, layout, org) if f["kind"] == "release"]
    assert len(released) == 1 and '"expired"' in released[0]["meta"]


async def test_rate_limit_sixth_call_in_a_minute_is_429_and_free(client, tenant):
    org, h = await tenant("pro")
    codes = []
    for _ in range(5):
        r = await client.post("/v1/consume", json={"feature": "generate_insight", "user_id": "ana"}, headers=h)
        codes.append(r.status_code)
        assert r.headers["RateLimit-Limit"] == "5"
    assert codes == [200] * 5
    before = await balance(client, h, "general")
    r = await client.post("/v1/consume", json={"feature": "generate_insight", "user_id": "ana"}, headers=h)
    assert r.status_code == 429
    assert r.headers["content-type"] == "application/problem+json"
    assert r.json()["code"] == "rate_limited"
    assert 1 <= int(r.headers["Retry-After"]) <= 12
    assert await balance(client, h, "general") == before
    # Another user of the same org is not limited by ana's calls.
    r = await client.post("/v1/consume", json={"feature": "generate_insight", "user_id": "ben"}, headers=h)
    assert r.status_code == 200


async def test_period_refresh_restores_allocation_and_keeps_purchased(client, tenant, redis, config, prefix):
    org, h = await tenant("bulk", general=7)
    for _ in range(3):
        assert (await client.post("/v1/consume", json={"feature": "generate_insight", "units": 30}, headers=h)).status_code == 200
    b = await balance(client, h, "general")
    assert (b["allocated"], b["purchased"], b["used"]) == (10, 7, 90)
    # Move the period end into the past.
    layout = Layout(prefix, config.shards)
    await redis.hset(layout.balances(org), meter_field("general", "period_end"), 1000)
    b = await balance(client, h, "general")
    assert (b["allocated"], b["purchased"], b["used"]) == (100, 7, 0)
    r = await client.post("/v1/consume", json={"feature": "generate_insight", "units": 105}, headers=h)
    assert r.status_code == 200 and r.json()["remaining"] == 2
    resets = [f for f in await stream_kinds(redis, layout, org) if f["kind"] == "reset" and f["meter"] == "general"]
    assert [int(f["delta"]) for f in resets] == [100, 90]  # first period, then the refill of what was used


async def test_idempotency_key_charges_once_and_returns_the_first_answer(client, tenant):
    org, h = await tenant("starter", general=50)
    hk = {**h, "Idempotency-Key": "order-42"}
    answers = await asyncio.gather(*(client.post("/v1/consume", json={"feature": "generate_insight", "units": 5},
                                                 headers=hk) for _ in range(20)))
    assert all(a.status_code == 200 for a in answers)
    assert len({a.json()["event_id"] for a in answers}) == 1
    assert len({a.json()["remaining"] for a in answers}) == 1
    assert (await balance(client, h, "general"))["balance"] == 45
    # The same key with another request is refused, not silently answered.
    r = await client.post("/v1/consume", json={"feature": "generate_insight", "units": 6}, headers=hk)
    assert r.status_code == 422


async def test_an_answer_stored_by_an_earlier_version_is_still_the_first_answer(client, tenant, redis):
    """Answers were stored as arrays (status, code, detail, cost, ...) before they travelled as one
    text; a retry inside the record's lifetime after an upgrade gets that answer, not an error."""
    org, h = await tenant("starter", general=50)
    hk = {**h, "Idempotency-Key": "order-7"}
    first = await client.post("/v1/consume", json={"feature": "generate_insight", "units": 5}, headers=hk)
    [key] = [k async for k in redis.scan_iter(match=f"*:idem:{org}:*")]
    record = orjson.loads(await redis.get(key))
    (status, code, cost, remaining, event_id, retry, rl_limit, rl_remaining, rl_reset, _replay, would, extra,
     sources, detail) = record["reply"].split("\t", 13)
    record["reply"] = [int(status), code, detail, int(cost), int(remaining), event_id, int(retry), int(rl_limit),
                       int(rl_remaining), int(rl_reset), 0, would, extra, sources]
    await redis.set(key, orjson.dumps(record), keepttl=True)
    again = await client.post("/v1/consume", json={"feature": "generate_insight", "units": 5}, headers=hk)
    assert again.status_code == 200 and again.headers["Idempotent-Replayed"] == "true"
    assert again.json() == first.json()
    assert again.headers["X-Quota-Source"] == first.headers["X-Quota-Source"] == "purchased"
    assert (await balance(client, h, "general"))["balance"] == 45


async def test_refund_once(client, tenant):
    org, h = await tenant("starter", general=10)
    eid = (await client.post("/v1/consume", json={"feature": "generate_insight", "units": 4}, headers=h)).json()["event_id"]
    answers = await asyncio.gather(*(client.post("/v1/refunds", json={"event_id": eid}, headers=h) for _ in range(10)))
    assert all(a.status_code == 200 for a in answers)
    assert len({a.json()["event_id"] for a in answers}) == 1
    assert (await balance(client, h, "general"))["balance"] == 10


async def test_grant_idempotent(client, tenant, admin):
    org, h = await tenant("starter")
    for _ in range(3):
        await admin.grant(org, "general", 25, idempotency_key="promo-1")
    assert (await balance(client, h, "general"))["purchased"] == 25


async def test_starter_plan_forbids_and_exhausted_is_402(client, tenant):
    org, h = await tenant("starter")
    r = await client.post("/v1/consume", json={"feature": "generate_goal"}, headers=h)
    assert r.status_code == 403 and r.json()["code"] == "plan_forbids"
    org, h = await tenant("bulk")
    r = await client.post("/v1/consume", json={"feature": "generate_insight", "units": 101}, headers=h)
    assert r.status_code == 402 and r.json()["code"] == "insufficient_balance"
    assert (await balance(client, h, "general"))["balance"] == 100


async def test_refused_calls_record_denied_events_and_change_nothing(client, tenant, redis, config, prefix):
    org, h = await tenant("starter")
    for _ in range(3):
        await client.post("/v1/consume", json={"feature": "generate_goal"}, headers=h)
    layout = Layout(prefix, config.shards)
    kinds = [f["kind"] for f in await stream_kinds(redis, layout, org)]
    assert kinds == ["denied"] * 3
    assert await redis.hget(layout.balances(org), meter_field("goal_generation", "allocated")) is None


async def test_seed_example_seven_goal_calls(client, tenant):
    """The origin journey: pro org, goal_generation 20, seven users each generate a goal."""
    org, h = await tenant("pro")
    remaining = []
    for i in range(7):
        r = await client.post("/v1/consume", json={"feature": "generate_goal", "user_id": f"user{i}"}, headers=h)
        remaining.append((r.status_code, r.json().get("remaining")))
    assert remaining[:6] == [(200, 17), (200, 14), (200, 11), (200, 8), (200, 5), (200, 2)]
    assert remaining[6][0] == 402
    assert (await balance(client, h, "goal_generation"))["balance"] == 2


async def test_check_changes_nothing(client, tenant, redis, config, prefix):
    org, h = await tenant("pro")
    for _ in range(10):
        r = await client.post("/v1/check", json={"feature": "generate_goal", "units": 2, "user_id": "x"}, headers=h)
        assert r.json() == {"allowed": True, "cost": 6, "remaining": 20}
    r = await client.post("/v1/check", json={"feature": "generate_goal", "units": 7}, headers=h)
    assert r.status_code == 200 and r.json()["allowed"] is False and r.json()["code"] == "insufficient_balance"
    layout = Layout(prefix, config.shards)
    assert await redis.exists(layout.balances(org), layout.stream(org) + "-none") == 0
    assert not await stream_kinds(redis, layout, org)


async def test_plan_upgrade_moves_the_allocation_mid_period(client, tenant, admin):
    org, h = await tenant("pro")
    assert (await client.post("/v1/consume", json={"feature": "generate_goal", "user_id": "a"}, headers=h)).status_code == 200
    r = await client.put(f"/v1/admin/orgs/{org}/plan", json={"plan": "enterprise"}, headers=admin.h)
    assert r.status_code == 200
    deadline = asyncio.get_running_loop().time() + 3
    while True:  # key/plan caches live ≤ 1 s
        b = await balance(client, h, "goal_generation")
        if b["limit"] == 200 or asyncio.get_running_loop().time() > deadline:
            break
        await asyncio.sleep(0.05)
    assert (b["limit"], b["balance"]) == (200, 197)


async def test_decisions_survive_a_script_flush(client, tenant, redis):
    """Redis restarted or scripts flushed: batched and single calls reload and answer once."""
    org, h = await tenant("starter", general=300)
    await redis.script_flush()
    await redis.function_flush()
    single = await client.post("/v1/consume", json={"feature": "generate_insight"}, headers=h)
    assert single.status_code == 200
    await redis.script_flush()
    await redis.function_flush()
    batch = await asyncio.gather(*(client.post("/v1/consume", json={"feature": "generate_insight"}, headers=h)
                                   for _ in range(200)))
    assert [r.status_code for r in batch].count(200) == 200
    assert (await balance(client, h, "general"))["balance"] == 99


# Holds Redis busy for one second (microseconds: whole seconds would end at the next tick).
BUSY_SCRIPT = """local function now() local t = redis.call('TIME') return t[1] * 1000000 + t[2] end
local t0 = now() repeat until now() - t0 >= 1000000"""


async def busy_started(redis_url: str) -> None:
    """Returns once Redis stops answering (the busy script runs): a PING that times out."""
    import redis.asyncio as aioredis

    probe = aioredis.from_url(redis_url, socket_timeout=0.05, retry=None)
    silent = 0
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 5
    try:
        while loop.time() < deadline:
            try:
                await probe.ping()
                silent = 0
            except (aioredis.TimeoutError, aioredis.ConnectionError):
                silent += 1  # three in a row: busy, not just a slow moment on a loaded machine
                if silent == 3:
                    return
        raise AssertionError("Redis never became busy")
    finally:
        await probe.aclose()


async def test_a_timed_out_decision_is_never_sent_twice(redis_url, prefix, config, redis, tenant):
    """A script that may have run must not be retried by the client: that would charge twice.
    A busy script holds Redis while our call times out in the queue behind it; Redis then runs
    what was sent. A client that retries (redis-py does, by default) sends it again."""
    import redis.asyncio as aioredis

    from quota_gw.decisions import Decider, Identity

    org, _ = await tenant("starter", general=10)
    r = aioredis.from_url(redis_url, decode_responses=True, socket_timeout=0.2)  # retries by default
    blocker = aioredis.from_url(redis_url, decode_responses=True)
    busy = BUSY_SCRIPT
    layout = Layout(prefix, config.shards)
    ident = Identity("key_test", org, None, frozenset({"consume"}), "starter")
    for coalesce in (True, False):
        cfg = config.model_copy(update={"behaviour": config.behaviour.model_copy(update={"coalesce": coalesce})})
        d = Decider(r, cfg, layout)
        await d.check(ident, "generate_insight", 1, "")  # scripts loaded, connection open
        hold = asyncio.ensure_future(blocker.eval(busy, 0))
        await busy_started(redis_url)
        try:
            await d.consume(ident, "generate_insight", 1, "")
            raise AssertionError(f"expected a timeout (coalesce={coalesce})")
        except (TimeoutError, aioredis.RedisError) as e:
            assert "imeout" in type(e).__name__ + str(e)
        await hold
        await d.aclose()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 5
    while len([f for f in await stream_kinds(redis, layout, org) if f["kind"] == "consume"]) < 2:
        assert loop.time() < deadline, "the timed-out calls did not run"
        await asyncio.sleep(0.02)
    consumes = [f for f in await stream_kinds(redis, layout, org) if f["kind"] == "consume"]
    assert len(consumes) == 2  # one per timed-out call, each run exactly once
    assert await redis.hget(layout.balances(org), meter_field("general", "purchased")) == "8"
    await r.aclose()
    await blocker.aclose()


async def test_decision_connection_lost_mid_flight_retries_with_keys_charge_once(client, tenant, app, redis,
                                                                                config, prefix, redis_url):
    """The decision connection breaks while calls are in flight (Redis is held busy so they
    are): those calls fail with 503 and are never resent by the gateway, since they may have
    run. A caller that retries with its idempotency key gets each call charged exactly once."""
    import redis.asyncio as aioredis

    org, h = await tenant("starter", general=1000)
    assert (await client.post("/v1/consume", json={"feature": "generate_insight"}, headers=h)).status_code == 200
    coalescer = app.state.ctx.decider._coalescer
    failed = 0

    async def call(i: int) -> int:
        nonlocal failed
        for _ in range(20):
            r = await client.post("/v1/consume", json={"feature": "generate_insight"},
                                  headers={**h, "Idempotency-Key": f"call-{i}"})
            if r.status_code == 200:
                return 1
            assert r.status_code == 503, r.text
            failed += 1
        raise AssertionError(f"never recovered: {r.text}")

    blocker = aioredis.from_url(redis_url)
    # Busy for 3 s (below the 5 s socket timeout): long enough for the 300 calls to be written
    # on a loaded machine; the wait for them is bounded so a slow machine fails, never hangs.
    hold = asyncio.ensure_future(blocker.eval(BUSY_SCRIPT.replace("1000000", "3000000"), 0))
    await busy_started(redis_url)
    calls = asyncio.gather(*(call(i) for i in range(300)))
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 2.5
    while len(coalescer._inflight) < 300 and loop.time() < deadline:  # written, not answered: Redis is busy
        await asyncio.sleep(0)
    in_flight = len(coalescer._inflight)
    assert in_flight >= 50, f"only {in_flight} calls in flight while Redis was busy"
    coalescer._conn._writer.transport.abort()  # the network drops the connection
    assert sum(await calls) == 300
    await hold
    await blocker.aclose()
    assert failed >= in_flight  # every call in flight failed once; none was resent by the gateway
    layout = Layout(prefix, config.shards)
    consumes = [f for f in await stream_kinds(redis, layout, org) if f["kind"] == "consume"]
    assert len(consumes) == len({f["id"] for f in consumes}) == 301
    assert (await balance(client, h, "general"))["balance"] == 1000 - 301


# -- expired holds are gone for every reader (issue 8) --------------------------------------

async def age(redis, layout: Layout, org: str, *rids: str) -> None:
    """Puts holds past their expiry without sleeping: the expiry is a score in the org's set, and
    the earliest one is kept beside the balances (layout.HOLDS_DUE)."""
    await redis.zadd(layout.expiries(org), {rid: 1 for rid in rids})
    await redis.hset(layout.balances(org), HOLDS_DUE, 1)


async def reserve(client, h, units: int, **kw) -> str:
    r = await client.post("/v1/reservations", json={"feature": "generate_insight", "units": units, "ttl_s": 600, **kw},
                          headers=h)
    assert r.status_code == 201, r.text
    return r.json()["reservation_id"]


async def test_decisions_know_when_the_earliest_hold_expires_and_sweep_only_then(client, tenant, redis, config,
                                                                                  prefix):
    """Decisions read no reservation until the earliest hold's expiry (HOLDS_DUE) has come; the
    reserve that adds an earlier hold moves it, the sweep sets it to the next one (0: none), and
    an org without it (data written before it was kept) is swept as before, then knows it."""
    org, h = await tenant("starter", general=100)
    layout = Layout(prefix, config.shards)
    bal = layout.balances(org)

    async def due() -> str | None:
        return await redis.hget(bal, HOLDS_DUE)

    async def consume() -> None:
        r = await client.post("/v1/consume", json={"feature": "generate_insight", "units": 1}, headers=h)
        assert r.status_code == 200, r.text

    await consume()
    assert await due() == "0"  # looked once (not known yet): no hold
    late = await reserve(client, h, 2, ttl_s=600)
    late_at = int(await redis.zscore(layout.expiries(org), late))
    assert await due() == str(late_at)
    early = await reserve(client, h, 2, ttl_s=60)
    early_at = int(await redis.zscore(layout.expiries(org), early))
    assert early_at < late_at and await due() == str(early_at)
    await reserve(client, h, 2, ttl_s=3000)
    assert await due() == str(early_at)  # a later hold does not move it
    # The earliest hold falls due (aged, not slept): the next decision sweeps it, and only it.
    await redis.zadd(layout.expiries(org), {early: 1})
    await redis.hset(bal, HOLDS_DUE, 1)
    await consume()
    assert not await redis.hexists(layout.reservations(org), early) and await redis.hexists(layout.reservations(org), late)
    assert await due() == str(late_at)
    # Written before the field was kept: a hold past its expiry, nothing known. Swept as before.
    await redis.zadd(layout.expiries(org), {late: 1})
    await redis.hdel(bal, HOLDS_DUE)
    await consume()
    assert not await redis.hexists(layout.reservations(org), late)
    assert int(await due()) > late_at  # the 3000 s hold is the next


async def test_commit_and_release_sweep_other_expired_holds_once_the_earliest_is_due(client, tenant, redis, config,
                                                                                    prefix):
    """A settle returns other holds past their expiry first, as decisions do, and like them looks
    only once HOLDS_DUE has come: a hold aged behind a mark still in the future is not read."""
    org, h = await tenant("starter", general=100)
    layout = Layout(prefix, config.shards)
    bal = layout.balances(org)
    stale, live, other = [await reserve(client, h, 5) for _ in range(3)]
    mark = await redis.hget(bal, HOLDS_DUE)
    await redis.zadd(layout.expiries(org), {stale: 1})  # past its expiry, the mark not moved
    r = await client.post(f"/v1/reservations/{live}/commit", json={"units": 2}, headers=h)
    assert r.status_code == 200, r.text
    assert await redis.hexists(layout.reservations(org), stale)  # not due by the mark: not looked for
    assert await redis.hget(bal, HOLDS_DUE) == mark
    await redis.hset(bal, HOLDS_DUE, 1)  # now due
    other_at = int(await redis.zscore(layout.expiries(org), other))
    assert (await client.delete(f"/v1/reservations/{other}", headers=h)).status_code == 200
    assert not await redis.hexists(layout.reservations(org), stale)
    expired = [f for f in await stream_kinds(redis, layout, org) if f["kind"] == "release" and '"expired"' in f["meta"]]
    assert [orjson.loads(f["meta"])["reservation_id"] for f in expired] == [stale]
    # The sweep set the next hold's expiry (the one being released); settling it leaves the mark.
    assert await redis.hget(bal, HOLDS_DUE) == str(other_at)
    b = await balance(client, h, "general")
    assert (b["balance"], b["held"], b["used"]) == (98, 0, 2)


async def test_expired_hold_is_gone_for_check_and_balance_which_write_nothing(client, tenant, redis, config, prefix):
    org, h = await tenant("starter", general=10)
    layout = Layout(prefix, config.shards)
    rid = await reserve(client, h, 6)
    r = await client.post("/v1/check", json={"feature": "generate_insight", "units": 10}, headers=h)
    assert r.json()["allowed"] is False  # held while live
    await age(redis, layout, org, rid)
    stored = await redis.hgetall(layout.balances(org))
    stream_len = await redis.xlen(layout.stream(org))
    r = await client.post("/v1/check", json={"feature": "generate_insight", "units": 10}, headers=h)
    assert r.status_code == 200 and r.json()["allowed"] is True and r.json()["remaining"] == 10, r.text
    b = await balance(client, h, "general")
    assert (b["balance"], b["held"]) == (10, 0)
    # Read-only: the hold is still stored (the next write sweeps it), nothing was written.
    assert await redis.hgetall(layout.balances(org)) == stored and stored[meter_field("general", "held")] == "6"
    assert await redis.hexists(layout.reservations(org), rid)
    assert await redis.xlen(layout.stream(org)) == stream_len


async def test_expired_hold_is_gone_for_a_user_sub_quota_check(client, tenant, admin, redis, config, prefix):
    org, h = await tenant("starter", general=100)
    await admin.quota(org, "general", 10, user_id="ula")
    rid = await reserve(client, h, 6, user_id="ula")
    await age(redis, Layout(prefix, config.shards), org, rid)
    r = await client.post("/v1/check", json={"feature": "generate_insight", "units": 10, "user_id": "ula"}, headers=h)
    assert r.json()["allowed"] is True and r.json()["remaining"] == 10, r.text


@pytest.mark.parametrize("plan, user", [("starter", None), ("bulk", "uma")])
async def test_expired_holds_beyond_one_sweep_are_gone_for_consume_and_reserve(client, tenant, admin, redis, config,
                                                                               prefix, plan, user):
    # A write sweeps at most 16 expired holds; the ones it leaves must not count either. The
    # binding level is the org (starter: 20 bought) or a user's sub-quota (bulk: 20 of 100).
    org, h = await tenant(plan, **({"general": 20} if plan == "starter" else {}))
    layout = Layout(prefix, config.shards)
    who = {"user_id": user} if user else {}
    if user:
        await admin.quota(org, "general", 20, user_id=user)
    rids = [await reserve(client, h, 1, **who) for _ in range(20)]
    await age(redis, layout, org, *rids)
    r = await client.post("/v1/reservations", json={"feature": "generate_insight", "units": 20, **who}, headers=h)
    assert r.status_code == 201, r.text
    assert (await client.delete(f"/v1/reservations/{r.json()['reservation_id']}", headers=h)).status_code == 200
    r = await client.post("/v1/consume", json={"feature": "generate_insight", "units": 20, **who}, headers=h)
    assert r.status_code == 200 and r.json()["remaining"] == 0, r.text
    # Every expired hold returned exactly once, and the stored holds come back to zero.
    await admin.grant(org, "general", 5)
    assert (await client.post("/v1/consume", json={"feature": "generate_insight"}, headers=h)).status_code == 200
    assert await redis.hget(layout.balances(org), meter_field("general", "held")) == "0"
    if user:
        assert await redis.hget(layout.quotas(org), quota_field(quota_subject("user", user), "general", "held")) == "0"
    expired = [f for f in await stream_kinds(redis, layout, org)
               if f["kind"] == "release" and '"expired"' in f["meta"]]
    assert sorted(orjson.loads(f["meta"])["reservation_id"] for f in expired) == sorted(rids)
    b = await balance(client, h, "general")
    assert (b["held"], b["used"]) == (0, 21)
    assert b["balance"] == (4 if plan == "starter" else 84)


async def test_commit_or_release_of_an_expired_hold_is_404_whatever_ran_before(client, tenant, redis, config, prefix):
    org, h = await tenant("starter", general=30)
    layout = Layout(prefix, config.shards)
    a, b, c, d = [await reserve(client, h, 5) for _ in range(4)]
    await age(redis, layout, org, a, b, c, d)
    # Nothing ran since the expiry: still 404, nothing charged.
    for r in (await client.post(f"/v1/reservations/{a}/commit", json={"units": 5}, headers=h),
              await client.delete(f"/v1/reservations/{b}", headers=h)):
        assert r.status_code == 404 and r.json()["code"] == "not_found", r.text
    # A write swept the rest first: the same answer.
    assert (await client.post("/v1/consume", json={"feature": "generate_insight"}, headers=h)).status_code == 200
    for r in (await client.post(f"/v1/reservations/{c}/commit", json={"units": 5}, headers=h),
              await client.delete(f"/v1/reservations/{d}", headers=h),
              await client.post(f"/v1/reservations/{a}/commit", json={"units": 5}, headers=h)):
        assert r.status_code == 404 and r.json()["code"] == "not_found", r.text
    m = await balance(client, h, "general")
    assert (m["balance"], m["held"], m["used"]) == (29, 0, 1)
    kinds = [f["kind"] for f in await stream_kinds(redis, layout, org)]
    assert "commit" not in kinds and kinds.count("release") == 4


async def test_expired_hold_is_gone_for_authorize_on_an_llm_route(redis_url, database_url, prefix, admin, redis):
    data = test_config_data()
    data["routes"] = [{"prefix": "/v1/chat/completions", "upstream": "http://127.0.0.1:9", "feature": "chat",
                       "metering": "openai"}]
    cfg = config_mod.parse(data)
    app = create_app(cfg, redis_url, database_url, prefix)
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw") as c:
            org = await admin.org("starter")
            await admin.grant(org, "tokens", 50)
            h = {"Authorization": f"Bearer {await admin.key(org)}"}
            r = await c.post("/v1/reservations", json={"feature": "chat", "units": 50, "ttl_s": 600}, headers=h)
            assert r.status_code == 201, r.text
            ask = {**h, "X-Original-URI": "/v1/chat/completions", "X-Original-Method": "POST"}
            assert (await c.get("/v1/authorize", headers=ask)).status_code == 402
            await age(redis, Layout(prefix, cfg.shards), org, r.json()["reservation_id"])
            r = await c.get("/v1/authorize", headers=ask)
            assert r.status_code == 200 and r.headers["X-Quota-Remaining"] == "50", r.text


# -- refusals leave the rate budget alone (issue 8: a planted bug went through) ---------------

async def test_refused_calls_402_and_403_leave_the_users_rate_budget_untouched(client, tenant):
    # pro and starter allow a user 5 calls a minute. 402 and 403 refusals, more of them than
    # the budget, must not use it: afterwards the user still has all 5 calls.
    org, h = await tenant("pro")
    call = {"feature": "generate_goal", "units": 7, "user_id": "rita"}  # 21 > the 20 allocated: 402
    for _ in range(7):
        r = await client.post("/v1/consume", json=call, headers=h)
        assert r.status_code == 402, r.text
        r = await client.post("/v1/reservations", json=call, headers=h)
        assert r.status_code == 402, r.text
    codes = []
    for i in range(6):
        r = await client.post("/v1/consume", json={"feature": "generate_insight", "user_id": "rita"}, headers=h)
        codes.append(r.status_code)
        if i == 0:
            assert r.headers["RateLimit-Remaining"] == "4"
    assert codes == [200] * 5 + [429]

    org, h = await tenant("starter")  # every meter forbidden: 403 plan_forbids
    for _ in range(7):
        for path in ("/v1/consume", "/v1/reservations"):
            r = await client.post(path, json={"feature": "generate_insight", "units": 1, "user_id": "rita"},
                                  headers=h)
            assert r.status_code == 403 and r.json()["code"] == "plan_forbids", r.text
    await client.post(f"/v1/admin/orgs/{org}/grants", json={"meter": "general", "amount": 10, "reason": "t"},
                      headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
    codes = [(await client.post("/v1/consume", json={"feature": "generate_insight", "user_id": "rita"},
                                headers=h)).status_code for _ in range(6)]
    assert codes == [200] * 5 + [429]
