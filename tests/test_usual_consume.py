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
import redis.asyncio as aioredis

from quota_gw.decisions import Decider
from quota_gw.events import entries
from quota_gw.layout import Layout, meter_field

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


async def test_the_usual_consume_draws_credit_lots_as_the_gate(client, admin, redis, redis_url, config, prefix):
    """Credit lots (grants that expire, a purchase that never does, beside the free pool) are
    drawn by the usual consume in the gate's order: the same answers, events, balances and lots."""
    layout = Layout(prefix, config.shards)
    raw = aioredis.from_url(redis_url)
    decider = Decider(raw, config, layout)
    later, sooner = rfc3339(time.time() + 7200), rfc3339(time.time() + 3600)
    users = [f"u{i}" for i in range(8)]
    orgs, names = {}, {}
    for side in ("usual", "gate"):
        org = await admin.org("pro")
        key = await admin.key(org)
        ids = {}
        ids[(await admin.grant(org, "general", 6, expires_at=later)).json()["event_id"]] = "LATER"
        ids[(await admin.grant(org, "general", 4, expires_at=sooner)).json()["event_id"]] = "SOONER"
        await decider.grant(org, "general", 5, lot=f"buy-{side}")  # a purchase: traced, never expires
        ids[f"buy-{side}"] = "BUY"
        await admin.grant(org, "general", 3)  # the free pool
        if side == "gate":
            for u in users:
                await admin.user(org, u, team="everyone")
            await admin.quota(org, "general", 10**9, team="everyone")
        orgs[side] = (org, {"Authorization": f"Bearer {key}"})
        names[side] = ids

    def named(side: str, text: str) -> str:
        for lot_id, name in names[side].items():
            text = text.replace(lot_id, name)
        return text

    rng = random.Random(2)
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
            heads = {k: named(side, r.headers.get(k) or "") for k in HEADERS}
            answers[side] = (r.status_code, named(side, orjson.dumps(out).decode()), heads)
        assert answers["usual"] == answers["gate"], (user, units)
        statuses.add(answers["usual"][0])
    assert {200, 402} <= statuses, statuses  # through every layer and out of credit

    recorded = {side: [[named(side, str(e[k])) for k in COMPARED] for e in await events(redis, layout, org)]
                for side, (org, _) in orgs.items()}
    assert recorded["usual"] == recorded["gate"]
    srcs = {e[-1] for e in recorded["usual"] if e[0] == "consume"}
    assert any("grant:SOONER:" in s for s in srcs) and any("grant:LATER:" in s for s in srcs), srcs
    assert any("purchased:" in s for s in srcs), srcs
    lots = {side: named(side, await redis.hget(layout.balances(org), meter_field("general", "lots")) or "")
            for side, (org, _) in orgs.items()}
    assert lots["usual"] == lots["gate"]
    balances = [(await client.get("/v1/balance", headers=h)).json()["meters"]["general"] for _, h in orgs.values()]
    assert balances[0] == balances[1]
    await raw.aclose()
