"""`quota-gw rebuild` and `quota-gw reconcile`: Redis state from the Postgres ledger, and drift
(Redis against the ledger, the ledger's rollups against its events, and each org's configuration
in Redis against Postgres: config_drift.py).

The ledger holds every balance change, so per (org, meter):
    allocated `a` = sum(delta - delta_purchased)     purchased `p` = sum(delta_purchased)
    credit ever bought `pt` = sum(delta_purchased) of grants/purchases/adjustments that added
    period end `pe`, allocation `lim` = metadata of the latest reset (new period) or plan adjust
    used `u` = what consume/commit charged since the latest reset, less refunds of those charges
    purchased at period start `ps` = the latest reset's metadata `purchased` (0 before it was recorded)
    alerts sent this period `alpe`/`alt` = the current period end and the lowest threshold of its
    `alert` events (so a rebuild does not alert again for what was already said)
    credit lots `lots` (expiring grants, purchases a refund may take back) = a replay of the
    meter's credit events: each charge's and refund's `sources` name the lot they took from or
    gave back to (lots.py). A lot whose lapse an `expire` event recorded is gone (and its credit
    out of `p`); one that lapsed with no decision since comes back as the scripts left it, for
    the next decision to expire and record. A refunded purchase's lot is gone with its `revoke`.
Reservations are not rebuilt (holds are released: they never changed a or p). Reconcile compares
a, p, pt and every lot (left, expiry) with the ledger.
"""

from __future__ import annotations

import logging
import sys
import time
import uuid
from collections import defaultdict
from dataclasses import dataclass
from functools import partial
from collections.abc import Collection
from typing import Any, ClassVar

import asyncpg
import redis.asyncio as aioredis

from quota_gw import cluster, events
from quota_gw.config import Config
from quota_gw.entitlements import canonical
from quota_gw.layout import (METER_FIELDS, SUB_QUOTAS, Layout, meter_field, quota_field, quota_subject, user_field,
                             user_key_field)
from quota_gw.redis_text import text_entries

from . import lots
from .config_drift import config_drift, print_config_drift, repair_config, shown, until_clean


log = logging.getLogger("quota_gw.recovery")


LEDGER_BALANCES = f"""
SELECT org_id, meter,
       sum(delta - delta_purchased)::bigint AS a,
       sum(delta_purchased)::bigint AS p,
       coalesce(sum(delta_purchased) FILTER (WHERE delta_purchased > 0 AND kind IN {lots.GRANT_KINDS}), 0)::bigint AS pt
FROM usage_events
WHERE meter IS NOT NULL {{where}}
GROUP BY org_id, meter
HAVING bool_or(kind <> 'denied')  -- a refusal saves nothing: no balance for a meter only ever refused
"""

# The latest reset or plan adjustment per (org, meter): the period and allocation now in force.
PERIODS = """
SELECT DISTINCT ON (org_id, meter) org_id, meter,
       (metadata ->> 'period_end')::bigint AS pe, (metadata ->> 'allocation')::bigint AS lim
FROM usage_events
WHERE kind IN ('reset', 'adjust') AND metadata ? 'allocation' AND meter IS NOT NULL
ORDER BY org_id, meter, ts DESC
"""

# Purchased credit at the start of the current period (the alerts' base, with the allocation).
PERIOD_START_PURCHASED = """
SELECT DISTINCT ON (org_id, meter) org_id, meter, coalesce((metadata ->> 'purchased')::bigint, 0) AS ps
FROM usage_events
WHERE kind = 'reset' AND meter IS NOT NULL
ORDER BY org_id, meter, ts DESC
"""

# The lowest low-balance threshold alerted, per period end.
ALERTS_SENT = """
SELECT org_id, meter, (metadata ->> 'period_end')::bigint AS pe, min((metadata ->> 'threshold')::int) AS alt
FROM usage_events
WHERE kind = 'alert' AND meter IS NOT NULL
GROUP BY 1, 2, 3
"""

# Usage in the current period, per user: charges after the latest reset (the reset and the
# charge that triggered it share a ts), less refunds of charges made after it (a refund of an
# older period's charge does not give back this period's usage; see lua/refund.lua).
PERIOD_USAGE = """
WITH resets AS (
    SELECT DISTINCT ON (org_id, meter) org_id, meter, event_id, ts
    FROM usage_events WHERE kind = 'reset' AND meter IS NOT NULL
    ORDER BY org_id, meter, ts DESC
)
SELECT e.org_id, e.meter, coalesce(e.user_id, '') AS user_id, sum(e.cost)::bigint AS used
FROM resets r
JOIN usage_events e ON e.org_id = r.org_id AND e.meter = r.meter AND e.ts >= r.ts AND e.event_id <> r.event_id
WHERE e.kind IN ('consume', 'commit')
   OR (e.kind = 'refund' AND EXISTS (
        SELECT 1 FROM usage_events o
        WHERE o.event_id = (e.metadata ->> 'refund_of')::uuid AND o.org_id = e.org_id AND o.ts >= r.ts))
GROUP BY 1, 2, 3
"""

# Users Redis knew: the users table, plus users registered on first use (auto_register_users),
# who appear only in the ledger. A refusal of an unknown user ('forbidden') registered nobody.
USERS = """
SELECT org_id, user_id, coalesce(team, '') AS team FROM users
UNION
SELECT DISTINCT org_id, user_id, '' FROM usage_events e
WHERE user_id IS NOT NULL AND NOT (kind = 'denied' AND metadata ->> 'code' = 'forbidden')
  AND NOT EXISTS (SELECT 1 FROM users u WHERE u.org_id = e.org_id AND u.user_id = e.user_id)
"""


def _id(u: uuid.UUID) -> str:
    return u.hex


# Users registered where absent (HSETNX each ARGV field of KEYS[1] to ''): one call per 1,000, not
# a command each (200,000 users: 0.4 s, against 2.3 s pipelined HSETNX and 0.5 s one HSET).
REGISTER_LUA = "for _, f in ipairs(ARGV) do redis.call('HSETNX', KEYS[1], f, '') end"


async def _write(r: aioredis.Redis, ops: list[tuple[Any, ...]]) -> None:
    for i in range(0, len(ops), 1000):
        async with r.pipeline(transaction=False) as p:
            for op, *a in ops[i:i + 1000]:
                getattr(p, op)(*a)
            await p.execute()


