"""Configuration drift: what the gateway reads of an org from Redis against Postgres, its source
of truth (`quota-gw reconcile`), and the repair of it (`quota-gw rebuild`, `--org`).

Compared per org: the org hash's `plan` and `entitlements` (the canonical text of the override,
migration 009; absent = none), each user and its team in the balance hash (a user is registered
by its field `@<user>`, whose value is its rate window, state, not configuration; its team is the
field `@<user>:t`, absent or '' none; the meters' and the org's fields beside them are not read)
and each sub-quota's limit in the quotas hash. A repair writes or removes only what drifted: a
team is set or removed, a missing user registered (`@<user>` only where absent: a window a
decision wrote stays), a user Postgres does not have removed with all its fields. The admin
store writes Postgres first, then Redis: a Redis write that failed (the admin got 503) leaves
Redis behind until a rebuild, and this is where it shows.

Read order, as for the balances: Redis, then the streams, then Postgres in one snapshot. A user
the gateway registered on first use (auto_register_users) is in Postgres only through the
ledger, and its registration and event are one script, so a user Redis holds is by then either
in the ledger or in a stream. An admin write landing between the Redis and the Postgres reads
shows as drift once; what is still there on the next run is real.
"""

from __future__ import annotations

import sys
from collections import defaultdict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar, cast

import asyncpg
import orjson
import redis.asyncio as aioredis

from quota_gw.entitlements import canonical
from quota_gw.layout import (QUOTA_FIELDS, SUB_QUOTAS, USER_FIELDS, USER_WRITE_LUA, Layout, quota_field, quota_subject,
                             user_field, user_key_field, user_of_field)
from quota_gw.redis_text import text_hash

T = TypeVar("T")

# Users Postgres knows, as rebuild writes them (recovery.USERS): the users table, plus users
# registered on first use, who appear only in the ledger. {where}: all orgs (then no filter: an
# org_id = ANY(every org) test per ledger row cost more than the rest of the check), or one.
# The ledger's users are grouped before the anti-join (fewer rows to probe; bench/reconcile_config.py).
USERS = """
SELECT org_id, user_id, coalesce(team, '') AS team FROM users WHERE true {where}
UNION ALL
SELECT org_id, user_id, '' FROM (
    SELECT org_id, user_id FROM usage_events
    WHERE user_id IS NOT NULL AND NOT (kind = 'denied' AND metadata ->> 'code' = 'forbidden') {where}
    GROUP BY 1, 2) e
WHERE NOT EXISTS (SELECT 1 FROM users u WHERE u.org_id = e.org_id AND u.user_id = e.user_id)
"""

ORGS = """SELECT o.org_id, o.plan, e.entitlements::text AS entitlements FROM orgs o
          LEFT JOIN org_entitlements e USING (org_id) WHERE true {where}"""

QUOTAS = "SELECT org_id, meter, scope, subject, quota FROM sub_quotas WHERE true {where}"

_LIMIT = ":" + QUOTA_FIELDS["limit"]

BALANCE_SCAN_COUNT = 1000  # fields an HSCAN of a balance hash asks for at a time


@dataclass
class ConfigDrift:
    org: str
    what: str  # 'plan', 'entitlements', 'team <user>', 'quota <quotas hash field>'
    key: str  # the Redis hash, and its field (a team's: the balance hash, '@<user>')
    field: str
    redis: str | None  # None: absent (a team's: the user is not registered; '' registered, no team)
    postgres: str | None  # None: Postgres has none (the Redis field should be absent)


async def _redis_orgs(r: aioredis.Redis, layout: Layout) -> set[str]:
    """Orgs that have an org, balance or quotas hash under the prefix: one SCAN pass."""
    glob = "".join("\\" + c if c in "*?[]\\" else c for c in layout.prefix)
    tags = set(layout.shard_tags())
    org_head = f"{layout.prefix}:org:"
    out: set[str] = set()
    async for k in r.scan_iter(match=f"{glob}:*", count=5000):
        if k.startswith(org_head):
            out.add(k[len(org_head):])
            continue
        tag, sep, rest = k.partition("}:")
        kind, _, org = rest.partition(":")
        if sep and kind in ("b", "q") and tag + "}" in tags and org:
            out.add(org)
    return out


def _stream_users(entries: list[dict[str, str]], orgs: set[str]) -> set[tuple[str, str]]:
    """(org, user) of events not drained yet that registered their user (a refusal of an unknown
    user, code 'forbidden', registered nobody)."""
    out = set()
    for f in entries:
        org, user = f.get("org", ""), f.get("user", "")
        if not user or org not in orgs:
            continue
        if f.get("kind") == "denied":
            try:
                meta = orjson.loads(f.get("meta") or "{}")
            except orjson.JSONDecodeError:
                meta = {}
            if isinstance(meta, dict) and meta.get("code") == "forbidden":
                continue
        out.add((org, user))
    return out


