"""The upgrade of the users (sync_worker/migrate_users.py): the old users hashes move into their
org's balance hash ('@<user>' registered with its rate window, '@<user>:t' its team), what the
balance hash already has (a decision's window, an admin's team) wins, nothing is left behind, and a
second run moves nothing; in chunks for a large hash; at the start of a real worker; and on a
Redis Cluster, whose every primary is scanned."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator
from typing import Any

import pytest

from cluster_support import orgs_on_every_primary
from quota_gw import cluster
from quota_gw.layout import Layout, meter_field, user_field, user_key_field
from sync_worker.migrate_users import migrate_users
from sync_worker.worker import Worker


def old_users(layout: Layout, org: str) -> str:
    """The key the old layout kept an org's users in."""
    return f"{layout.tag(org)}:users:{org}"


@pytest.fixture
async def layout(redis, prefix: str) -> AsyncIterator[Layout]:
    sub = f"{prefix}:m{secrets.token_hex(3)}"
    yield Layout(sub, 16)
    async for k in redis.scan_iter(match=f"{sub}:*", count=5000):
        await redis.delete(k)


async def seed(r: Any, layout: Layout, org: str) -> dict[str, str]:
    """An old users hash (team users and a no-team user, a rate window each) and a balance hash with
    meter fields and users written since the upgrade: bob registered by a decision that wrote his
    window, dee registered by one with no window yet, eve's team set by an admin. Returns the meter
    fields."""
    await r.hset(old_users(layout, org), mapping={"ann": "red", "ann:rl": "1700000000000000", "bob": "blue",
                                                  "bob:rl": "1700000000000005", "dee": "", "dee:rl": "1700000000000009",
                                                  "eve": "red"})
    meters = {meter_field("general", "allocated"): "90", meter_field("general", "used"): "10", "holds_due": "0"}
    await r.hset(layout.balances(org), mapping={**meters, user_key_field("bob"): "1800000000000000",
                                                user_key_field("dee"): "", user_key_field("eve"): "",
                                                user_field("eve", "team"): "green"})
    return meters


async def assert_moved(r: Any, layout: Layout, org: str, meters: dict[str, str]) -> None:
    assert await r.hgetall(layout.balances(org)) == {
        **meters,
        user_key_field("ann"): "1700000000000000",  # the old rate window
        user_field("ann", "team"): "red",
        user_key_field("bob"): "1800000000000000",  # the newer one (a decision's), kept
        user_field("bob", "team"): "blue",  # the old team, though a decision registered bob first
        user_key_field("dee"): "1700000000000009",  # registered, no window yet: the old one comes
        user_key_field("eve"): "",
        user_field("eve", "team"): "green",  # the newer one (an admin's), kept
    }
    assert not await r.exists(old_users(layout, org))


async def test_old_users_move_into_the_balance_hash_once(redis, layout: Layout) -> None:
    org = f"org-{secrets.token_hex(4)}"
    meters = await seed(redis, layout, org)
    other = f"org-{secrets.token_hex(4)}"  # an org with no balance hash yet
    await redis.hset(old_users(layout, other), "cy", "blue")
    moved = await migrate_users(redis, layout)
    # ann and cy registered; moved: ann, ann:rl, bob, dee, dee:rl, cy; kept: bob:rl, eve
    assert (moved.keys, moved.users, moved.fields, moved.kept, moved.skipped) == (2, 2, 6, 2, 0)
    await assert_moved(redis, layout, org, meters)
    assert await redis.hgetall(layout.balances(other)) == {user_key_field("cy"): "", user_field("cy", "team"): "blue"}
    before = {o: await redis.hgetall(layout.balances(o)) for o in (org, other)}
    again = await migrate_users(redis, layout)
    assert (again.keys, again.users, again.fields, again.kept) == (0, 0, 0, 0)
    assert {o: await redis.hgetall(layout.balances(o)) for o in (org, other)} == before


async def test_a_large_users_hash_moves_in_chunks(redis, layout: Layout) -> None:
    org = f"org-{secrets.token_hex(4)}"
    users = {f"u{i}": f"t{i % 7}" if i % 3 else "" for i in range(2500)}
    await redis.hset(old_users(layout, org), mapping={**users, **{f"{u}:rl": str(i) for i, u in enumerate(users)}})
    per_script: list[int] = []  # fields each script call handled
    script = redis.register_script

    def counting(src: str) -> Any:  # the real script, what each call handled counted
        s = script(src)

        async def call(**kw: Any) -> Any:
            reply = await s(**kw)
            per_script.append(int(reply[1]) + int(reply[2]))
            return reply
        return call
    redis.register_script = counting
    try:
        moved = await migrate_users(redis, layout, chunk=1000)
    finally:
        del redis.register_script
    assert (moved.keys, moved.users, moved.fields, moved.kept) == (1, 2500, 5000, 0)
    assert sum(per_script) == 5000 and len(per_script) >= 5 and max(per_script) <= 1100, per_script
    bal = await redis.hgetall(layout.balances(org))
    assert bal == {**{user_field(u, "team"): t for u, t in users.items() if t},
                   **{user_key_field(u): str(i) for i, u in enumerate(users)}}
    assert not await redis.exists(old_users(layout, org))


async def test_the_worker_moves_them_when_it_starts(redis, redis_url: str, database_url: str, layout: Layout) -> None:
    org = f"org-{secrets.token_hex(4)}"
    meters = await seed(redis, layout, org)
    w = Worker(redis_url, database_url, layout, "migrator", block_ms=50)
    try:
        await w._connect()
        await w._round()
        assert w.users_migrated
        await assert_moved(redis, layout, org, meters)
        await w._round()  # once per start
    finally:
        await w._disconnect()


@pytest.mark.cluster
async def test_every_primary_of_a_cluster_is_migrated(redis_cluster) -> None:
    layout = Layout(f"qgwmu{secrets.token_hex(3)}", 16)
    r = await cluster.connect(redis_cluster.url)
    try:
        orgs = orgs_on_every_primary(redis_cluster, layout, 6)
        meters = {o: await seed(r, layout, o) for o in orgs}
        moved = await migrate_users(r, layout)
        assert (moved.keys, moved.users) == (len(orgs), len(orgs))  # ann (bob, dee, eve were registered)
        for o in orgs:
            await assert_moved(r, layout, o, meters[o])
        assert (await migrate_users(r, layout)).keys == 0
    finally:
        for o in orgs:
            await r.delete(layout.balances(o))
        await r.aclose()


async def test_workers_starting_at_once_move_each_field_once(redis, layout: Layout) -> None:
    org = f"org-{secrets.token_hex(4)}"
    users = {f"u{i}": "t" for i in range(2500)}
    await redis.hset(old_users(layout, org), mapping=users)
    runs = await asyncio.gather(*(migrate_users(redis, layout, chunk=100) for _ in range(3)))
    assert sum(m.fields for m in runs) == 2500 and sum(m.kept for m in runs) == 0  # each field once
    assert await redis.hgetall(layout.balances(org)) == {f: v for u in users
                                                         for f, v in ((user_key_field(u), ""), (user_field(u, "team"), "t"))}
    assert not await redis.exists(old_users(layout, org))