async def org_keys(r: aioredis.Redis, layout: Layout, kinds: tuple[str, ...]) -> dict[str, list[str]]:
    """Per-org keys of these kinds ('b', 'q') under the prefix, by kind: one SCAN pass
    (a SCAN walks the whole keyspace whatever its MATCH, so one pass, not one per shard)."""
    tags = set(layout.shard_tags())
    out: dict[str, list[str]] = {k: [] for k in kinds}
    async for k in r.scan_iter(match=f"{_glob(layout.prefix)}:*", count=5000):
        tag, sep, rest = k.partition("}:")
        kind = rest.split(":", 1)[0]
        if sep and kind in out and tag + "}" in tags:
            out[kind].append(k)
    return out


async def state_keys(r: aioredis.Redis, layout: Layout) -> list[str]:
    """Keys rebuild would overwrite (balances, with the users in them, and quotas), if any exist."""
    return [k for keys in (await org_keys(r, layout, ("b", "q"))).values() for k in keys]


def _glob(s: str) -> str:
    """Escapes a key prefix for SCAN MATCH (the shard tag has braces, the prefix may have more)."""
    return "".join("\\" + c if c in "*?[]\\" else c for c in s)


async def stream_records(r: aioredis.Redis, layout: Layout) -> list[tuple[str, dict[str, str]]]:
    """Every entry of the streams: (its entry id, its values by name: events.decode), in each
    stream's order."""
    records: list[tuple[str, dict[str, str]]] = []
    for s in layout.streams():
        start = "-"
        while True:
            chunk = text_entries(await r.xrange(s, min=start, count=10_000))
            records += [(entry_id, events.decode(f)) for entry_id, f in chunk]
            if len(chunk) < 10_000:
                break
            start = "(" + chunk[-1][0]
    return records


async def stream_entries(r: aioredis.Redis, layout: Layout) -> list[dict[str, str]]:
    return [f for _, f in await stream_records(r, layout)]


async def not_in_ledger(pg: asyncpg.Connection, entries: list[dict[str, str]]) -> list[dict[str, str]]:
    """The entries whose event is not (yet) in Postgres."""
    ids = []
    for f in entries:
        try:
            ids.append(uuid.UUID(f.get("id", "")))
        except ValueError:
            pass
    have = {_id(x["event_id"]) for x in await pg.fetch(
        "SELECT event_id FROM usage_events WHERE event_id = ANY($1::uuid[])", ids)} if ids else set()
    return [f for f in entries if f.get("id") not in have and "org" in f]


async def undrained(r: aioredis.Redis, pg: asyncpg.Connection, layout: Layout) -> list[dict[str, str]]:
    """Events still in the streams and not (yet) in Postgres."""
    return await not_in_ledger(pg, await stream_entries(r, layout))


@dataclass
class RebuildReport:
    orgs: int = 0
    balances: int = 0
    users: int = 0
    quotas: int = 0
    keys: int = 0
    revoked: int = 0
    refund_guards: int = 0
    lots: int = 0
    lots_lapsed: int = 0  # of them, past their expiry: the next decision on the meter expires them
    entitlements: int = 0
    config_removed: int = 0
    config_set: int = 0  # after the writes: a user of an event not drained (--force), or a write racing