async def config_drift(r: aioredis.Redis, pg: asyncpg.Connection, layout: Layout,
                       org: str | None = None) -> tuple[list[ConfigDrift], int]:
    """Differences between Redis and Postgres in the orgs' configuration (see the module doc);
    also returns how many orgs were checked. Reads only."""
    from .recovery import not_in_ledger, stream_entries  # recovery imports this module

    if org is not None:
        orgs = [org]
    else:
        known = {x["org_id"] for x in await pg.fetch("SELECT org_id FROM orgs")}
        orgs = sorted(known | await _redis_orgs(r, layout))
    # 1. Redis: each org's three hashes. Its users are in the balance hash, which an org with many
    #    users makes large: read by HSCAN, 1,000 fields a command (an HGETALL of 200,000 users
    #    held Redis ~0.4 s); a small hash comes whole in the first (one round trip per 500 orgs).
    have: dict[str, list[dict[str, str]]] = {}
    for i in range(0, len(orgs), 500):
        chunk = orgs[i:i + 500]
        async with r.pipeline(transaction=False) as p:
            for o in chunk:
                p.hgetall(layout.org(o))
                p.hscan(layout.balances(o), 0, count=BALANCE_SCAN_COUNT)
                p.hgetall(layout.quotas(o))
            res = await p.execute()
        for j, o in enumerate(chunk):
            org_hash, (cursor, balance), quotas = res[3 * j:3 * j + 3]
            balance = text_hash(balance)
            while int(cursor):
                cursor, more = await r.hscan(layout.balances(o), cursor, count=BALANCE_SCAN_COUNT)
                balance.update(text_hash(cast("dict[bytes | str, bytes | str]", more)))
            have[o] = [org_hash, balance, quotas]
    # 2. The streams, 3. Postgres in one snapshot (the undrained entries checked in it too).
    wanted = set(orgs)
    entries = [f for f in await stream_entries(r, layout) if f.get("org") in wanted]
    async with pg.transaction(isolation="repeatable_read", readonly=True):
        pending = await not_in_ledger(pg, entries)
        where, args = ("", []) if org is None else ("AND org_id = $1", [org])
        pg_orgs = {x["org_id"]: x for x in await pg.fetch(ORGS.format(where=where), *args)}
        pg_users: dict[str, dict[str, str]] = defaultdict(dict)
        for u in await pg.fetch(USERS.format(where=where), *args):
            pg_users[u["org_id"]][u["user_id"]] = u["team"]
        pg_quotas: dict[str, dict[str, str]] = defaultdict(dict)
        for q in await pg.fetch(QUOTAS.format(where=where), *args):
            field = quota_field(quota_subject(q["scope"], q["subject"]), q["meter"], "limit")
            pg_quotas[q["org_id"]][field] = str(q["quota"])
    for o, u in _stream_users(pending, wanted):
        pg_users[o].setdefault(u, "")

    out: list[ConfigDrift] = []
    for o in orgs:
        org_hash, balances, quotas = have[o]
        row = pg_orgs.get(o)
        okey = layout.org(o)
        want_plan = row["plan"] if row else None
        if org_hash.get("plan") != want_plan:
            out.append(ConfigDrift(o, "plan", okey, "plan", org_hash.get("plan"), want_plan))
        # Redis holds no field for no override; Postgres no row.
        want_ents = (canonical(row["entitlements"]) or None) if row else None
        if org_hash.get("entitlements") != want_ents:
            out.append(ConfigDrift(o, "entitlements", okey, "entitlements", org_hash.get("entitlements"), want_ents))
        bkey = layout.balances(o)
        # A registered user ('@<user>', whatever its rate window) and its team ('@<user>:t', '' none).
        teams = {u: balances.get(user_field(u, "team"), "") for k in balances if (u := user_of_field(k)) is not None}
        want_teams = pg_users.get(o, {})
        for user in sorted(set(teams) | set(want_teams)):
            if teams.get(user) != want_teams.get(user):
                out.append(ConfigDrift(o, f"team {user}", bkey, user_key_field(user), teams.get(user),
                                       want_teams.get(user)))
        qkey = layout.quotas(o)
        limits = {k: v for k, v in quotas.items() if k.endswith(_LIMIT)}
        want_limits = pg_quotas.get(o, {})
        for field in sorted(set(limits) | set(want_limits)):
            if limits.get(field) != want_limits.get(field):
                out.append(ConfigDrift(o, f"quota {field}", qkey, field, limits.get(field), want_limits.get(field)))
    return out, len(orgs)


