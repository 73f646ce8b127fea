"""The usual reserve, commit and release (lua/_lib.lua usual_reserve, usual_commit,
usual_release) decide exactly as the general path does.

Most reserves and settlements take a straight-line path through their script; anything unusual
(a sub-quota, a rate window passed, a period to refresh, a hold due, a threshold crossed, a
retry, a refusal...) goes through the gate's steps and settle_start. Two orgs on the same plan
get the same calls in the same order: in one, every user is in a team with a sub-quota too large
to matter, so every user's hold goes through the general path (its record names the team, so its
commit or release does too); in the other, none has one, so the usual calls take the straight
path. Answers, replays, events and balances must be the same, call for call: through the HTTP
API, and as the sidecar's LLM routes call the Decider (a reserve with a floor, a commit beyond
the hold with metadata)."""

from __future__ import annotations

import asyncio
import json
import random
import re
from typing import Any

import orjson

from quota_gw.decisions import Decider, Identity
from quota_gw.events import entries
from quota_gw.layout import Layout

INTEGER = re.compile(r"^(0|-?[1-9][0-9]*)$")  # what the ledger reads; never "-0"
NUMERIC = ("delta", "dp", "cost", "bal", "ts")
COMPARED = ("kind", "user", "meter", "feature", "delta", "dp", "cost", "bal", "meta", "src")
HEADERS = ("X-Quota-Remaining", "X-Quota-Source", "RateLimit-Limit", "RateLimit-Remaining", "RateLimit-Reset",
           "Retry-After")
USERS = [f"u{i}" for i in range(6)]


def timeless(text: str) -> str:
    """A refusal's wait is the server clock's: the two orgs' calls are microseconds apart."""
    return re.sub(r"retry in \d+ ms", "retry in N ms", text)


class Ids:
    """Each org's reservation and event ids as the order they were first seen in: the two orgs'
    ids differ, their places must not."""

    def __init__(self) -> None:
        self.seen: dict[str, int] = {}

    def __call__(self, rid: str) -> str:
        return f"#{self.seen.setdefault(rid.replace('-', ''), len(self.seen))}"


async def events(redis: Any, layout: Layout, org: str, ids: Ids) -> list[dict[str, Any]]:
    """The org's events, ids and clock readings replaced by what they stand for: a reservation
    id by its place, an expiry by the hold's time to live (the two orgs' calls may straddle a
    second)."""
    out = []
    for f in entries(await redis.xrange(layout.stream(org))):
        if f["org"] != org:
            continue
        meta: Any = timeless(f["meta"])
        if meta.startswith("{"):
            meta = json.loads(meta)
            if "reservation_id" in meta:
                meta["reservation_id"] = ids(meta["reservation_id"])
            if "expires_at" in meta and f["kind"] == "reserve":
                meta["expires_at"] -= int(f["ts"]) // 1_000_000
        out.append({**f, "meta": meta})
    return out


def same_events(usual: list[dict[str, Any]], gate: list[dict[str, Any]]) -> None:
    assert [[e[k] for k in COMPARED] for e in usual] == [[e[k] for k in COMPARED] for e in gate]
    assert all(INTEGER.match(e[k]) for e in usual + gate for k in NUMERIC)


async def two_orgs(admin: Any, meter: str, grant: int) -> dict[str, tuple[str, dict[str, str]]]:
    orgs = {}
    for side in ("usual", "gate"):
        org = await admin.org("pro")
        key = await admin.key(org)
        await admin.grant(org, meter, grant)  # purchased, after the plan's allocation
        if side == "gate":
            for u in USERS:
                await admin.user(org, u, team="everyone")
            await admin.quota(org, meter, 10**12, team="everyone")
        orgs[side] = (org, {"Authorization": f"Bearer {key}"})
    return orgs


async def balances(client: Any, orgs: dict[str, tuple[str, dict[str, str]]], meter: str) -> list[Any]:
    out = []
    for _, h in orgs.values():
        r = await client.get("/v1/balance", headers=h)
        out.append(r.json()["meters"][meter])
    return out


