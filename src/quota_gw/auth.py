"""API keys: minted once, stored hashed, resolved through Redis with a short in-process cache.

The cache lives at most `behaviour.key_cache_s` (≤ 1 s), so a revocation reaches every
replica within a second without a Redis round trip on every request. When an entry expires,
the requests that miss while it is being read again wait for that one read rather than each
reading it (they all did: at a saturated gateway, ~50 extra reads a second instead of one).
Postgres is the source of truth; a key missing from Redis (say, after a flush) is read from
Postgres and written back with HSETNX, so a concurrent revocation's tombstone always wins.
While Postgres is down, such a key is 503 `unavailable` (it cannot be told from an unknown one).
While Redis is down, a fail-open proxy route still needs the caller's identity: KeyStore reads
key and plan from Postgres alone (`authenticate_from_postgres`), uncached and not written back.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import os
import secrets
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from redis.asyncio import Redis
from starlette.requests import Request

from . import entitlements, links, metrics
from .db import Database
from .decisions import Identity
from .layout import Layout
from .problems import Problem, unavailable
from .redis_text import text, text_hash

KEY_PREFIX = "qgw_"
T = TypeVar("T")


def new_key() -> tuple[str, str]:
    """Returns (key_id, key). The key is shown once; only its hash is kept."""
    return "key_" + secrets.token_hex(8), KEY_PREFIX + secrets.token_urlsafe(30)


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def bearer(request: Request) -> str | None:
    return bearer_token(request.headers.get("authorization"))


def bearer_token(h: str | None) -> str | None:
    """The key of an `Authorization: Bearer <key>` header's value (None: absent or not a bearer)."""
    if not h or not h[:7].lower() == "bearer ":
        return None
    return h[7:].strip() or None


def missing_key() -> Problem:
    return Problem(401, "unauthorized", "missing bearer API key (Authorization: Bearer qgw_...)",
                   headers={"WWW-Authenticate": "Bearer"})


def unknown_key() -> Problem:
    return Problem(401, "unauthorized", "unknown or revoked API key", headers={"WWW-Authenticate": "Bearer"})


def lacks_scope(scope: str) -> Problem:
    return Problem(403, "forbidden", f"this key lacks the {scope!r} scope")


KEY_CACHE_HIT, KEY_CACHE_MISS = metrics.KEY_CACHE.labels("hit"), metrics.KEY_CACHE.labels("miss")


