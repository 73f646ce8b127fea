"""The key/plan cache: when an entry expires, concurrent requests share one read."""

from __future__ import annotations

import asyncio

import pytest

from quota_gw.auth import KeyStore, hash_key, new_key
from quota_gw.layout import Layout


class SlowRedis:
    """Answers like Redis after a delay and counts the reads (only what KeyStore calls)."""

    def __init__(self, layout: Layout, key: str) -> None:
        self.reads = 0
        self.fail: Exception | None = None
        self.keys = {layout.api_key(hash_key(key)): {"key_id": "key_1", "org": "org_1", "user": "",
                                                      "scopes": "consume,read"}}
        self.orgs = {layout.org("org_1"): "starter"}

    async def hgetall(self, name: str) -> dict[str, str]:
        self.reads += 1
        await asyncio.sleep(0.02)
        if self.fail is not None:
            raise self.fail
        return dict(self.keys.get(name, {}))

    async def hmget(self, name: str, fields: list[str]) -> list[str | None]:
        self.reads += 1
        await asyncio.sleep(0.02)
        return [self.orgs.get(name) if f == "plan" else None for f in fields]  # no entitlements


@pytest.fixture
def store() -> tuple[KeyStore, SlowRedis, str]:
    layout = Layout("cachetest", 16)
    _, key = new_key()
    redis = SlowRedis(layout, key)
    return KeyStore(redis, layout, None, ttl=0.2), redis, key  # type: ignore[arg-type]


async def test_concurrent_misses_share_one_read(store):
    keys, redis, key = store
    idents = await asyncio.gather(*(keys.resolve(key) for _ in range(50)))
    assert {i.org_id for i in idents} == {"org_1"} and idents[0].plan == "starter"
    assert redis.reads == 2  # one HGETALL of the key, one HMGET of the org's plan (and entitlements)
    await asyncio.gather(*(keys.resolve(key) for _ in range(50)))
    assert redis.reads == 2  # cached
    await asyncio.sleep(0.25)  # expired: read again, once
    await asyncio.gather(*(keys.resolve(key) for _ in range(50)))
    assert redis.reads == 4


async def test_a_caller_that_gives_up_does_not_cancel_the_read(store):
    keys, redis, key = store
    first = asyncio.ensure_future(keys.resolve(key))
    await asyncio.sleep(0.005)
    second = asyncio.ensure_future(keys.resolve(key))
    await asyncio.sleep(0)
    first.cancel()  # the first caller's client went away mid-read
    ident = await second
    assert ident is not None and ident.org_id == "org_1"
    assert redis.reads == 2


async def test_a_failed_read_fails_every_waiter_and_is_not_cached(store):
    keys, redis, key = store
    redis.fail = ConnectionError("redis down")
    results = await asyncio.gather(*(keys.resolve(key) for _ in range(10)), return_exceptions=True)
    assert all(isinstance(r, ConnectionError) for r in results)
    assert redis.reads == 1
    redis.fail = None
    assert (await keys.resolve(key)).org_id == "org_1"  # the next request reads again


async def test_no_cache_reads_every_time(store):
    keys, redis, key = store
    keys.ttl = 0
    await asyncio.gather(*(keys.resolve(key) for _ in range(5)))
    assert redis.reads == 10


async def test_the_cached_answer_is_only_a_live_entry_with_the_scope(store):
    """`cached` (authorize's path without a coroutine) answers what authenticate_key would,
    or None for authenticate_key to decide: never an expired entry, an unknown key or a scope
    the key lacks."""
    keys, redis, key = store
    assert keys.cached(key, "consume") is None  # not read yet
    ident = await keys.authenticate_key(key, "consume")
    assert keys.cached(key, "consume") == ident and keys.cached(key, "read") == ident
    assert keys.cached(key, "admin") is None and keys.cached(None, "consume") is None
    assert await keys.resolve("qgw_unknown") is None
    assert keys.cached("qgw_unknown", "consume") is None  # cached as unknown: authenticate_key refuses it
    keys._keys[key] = (ident, 0.0)  # expired
    assert keys.cached(key, "consume") is None
