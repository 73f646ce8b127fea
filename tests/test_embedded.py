"""Really start the embedded Valkey and Postgres servers (on free ports, so this
also runs next to a system Redis/Postgres on 6379/5432)."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import asyncpg
import redis

from quota_gw.embedded import EmbeddedServer, free_port, reachable, start_postgres, start_redis


def _session_members(sid: int) -> list[int]:
    """PIDs still in the server's session (servers run in their own session, so this
    catches the main process and any forked children such as Postgres backends --
    whose process titles no longer mention the data dir)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if os.getsid(int(entry.name)) == sid:
                pids.append(int(entry.name))
        except OSError:
            continue
    return pids


def _assert_gone(server: EmbeddedServer) -> None:
    assert not server.running()
    assert not reachable(server.host, server.port)
    assert not Path(f"/proc/{server.pid}").exists()
    assert _session_members(server.pid) == []


def test_free_port_and_reachable() -> None:
    port = free_port()
    assert 1024 < port < 65536
    assert not reachable("127.0.0.1", port)


def test_redis_ping_set_get_and_stop(tmp_path: Path) -> None:
    data_dir = tmp_path / "valkey"
    server = start_redis(data_dir)
    try:
        assert server.url.startswith("redis://127.0.0.1:")
        assert server.port not in (6379,)
        client = redis.Redis.from_url(server.url)
        try:
            assert client.ping() is True
            client.set("quota:test", "42")
            assert client.get("quota:test") == b"42"
        finally:
            client.close()
    finally:
        server.stop()
    server.stop()  # idempotent
    _assert_gone(server)


def test_redis_persist_keeps_keys_across_restarts(tmp_path: Path) -> None:
    data_dir = tmp_path / "valkey-dev"
    with start_redis(data_dir, persist=True) as server:
        client = redis.Redis.from_url(server.url)
        client.set("kept", "yes")
        client.close()
    _assert_gone(server)
    with start_redis(data_dir, persist=True) as again:
        client = redis.Redis.from_url(again.url)
        assert client.get("kept") == b"yes"
        client.close()
    _assert_gone(again)


def test_postgres_select_persistence_and_stop(pg_dir: Path) -> None:
    data_dir = pg_dir

    async def first_run(url: str) -> int:
        conn = await asyncpg.connect(url)
        try:
            await conn.execute("create table kept (id int primary key, name text)")
            await conn.execute("insert into kept values (1, 'héllo')")
            return await conn.fetchval("select 1")
        finally:
            await conn.close()

    async def second_run(url: str) -> list[tuple[int, str]]:
        conn = await asyncpg.connect(url)
        try:
            return [tuple(r) for r in await conn.fetch("select id, name from kept")]
        finally:
            await conn.close()

    server = start_postgres(data_dir)
    try:
        assert server.url.startswith("postgresql://postgres@127.0.0.1:")
        assert asyncio.run(first_run(server.url)) == 1
    finally:
        server.stop()
    server.stop()  # idempotent
    _assert_gone(server)

    # Second start on the same data dir (and a different port): no initdb, data kept.
    port = free_port()
    again = start_postgres(data_dir, port)
    try:
        assert again.port == port
        assert asyncio.run(second_run(again.url)) == [(1, "héllo")]
    finally:
        again.stop()
    _assert_gone(again)
