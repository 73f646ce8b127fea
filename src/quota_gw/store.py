"""The store: orgs, users, keys, sub-quotas, grants, webhooks, purchases and the ledger's reads,
for the routes. Route handlers check what they were sent and shape what they answer; what is
read and written, and in which order, is here. The SQL is named in queries.sql.

The write rule, in one place (`_postgres_then_redis`): Postgres is written first, in one
transaction, and is the source of truth; Redis is written after it committed. So a crash or a
Redis failure in between leaves Redis behind, never ahead: the change stays in Postgres, the
Redis error goes up to the caller (a route answers 503 `unavailable`; a retry of a create finds
it made: 409), the gateway reads a key it misses through to Postgres (auth.KeyStore), and
`quota-gw rebuild` rewrites Redis from Postgres. Grants are not Postgres writes: the grant
script changes the balance and records the event, which the sync worker drains to the ledger.

"Usage" (what calls were priced at: consume and commit add their cost, a refund subtracts it) is
defined once, by migration 003's rollups; the ledger reads below go through its views and its
`qgw_usage_since`, never restating it.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import date, datetime
from typing import Any, TypeVar

import asyncpg

from .auth import hash_key, new_key
from .db import Database
from .decisions import Decider, Decision
from .entitlements import canonical
from .layout import SUB_QUOTAS, USER_WRITE_LUA, quota_field, quota_subject, user_field, user_key_field
from .problems import Problem
from .queries import Q

T = TypeVar("T")


async def record_low_balance_mark(pg: asyncpg.Pool | asyncpg.Connection, percent: int) -> None:
    """The config's low-balance mark, where the `low_balances` view reads it (migration 006)."""
    await pg.execute(Q.record_low_balance_mark, percent)


def sub_quota_field(scope: str, subject: str, meter: str) -> str:
    """A user's or team's cap in the org's quotas hash (read by lua/_lib.lua and recovery.py)."""
    return quota_field(quota_subject(scope, subject), meter, "limit")


# A sub-quota limit set (ARGV[2] its limit) or removed (ARGV[2] ''), and the balance hash's
# SUB_QUOTAS mark removed in the same script: a consume never reads a '0' made before it.
# KEYS: quotas, balances (the org's, one slot); ARGV: the field, the limit.
SUB_QUOTA_WRITE_LUA = """
if ARGV[2] == '' then
  redis.call('HDEL', KEYS[1], ARGV[1])
else
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
end
redis.call('HDEL', KEYS[2], '%s')
return 1
""" % SUB_QUOTAS