async def test_the_usual_reserve_commit_and_release_answer_write_and_record_as_the_general_path(
        client, admin, redis, config, prefix):
    layout = Layout(prefix, config.shards)
    orgs = await two_orgs(admin, "general", 40)
    ids = {side: Ids() for side in orgs}
    held: list[dict[str, str]] = []  # open reservations, each org's id
    settled: list[tuple[dict[str, str], str, dict[str, Any]]] = []  # (ids, path, body): retried below
    rng = random.Random(14)
    statuses: dict[str, set[int]] = {"reserve": set(), "commit": set(), "release": set(), "consume": set()}

    async def call(op: str, method: str, path: dict[str, str] | str, body: dict[str, Any] | None) -> dict[str, str]:
        """The same call to both orgs; their answers must agree. Returns each org's new id."""
        answers, made = {}, {}
        for side, (_, h) in orgs.items():
            url = path if isinstance(path, str) else path[side]
            r = await client.request(method, url, json=body, headers=h)
            out = r.json()
            made[side] = out.get("reservation_id") or out.get("event_id") or ""
            for name in ("reservation_id", "event_id"):
                if name in out:
                    ids[side](out[name])
                    out[name] = "id"
            out.pop("expires_at", None)  # the server clock's second (the events hold its distance)
            out["detail"] = re.sub(r"[0-9a-f]{32}", lambda m, own=ids[side]: own(m.group()),
                                   timeless(out.get("detail", "")))
            answers[side] = (r.status_code, out, {k: r.headers.get(k) for k in HEADERS})
        assert answers["usual"] == answers["gate"], (op, body)
        statuses[op].add(answers["usual"][0])
        return made if answers["usual"][0] < 300 else {}

    def url(rid: dict[str, str], tail: str = "") -> dict[str, str]:
        return {side: f"/v1/reservations/{r}{tail}" for side, r in rid.items()}

    for step in range(70):
        expired = step == 20
        if expired:  # a hold that expires (one: the sweep takes equal expiries by id), committed too late
            made = await call("reserve", "POST", "/v1/reservations",
                              {"feature": "generate_insight", "units": 1, "ttl_s": 1, "user_id": "u1"})
            held.insert(0, made)
            await asyncio.sleep(1.2)
            # The next decision sweeps it, by holds_due (which the straight reserve kept as the general one)
            held.append(await call("reserve", "POST", "/v1/reservations", {"feature": "generate_insight", "units": 1}))
        user = rng.choice(USERS + [None, None, None])
        roll = 0.5 if expired else rng.random()
        if roll < 0.45 or not held:
            made = await call("reserve", "POST", "/v1/reservations",
                              {"feature": "generate_insight", "units": rng.randint(1, 4), "ttl_s": 600,
                               **({"user_id": user} if user else {})})
            if made:
                held.append(made)
        elif roll < 0.8:
            rid = held.pop(0 if expired else rng.randrange(len(held)))
            body: dict[str, Any] = {"units": rng.randint(0, 5)}
            if rng.random() < 0.5:
                body["metadata"] = {"step": step, "note": "usual/general", "ok": True}
            await call("commit", "POST", url(rid, "/commit"), body)
            settled.append((rid, "/commit", body))
        elif roll < 0.85:
            rid = held.pop(rng.randrange(len(held)))
            await call("release", "DELETE", url(rid), None)
            settled.append((rid, "", {}))
        else:  # a consume drains the balance: commits cross thresholds and run into purchased credit
            await call("consume", "POST", "/v1/consume", {"feature": "generate_insight", "units": rng.randint(4, 12)})
    # Retries get the first answer (or a conflict): the settled record, whichever path wrote it.
    for rid, tail, body in settled[:12]:
        if tail:
            await call("commit", "POST", url(rid, tail), body)
            await call("release", "DELETE", url(rid), None)
        else:
            await call("release", "DELETE", url(rid), None)
            await call("commit", "POST", url(rid, "/commit"), {"units": 1})
    for rid in held:
        await call("release", "DELETE", url(rid), None)
    # The run held, ran out, settled, replayed, conflicted and found an expired hold gone.
    assert {201, 402, 429} <= statuses["reserve"], statuses
    assert {200, 404, 409} <= statuses["commit"], statuses
    assert {200, 409} <= statuses["release"], statuses

    usual = await events(redis, layout, orgs["usual"][0], ids["usual"])
    gate = await events(redis, layout, orgs["gate"][0], ids["gate"])
    same_events(usual, gate)
    kinds = {e["kind"] for e in usual}
    assert {"reserve", "commit", "release", "denied", "alert"} <= kinds, kinds
    assert any(e["kind"] == "release" and e["meta"]["reason"] == "expired" for e in usual)
    srcs = {e["src"] for e in usual if e["kind"] == "commit"}
    assert any(s.startswith("allocated:") and ",purchased:" in s for s in srcs), srcs  # a charge across both
    assert any("request" in e["meta"] for e in usual if e["kind"] == "commit")

    b = await balances(client, orgs, "general")
    assert b[0] == b[1]
    assert b[0]["held"] == 0  # every hold settled, released or expired
    # The team's sub-quota got its holds back too (their commits and releases took the general path).
    assert await redis.hget(layout.quotas(orgs["gate"][0]), "t:everyone:general:h") == "0"


