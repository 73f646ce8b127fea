"""The coalescer never sends a timed-out call again. Its calls may have run: Redis may be
stalled, not dead, and run what it was sent once the stall ends, so a call resent on a new
connection would charge twice. The stall here ends just past the socket timeout, while a
resend would still be waiting on its new connection: a coalescer that re-queued in-flight
calls after a timeout would land a second charge (tests/test_invariants.py's stall of one
whole second outlasts the resend, which then times out too and never shows)."""

from __future__ import annotations

import asyncio

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from quota_gw.decisions import Decider, Identity
from quota_gw.layout import Layout, meter_field
from test_invariants import stream_kinds

TIMEOUT = 0.5  # the decider's socket timeout: a stalled call is dropped 1 to 1.5 of these after it was sent
STALL_S = 1.0  # ends after that drop, and before a resend's new connection would time out (2 to 2.5)
STALL = f"""local function now() local t = redis.call('TIME') return t[1] * 1000000 + t[2] end
local t0 = now() repeat until now() - t0 >= {int(STALL_S * 1_000_000)}"""


async def stalled(redis_url: str) -> None:
    """Returns as soon as Redis stops answering (one PING that times out)."""
    probe = aioredis.from_url(redis_url, socket_timeout=0.03, retry=None)
    try:
        async with asyncio.timeout(5):
            while True:
                try:
                    await probe.ping()
                except (aioredis.TimeoutError, aioredis.ConnectionError):
                    return
    finally:
        await probe.aclose()


async def test_a_call_stalled_just_past_the_timeout_is_charged_once(redis_url, prefix, config, redis, tenant):
    org, _ = await tenant("starter", general=10)
    layout = Layout(prefix, config.shards)
    ident = Identity("key_test", org, None, frozenset({"consume"}), "starter")
    r = aioredis.from_url(redis_url, decode_responses=True, socket_timeout=TIMEOUT, retry=None)
    blocker = aioredis.from_url(redis_url, decode_responses=True)
    d = Decider(r, config, layout)  # coalescing on (the default)
    try:
        await d.check(ident, "generate_insight", 1, "")  # scripts loaded, decision connection open
        before = int(await redis.hget(layout.balances(org), meter_field("general", "purchased")))
        stall = asyncio.ensure_future(blocker.eval(STALL, 0))
        await stalled(redis_url)
        try:
            result = await d.consume(ident, "generate_insight", 1, "")
        except (TimeoutError, RedisError) as e:
            result = e
        await stall

        async def consumes() -> list[dict]:
            return [f for f in await stream_kinds(redis, layout, org) if f["kind"] == "consume"]

        async with asyncio.timeout(10):
            while not await consumes():  # the stalled call runs when the stall ends
                await asyncio.sleep(0.02)
        await redis.ping()  # anything sent before this has run
        assert len(await consumes()) == 1, "a call that may have run was sent again"
        assert int(await redis.hget(layout.balances(org), meter_field("general", "purchased"))) == before - 1
        assert isinstance(result, Exception) and "imeout" in type(result).__name__ + str(result), result
    finally:
        await d.aclose()
        await r.aclose()
        await blocker.aclose()