class Store:
    def __init__(self, db: Database, decider: Decider) -> None:
        self.db, self.decider = db, decider
        self.redis, self.layout = decider.redis, decider.layout

    async def _postgres_then_redis(self, write: Callable[[asyncpg.Connection], Awaitable[T]],
                                   apply: Callable[[T], Awaitable[Any]]) -> T:
        """`write` in one Postgres transaction; once it committed, `apply` its result to Redis.
        An error in `write` changes nothing; an error in `apply` leaves Postgres written and
        Redis behind (see the module's docstring) and is raised as it came."""
        async with self.db.transaction() as conn:
            result = await write(conn)
        await apply(result)
        return result

    # Orgs

    async def org_exists(self, org_id: str) -> bool:
        return bool(await self.db.fetchval(Q.org_exists, org_id))

    async def require_org(self, org_id: str) -> None:
        if not await self.org_exists(org_id):
            raise Problem(404, "not_found", f"no org {org_id}")

    async def org_plan(self, org_id: str) -> str | None:
        return await self.db.fetchval(Q.org_plan, org_id)

    async def list_orgs(self, after: str | None, limit: int) -> list[asyncpg.Record]:
        return await self.db.fetch(Q.list_orgs, after, limit)

    async def create_org(self, org_id: str, name: str | None, plan: str) -> None:
        """Raises 409 when the org exists."""

        async def write(conn: asyncpg.Connection) -> None:
            try:
                await conn.execute(Q.insert_org, org_id, name, plan)
            except asyncpg.UniqueViolationError:
                raise Problem(409, "conflict", f"org {org_id} exists") from None

        async def apply(_: None) -> None:
            await self.redis.hset(self.layout.org(org_id), mapping={"plan": plan, "name": name or ""})

        await self._postgres_then_redis(write, apply)

    async def set_plan(self, org_id: str, plan: str) -> None:
        """Raises 404 when there is no such org. The next decision sees the new allocation (an
        `adjust` event) once the processes' caches expire (≤ 1 s)."""

        async def write(conn: asyncpg.Connection) -> None:
            if await conn.fetchval(Q.update_org_plan, org_id, plan) is None:
                raise Problem(404, "not_found", f"no org {org_id}")

        async def apply(_: None) -> None:
            await self.redis.hset(self.layout.org(org_id), "plan", plan)

        await self._postgres_then_redis(write, apply)

    # Entitlements (migration 009; entitlements.py)

    async def entitlements(self, org_id: str) -> tuple[str, str]:
        """(plan, entitlements text, '' none); 404 when there is no such org."""
        row = await self.db.fetchrow(Q.org_entitlements, org_id)
        if row is None:
            raise Problem(404, "not_found", f"no org {org_id}")
        return row["plan"], canonical(row["entitlements"])

    async def set_entitlements(self, org_id: str, text: str) -> str:
        """Replaces the org's override with `text` (canonical; '' removes it); returns its plan.
        404 when there is no such org. Other processes see it once their key caches expire (≤ 1 s)."""

        async def write(conn: asyncpg.Connection) -> str:
            plan = await conn.fetchval(Q.org_plan, org_id)
            if plan is None:
                raise Problem(404, "not_found", f"no org {org_id}")
            if text:
                await conn.execute(Q.upsert_entitlements, org_id, text)
            else:
                await conn.execute(Q.delete_entitlements, org_id)
            return plan

        async def apply(_: str) -> None:
            if text:
                await self.redis.hset(self.layout.org(org_id), "entitlements", text)
            else:
                await self.redis.hdel(self.layout.org(org_id), "entitlements")

        return await self._postgres_then_redis(write, apply)

    # Users

    async def put_user(self, org_id: str, user_id: str, team: str | None) -> bool:
        """Adds the user or replaces their team; True when the user existed."""

        async def write(conn: asyncpg.Connection) -> bool:
            return bool(await conn.fetchval(Q.upsert_user, org_id, user_id, team))

        async def apply(_: bool) -> None:
            await self.redis.eval(USER_WRITE_LUA + "return 1", 1, self.layout.balances(org_id), user_key_field(user_id),
                                  user_field(user_id, "team"), team or "")

        await self.require_org(org_id)
        return await self._postgres_then_redis(write, apply)

    # Keys

    async def create_key(self, org_id: str, user_id: str | None, scopes: list[str]) -> tuple[str, str]:
        """(key_id, key): the key is shown this once; Postgres and Redis hold its hash."""
        key_id, key = new_key()
        h = hash_key(key)

        async def write(conn: asyncpg.Connection) -> None:
            await conn.execute(Q.insert_key, key_id, org_id, user_id, h, key[:8], scopes)

        async def apply(_: None) -> None:
            await self.redis.hset(self.layout.api_key(h), mapping={
                "key_id": key_id, "org": org_id, "user": user_id or "", "scopes": ",".join(scopes)})

        await self.require_org(org_id)
        await self._postgres_then_redis(write, apply)
        return key_id, key

    async def list_keys(self, org_id: str) -> list[asyncpg.Record]:
        await self.require_org(org_id)
        return await self.db.fetch(Q.list_keys, org_id)

    async def revoke_key(self, key_id: str) -> None:
        """Raises 404 when there is no such key; revoking twice is revoking once."""

        async def write(conn: asyncpg.Connection) -> str:
            h = await conn.fetchval(Q.revoke_key, key_id)
            if h is None:
                raise Problem(404, "not_found", f"no key {key_id}")
            return h

        async def apply(h: str) -> None:
            # A tombstone, not a delete: a replica reading through from Postgres must not resurrect it.
            await self.redis.hset(self.layout.api_key(h), "revoked", "1")

        await self._postgres_then_redis(write, apply)

    # Sub-quotas

    async def set_sub_quota(self, org_id: str, meter: str, scope: str, subject: str, limit: int | None) -> None:
        """A user's or team's cap per period on a meter; None removes it."""
        field = sub_quota_field(scope, subject, meter)

        async def write(conn: asyncpg.Connection) -> None:
            if limit is None:
                await conn.execute(Q.delete_sub_quota, org_id, meter, scope, subject)
            else:
                await conn.execute(Q.upsert_sub_quota, org_id, meter, scope, subject, limit)

        async def apply(_: None) -> None:
            await self.redis.eval(SUB_QUOTA_WRITE_LUA, 2, self.layout.quotas(org_id), self.layout.balances(org_id),
                                  field, "" if limit is None else limit)

        await self.require_org(org_id)
        await self._postgres_then_redis(write, apply)

    # Grants: the grant script is the write (Redis, then the ledger through the worker)

    async def grant(self, org_id: str, meter: str, amount: int, reason: str, idem: str | None,
                    expires: int | None) -> Decision:
        await self.require_org(org_id)
        return await self.decider.grant(org_id, meter, amount, "grant", {"reason": reason}, idem,
                                        expires=str(expires) if expires else "")

    # Webhooks

    async def set_webhook(self, org_id: str, url: str, secret: str) -> None:
        await self.require_org(org_id)
        await self.db.execute(Q.upsert_webhook, org_id, url, secret)

    async def webhook_deliveries(self, org_id: str, limit: int) -> list[asyncpg.Record]:
        await self.require_org(org_id)
        return await self.db.fetch(Q.webhook_deliveries, org_id, limit)

    # The ledger's reads (the views of migrations 002/003)

    async def usage_events(self, org_id: str, *, feature: str | None = None, meter: str | None = None,
                           kind: str | None = None, user_id: str | None = None, since: datetime | None = None,
                           until: datetime | None = None, before: tuple[datetime, str] | None = None,
                           limit: int) -> list[asyncpg.Record]:
        """The org's events newest first, at most `limit`, those before the keyset `before`
        ((ts, event id hex) of the last row a page returned). Only the filters given go into the
        statement, so each variant plans on the (org_id, ts) index."""
        args: list[Any] = [org_id]
        where = ["org_id = $1"]
        for col, val in (("feature", feature), ("meter", meter), ("kind", kind), ("user_id", user_id)):
            if val is not None:
                args.append(val)
                where.append(f"{col} = ${len(args)}")
        if since:
            args.append(since)
            where.append(f"ts >= ${len(args)}")
        if until:
            args.append(until)
            where.append(f"ts < ${len(args)}")
        if before:
            args += [before[0], before[1]]
            where.append(f"(ts, event_id) < (${len(args) - 1}, ${len(args)}::uuid)")
        args.append(limit)
        return await self.db.fetch(Q.usage_events.format(where=" AND ".join(where), limit=len(args)), *args)

    async def usage_by_day(self, org_id: str, first_day: date) -> list[asyncpg.Record]:
        """Rows of `usage_by_feature_day` from `first_day` on."""
        return await self.db.fetch(Q.usage_by_day, org_id, first_day)

    async def spend_by_layer(self, org_id: str, since: datetime) -> list[asyncpg.Record]:
        """(meter, layer, tokens): what the org's charges took from each layer since `since`, net of refunds."""
        return await self.db.fetch(Q.spend_by_layer, org_id, since)

    async def usage_by_meter_since(self, org_id: str, since: datetime) -> dict[str, int]:
        return {r["meter"]: r["tokens"] for r in await self.db.fetch(Q.usage_by_meter_since, org_id, since)}

    async def top_orgs(self, days: int, limit: int, meter: str | None) -> list[asyncpg.Record]:
        if meter is None:
            return await self.db.fetch(Q.top_orgs_all_meters, days, limit)
        return await self.db.fetch(Q.top_orgs_one_meter, days, limit, meter)