def shown(v: str | None) -> str:
    return "(absent)" if v is None else f"'{v}'"


def print_config_drift(drift: list[ConfigDrift], orgs: int, out: Any = None) -> None:
    out = out or sys.stdout  # read at call time (a caller may have redirected it)
    for d in drift:
        out.write(f"{d.org} config {d.what}: redis {shown(d.redis)} vs postgres {shown(d.postgres)}\n")
    out.write(f"config: {orgs} orgs' plan, entitlements, user teams and sub-quota limits checked against "
              f"Postgres, {len({d.org for d in drift})} differ\n")
    if drift:
        out.write("config drift is Redis behind Postgres (a Redis write that failed after Postgres committed; "
                  "`quota-gw rebuild --org ORG` sets it), or an admin change made during the check (run again)\n")


# One field set to Postgres's value (or removed), only if it still holds what the check read: an
# admin write meanwhile wrote both stores and wins. ARGV: field, 1 if it was present, what it
# held, 1 to set (else remove), the value to set. A sub-quota limit's: KEYS[2], the org's balance
# hash, loses its SUB_QUOTAS mark in the same script.
CONFIG_REPAIR_LUA = """
local have = redis.call('HGET', KEYS[1], ARGV[1])
if ARGV[2] == '1' then
  if have ~= ARGV[3] then return 0 end
elseif have then return 0 end
if ARGV[4] == '1' then
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[5])
else
  redis.call('HDEL', KEYS[1], ARGV[1])
end
if KEYS[2] then redis.call('HDEL', KEYS[2], '%s') end
return 1
""" % SUB_QUOTAS

# A user of the balance hash KEYS[1] set as Postgres has it, only if it is still as the check read
# it (registered or not; if registered, its team): an admin write or a registration on first use
# meanwhile wins (a decision's new rate window is no change: the window is not compared). ARGV:
# '@<user>', '@<user>:t', the team to set ('' none), 1 if it was registered, the team it had
# ('' none), 1 to register (layout.USER_WRITE_LUA: never overwriting '@<user>', which holds the
# rate window) else remove, then the user's other fields, removed with it.
USER_REPAIR_LUA = """
local registered = redis.call('HEXISTS', KEYS[1], ARGV[1]) == 1
if registered ~= (ARGV[4] == '1') then return 0 end
if registered and (redis.call('HGET', KEYS[1], ARGV[2]) or '') ~= ARGV[5] then return 0 end
if ARGV[6] ~= '1' then
  redis.call('HDEL', KEYS[1], ARGV[1], unpack(ARGV, 7))
  return 1
end
""" + USER_WRITE_LUA + "return 1"


async def set_from_postgres(r: aioredis.Redis, layout: Layout, d: ConfigDrift) -> bool:
    """One drifting field (or user) set as Postgres says, compare-and-set against what the check read."""
    user = user_of_field(d.field) if d.what.startswith("team ") else None
    if user is not None:
        return bool(await r.eval(USER_REPAIR_LUA, 1, d.key, d.field, user_field(user, "team"), d.postgres or "",
                                 int(d.redis is not None), d.redis or "", int(d.postgres is not None),
                                 *[user_field(user, s) for s in USER_FIELDS]))
    keys = [d.key, layout.balances(d.org)] if d.what.startswith("quota ") else [d.key]
    return bool(await r.eval(CONFIG_REPAIR_LUA, len(keys), *keys, d.field, int(d.redis is not None), d.redis or "",
                             int(d.postgres is not None), d.postgres or ""))


async def until_clean(check: Callable[[], Awaitable[list[T]]], fix: Callable[[T], Awaitable[Any]],
                      rounds: int) -> tuple[list[T], list[T]]:
    """The repair loop of `rebuild --org` while gateways run: fix each drift found (a fix that
    finds the field changed since the check does nothing), check again, until clean or `rounds`.
    Returns (fixed, still drifting). Balances (recovery.repair) and configuration use it."""
    fixed: list[T] = []
    drift: list[T] = []
    for _ in range(rounds):
        drift = await check()
        if not drift:
            break
        for d in drift:
            if await fix(d):
                fixed.append(d)
    return fixed, drift


async def repair_config(r: aioredis.Redis, pg: asyncpg.Connection, layout: Layout, org: str | None = None,
                        rounds: int = 5) -> tuple[list[ConfigDrift], list[ConfigDrift]]:
    """Sets the drifting configuration of one org (or every org) from Postgres, while the
    gateways run, then checks again, until clean. Returns (repaired, still drifting)."""
    async def check() -> list[ConfigDrift]:
        return (await config_drift(r, pg, layout, org))[0]

    return await until_clean(check, lambda d: set_from_postgres(r, layout, d), rounds)
