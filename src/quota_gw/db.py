"""Postgres: the lazily connected pool and the versioned, idempotent migrations.

The gateway's decisions live in Redis; Postgres is only the ledger, the admin API and the key
lookup behind the Redis cache. So the pool connects on first use, not at start (a restart or a
scale-out during a Postgres outage keeps the decision service), and a route that needs
Postgres while it is down answers 503 `unavailable` with Retry-After instead of a 500.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from importlib import resources
from typing import Any

import asyncpg

from .problems import Problem

MIGRATIONS_LOCK = 0x71677701  # pg advisory lock: one migrator at a time
RETRY_AFTER_S = 2
CONNECT_TIMEOUT_S = 3.0
log = logging.getLogger("quota_gw.db")

# What "Postgres is not there" looks like from asyncpg: refused or reset sockets, a server
# shutting down or starting up (class 57), a connection exception (class 08), a closed connection.
DOWN = (OSError, asyncio.TimeoutError, asyncpg.PostgresConnectionError, asyncpg.InterfaceError,
        asyncpg.OperatorInterventionError, asyncpg.CannotConnectNowError)


def unavailable(error: BaseException | str) -> Problem:
    detail = error if isinstance(error, str) else f"{type(error).__name__}: {error}"
    return Problem(503, "unavailable", f"the ledger database is unavailable ({detail}); retry later",
                   headers={"Retry-After": str(RETRY_AFTER_S)})


class Database:
    """The asyncpg pool, made on first use and again after a failed attempt. Connection
    attempts are spaced by `retry_s`, so an outage costs one connect timeout per interval,
    not one per request. A query whose connection is gone raises `unavailable`; the pool
    replaces broken connections by itself once Postgres is back."""

    def __init__(self, dsn: str, min_size: int = 1, max_size: int = 10, retry_s: float = 1.0,
                 on_connect: Callable[[asyncpg.Pool], Awaitable[Any]] | None = None) -> None:
        self.dsn, self.min_size, self.max_size, self.retry_s = dsn, min_size, max_size, retry_s
        self.on_connect = on_connect  # run on each new pool (store.py records the config's settings)
        self._pool: asyncpg.Pool | None = None
        self._lock = asyncio.Lock()
        self._failed_at = 0.0
        self._error: BaseException | None = None

    async def pool(self) -> asyncpg.Pool:
        if self._pool is not None:
            return self._pool
        async with self._lock:
            if self._pool is not None:
                return self._pool
            if self._error is not None and time.monotonic() - self._failed_at < self.retry_s:
                raise unavailable(self._error)
            try:
                self._pool = await asyncpg.create_pool(
                    self.dsn, min_size=self.min_size, max_size=self.max_size, timeout=CONNECT_TIMEOUT_S,
                    server_settings={"application_name": "quota-gw"})
            except DOWN as e:
                if self._error is None:
                    log.warning("postgres unavailable, will retry on use: %s: %s", type(e).__name__, e)
                self._error, self._failed_at = e, time.monotonic()
                raise unavailable(e) from None
            if self._error is not None:
                log.info("postgres connected again")
            self._error = None
            if self.on_connect is not None:
                try:
                    await self.on_connect(self._pool)
                except Exception as e:  # noqa: BLE001 - e.g. not migrated yet: logged, the pool still serves
                    log.warning("postgres connected, but its setup failed: %s: %s", type(e).__name__, e)
            return self._pool

    async def _run(self, method: str, query: str, *args: Any) -> Any:
        pool = await self.pool()
        try:
            return await getattr(pool, method)(query, *args, timeout=None)
        except DOWN as e:
            raise unavailable(e) from None

    async def fetch(self, query: str, *args: Any) -> list[asyncpg.Record]:
        return await self._run("fetch", query, *args)

    async def fetchrow(self, query: str, *args: Any) -> asyncpg.Record | None:
        return await self._run("fetchrow", query, *args)

    async def fetchval(self, query: str, *args: Any) -> Any:
        return await self._run("fetchval", query, *args)

    async def execute(self, query: str, *args: Any) -> str:
        return await self._run("execute", query, *args)

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[asyncpg.Connection]:
        """A connection in a transaction: committed when the block ends, rolled back when it raises."""
        pool = await self.pool()
        try:
            async with pool.acquire() as conn, conn.transaction():
                yield conn
        except DOWN as e:
            raise unavailable(e) from None

    async def ping(self, timeout: float = 1.0) -> None:
        """Raises `unavailable` unless Postgres answers within `timeout` (for /readyz)."""
        try:
            await asyncio.wait_for(self.fetchval("SELECT 1"), timeout)
        except TimeoutError as e:
            raise unavailable(e) from None

    async def close(self) -> None:
        if self._pool is not None:
            pool, self._pool = self._pool, None
            await pool.close()


def migrations() -> list[tuple[int, str, str]]:
    """(version, name, sql) of every `migrations/NNN_name.sql`, in order."""
    out = []
    for f in resources.files("quota_gw.migrations").iterdir():
        m = re.fullmatch(r"(\d+)_(.+)\.sql", f.name)
        if m:
            out.append((int(m.group(1)), m.group(2), f.read_text()))
    return sorted(out)


async def migrate(conn: asyncpg.Connection) -> list[str]:
    """Applies what is missing, each file in its own transaction; returns what it applied."""
    applied = []
    await conn.execute("""CREATE TABLE IF NOT EXISTS schema_migrations (
        version int PRIMARY KEY, name text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now())""")
    for version, name, sql in migrations():
        async with conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1)", MIGRATIONS_LOCK)
            if await conn.fetchval("SELECT 1 FROM schema_migrations WHERE version = $1", version):
                continue
            await conn.execute(sql)
            await conn.execute("INSERT INTO schema_migrations (version, name) VALUES ($1, $2)", version, name)
            applied.append(f"{version:03d}_{name}")
    from .config import DEFAULT_LOW_BALANCE_MARK
    from .queries import Q

    await conn.execute(Q.seed_low_balance_mark, DEFAULT_LOW_BALANCE_MARK)  # until a gateway records its own
    return applied


async def migrate_url(dsn: str) -> list[str]:
    """`migrate` on a connection of its own (the commands' and `dev`'s way in)."""
    conn = await asyncpg.connect(dsn)
    try:
        return await migrate(conn)
    finally:
        await conn.close()


def maintenance_url(dsn: str, database: str = "postgres") -> str:
    """The same server and login, another database (`postgres`, the maintenance database)."""
    from urllib.parse import urlsplit, urlunsplit

    u = urlsplit(dsn)
    return urlunsplit((u.scheme, u.netloc, "/" + database, u.query, u.fragment))


async def create_database(dsn: str) -> bool:
    """Creates the database `dsn` names, connected to the maintenance database of the same
    server. False when it already exists. Raises asyncpg's error when the login may not."""
    from urllib.parse import urlsplit

    name = urlsplit(dsn).path.lstrip("/")
    conn = await asyncpg.connect(maintenance_url(dsn), timeout=10)
    try:
        if await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name):
            return False
        try:
            await conn.execute('CREATE DATABASE "%s"' % name.replace('"', '""'))
        except asyncpg.DuplicateDatabaseError:  # another migrator made it meanwhile
            return False
        return True
    finally:
        await conn.close()


async def ensure_database(dsn: str) -> bool:
    """True when the database did not exist and was created (see create_database)."""
    try:
        conn = await asyncpg.connect(dsn, timeout=10)
    except asyncpg.InvalidCatalogNameError:
        return await create_database(dsn)
    await conn.close()
    return False