async def rebuild(r: aioredis.Redis, pg: asyncpg.Connection, config: Config, layout: Layout) -> RebuildReport:
    """Writes every org, key, user, quota and balance of Postgres into Redis (see module doc)."""
    rep = RebuildReport()
    ops: list[tuple[Any, ...]] = []

    for o in await pg.fetch("SELECT o.org_id, o.name, o.plan, e.entitlements::text AS entitlements FROM orgs o "
                            "LEFT JOIN org_entitlements e USING (org_id)"):
        org_fields = {"plan": o["plan"], "name": o["name"] or ""}
        ents = canonical(o["entitlements"])  # the org's override of its plan's layers (migration 009)
        if ents:
            org_fields["entitlements"] = ents
            rep.entitlements += 1
        else:  # --force over a Redis that had one: the ledger says there is none
            ops.append(("hdel", layout.org(o["org_id"]), "entitlements"))
        ops.append(("hset", layout.org(o["org_id"]), None, None, org_fields))
        rep.orgs += 1
    for k in await pg.fetch("SELECT key_id, org_id, user_id, key_hash, scopes, revoked_at FROM api_keys"):
        rec = {"key_id": k["key_id"], "org": k["org_id"], "user": k["user_id"] or "", "scopes": ",".join(k["scopes"])}
        if k["revoked_at"] is not None:
            rec["revoked"] = "1"  # a tombstone, as the admin API writes it
            rep.revoked += 1
        ops.append(("hset", layout.api_key(k["key_hash"]), None, None, rec))
        rep.keys += 1

    team_of: dict[tuple[str, str], str] = {}
    users: dict[str, dict[str, str]] = defaultdict(dict)
    for u in await pg.fetch(USERS):
        users[u["org_id"]][u["user_id"]] = u["team"]
        team_of[(u["org_id"], u["user_id"])] = u["team"]
    # Each user, in its org's balance hash: registered ('@<user>', '' no rate window: windows are
    # not restored; HSETNX, so a --force over a Redis that had one keeps it) and its team
    # ('@<user>:t'; removed for a user with none, which a --force may find there).
    for org, teams in users.items():
        bal = layout.balances(org)
        regs = [user_key_field(u) for u in teams]
        ops += [("eval", REGISTER_LUA, 1, bal, *regs[i:i + 1000]) for i in range(0, len(regs), 1000)]
        if with_team := {user_field(u, "team"): t for u, t in teams.items() if t}:
            ops.append(("hset", bal, None, None, with_team))
        if no_team := [user_field(u, "team") for u, t in teams.items() if not t]:
            ops.append(("hdel", bal, *no_team))
        rep.users += len(teams)

    periods = {(p["org_id"], p["meter"]): (p["pe"], p["lim"]) for p in await pg.fetch(PERIODS)}
    start_purchased = {(p["org_id"], p["meter"]): p["ps"] for p in await pg.fetch(PERIOD_START_PURCHASED)}
    alerted = {(x["org_id"], x["meter"], x["pe"]): x["alt"] for x in await pg.fetch(ALERTS_SENT)}
    org_used: dict[tuple[str, str], int] = defaultdict(int)
    subject_used: dict[tuple[str, str, str], int] = defaultdict(int)  # (org, 'u:x' | 't:y', meter)
    for row in await pg.fetch(PERIOD_USAGE):
        org, meter, user, used = row["org_id"], row["meter"], row["user_id"], row["used"]
        org_used[(org, meter)] += used
        if user:
            subject_used[(org, quota_subject("user", user), meter)] += used
            team = team_of.get((org, user), "")
            if team:
                subject_used[(org, quota_subject("team", team), meter)] += used

    now_s = int(time.time())
    lots_of = {k: meter.stored(now_s)
               for k, meter in lots.replay(await pg.fetch(lots.lot_events_sql(False), [], [])).items()}
    for b in await pg.fetch(LEDGER_BALANCES.format(where="")):
        org, m = b["org_id"], b["meter"]
        mf = partial(meter_field, m)
        fields: dict[str, Any] = {mf("allocated"): b["a"], mf("purchased"): b["p"], mf("held"): 0,
                                  mf("used"): max(0, org_used.get((org, m), 0))}
        stored = lots_of.get((org, m))
        if stored:
            fields[mf("lots")] = lots.encode(stored)
            rep.lots += len(stored)
            rep.lots_lapsed += sum(0 < lot.x <= now_s for lot in stored)
        else:  # --force over a Redis that had some: the ledger says there are none
            ops.append(("hdel", layout.balances(org), mf("lots")))
        if b["pt"] > 0:
            fields[mf("purchased_total")] = b["pt"]
        if (org, m) in periods:
            pe, lim = periods[(org, m)]
            fields[mf("period_end")], fields[mf("limit")] = pe, lim
            fields[mf("purchased_at_start")] = start_purchased.get((org, m), 0)
            if (org, m, pe) in alerted:
                fields[mf("alert_period")], fields[mf("alert_threshold")] = pe, alerted[(org, m, pe)]
        ops.append(("hset", layout.balances(org), None, None, fields))
        rep.balances += 1

    for q in await pg.fetch("SELECT org_id, meter, scope, subject, quota FROM sub_quotas"):
        org, m = q["org_id"], q["meter"]
        subject = quota_subject(q["scope"], q["subject"])
        qf = partial(quota_field, subject, m)
        fields = {qf("limit"): q["quota"], qf("held"): 0}
        if (org, m) in periods:
            fields[qf("used")] = max(0, subject_used.get((org, subject, m), 0))
            fields[qf("period_end")] = periods[(org, m)][0]
        ops.append(("hset", layout.quotas(org), None, None, fields))
        # Not known whether the org has sub-quotas (a --force over a Redis that said none): the next consume looks.
        ops.append(("hdel", layout.balances(org), SUB_QUOTAS))
        rep.quotas += 1

    rep.refund_guards = await _refund_guards(pg, config, layout, ops)
    await _write(r, ops)
    # What the writes above cannot undo over a Redis that had state (--force): configuration
    # Postgres no longer has (users, sub-quota limits, orgs) is removed, so reconcile is clean.
    fixed, _ = await repair_config(r, pg, layout)
    rep.config_removed = sum(d.postgres is None for d in fixed)
    rep.config_set = len(fixed) - rep.config_removed
    return rep


async def _refund_guards(pg: asyncpg.Connection, config: Config, layout: Layout, ops: list[tuple[Any, ...]]) -> int:
    """Refunds of the window's charges, each its guard again (lua/refund.lua writes it), so a
    charge refunded before the rebuild is not refunded twice. The guard holds no answer (the
    ledger has no `remaining`): a refund of that event is 404, as it was before this guard."""
    window = float(config.behaviour.refund_window_s)
    now = time.time()
    n = 0
    for g in await pg.fetch(
            """SELECT c.org_id, c.event_id, min(c.ts) AS ts
                 FROM usage_events r
                 JOIN usage_events c ON c.event_id = CASE WHEN r.metadata ->> 'refund_of' ~ '^[0-9a-f]{32}$'
                                                     THEN (r.metadata ->> 'refund_of')::uuid END
                                    AND c.org_id = r.org_id AND c.kind IN ('consume', 'commit')
                WHERE r.kind = 'refund' AND r.ts > now() - $1 * interval '1 second'
                  AND c.ts > now() - $1 * interval '1 second'
                GROUP BY 1, 2""", window):
        ttl = int(window - (now - g["ts"].timestamp())) + 1
        if ttl > 0:
            ops.append(("set", layout.refund_guard(g["org_id"], _id(g["event_id"])), "{}", ttl))
            n += 1
    return n


# The server clock and every balance of one shard at one instant. A script, not MULTI: on a
# cluster a script with one slot's keys runs on that slot's primary, and TIME is keyless. It reads
# the meters' fields it is given (ARGV), not the whole hash: the org's users live there too
# (layout.py), and an HGETALL of 200,000 users held Redis for ~0.4 s.
SNAPSHOT_LUA = """
local t = redis.call('TIME')
local out = {t[1], t[2]}
for i, k in ipairs(KEYS) do out[i + 2] = redis.call('HMGET', k, unpack(ARGV)) end
return out
"""
# The fields of a meter the snapshot reads (reconcile compares these).
SNAPSHOT_FIELDS = ("allocated", "purchased", "purchased_total", "lots")
# The meters the ledger has a balance for (the worker's running totals), beside the configured ones.
LEDGER_METERS = "SELECT DISTINCT meter FROM meter_totals WHERE ($1::text IS NULL OR org_id = $1)"


@dataclass
class Drift:
    org: str
    meter: str
    field: str
    redis: int
    ledger: int


@dataclass
class LotDrift:
    """One credit lot that Redis and the ledger disagree on (absent on one side: None)."""
    org: str
    meter: str
    lot: str
    redis: lots.Lot | None
    ledger: lots.Lot | None
    redis_text: str | None  # the meter's lots field as read (repair compares against it)
    ledger_text: str | None  # the field as the ledger says (what repair writes; None: no lot)
    field: ClassVar[str] = METER_FIELDS["lots"]