class KeyStore:
    def __init__(self, redis: Redis, layout: Layout, db: Database | None, ttl: float = 1.0) -> None:
        self.redis, self.layout, self.db, self.ttl = redis, layout, db, ttl
        self._keys: dict[str, tuple[Identity | None, float]] = {}
        # org -> ((plan, entitlements text) | None: no such org, expiry)
        self._plans: dict[str, tuple[tuple[str, str] | None, float]] = {}
        self._loading: dict[tuple[str, str], asyncio.Task[Any]] = {}

    def cached(self, key: str | None, scope: str) -> Identity | None:
        """What `authenticate_key` answers when the cache holds the key, live and with `scope`,
        without a coroutine (every authorize call asks; three awaits cost as much as the lookup
        itself). None: ask `authenticate_key` (it counts the lookup then, hit or miss)."""
        hit = self._keys.get(key) if key is not None else None  # (never a dashboard link: not cached here)
        if hit is None or hit[0] is None or hit[1] <= time.monotonic() or scope not in hit[0].scopes:
            return None
        metrics.count(KEY_CACHE_HIT)
        return hit[0]

    async def resolve(self, key: str) -> Identity | None:
        hit = self._keys.get(key)
        if hit is not None and hit[1] > time.monotonic():
            metrics.count(KEY_CACHE_HIT)
            return hit[0]
        metrics.count(KEY_CACHE_MISS)
        return await self._once(("key", key), self._reload_key, key)

    async def _reload_key(self, key: str) -> Identity | None:
        now = time.monotonic()
        ident = await self._load(key)
        if len(self._keys) > 100_000:
            self._keys.clear()
        self._keys[key] = (ident, now + self.ttl)
        return ident

    async def _once(self, name: tuple[str, str], load: Callable[[str], Awaitable[T]], arg: str) -> T:
        """One read per expired entry: whoever misses while it is in flight waits for it (a
        read started less than a round trip ago, well inside the cache's own ≤ 1 s). A caller
        that gives up (a client gone) does not cancel it for the others."""
        if self.ttl <= 0:  # no cache: every call reads
            return await load(arg)
        task = self._loading.get(name)
        if task is None or task.get_loop() is not asyncio.get_running_loop():
            task = asyncio.ensure_future(load(arg))
            self._loading[name] = task

            def done(t: asyncio.Task[Any]) -> None:
                if self._loading.get(name) is t:
                    del self._loading[name]
                if not t.cancelled():
                    t.exception()  # retrieved here: the waiters re-raise it

            task.add_done_callback(done)
        return await asyncio.shield(task)

    async def _load(self, key: str) -> Identity | None:
        if not key.startswith(KEY_PREFIX) or len(key) > 200:
            return None
        h = hash_key(key)
        rec = text_hash(await self.redis.hgetall(self.layout.api_key(h)))
        if not rec and self.db is not None:
            rec = await self._from_postgres(h)
        if not rec or rec.get("revoked") == "1":
            return None
        terms = await self.org_terms(rec["org"])
        if terms is None:
            return None
        return Identity(rec["key_id"], rec["org"], rec.get("user") or None,
                        frozenset(rec.get("scopes", "").split(",")), *terms)

    async def _from_postgres(self, h: str) -> dict[str, str]:
        assert self.db is not None  # _load asks only when there is a ledger
        row = await self.db.fetchrow(
            "SELECT key_id, org_id, user_id, scopes, revoked_at FROM api_keys WHERE key_hash = $1", h)
        if row is None:
            return {}
        rec = {"key_id": row["key_id"], "org": row["org_id"], "user": row["user_id"] or "",
               "scopes": ",".join(row["scopes"])}
        if row["revoked_at"] is not None:
            rec["revoked"] = "1"
        k = self.layout.api_key(h)
        async with self.redis.pipeline(transaction=False) as p:
            for f, v in rec.items():
                p.hsetnx(k, f, v)
            await p.execute()
        return rec

    async def plan(self, org_id: str) -> str | None:
        """The org's plan name (None: no such org), cached like keys."""
        terms = await self.org_terms(org_id)
        return terms[0] if terms else None

    async def org_terms(self, org_id: str) -> tuple[str, str] | None:
        """The org's plan and entitlements text (entitlements.py; '' none), cached like keys: both
        come from the org's hash in one read, so an override costs a decision nothing."""
        hit = self._plans.get(org_id)
        if hit is not None and hit[1] > time.monotonic():
            return hit[0]
        return await self._once(("plan", org_id), self._reload_plan, org_id)

    def forget_org(self, org_id: str) -> None:
        """Drops the org's cached terms, and its keys' identities that carry them: this process sees an
        admin change at once (others within the TTL). An admin write, not the hot path: a scan is fine."""
        self._plans.pop(org_id, None)
        for key in [k for k, (ident, _) in self._keys.items() if ident is not None and ident.org_id == org_id]:
            del self._keys[key]

    async def _reload_plan(self, org_id: str) -> tuple[str, str] | None:
        now = time.monotonic()
        plan, ents = (text(v) for v in await self.redis.hmget(self.layout.org(org_id), ["plan", "entitlements"]))
        if plan is None and self.db is not None:
            row = await self.db.fetchrow(
                "SELECT o.plan, e.entitlements::text AS entitlements FROM orgs o"
                " LEFT JOIN org_entitlements e USING (org_id) WHERE o.org_id = $1", org_id)
            if row is not None:
                plan, ents = row["plan"], entitlements.canonical(row["entitlements"])
                async with self.redis.pipeline(transaction=False) as p:
                    p.hsetnx(self.layout.org(org_id), "plan", plan)
                    if ents:
                        p.hsetnx(self.layout.org(org_id), "entitlements", ents)
                    await p.execute()
        terms = (plan, ents or "") if plan is not None else None
        self._plans[org_id] = (terms, now + self.ttl)
        return terms

    async def authenticate(self, request: Request, scope: str) -> Identity:
        return await self.authenticate_key(bearer(request), scope)

    async def authenticate_key(self, key: str | None, scope: str) -> Identity:
        """`authenticate` with the bearer key already taken from the request (None: none given)."""
        if key is None:
            raise missing_key()
        if key.startswith(links.PREFIX):  # a signed dashboard link: read-only, its org only (links.py)
            org = links.verify(key)
            plan = await self.plan(org) if org else None
            ident = Identity("dashboard-link", org, None, frozenset({"read"}), plan) if org and plan else None
        else:
            ident = await self.resolve(key)
        if ident is None:
            raise unknown_key()
        if scope not in ident.scopes:
            raise lacks_scope(scope)
        return ident

    async def authenticate_from_postgres(self, request: Request, scope: str) -> Identity:
        """The caller's identity while Redis is down, read from Postgres alone: one query per
        call, nothing cached or written back (Redis is what is missing). API keys only (a
        dashboard link carries only `read`). Without Postgres it is 503: an unknown key cannot
        be told from a known one."""
        return await self.authenticate_key_from_postgres(bearer(request), scope)

    async def authenticate_key_from_postgres(self, key: str | None, scope: str) -> Identity:
        """`authenticate_from_postgres` with the bearer key already taken from the request."""
        if key is None:
            raise missing_key()
        if self.db is None:
            raise unavailable("the quota store is unavailable and there is no Postgres to check the key")
        row = None
        if key.startswith(KEY_PREFIX) and len(key) <= 200:
            row = await self.db.fetchrow(
                "SELECT k.key_id, k.org_id, k.user_id, k.scopes, o.plan, e.entitlements::text AS entitlements"
                " FROM api_keys k JOIN orgs o USING (org_id) LEFT JOIN org_entitlements e USING (org_id)"
                " WHERE k.key_hash = $1 AND k.revoked_at IS NULL", hash_key(key))
        if row is None:
            raise unknown_key()
        ident = Identity(row["key_id"], row["org_id"], row["user_id"], frozenset(row["scopes"]), row["plan"],
                         entitlements.canonical(row["entitlements"]))
        if scope not in ident.scopes:
            raise lacks_scope(scope)
        return ident


def require_admin(request: Request) -> None:
    token = os.environ.get("QUOTA_GW_ADMIN_TOKEN")
    if not token:
        raise Problem(403, "forbidden", "the admin API is disabled: set QUOTA_GW_ADMIN_TOKEN")
    given = bearer(request)
    if given is None or not hmac.compare_digest(given.encode(), token.encode()):
        raise Problem(401, "unauthorized", "admin token required", headers={"WWW-Authenticate": "Bearer"})
