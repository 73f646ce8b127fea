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