async def reconcile(r: aioredis.Redis, pg: asyncpg.Connection, layout: Layout, org: str | None = None, *,
                    meters: Collection[str]) -> tuple[list[Drift | LotDrift], dict[str, int]]:
    """Redis a/p/pt and credit lots against the ledger, per (org, meter): the `meters` given (the
    configuration's) and those the ledger has a balance for.

    Per shard, one script reads the clock and every balance at one instant T. Every balance
    change up to T is then either in Postgres or still in the stream (entries are trimmed only
    after they are committed), so: read the streams, then Postgres, keep events with ts <= T.
    The lots are the replay of lots.py over the same events, as the scripts store them at T.
    Safe to run while the gateway and the worker run."""
    stats = {"pairs": 0, "undrained": 0, "dead_letters": 0, "lots": 0}
    names = sorted(set(meters) | {x["meter"] for x in await pg.fetch(LEDGER_METERS, org)})
    fields = [meter_field(m, f) for m in names for f in SNAPSHOT_FIELDS]
    known = [org] if org else [x["org_id"] for x in await pg.fetch("SELECT org_id FROM orgs")]
    known_by_tag: dict[str, list[str]] = defaultdict(list)
    for o in known:
        known_by_tag[layout.tag(o)].append(layout.balances(o))
    # 1. Snapshot: balances and the server time, per shard, atomically. Keys: every known org's
    #    (whether or not it exists yet) and any other balance key found.
    snap: dict[str, dict[str, str]] = {}  # org -> balance fields
    t_of: dict[str, int] = {}  # org -> snapshot time (unix us)
    found: dict[str, set[str]] = defaultdict(set)
    if org is None:
        for k in (await org_keys(r, layout, ("b",)))["b"]:
            found[k.partition("}:")[0] + "}"].add(k)
    for tag in layout.shard_tags():
        keys = sorted(set(known_by_tag.get(tag, [])) | found.get(tag, set()))
        if not keys or not fields:
            continue
        sec, us, *res = await r.eval(SNAPSHOT_LUA, len(keys), *keys, *fields)  # one slot: its owner, atomically
        t = int(sec) * 1_000_000 + int(us)
        for k, values in zip(keys, res):
            o = k[len(tag) + 3:]
            snap[o], t_of[o] = {f: v for f, v in zip(fields, values) if v is not None}, t
    # 2. The streams (after the snapshot), 3. Postgres (after the streams), in one snapshot of its
    #    own so an event the worker commits meanwhile is seen either in both queries or in neither.
    records = [(i, f) for i, f in await stream_records(r, layout) if f.get("org") in t_of]
    entry_id = {f.get("id", ""): i for i, f in records}
    for s in layout.streams():
        stats["dead_letters"] += await r.xlen(s + ":dead")
    ledger: dict[tuple[str, str], list[int]] = defaultdict(lambda: [0, 0, 0])
    ledger_lots: dict[tuple[str, str], list[lots.Lot]] = {}
    by_t: dict[int, list[str]] = defaultdict(list)  # one query per snapshot time (per shard)
    for o in sorted(t_of):
        by_t[t_of[o]].append(o)
    async with pg.transaction(isolation="repeatable_read", readonly=True):
        pending = await not_in_ledger(pg, [f for _, f in records])
        credit_pending: dict[tuple[str, str], list[lots.LotEvent]] = defaultdict(list)  # the lots' replay
        for f in pending:
            e = lots.event_from_entry(entry_id.get(f.get("id", ""), ""), f)
            if e is not None and f.get("meter") and int(f.get("ts", 0)) <= t_of[f["org"]]:
                credit_pending[(f["org"], f["meter"])].append(e)
        for t, group in by_t.items():
            rows = await pg.fetch(LEDGER_BALANCES.format(
                where="AND org_id = ANY($1) AND ts <= timestamptz 'epoch' + $2 * interval '1 microsecond'"), group, t)
            for x in rows:
                ledger[(x["org_id"], x["meter"])] = [x["a"], x["p"], x["pt"]]
        # The lots: every org's in one query, each org's events up to its snapshot. A lot opened
        # by an event still in a stream: that meter is replayed from its first event.
        opened = sorted(k for k, es in credit_pending.items() if any(map(lots.opens_lot, es)))
        args: list[Any] = [[k[0] for k in opened], [k[1] for k in opened]] + ([org] if org else [])
        lot_rows = [x for x in await pg.fetch(lots.lot_events_sql(org is not None), *args)
                    if x["org_id"] in t_of and x["ts_us"] <= t_of[x["org_id"]]]
        for pair, meter in lots.replay(lot_rows, credit_pending).items():
            ledger_lots[pair] = meter.stored(t_of[pair[0]] // 1_000_000)
    for f in pending:
        o = f["org"]
        try:
            ts, delta, dp = int(f["ts"]), int(f["delta"]), int(f["dp"])
        except (KeyError, ValueError):
            continue  # not an event; the worker dead-letters it
        if ts > t_of[o] or not f.get("meter"):
            continue  # after the snapshot: not in the balances read
        v = ledger[(o, f["meter"])]
        v[0] += delta - dp
        v[1] += dp
        if dp > 0 and f.get("kind") in lots.GRANT_KINDS:
            v[2] += dp
        stats["undrained"] += 1
    drift: list[Drift | LotDrift] = []
    pairs = set(ledger)
    a_p = (":" + METER_FIELDS["allocated"], ":" + METER_FIELDS["purchased"])
    for o, have_fields in snap.items():
        pairs |= {(o, k.rsplit(":", 1)[0]) for k in have_fields if k.endswith(a_p)}
    for o, m in sorted(pairs):
        have_fields = snap.get(o, {})
        want = ledger.get((o, m), [0, 0, 0])
        for i, name in enumerate(("allocated", "purchased", "purchased_total")):
            have = int(have_fields.get(meter_field(m, name), 0))
            if have != want[i]:
                drift.append(Drift(o, m, METER_FIELDS[name], have, want[i]))
    lot_field = ":" + METER_FIELDS["lots"]
    lot_pairs = set(ledger_lots) | {(o, k[:-len(lot_field)]) for o, have_fields in snap.items()
                                    for k in have_fields if k.endswith(lot_field)}
    for o, m in sorted(lot_pairs):
        text = snap.get(o, {}).get(meter_field(m, "lots"))
        now_s = t_of.get(o, 0) // 1_000_000
        # A spent lot past its expiry counts for nothing (the next decision drops it unrecorded).
        in_redis = {lot.i: lot for lot in lots.decode(text) if not (0 < lot.x <= now_s and lot.n <= 0)}
        stored = ledger_lots.get((o, m), [])
        in_ledger = {lot.i: lot for lot in stored}
        stats["lots"] += len(set(in_redis) | set(in_ledger))
        for lot_id in sorted(set(in_redis) | set(in_ledger)):
            if in_redis.get(lot_id) != in_ledger.get(lot_id):
                drift.append(LotDrift(o, m, lot_id, in_redis.get(lot_id), in_ledger.get(lot_id), text,
                                      lots.encode(stored) if stored else None))
    stats["pairs"] = len(pairs)
    return drift, stats


# --- every charge's split against its delta (migration 008) ------------------------------------
# The sources of an event (what each layer gave or got back) must add up to the event's delta: a
# row whose split says otherwise was written wrong or changed since. Rows without sources (written
# before they were recorded) are not checked.
SPLIT_DRIFT = """
SELECT e.event_id, e.org_id, coalesce(e.meter, '') AS meter, e.kind, e.delta,
       coalesce(sum(s.delta), 0)::bigint AS split, e.sources
  FROM usage_events e LEFT JOIN usage_event_sources s ON s.event_id = e.event_id AND s.ts = e.ts
 WHERE e.sources IS NOT NULL AND e.sources <> '' {where}
 GROUP BY e.event_id, e.org_id, e.meter, e.kind, e.delta, e.sources
HAVING coalesce(sum(s.delta), 0) <> e.delta
 ORDER BY e.org_id, e.event_id
"""


@dataclass
class SplitDrift:
    event_id: str
    org: str
    meter: str
    kind: str
    delta: int
    split: int  # what its sources add up to
    sources: str


async def split_drift(pg: asyncpg.Connection, org: str | None = None) -> list[SplitDrift]:
    """Ledger rows whose split over the layers does not add up to their delta."""
    if org is None:
        rows = await pg.fetch(SPLIT_DRIFT.format(where=""))
    else:
        rows = await pg.fetch(SPLIT_DRIFT.format(where="AND e.org_id = $1"), org)
    return [SplitDrift(str(x["event_id"]), x["org_id"], x["meter"], x["kind"], x["delta"], x["split"], x["sources"])
            for x in rows]


def print_split_drift(drift: list[SplitDrift], out: Any = None) -> None:
    out = out or sys.stdout  # read at call time (a caller may have redirected it)
    for d in drift:
        out.write(f"event {d.event_id} ({d.org} {d.meter} {d.kind}): delta {d.delta}, its sources add up to "
                  f"{d.split} ({d.sources})\n")
    out.write(f"splits: {len(drift)} events whose sources do not add up to their delta\n")


# --- the three records tie out (docs/design.md "Three records that tie out") -------------------
# Usage (what the caller did: the charge's feature and the tokens it was priced at, `cost`),
# monetization (what was taken, by layer: the split rows of usage_event_sources) and balance
# changes (`delta`, `delta_purchased`: what the balances moved, which Redis is reconciled against)
# must agree per org, UTC day, meter and feature, over the events that record a split (from
# migration 008 on: `sources IS NOT NULL`; older rows have none to tie):
#   usage = monetization:  sum(cost) of charges (consume, commit) = -sum(split) of those charges
#   monetization = balance: sum(split on 'allocated') = sum(delta - delta_purchased) and
#                           sum(split on the credit layers, grant:* and purchased) = sum(delta_purchased),
#                           over charges and refunds
# A charge that took from no layer (no split, no delta: an unlimited meter) ties out trivially.
# A refund's usage is its charge's: see REFUND_TIE_OUT.
TIE_OUT = """
WITH ev AS (
    SELECT e.event_id, e.ts, e.org_id, coalesce(e.meter, '') AS meter, coalesce(e.feature, '') AS feature,
           (e.ts AT TIME ZONE 'UTC')::date AS day, e.kind, e.cost, e.delta, e.delta_purchased
      FROM usage_events e
     WHERE e.kind IN ('consume', 'commit', 'refund') AND e.sources IS NOT NULL
       AND NOT (e.sources = '' AND e.delta = 0 AND e.delta_purchased = 0) {where}
), split AS (
    SELECT s.event_id, s.ts,
           coalesce(sum(s.delta) FILTER (WHERE s.layer = 'allocated'), 0) AS allocated,
           coalesce(sum(s.delta) FILTER (WHERE s.layer <> 'allocated'), 0) AS credit
      FROM usage_event_sources s JOIN ev USING (event_id, ts)
     GROUP BY 1, 2
), day AS (
    SELECT ev.org_id, ev.day, ev.meter, ev.feature,
           coalesce(sum(ev.cost) FILTER (WHERE ev.kind <> 'refund'), 0)::bigint AS usage,
           coalesce(-sum(coalesce(s.allocated, 0) + coalesce(s.credit, 0))
                    FILTER (WHERE ev.kind <> 'refund'), 0)::bigint AS charged,
           coalesce(sum(s.allocated), 0)::bigint AS split_allocated,
           coalesce(sum(s.credit), 0)::bigint AS split_credit,
           sum(ev.delta - ev.delta_purchased)::bigint AS delta_allocated,
           sum(ev.delta_purchased)::bigint AS delta_purchased
      FROM ev LEFT JOIN split s USING (event_id, ts)
     GROUP BY 1, 2, 3, 4
)
SELECT * FROM day
 WHERE usage <> charged OR split_allocated <> delta_allocated OR split_credit <> delta_purchased
 ORDER BY org_id, day, meter, feature
"""

# A refund against the charge it refunds (metadata refund_of), when both are in the ledger: its
# usage is the charge's (cost = -the charge's cost), and no layer gets back more than the charge
# took from it (an expired grant's share, or a past period's allocation, gets back less: `lost`).
REFUND_TIE_OUT = """
WITH r AS (
    SELECT e.event_id, e.ts, e.org_id, coalesce(e.meter, '') AS meter, coalesce(e.feature, '') AS feature,
           (e.ts AT TIME ZONE 'UTC')::date AS day, e.cost, (e.metadata ->> 'refund_of')::uuid AS refund_of
      FROM usage_events e
     WHERE e.kind = 'refund' AND e.sources IS NOT NULL AND e.metadata ->> 'refund_of' ~ '^[0-9a-f]{{32}}$' {where}
), c AS (
    SELECT r.event_id AS refund_id, c.event_id, c.ts, c.cost
      FROM r JOIN usage_events c ON c.event_id = r.refund_of AND c.org_id = r.org_id
                                AND c.kind IN ('consume', 'commit') AND c.sources IS NOT NULL
), layers AS (
    SELECT c.refund_id, l.layer, sum(l.back)::bigint AS back, sum(l.took)::bigint AS took
      FROM c CROSS JOIN LATERAL (
          SELECT s.layer, s.delta AS back, 0 AS took FROM usage_event_sources s
           WHERE s.event_id = c.refund_id
          UNION ALL
          SELECT s.layer, 0, -s.delta FROM usage_event_sources s WHERE s.event_id = c.event_id AND s.ts = c.ts) l
     GROUP BY 1, 2
)
SELECT r.org_id, r.day, r.meter, r.feature, r.event_id, -r.cost AS refunded_usage, c.cost AS charged_usage,
       coalesce(string_agg(l.layer || ' ' || l.back || '>' || l.took, ', ' ORDER BY l.layer)
                FILTER (WHERE l.back > l.took), '') AS layers_over
  FROM r JOIN c ON c.refund_id = r.event_id LEFT JOIN layers l ON l.refund_id = r.event_id
 GROUP BY r.org_id, r.day, r.meter, r.feature, r.event_id, r.cost, c.cost
HAVING -r.cost <> c.cost OR bool_or(l.back > l.took)
 ORDER BY r.org_id, r.day, r.event_id
"""


@dataclass
class TieOutDrift:
    org: str
    day: str
    meter: str
    feature: str
    check: str  # 'usage = monetization', 'monetization = balance' (allocated / credit), 'refund = charge'
    left: int
    right: int
    detail: str = ""


async def tie_out_drift(pg: asyncpg.Connection, org: str | None = None) -> list[TieOutDrift]:
    """Where usage, monetization and balance changes disagree per (org, day, meter, feature), and
    refunds that do not tie to their charge (see TIE_OUT and REFUND_TIE_OUT)."""
    where, args = ("", []) if org is None else ("AND e.org_id = $1", [org])
    out: list[TieOutDrift] = []
    async with pg.transaction(isolation="repeatable_read", readonly=True):
        for x in await pg.fetch(TIE_OUT.format(where=where), *args):
            at = (x["org_id"], str(x["day"]), x["meter"], x["feature"])
            if x["usage"] != x["charged"]:
                out.append(TieOutDrift(*at, "usage = monetization", x["usage"], x["charged"],
                                       "charges' cost vs what their split took"))
            if x["split_allocated"] != x["delta_allocated"]:
                out.append(TieOutDrift(*at, "monetization = balance", x["split_allocated"], x["delta_allocated"],
                                       "split on allocated vs delta - delta_purchased"))
            if x["split_credit"] != x["delta_purchased"]:
                out.append(TieOutDrift(*at, "monetization = balance", x["split_credit"], x["delta_purchased"],
                                       "split on credit layers vs delta_purchased"))
        for x in await pg.fetch(REFUND_TIE_OUT.format(where=where), *args):
            at = (x["org_id"], str(x["day"]), x["meter"], x["feature"])
            detail = f"refund {x['event_id'].hex}"
            if x["layers_over"]:
                detail += f": back > taken on {x['layers_over']}"
            out.append(TieOutDrift(*at, "refund = charge", x["refunded_usage"], x["charged_usage"], detail))
    return out


def print_tie_out_drift(drift: list[TieOutDrift], out: Any = None) -> None:
    out = out or sys.stdout  # read at call time (a caller may have redirected it)
    for d in drift:
        out.write(f"{d.org} {d.day} {d.meter or '-'}/{d.feature or '-'}: {d.check}: {d.left} vs {d.right} "
                  f"({d.detail})\n")
    out.write(f"three records: {len({(d.org, d.day) for d in drift})} (org, day) periods where usage, "
              "monetization and balance changes disagree\n")


# One balance field set to the ledger's value, only if it still holds what reconcile read (a
# decision meanwhile changed it: read again). An absent field reads as 0, as in reconcile.
REPAIR_LUA = """
local have = tonumber(redis.call('HGET', KEYS[1], ARGV[1]) or '0')
if have ~= tonumber(ARGV[2]) then return 0 end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[3])
return 1
"""


# A meter's lots field set to the ledger's (removed: ''), only if it still holds what reconcile
# read (ARGV[2] '1': present, holding ARGV[3]), or already set (another lot of the same meter).
REPAIR_LOTS_LUA = """
local have = redis.call('HGET', KEYS[1], ARGV[1])
if (have or '') == ARGV[4] then return 1 end
if ARGV[2] == '1' then
  if have ~= ARGV[3] then return 0 end
elseif have then return 0 end
if ARGV[4] == '' then redis.call('HDEL', KEYS[1], ARGV[1]) else redis.call('HSET', KEYS[1], ARGV[1], ARGV[4]) end
return 1
"""


async def repair(r: aioredis.Redis, pg: asyncpg.Connection, layout: Layout, org: str, rounds: int = 5, *,
                 meters: Collection[str]) -> tuple[list[Drift | LotDrift], list[Drift | LotDrift]]:
    """Sets one org's drifted a/p/pt, and the lots of a meter with a drifting lot, to what the
    ledger (plus the undrained events) says, while the gateways run: each field by
    compare-and-set against what reconcile saw, then reconcile again, until clean. Returns
    (repaired, still drifting)."""
    async def check() -> list[Drift | LotDrift]:
        return (await reconcile(r, pg, layout, org, meters=meters))[0]

    async def fix(d: Drift | LotDrift) -> Any:
        key = layout.balances(d.org)
        if isinstance(d, LotDrift):
            return await r.eval(REPAIR_LOTS_LUA, 1, key, meter_field(d.meter, "lots"), "0" if d.redis_text is None
                                else "1", d.redis_text or "", d.ledger_text or "")
        return await r.eval(REPAIR_LUA, 1, key, f"{d.meter}:{d.field}", d.redis, d.ledger)

    return await until_clean(check, fix, rounds)


# --- rollups against events (migration 003) ----------------------------------------------------
# Per (org, meter) sums: the hourly rollup against usage_events from the first hour still in the
# ledger (raw events may be kept for less time than rollups), and the daily rollup and the
# running totals against the hourly rollup over all time. The trigger writes them in the event's
# transaction, so one snapshot sees both sides equal, even while the worker writes.
# Migration 005's per-org running and cumulative totals against the daily rollup: usage_running
# against its sums, and each day's last cumulative row against the daily sums to that day's end.
ROLLUP_SUMS = ("events", "calls", "tokens", "refunds", "refunded", "denied", "delta", "delta_purchased",
               "purchased_in")
_EVENT_SUMS = """count(*) AS events,
       count(*) FILTER (WHERE kind IN ('consume', 'commit')) AS calls,
       coalesce(sum(cost) FILTER (WHERE kind IN ('consume', 'commit', 'refund')), 0)::bigint AS tokens,
       count(*) FILTER (WHERE kind = 'refund') AS refunds,
       coalesce(-sum(cost) FILTER (WHERE kind = 'refund'), 0)::bigint AS refunded,
       count(*) FILTER (WHERE kind = 'denied') AS denied,
       sum(delta)::bigint AS delta, sum(delta_purchased)::bigint AS delta_purchased,
       coalesce(sum(delta_purchased) FILTER (
           WHERE delta_purchased > 0 AND kind IN ('grant', 'purchase', 'adjust')), 0)::bigint AS purchased_in"""
_ROLLUP_SUMS = ", ".join(f"sum({c})::bigint AS {c}" for c in ROLLUP_SUMS)


@dataclass
class RollupDrift:
    org: str
    meter: str
    field: str
    rollup: int
    source: int
    against: str  # what the rollup was compared with


async def rollup_drift(pg: asyncpg.Connection, org: str | None = None) -> tuple[list[RollupDrift], int]:
    """Differences between the rollups and usage_events; also returns the (org, meter) pairs checked."""
    out: list[RollupDrift] = []

    def compare(rollup: dict[tuple[str, str], Any], source: dict[tuple[str, str], Any], against: str,
                fields: tuple[str, ...]) -> None:
        for k in sorted(set(rollup) | set(source)):
            a, b = rollup.get(k), source.get(k)
            for f in fields:
                x, y = (int(a[f]) if a else 0), (int(b[f]) if b else 0)
                if x != y:
                    out.append(RollupDrift(k[0], k[1], f, x, y, against))

    def keyed(rows: list[Any]) -> dict[tuple[str, str], Any]:
        return {(r["org_id"], r["meter"]): r for r in rows}

    async with pg.transaction(isolation="repeatable_read", readonly=True):
        since = await pg.fetchval("SELECT date_trunc('hour', min(ts), 'UTC') FROM usage_events "
                                  "WHERE ($1::text IS NULL OR org_id = $1)", org)
        hourly_all = keyed(await pg.fetch(
            f"SELECT org_id, meter, {_ROLLUP_SUMS} FROM usage_hourly WHERE ($1::text IS NULL OR org_id = $1) "
            "GROUP BY 1, 2", org))
        if since is not None:
            hourly = keyed(await pg.fetch(
                f"SELECT org_id, meter, {_ROLLUP_SUMS} FROM usage_hourly "
                "WHERE ($1::text IS NULL OR org_id = $1) AND hour >= $2 GROUP BY 1, 2", org, since))
            events = keyed(await pg.fetch(
                f"SELECT org_id, coalesce(meter, '') AS meter, {_EVENT_SUMS} FROM usage_events "
                "WHERE ($1::text IS NULL OR org_id = $1) GROUP BY 1, 2", org))
            compare(hourly, events, "usage_events", ROLLUP_SUMS)
        daily = keyed(await pg.fetch(
            f"SELECT org_id, meter, {_ROLLUP_SUMS} FROM usage_daily WHERE ($1::text IS NULL OR org_id = $1) "
            "GROUP BY 1, 2", org))
        compare(daily, hourly_all, "usage_hourly", ROLLUP_SUMS)
        totals = keyed(await pg.fetch(
            """SELECT org_id, meter, allocated, purchased, purchased_total, changes FROM meter_totals
               WHERE ($1::text IS NULL OR org_id = $1)""", org))
        want = {k: {"allocated": r["delta"] - r["delta_purchased"], "purchased": r["delta_purchased"],
                    "purchased_total": r["purchased_in"], "changes": r["events"] - r["denied"]}
                for k, r in hourly_all.items() if k[1] != ""}
        compare(totals, want, "usage_hourly", ("allocated", "purchased", "purchased_total", "changes"))
        # 005's per-org totals (meter reported as "*"): usage_running against the daily sums, and
        # the first day per org whose last cumulative row disagrees with them.
        running = {(r["org_id"], "*"): r for r in await pg.fetch(
            "SELECT org_id, calls, tokens FROM usage_running WHERE ($1::text IS NULL OR org_id = $1)", org)}
        per_org: dict[tuple[str, str], dict[str, int]] = {}
        for (o, _), r in daily.items():
            t = per_org.setdefault((o, "*"), {"calls": 0, "tokens": 0, "refunds": 0})
            for f in t:
                t[f] += int(r[f])
        compare(running, {k: t for k, t in per_org.items() if t["calls"] or t["refunds"] or t["tokens"]},
                "usage_daily", ("calls", "tokens"))
        for r in await pg.fetch(
                """SELECT DISTINCT ON (d.org_id) d.org_id, d.day, d.calls, d.tokens,
                          coalesce(c.calls, 0) AS c_calls, coalesce(c.tokens, 0) AS c_tokens
                   FROM (SELECT org_id, day, sum(sum(calls)) OVER w AS calls, sum(sum(tokens)) OVER w AS tokens
                         FROM usage_daily WHERE ($1::text IS NULL OR org_id = $1)
                         GROUP BY 1, 2 WINDOW w AS (PARTITION BY org_id ORDER BY day)) d
                   LEFT JOIN LATERAL (SELECT calls, tokens FROM usage_cumulative c
                                      WHERE c.org_id = d.org_id AND c.hour < (d.day + 1)::timestamp AT TIME ZONE 'UTC'
                                      ORDER BY c.hour DESC LIMIT 1) c ON true
                   WHERE d.calls <> coalesce(c.calls, 0) OR d.tokens <> coalesce(c.tokens, 0)
                   ORDER BY d.org_id, d.day""", org):
            for f in ("calls", "tokens"):
                if r[f] != r[f"c_{f}"]:
                    out.append(RollupDrift(r["org_id"], "*", f"cumulative {f} to {r['day']}", int(r[f"c_{f}"]),
                                           int(r[f]), "usage_daily"))
    return out, len(set(hourly_all) | set(daily))


def print_rollup_drift(drift: list[RollupDrift], pairs: int, out: Any = sys.stdout) -> None:
    if drift:
        out.write(f"{'org':<20}  {'meter':<18}  {'field':<16}  {'rollup':>14}  {'source':>14}  against\n")
        for d in drift:
            out.write(f"{d.org:<20}  {d.meter or '-':<18}  {d.field:<16}  {d.rollup:>14}  {d.source:>14}  "
                      f"{d.against}\n")
    out.write(f"rollups: {pairs} (org, meter) pairs checked against the events, "
              f"{len({(d.org, d.meter) for d in drift})} differ\n")


def shown_lot(lot: lots.Lot | None) -> str:
    return "(absent)" if lot is None else lot.shown()


def print_drift(every: list[Drift | LotDrift], stats: dict[str, int], out: Any = sys.stdout) -> None:
    drift = [d for d in every if isinstance(d, Drift)]
    lot_drift = [d for d in every if isinstance(d, LotDrift)]
    w = max([len("org")] + [len(d.org) for d in drift])
    wm = max([len("meter")] + [len(d.meter) for d in drift])
    if drift:
        out.write(f"{'org':<{w}}  {'meter':<{wm}}  field  {'redis':>14}  {'ledger':>14}  {'redis-ledger':>14}\n")
        for d in drift:
            out.write(f"{d.org:<{w}}  {d.meter:<{wm}}  {d.field:<5}  {d.redis:>14}  {d.ledger:>14}  "
                      f"{d.redis - d.ledger:>14}\n")
    pairs = len({(d.org, d.meter) for d in drift})
    out.write(f"{stats['pairs']} (org, meter) balances checked, {pairs} differ; {stats['undrained']} events not yet "
              f"drained were counted; {stats['dead_letters']} dead letters\n")
    for x in lot_drift:
        out.write(f"{x.org} {x.meter} lot {x.lot}: redis {shown_lot(x.redis)} vs ledger {shown_lot(x.ledger)}\n")
    out.write(f"lots: {stats['lots']} credit lots checked against the ledger, {len(lot_drift)} differ\n")
    if every and stats["dead_letters"]:
        out.write("dead letters are balance changes missing from the ledger: see the <stream>:dead streams\n")


async def _connect(redis_url: str, database_url: str) -> tuple[aioredis.Redis, asyncpg.Connection]:
    return await cluster.connect(redis_url), await asyncpg.connect(database_url)


async def rebuild_main(redis_url: str, database_url: str, config: Config, layout: Layout, force: bool = False) -> int:
    r, pg = await _connect(redis_url, database_url)
    try:
        if not force:
            existing = await state_keys(r, layout)
            if existing:
                print(f"quota-gw rebuild: Redis already holds state for prefix {layout.prefix!r} (e.g. {existing[0]}); "
                      "rebuild restores into an empty Redis. Stop the gateway, then rerun with --force to "
                      "overwrite.", file=sys.stderr)
                return 2
            left = await undrained(r, pg, layout)
            if left:
                print(f"quota-gw rebuild: {len(left)} events in the streams are not in Postgres yet; run "
                      "`quota-gw worker` until they drain (or --force to rebuild without them).", file=sys.stderr)
                return 2
        t0 = time.monotonic()
        rep = await rebuild(r, pg, config, layout)
        print(f"rebuilt prefix {layout.prefix!r} in {time.monotonic() - t0:.1f}s: {rep.orgs} orgs, {rep.balances} "
              f"balances, {rep.users} users, {rep.quotas} sub-quotas, {rep.keys} keys ({rep.revoked} revoked), "
              f"{rep.refund_guards} refund guards, {rep.entitlements} entitlements, {rep.lots} credit lots; open "
              "reservations were released")
        if rep.lots_lapsed:
            print(f"quota-gw rebuild: {rep.lots_lapsed} of the credit lots are past their expiry with no expire event "
                  "yet; no reader counts them, and the next decision on their meter records their lapse")
        if rep.config_removed:
            print(f"quota-gw rebuild: {rep.config_removed} configuration fields Postgres does not have were removed "
                  "from Redis (users, sub-quota limits, orgs)")
        if rep.config_set:
            print(f"quota-gw rebuild: {rep.config_set} more configuration fields were set as Postgres says")
        return 0
    finally:
        await r.aclose()
        await pg.close()


async def repair_main(redis_url: str, database_url: str, layout: Layout, org: str,
                      meters: Collection[str]) -> int:
    r, pg = await _connect(redis_url, database_url)
    try:
        fixed, left = await repair(r, pg, layout, org, meters=meters)
        for d in fixed:
            if isinstance(d, LotDrift):
                print(f"repaired {d.org} {d.meter} lots: lot {d.lot} {shown_lot(d.redis)} -> {shown_lot(d.ledger)}")
            else:
                print(f"repaired {d.org} {d.meter} {d.field}: {d.redis} -> {d.ledger} "
                      f"(redis-ledger was {d.redis - d.ledger})")
        print(f"{len(fixed)} balance fields of org {org} set from the ledger; {len(left)} still differ")
        config_fixed, config_left = await repair_config(r, pg, layout, org)
        for c in config_fixed:
            print(f"repaired {c.org} config {c.what}: {shown(c.redis)} -> {shown(c.postgres)}")
        print(f"{len(config_fixed)} configuration fields of org {org} set from Postgres; {len(config_left)} still differ")
        return 1 if left or config_left else 0
    finally:
        await r.aclose()
        await pg.close()


async def reconcile_main(redis_url: str, database_url: str, config: Config, layout: Layout,
                         org: str | None = None) -> int:
    r, pg = await _connect(redis_url, database_url)
    try:
        drift, stats = await reconcile(r, pg, layout, org, meters=config.meter_names)
        print_drift(drift, stats)
        rollups, pairs = await rollup_drift(pg, org)
        print_rollup_drift(rollups, pairs)
        splits = await split_drift(pg, org)
        print_split_drift(splits)
        ties = await tie_out_drift(pg, org)
        print_tie_out_drift(ties)
        configs, orgs = await config_drift(r, pg, layout, org)
        print_config_drift(configs, orgs)
        return 1 if drift or rollups or splits or ties or configs else 0
    finally:
        await r.aclose()
        await pg.close()

