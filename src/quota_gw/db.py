"""Postgres: the connection pool and the versioned, idempotent migrations."""

from __future__ import annotations

import re
from importlib import resources

import asyncpg

MIGRATIONS_LOCK = 0x71677701  # pg advisory lock: one migrator at a time


async def pool(dsn: str, min_size: int = 1, max_size: int = 10) -> asyncpg.Pool:
    return await asyncpg.create_pool(dsn, min_size=min_size, max_size=max_size,
                                     server_settings={"application_name": "quota-gw"})


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
