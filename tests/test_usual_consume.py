"""The usual consume (lua/_lib.lua usual_consume) decides exactly as the gate does.

Most consumes take a straight-line path through the script; anything unusual (a sub-quota, a
rate window passed, a period to refresh, a threshold crossed, a refusal...) goes through the
gate's steps. Two orgs on the same plan get the same calls in the same order: in one, every
user is in a team with a sub-quota too large to matter, so every user call goes through the
gate; in the other, none has one, so the usual calls take the straight path. Answers, events
and balances must be the same, call for call."""

from __future__ import annotations

import random
import re
import time
from datetime import datetime, timezone

import orjson
import pytest
import redis.asyncio as aioredis

from quota_gw.decisions import Decider
from quota_gw.events import entries
from quota_gw.layout import SUB_QUOTAS, Layout, meter_field, quota_field, quota_subject, user_key_field

INTEGER = re.compile(r"^(0|-?[1-9][0-9]*)$")  # what the ledger reads; never "-0"
NUMERIC = ("delta", "dp", "cost", "bal", "ts")
COMPARED = ("kind", "user", "meter", "feature", "delta", "dp", "cost", "bal", "meta", "src")
HEADERS = ("X-Quota-Remaining", "X-Quota-Source", "RateLimit-Limit", "RateLimit-Remaining", "RateLimit-Reset",
           "Retry-After")