async def test_the_usual_llm_hold_and_commit_beyond_it_answer_write_and_record_as_the_general_path(
        client, admin, redis, config, prefix):
    """The sidecar's calls (sidecar/admission.py, settling.py): a hold of the estimate with a
    floor (it holds what is left when less, down to the floor), then a commit of the measured
    tokens beyond the hold, with the sidecar's metadata."""
    layout = Layout(prefix, config.shards)
    decider = Decider(redis, config, layout)
    orgs = await two_orgs(admin, "tokens", 20_000)
    idents = {side: Identity("k1", org, None, frozenset({"consume"}), "pro") for side, (org, _) in orgs.items()}
    ids = {side: Ids() for side in orgs}
    rng = random.Random(5)
    seen: dict[str, set[Any]] = {"cost": set(), "overage": set(), "status": set()}

    def plain(side: str, d: Any) -> tuple[Any, ...]:
        extra = {k: v for k, v in d.extra.items() if k != "expires_at"}
        if d.event_id:
            ids[side](d.event_id)
        return (d.status, d.code, d.cost, d.remaining, d.rl_limit, d.rl_remaining, d.rl_reset, d.replay, d.would,
                extra, d.sources, timeless(d.detail))

    async def both(call: Any) -> dict[str, Any]:
        """The same call for both orgs; their answers must agree."""
        out = {side: await call(side, ident) for side, ident in idents.items()}
        assert plain("usual", out["usual"]) == plain("gate", out["gate"])
        return out

    # Other calls' holds, open throughout: a commit beyond its own hold never takes what they cover.
    others = [await both(lambda side, ident: decider.reserve(ident, "chat", 1, "", 600, cost=5_000)) for _ in range(2)]
    for step in range(40):
        user = rng.choice(USERS)
        estimate = rng.randint(2_000, 14_000)
        floor = rng.randint(500, 2_000)
        holds = {}
        answers = []
        for side, ident in idents.items():
            d = await decider.reserve(ident, "chat", 1, user, 600, None, False, cost=estimate, min_cost=floor)
            holds[side] = d
            answers.append(plain(side, d))
        assert answers[0] == answers[1], step
        d = holds["usual"]
        seen["status"].add(d.status)
        seen["cost"].add("lowered" if d.ok and d.cost < estimate else "whole")
        if not d.ok:
            continue
        tokens = rng.randint(0, estimate * 3 // 2)
        meta = orjson.dumps({"route": "/v1/chat/completions", "tokens": tokens, "source": "usage", "status": 200,
                             "prompt_estimate": rng.randint(1, 900)})
        answers = []
        for side, ident in idents.items():
            c = await decider.commit(ident, holds[side].event_id, tokens, meta, beyond_hold=True)
            answers.append(plain(side, c))
            if rng.random() < 0.2:  # a retry (the spool's): the first answer again
                again = await decider.commit(ident, holds[side].event_id, tokens, meta, beyond_hold=True)
                assert again.replay and plain(side, again)[:7] == answers[-1][:7]
        assert answers[0] == answers[1], step
        seen["overage"].add(bool(answers[0][9].get("overage")))
    # Holds lowered to what was left, commits beyond the hold charged and beyond the balance not.
    assert seen["cost"] == {"lowered", "whole"} and seen["overage"] == {True, False}, seen
    assert {201, 402} <= seen["status"], seen

    # Every threshold crossed, one other hold released: an LLM call beyond its hold, straight through,
    # takes what is left but the other hold, not more.
    first = await both(lambda side, ident: decider.release(ident, others[0][side].event_id))
    hold = await both(lambda side, ident: decider.reserve(ident, "chat", 1, "", 600, cost=2_000, min_cost=500))
    meta = orjson.dumps({"route": "/v1/chat/completions", "tokens": 10_000, "source": "usage", "status": 200})
    done = await both(lambda side, ident: decider.commit(ident, hold[side].event_id, 10_000, meta, beyond_hold=True))
    assert first["usual"].ok and hold["usual"].cost == 2_000 and done["usual"].ok, (first, hold, done)
    assert 0 < done["usual"].extra["overage"] < 10_000 - 2_000 and done["usual"].remaining == 0, done["usual"]
    await both(lambda side, ident: decider.release(ident, others[1][side].event_id))
    # Either path's commit event carries the caller's metadata as sent (lua commit_meta), not re-encoded.
    for org, _ in orgs.values():
        commits = [f for f in entries(await redis.xrange(layout.stream(org))) if f["org"] == org and f["kind"] == "commit"]
        assert commits[-1]["meta"].endswith(',"request":' + meta.decode() + "}"), commits[-1]["meta"]

    usual = await events(redis, layout, orgs["usual"][0], ids["usual"])
    gate = await events(redis, layout, orgs["gate"][0], ids["gate"])
    same_events(usual, gate)
    assert {"reserve", "commit", "denied", "alert"} <= {e["kind"] for e in usual}
    b = await balances(client, orgs, "tokens")
    assert b[0] == b[1]
    await decider.aclose()


async def test_a_hold_is_recorded_as_the_general_path_records_it_and_any_json_of_it_is_settled(
        client, admin, redis, config, prefix):
    """The straight reserve writes the reservation record the general path writes (the readers:
    settle_start, the sweeps, expired_holds, all cjson), and the straight commit and release read
    a record in any JSON spelling of it (one written by an earlier version), not only their own."""
    layout = Layout(prefix, config.shards)
    orgs = await two_orgs(admin, "general", 40)
    records = {}
    for side, (org, h) in orgs.items():
        r = await client.post("/v1/reservations", json={"feature": "generate_insight", "units": 2, "user_id": "u1"},
                              headers=h)
        assert r.status_code == 201, r.text
        records[side] = json.loads(await redis.hget(layout.reservations(org), r.json()["reservation_id"]))
    assert records["gate"].pop("tt") == "t:everyone" and records["usual"].pop("tt") == ""
    assert records["usual"]["exp"] - records["gate"]["exp"] in (-1, 0, 1)
    assert {**records["usual"], "exp": 0, "k": ""} == {**records["gate"], "exp": 0, "k": ""}

    org, h = orgs["usual"]
    answers = []
    for path in ("/commit", ""):
        r = await client.post("/v1/reservations", json={"feature": "generate_insight", "units": 3}, headers=h)
        rid = r.json()["reservation_id"]
        raw = await redis.hget(layout.reservations(org), rid)
        # Another spelling of the same record: sorted keys, spaces (cjson reads it as the same).
        await redis.hset(layout.reservations(org), rid, json.dumps(json.loads(raw), sort_keys=True))
        if path:
            answers.append(await client.post(f"/v1/reservations/{rid}{path}", json={"units": 2}, headers=h))
        else:
            answers.append(await client.delete(f"/v1/reservations/{rid}", headers=h))
    assert [(a.status_code, a.json()["released"]) for a in answers] == [(200, 1), (200, 3)]
    assert answers[0].json()["cost"] == 2
    b = (await client.get("/v1/balance", headers=h)).json()["meters"]["general"]
    assert b["held"] == 2  # the first hold (u1's) only


async def test_a_hold_priced_past_a_rate_window_is_committed_from_credit_at_its_multiple(
        client, admin, redis, config, prefix):
    """A hold taken past the user's window with `overflow: credit` (its record's multiple, `co`) is
    not of the usual shape: its commit charges purchased credit only, at the multiple, as
    commit.lua does, whichever path the hold and the commit take."""
    org = await admin.org("pro")
    key = await admin.key(org)
    h = {"Authorization": f"Bearer {key}"}
    await admin.grant(org, "general", 40)
    r = await client.put(f"/v1/admin/orgs/{org}/entitlements", headers=admin.h,
                         json={"rate_limits": {"user": {"overflow": "credit", "overflow_cost": 2}}})
    assert r.status_code == 200, r.text
    holds = []
    for _ in range(6):  # pro: 5 calls a minute a user; the sixth is past the window
        r = await client.post("/v1/reservations", json={"feature": "generate_insight", "units": 2, "user_id": "ann"},
                              headers=h)
        assert r.status_code == 201, r.text
        holds.append(r.json())
    assert [x["held"] for x in holds] == [2] * 5 + [4]  # the sixth at twice the price, from credit
    answers = []
    for x in (holds[5], holds[0]):
        r = await client.post(f"/v1/reservations/{x['reservation_id']}/commit", json={"units": 1}, headers=h)
        assert r.status_code == 200, r.text
        answers.append((r.json()["cost"], r.json()["released"], r.headers.get("X-Quota-Source")))
    assert answers == [(2, 2, "purchased"), (1, 1, "allocated")]