def rfc3339(ts: float) -> str:
    return datetime.fromtimestamp(ts, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def timeless(text: str) -> str:
    """A refusal's wait is the server clock's: the two orgs' calls are microseconds apart."""
    return re.sub(r"retry in \d+ ms", "retry in N ms", text)


async def events(redis, layout: Layout, org: str) -> list[dict]:
    return [{**f, "meta": timeless(f["meta"])} for f in entries(await redis.xrange(layout.stream(org))) if f["org"] == org]


async def test_the_usual_consume_answers_writes_and_records_as_the_gate(client, admin, redis, config, prefix):
    layout = Layout(prefix, config.shards)
    users = [f"u{i}" for i in range(8)]
    orgs = {}
    for side in ("usual", "gate"):
        org = await admin.org("pro")
        key = await admin.key(org)
        await admin.grant(org, "general", 40)  # purchased, after the plan's 50 allocated
        if side == "gate":
            for u in users:
                await admin.user(org, u, team="everyone")
            await admin.quota(org, "general", 10**9, team="everyone")
        orgs[side] = (org, {"Authorization": f"Bearer {key}"})

    rng = random.Random(1)
    calls = [(rng.choice(users + [None]), rng.randint(1, 4)) for _ in range(90)]
    statuses = set()
    for user, units in calls:
        body = {"feature": "generate_insight", "units": units, **({"user_id": user} if user else {})}
        answers = {}
        for side, (_, h) in orgs.items():
            r = await client.post("/v1/consume", json=body, headers=h)
            out = r.json()
            out.pop("event_id", None)
            out["detail"] = timeless(out.get("detail", ""))
            answers[side] = (r.status_code, out, {k: r.headers.get(k) for k in HEADERS})
        assert answers["usual"] == answers["gate"], (user, units)
        statuses.add(answers["usual"][0])
    # The run went through the allocation, into purchased credit, past rate windows and out of credit.
    assert statuses == {200, 402, 429}, statuses

    usual = await events(redis, layout, orgs["usual"][0])
    gate = await events(redis, layout, orgs["gate"][0])
    assert [[e[k] for k in COMPARED] for e in usual] == [[e[k] for k in COMPARED] for e in gate]
    kinds = {e["kind"] for e in usual}
    assert {"consume", "denied", "alert", "reset"} <= kinds, kinds
    assert all(INTEGER.match(e[k]) for e in usual + gate for k in NUMERIC)
    srcs = {e["src"] for e in usual if e["kind"] == "consume"}
    assert any(s.startswith("allocated:") and ",purchased:" in s for s in srcs), srcs  # a charge across both

    balances = []
    for _, h in orgs.values():
        r = await client.get("/v1/balance", headers=h)
        balances.append(r.json()["meters"]["general"])
    assert balances[0] == balances[1]


async def consume(client, h: dict[str, str], units: int, user: str = "ann") -> tuple[int, dict]:
    r = await client.post("/v1/consume", json={"feature": "generate_insight", "units": units, "user_id": user}, headers=h)
    return r.status_code, r.json()


async def test_a_sub_quota_set_after_the_org_was_known_to_have_none_holds_the_next_consume(client, admin, redis,
                                                                                         config, prefix):
    """The usual consume reads no sub-quota in an org known to have none (the balance hash's
    SUB_QUOTAS '0', which a consume records from the empty quota hash); setting one, for a user or
    a team, removes that mark in the same step, so the very next consume reads it and is held to it."""
    layout = Layout(prefix, config.shards)
    for who in ({"user_id": "ann"}, {"team": "red"}):
        org = await admin.org("pro")
        await admin.user(org, "ann", team="red")
        h = {"Authorization": f"Bearer {await admin.key(org)}"}
        for _ in range(2):  # the first starts the period (the gate's steps), the second is a usual one
            assert (await consume(client, h, 1))[0] == 200
        assert await redis.hget(layout.balances(org), SUB_QUOTAS) == "0"
        await admin.quota(org, "general", 2, **who)
        assert await redis.hget(layout.balances(org), SUB_QUOTAS) is None
        assert (await consume(client, h, 2))[0] == 200  # a new sub-quota counts from its setting
        status, out = await consume(client, h, 1)
        assert (status, out["code"]) == (402, "insufficient_balance"), out
        assert await redis.hget(layout.balances(org), SUB_QUOTAS) == "1"  # it has one now: read each call
        assert (await consume(client, h, 1, user="bob"))[0] == 200  # bob, in no team, has none


async def test_an_org_whose_mark_is_absent_is_looked_at(client, admin, redis, config, prefix):
    """Data from before the mark (or after a rebuild) has none: absent means look, never none."""
    layout = Layout(prefix, config.shards)
    org = await admin.org("pro")
    h = {"Authorization": f"Bearer {await admin.key(org)}"}
    for _ in range(2):
        assert (await consume(client, h, 1))[0] == 200
    # A sub-quota as a version without the mark wrote it: the limit alone, the mark left absent.
    await redis.hdel(layout.balances(org), SUB_QUOTAS)
    await redis.hset(layout.quotas(org), quota_field(quota_subject("user", "ann"), "general", "limit"), 1)
    assert (await consume(client, h, 1))[0] == 200
    assert (await consume(client, h, 1))[0] == 402
    assert await redis.hget(layout.balances(org), SUB_QUOTAS) == "1"


async def test_the_configuration_repair_of_a_sub_quota_removes_the_mark_with_it(client, admin, redis, config,
                                                                                  prefix):
    """`rebuild --org` sets a sub-quota Redis missed (config_drift.set_from_postgres): the mark
    that said the org has none goes in the same script."""
    from sync_worker.config_drift import ConfigDrift, set_from_postgres

    layout = Layout(prefix, config.shards)
    org = await admin.org("pro")
    h = {"Authorization": f"Bearer {await admin.key(org)}"}
    for _ in range(2):  # the first starts the period, the second is a usual one
        assert (await consume(client, h, 1))[0] == 200
    assert await redis.hget(layout.balances(org), SUB_QUOTAS) == "0"
    field = quota_field(quota_subject("user", "ann"), "general", "limit")
    assert await set_from_postgres(redis, layout, ConfigDrift(org, f"quota {field}", layout.quotas(org), field,
                                                              None, "1"))
    assert await redis.hget(layout.balances(org), SUB_QUOTAS) is None
    assert (await consume(client, h, 1))[0] == 200
    assert (await consume(client, h, 1))[0] == 402


async def test_the_usual_consume_writes_large_numbers_digit_for_digit(client, admin, redis, config, prefix):
    """The numbers the usual consume sends Redis, and those of its event and answer, are texts it
    makes itself (fmt: groups of three digits, not Redis's or Lua's formatting): digit for digit,
    whatever their size, in the balance hash, the event, the answer and the rate window."""
    layout = Layout(prefix, config.shards)
    org = await admin.org("pro")
    h = {"Authorization": f"Bearer {await admin.key(org)}"}
    await admin.grant(org, "general", 10**12 - 1)
    assert (await consume(client, h, 1))[0] == 200  # starts the period (the gate's steps)
    allocated = int(await redis.hget(layout.balances(org), "general:a"))
    status, out = await consume(client, h, allocated + 1000)  # the allocation, then 1,000 of credit
    assert status == 200, out
    left = 10**12 - 1 - 1000
    assert await redis.hget(layout.balances(org), "general:p") == str(left)
    assert await redis.hget(layout.balances(org), "general:a") == "0"
    assert out["remaining"] == left
    last = (await events(redis, layout, org))[-1]
    assert (last["kind"], last["bal"], last["src"]) == ("consume", str(left), f"allocated:{allocated},purchased:1000")
    assert INTEGER.match(last["ts"]) and len(last["ts"]) == 16
    tat = await redis.hget(layout.balances(org), user_key_field("ann"))  # the plan's user rate window, in µs
    assert INTEGER.match(tat) and len(tat) == 16, tat
    assert await redis.hget(layout.balances(org), SUB_QUOTAS) == "0"  # the usual path decided it


# Credit lot shapes: (expiring grants, entitlements). One lot that expires is drawn by the usual
# consume's own plan (plan_lots_charge); two go through the meter's waterfall on the usual path.
LOT_SHAPES = {
    "one lot that expires, grants first": ((4,), {}),
    "purchased first, credit at 2x": ((4,), {"credit_order": ["purchased", "grants"], "overflow_cost": 2}),
    "two lots that expire": ((6, 4), {}),
}


@pytest.mark.parametrize("shape", list(LOT_SHAPES))
async def test_the_usual_consume_draws_credit_lots_as_the_gate(client, admin, redis, redis_url, config, prefix, shape):
    """Credit lots (grants that expire, a purchase that never does, beside the free pool) are
    drawn by the usual consume in the gate's order: the same answers, events, balances and lots.
    The gate's org sends every call with an idempotency key, which the usual consume leaves to it."""
    expiring, entitlements = LOT_SHAPES[shape]
    layout = Layout(prefix, config.shards)
    raw = aioredis.from_url(redis_url)
    decider = Decider(raw, config, layout)
    users = [f"u{i}" for i in range(8)]
    orgs, names = {}, {}
    now = time.time()  # one clock for both sides: their lots expire at the same second
    for side in ("usual", "gate"):
        org = await admin.org("pro")
        key = await admin.key(org)
        if entitlements:
            r = await client.put(f"/v1/admin/orgs/{org}/entitlements", json=entitlements, headers=admin.h)
            assert r.status_code == 200, r.text
        ids = {}
        for n, amount in enumerate(expiring):  # the later the larger: the sooner one is drawn first
            expires = rfc3339(now + 7200 - 3600 * n)
            ids[(await admin.grant(org, "general", amount, expires_at=expires)).json()["event_id"]] = f"GRANT{n}"
        await decider.grant(org, "general", 5, lot=f"buy-{side}")  # a purchase: traced, never expires
        ids[f"buy-{side}"] = "BUY"
        await admin.grant(org, "general", 3)  # the free pool
        orgs[side] = (org, {"Authorization": f"Bearer {key}"})
        names[side] = ids

    def named(side: str, text: str) -> str:
        for lot_id, name in names[side].items():
            text = text.replace(lot_id, name)
        return text

    rng = random.Random(2)
    calls = [(rng.choice(users + [None]), rng.randint(1, 4)) for _ in range(90)]
    statuses = set()
    for i, (user, units) in enumerate(calls):
        body = {"feature": "generate_insight", "units": units, **({"user_id": user} if user else {})}
        answers = {}
        for side, (_, h) in orgs.items():
            if side == "gate":  # a call with an idempotency key takes the gate's steps, user or not
                h = {**h, "Idempotency-Key": f"call-{i}"}
            r = await client.post("/v1/consume", json=body, headers=h)
            out = r.json()
            out.pop("event_id", None)
            out["detail"] = timeless(out.get("detail", ""))
            heads = {k: named(side, r.headers.get(k) or "") for k in HEADERS}
            answers[side] = (r.status_code, named(side, orjson.dumps(out).decode()), heads)
        assert answers["usual"] == answers["gate"], (user, units)
        statuses.add(answers["usual"][0])
    assert {200, 402} <= statuses, statuses  # through every layer and out of credit

    recorded = {side: [[named(side, str(e[k])) for k in COMPARED] for e in await events(redis, layout, org)]
                for side, (org, _) in orgs.items()}
    assert recorded["usual"] == recorded["gate"]
    srcs = {e[-1] for e in recorded["usual"] if e[0] == "consume"}
    assert all(any(f"grant:GRANT{n}:" in s for s in srcs) for n in range(len(expiring))), srcs
    assert any("purchased:" in s for s in srcs) and any("allocated:" in s for s in srcs), srcs
    lots = {side: named(side, await redis.hget(layout.balances(org), meter_field("general", "lots")) or "")
            for side, (org, _) in orgs.items()}
    assert lots["usual"] == lots["gate"]
    balances = [(await client.get("/v1/balance", headers=h)).json()["meters"]["general"] for _, h in orgs.values()]
    assert balances[0] == balances[1]
    await raw.aclose()


# After the allocation is spent (every alert threshold passed: none sends a call to the gate), calls
# that cross each boundary between the credit layers, and one the layers cannot cover.
BOUNDARIES = {
    # one lot that expires (4), the purchase (5), the free pool (3): grants first
    "grants first": ({}, [15, 3, 2, 5, 1, 3], ["grant:G:3", "grant:G:1,purchased:1", "purchased:5"]),
    # purchased first, credit at 2x: the pool and the purchase (8), then the lot (4)
    "purchased first, 2x": ({"credit_order": ["purchased", "grants"], "overflow_cost": 2}, [7, 3, 2, 1, 1],
                            ["purchased:6", "purchased:2,grant:G:2", "grant:G:2"]),
}


@pytest.mark.parametrize("shape", list(BOUNDARIES))
async def test_the_usual_consume_crosses_the_credit_layers_as_the_gate(client, admin, redis, redis_url, config,
                                                                      prefix, shape):
    """Each boundary between credit layers, and a charge they cannot cover (refused, nothing taken
    although some credit is left), decided by the usual consume and by the gate alike."""
    entitlements, units, expected = BOUNDARIES[shape]
    layout = Layout(prefix, config.shards)
    raw = aioredis.from_url(redis_url)
    decider = Decider(raw, config, layout)
    orgs, names = {}, {}
    for side in ("usual", "gate"):
        org = await admin.org("pro")
        h = {"Authorization": f"Bearer {await admin.key(org)}"}
        if entitlements:
            r = await client.put(f"/v1/admin/orgs/{org}/entitlements", json=entitlements, headers=admin.h)
            assert r.status_code == 200, r.text
        r = await client.post("/v1/consume", json={"feature": "generate_insight", "units": 50}, headers=h)
        assert r.status_code == 200, r.text  # the allocation, to 0: every alert threshold passed
        grant = (await admin.grant(org, "general", 4, expires_at=rfc3339(time.time() + 3600))).json()["event_id"]
        await decider.grant(org, "general", 5, lot=f"buy-{side}")
        await admin.grant(org, "general", 3)
        orgs[side], names[side] = (org, h), {grant: "G", f"buy-{side}": "BUY"}
    answers: dict[str, list] = {"usual": [], "gate": []}
    for i, n in enumerate(units):
        for side, (_, h) in orgs.items():
            if side == "gate":
                h = {**h, "Idempotency-Key": f"{shape}-{i}"}
            r = await client.post("/v1/consume", json={"feature": "generate_insight", "units": n}, headers=h)
            out = r.json()
            out.pop("event_id", None)
            text = orjson.dumps(out).decode()
            for lot_id, name in names[side].items():
                text = text.replace(lot_id, name)
            answers[side].append((r.status_code, text))
    assert answers["usual"] == answers["gate"]
    statuses = [s for s, _ in answers["usual"]]
    assert statuses[0] == 402 and statuses[-1] == 402, statuses  # more than the layers hold; then out of credit
    recorded = {}
    for side, (org, _) in orgs.items():
        text = "\n".join(e["src"] for e in await events(redis, layout, org) if e["kind"] == "consume")
        for lot_id, name in names[side].items():
            text = text.replace(lot_id, name)
        recorded[side] = text.split("\n")
    assert recorded["usual"] == recorded["gate"]
    for part in expected:
        assert part in recorded["usual"], (part, recorded["usual"])
    balances = [(await client.get("/v1/balance", headers=h)).json()["meters"]["general"] for _, h in orgs.values()]
    assert balances[0] == balances[1]
    await raw.aclose()


async def test_lots_changed_between_usual_consumes_are_drawn_as_the_gate_draws_them(client, admin, redis, redis_url,
                                                                                    config, prefix):
    """The usual consume keeps what it found of a list of lots (its earliest expiry, its shape, its
    sums) on the list the memo keeps across calls, and keeps them true as it draws. Charges across
    the lot that expires and the free pool, and a grant, a refund and a purchase changing the list
    between them: the same answers, sources and lots, step by step, as the gate's."""
    layout = Layout(prefix, config.shards)
    raw = aioredis.from_url(redis_url)
    decider = Decider(raw, config, layout)
    steps = [("consume", 2), ("consume", 3), ("consume", 3), ("grant", 4), ("consume", 3), ("refund", 0),
             ("consume", 2), ("consume", 4), ("purchase", 5), ("consume", 6), ("consume", 1)]
    orgs, names, answers = {}, {}, {}
    for side in ("usual", "gate"):
        org = await admin.org("pro")
        h = {"Authorization": f"Bearer {await admin.key(org)}"}
        r = await client.post("/v1/consume", json={"feature": "generate_insight", "units": 50}, headers=h)
        assert r.status_code == 200, r.text  # the allocation, to 0: every alert threshold passed
        grant = (await admin.grant(org, "general", 6, expires_at=rfc3339(time.time() + 7200))).json()["event_id"]
        await admin.grant(org, "general", 3)  # the free pool
        await decider.grant(org, "general", 5, lot=f"buy-{side}")  # a purchase: traced, never expires
        orgs[side], answers[side] = (org, h), []
        names[side] = {grant: "G1", f"buy-{side}": "BUY", f"buy2-{side}": "BUY2"}
    last: dict[str, str] = {}
    for i, (what, n) in enumerate(steps):
        for side, (org, h) in orgs.items():
            if what == "grant":  # one that expires sooner: drawn first from now on
                r = await admin.grant(org, "general", n, expires_at=rfc3339(time.time() + 3600))
                names[side][r.json()["event_id"]] = "G2"
            elif what == "purchase":
                await decider.grant(org, "general", n, lot=f"buy2-{side}")
            else:
                if side == "gate":
                    h = {**h, "Idempotency-Key": f"call-{i}"}
                if what == "refund":
                    r = await client.post("/v1/refunds", json={"event_id": last[side]}, headers=h)
                else:
                    r = await client.post("/v1/consume", json={"feature": "generate_insight", "units": n}, headers=h)
                out = r.json()
                last[side] = out.pop("event_id", "")
                answers[side].append(f"{r.status_code} {orjson.dumps(out).decode()}")
            lots = await redis.hget(layout.balances(org), meter_field("general", "lots"))
            answers[side].append(f"lots {lots or ''}")
    for side in orgs:  # each side's lot ids by name
        for lot_id, name in names[side].items():
            answers[side] = [a.replace(lot_id, name) for a in answers[side]]
    assert answers["usual"] == answers["gate"]
    assert all(a.startswith("200 ") for a in answers["usual"] if not a.startswith("lots ")), answers["usual"]
    recorded = {}
    for side, (org, _) in orgs.items():
        text = "\n".join(e["kind"] + " " + e["src"] + " " + e["bal"] for e in await events(redis, layout, org))
        for lot_id, name in names[side].items():
            text = text.replace(lot_id, name)
        recorded[side] = text.split("\n")
    assert recorded["usual"] == recorded["gate"]
    srcs = "\n".join(recorded["usual"])
    assert "grant:G2:" in srcs and "grant:G1:" in srcs and "purchased:" in srcs, srcs
    balances = [(await client.get("/v1/balance", headers=h)).json()["meters"]["general"] for _, h in orgs.values()]
    assert balances[0] == balances[1]
    await raw.aclose()


async def test_a_lots_text_written_by_a_charge_reads_back_whatever_its_ids_hold(client, admin, redis, redis_url,
                                                                               config, prefix):
    """The lots' text a charge writes (made in Lua, not by cjson) is JSON that
    sync_worker.lots.decode reads back: an id with quotes, backslashes, slashes and non-ASCII, and
    amounts written digit for digit."""
    from sync_worker import lots as lots_mod

    layout = Layout(prefix, config.shards)
    raw = aioredis.from_url(redis_url)
    org = await admin.org("pro")
    h = {"Authorization": f"Bearer {await admin.key(org)}"}
    odd = 'cs_"quoted"\\back/slash-é'
    assert (await client.post("/v1/consume", json={"feature": "generate_insight", "units": 50}, headers=h)).status_code == 200
    await Decider(raw, config, layout).grant(org, "general", 123456789012, lot=odd)
    expires = int(time.time()) + 3600
    await admin.grant(org, "general", 7, expires_at=rfc3339(expires))
    r = await client.post("/v1/consume", json={"feature": "generate_insight", "units": 9}, headers=h)
    assert r.status_code == 200, r.text
    text = await redis.hget(layout.balances(org), meter_field("general", "lots"))
    read = sorted(lots_mod.decode(text), key=lambda lot: lot.x)
    assert [(lot.i, lot.n, lot.x) for lot in read] == [(odd, 123456789012 - 2, 0), (read[1].i, 0, expires)], text
    await raw.aclose()


async def test_hand_written_balances_out_of_range_are_left_to_the_gate(client, admin, redis, redis_url, config,
                                                                        prefix):
    """A negative allocation, or a credit lot holding less than nothing, is no state a script
    writes; an operator's hand can. The usual consume leaves such a meter to the gate's rules, so
    the answer, the balances and the event are the gate's (its org: every call with an idempotency key)."""
    layout = Layout(prefix, config.shards)
    raw = aioredis.from_url(redis_url)
    decider = Decider(raw, config, layout)
    for bad in ({"general:a": -5}, {"general:lots": '[{"i":"g1","n":-5,"x":4102444800}]'}):
        seen = []
        for side in ("usual", "gate"):
            org = await admin.org("pro")
            h = {"Authorization": f"Bearer {await admin.key(org)}"}
            assert (await client.post("/v1/consume", json={"feature": "generate_insight", "units": 1},
                                      headers=h)).status_code == 200  # the period started
            await decider.grant(org, "general", 1000, lot="buy")
            await redis.hset(layout.balances(org), mapping=bad)
            if side == "gate":
                h = {**h, "Idempotency-Key": "once"}
            r = await client.post("/v1/consume", json={"feature": "generate_insight", "units": 60}, headers=h)
            out = r.json()
            out.pop("event_id", None)
            last = (await events(redis, layout, org))[-1]
            fields = await redis.hmget(layout.balances(org), "general:a", "general:p", "general:lots")
            seen.append((r.status_code, out, [last[k] for k in ("kind", "delta", "dp", "cost", "bal", "src")],
                         fields[:2], fields[2].replace('"buy"', "").replace("g1", "") if fields[2] else None))
        assert seen[0] == seen[1], bad
    await raw.aclose()


async def test_a_user_is_registered_on_first_use_even_when_that_use_is_refused(client, admin, redis, config, prefix):
    """auto_register_users: a user id the org has not registered is registered on first use,
    the gate's refusal included (refuse() writes it), and so is one the usual path charges."""
    layout = Layout(prefix, config.shards)
    org = await admin.org("pro")
    h = {"Authorization": f"Bearer {await admin.key(org)}"}
    r = await client.post("/v1/consume", json={"feature": "generate_insight", "units": 10**6, "user_id": "ann"},
                          headers=h)
    assert r.status_code == 402, r.text
    assert await redis.hget(layout.balances(org), user_key_field("ann")) == ""  # registered, no window taken
    assert (await consume(client, h, 1, user="bob"))[0] == 200
    assert INTEGER.match(await redis.hget(layout.balances(org), user_key_field("bob")) or "")  # and its window


async def test_a_user_field_that_is_not_a_window_reads_as_none_on_both_paths(client, admin, redis, config, prefix):
    """A user's field holds its rate window (digits) or '' (layout.py); anything else (only
    hand-written data) reads as no window yet, on the usual path as on the gate (tonumber), and
    the call is decided, not a script error: the user is charged and its window written."""
    layout = Layout(prefix, config.shards)
    org = await admin.org("pro")
    h = {"Authorization": f"Bearer {await admin.key(org)}"}
    assert (await consume(client, h, 1, user="cy"))[0] == 200  # the period started: the next consume goes straight
    await redis.hset(layout.balances(org), mapping={user_key_field("ann"): "red", user_key_field("bob"): "red"})
    status, out = await consume(client, h, 1, user="ann")  # the usual path
    assert status == 200, out
    r = await client.post("/v1/check", json={"feature": "generate_insight", "user_id": "bob", "explain": True},
                          headers=h)
    assert r.status_code == 200, r.text  # the gate
    assert INTEGER.match(await redis.hget(layout.balances(org), user_key_field("ann")) or "")
