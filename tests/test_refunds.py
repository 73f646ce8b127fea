"""Refunds without a record per charge (issue 11): a consume or commit leaves nothing in Redis of
its own; a refund reads the charged event from the stream (not drained yet) or from the ledger
(drained), puts back what it took (allocated in the same period, purchased, user and team
quotas), once per event inside the refund window, and is 503 when the ledger is down and the
event already drained. A gateway on a key prefix of its own, the session database, a real worker."""

from __future__ import annotations

import asyncio
import secrets
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import datetime, timedelta, timezone
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import asyncpg
import httpx
import orjson
import pytest
import redis.asyncio as aioredis

from conftest import Admin, test_config_data
from quota_gw import charges
from quota_gw.app import create_app
from quota_gw.db import Database
from quota_gw.decisions import Decider, Identity
from quota_gw.layout import Layout
from quota_gw.problems import Problem
from quota_gw.events import entries
from worker_support import WorkerProc, write_config


@pytest.fixture
async def gw(redis, redis_url: str, database_url: str, prefix: str, config, tmp_path: Path) -> AsyncIterator[Any]:
    sub = f"{prefix}:rf{secrets.token_hex(3)}"
    app = create_app(config, redis_url, database_url, sub)
    cfg = write_config(tmp_path, test_config_data())
    pg = await asyncpg.connect(database_url)
    workers: list[WorkerProc] = []

    def worker() -> WorkerProc:
        w = WorkerProc(cfg, redis_url, database_url, sub, f"rf{len(workers)}", tmp_path)
        workers.append(w)
        return w

    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw") as client:
            admin = Admin(client)

            async def tenant() -> tuple[str, dict[str, str], str]:
                """A bulk org (general: 100 a period) with user ann in team red, both with quotas."""
                org = await admin.org("bulk")
                key = await admin.key(org)
                await admin.user(org, "ann", team="red")
                await admin.quota(org, "general", 40, user_id="ann")
                await admin.quota(org, "general", 60, team="red")
                return org, {"Authorization": f"Bearer {key}"}, key

            yield SimpleNamespace(client=client, admin=admin, pg=pg, prefix=sub, layout=Layout(sub, config.shards),
                                  tenant=tenant, worker=worker, config=config)
    for w in workers:
        await w.kill()
    await pg.close()
    async for k in redis.scan_iter(match=f"{sub}:*", count=5000):
        await redis.delete(k)


async def until(pred: Callable[[], Awaitable[bool]], what: str, timeout: float = 30) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not await pred():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


async def stream_has(redis, gw: Any, org: str, eid: str) -> bool:
    return any(f["id"] == eid for f in entries(await redis.xrange(gw.layout.stream(org))))


async def ledger_has(gw: Any, eid: str) -> bool:
    return bool(await gw.pg.fetchval("SELECT 1 FROM usage_events WHERE event_id = $1", uuid.UUID(eid)))


async def drained(redis, gw: Any, org: str, eid: str, h: dict[str, str]) -> None:
    """The worker wrote the event to the ledger and trimmed it from the stream. The trim keeps
    the last entry read, so a refusal (an event that changes nothing) goes after it."""
    r = await gw.client.post("/v1/consume", json={"feature": "generate_insight", "units": 10**6}, headers=h)
    assert r.status_code == 402, r.text

    async def gone() -> bool:
        return not await stream_has(redis, gw, org, eid) and await ledger_has(gw, eid)
    await until(gone, f"event {eid} drained and trimmed")


async def consume(gw: Any, h: dict[str, str], units: int, **kw: Any) -> str:
    r = await gw.client.post("/v1/consume", json={"feature": "generate_insight", "units": units, **kw}, headers=h)
    assert r.status_code == 200, r.text
    return r.json()["event_id"]


async def state(redis, gw: Any, org: str, h: dict[str, str]) -> tuple[int, int, int, int, int]:
    """(allocated, purchased, used, ann's quota used, team red's quota used) of `general`."""
    g = (await gw.client.get("/v1/balance", headers=h)).json()["meters"]["general"]
    q = await redis.hmget(gw.layout.quotas(org), "u:ann:general:used", "t:red:general:used")
    return g["allocated"], g["purchased"], g["used"], int(q[0] or 0), int(q[1] or 0)


async def split_charge(redis, gw: Any, org: str, h: dict[str, str]) -> tuple[str, tuple[int, ...], tuple[int, ...]]:
    """A charge of 5 by ann that takes the last 2 of the allocation and 3 purchased:
    (its event id, the state before it, the state after it)."""
    await consume(gw, h, 98)
    await gw.admin.grant(org, "general", 10)
    before = await state(redis, gw, org, h)
    eid = await consume(gw, h, 5, user_id="ann")
    after = await state(redis, gw, org, h)
    assert after == (before[0] - 2, before[1] - 3, before[2] + 5, before[3] + 5, before[4] + 5)
    return eid, before, after


async def refund(gw: Any, h: dict[str, str], eid: str, **body: Any) -> httpx.Response:
    return await gw.client.post("/v1/refunds", json={"event_id": eid, **body}, headers=h)


async def test_a_charge_leaves_no_key_of_its_own_in_redis(gw: Any, redis) -> None:
    org, h, _ = await gw.tenant()
    await consume(gw, h, 1)  # the org's own keys (balances, stream, ...) exist from here on
    keys_before = {k async for k in redis.scan_iter(match=f"{gw.prefix}:*")}
    ids = [await consume(gw, h, 1, user_id="ann") for _ in range(10)]
    r = await gw.client.post("/v1/reservations", json={"feature": "generate_insight", "units": 2}, headers=h)
    rid = r.json()["reservation_id"]
    r = await gw.client.post(f"/v1/reservations/{rid}/commit", json={"units": 1}, headers=h)
    ids.append(r.json()["event_id"])
    new = {k async for k in redis.scan_iter(match=f"{gw.prefix}:*")} - keys_before
    # A commit keeps its answer (the reservation's idempotency record); no key names an event.
    assert all(":done:" in k for k in new), new
    assert not [k for k in new for eid in ids if eid in k]
    assert not [k async for k in redis.scan_iter(match=f"{gw.prefix}:*:ev:*")]


async def test_refund_of_an_undrained_event_reads_it_from_the_stream(gw: Any, redis) -> None:
    org, h, _ = await gw.tenant()
    eid, before, _ = await split_charge(redis, gw, org, h)
    assert await stream_has(redis, gw, org, eid) and not await ledger_has(gw, eid)  # no worker runs
    r = await refund(gw, h, eid)
    assert r.status_code == 200 and r.json()["refunded"] == 5, r.text
    assert await state(redis, gw, org, h) == before  # allocated, purchased, used and both quotas


async def test_refund_of_a_drained_event_reads_it_from_the_ledger_once(gw: Any, redis) -> None:
    org, h, _ = await gw.tenant()
    eid, before, _ = await split_charge(redis, gw, org, h)
    await gw.worker().start()
    await drained(redis, gw, org, eid, h)
    r = await refund(gw, h, eid, metadata={"why": "upstream failed"})
    assert r.status_code == 200 and r.json()["refunded"] == 5, r.text
    assert await state(redis, gw, org, h) == before
    again = await refund(gw, h, eid, metadata={"why": "upstream failed"})
    assert again.status_code == 200 and again.headers["Idempotent-Replayed"] == "true"
    assert again.json()["event_id"] == r.json()["event_id"]
    assert (await refund(gw, h, eid, metadata={"why": "other"})).status_code == 409
    assert await state(redis, gw, org, h) == before
    # Another org's key cannot refund it: the event is not its own.
    _, other, _ = await gw.tenant()
    assert (await refund(gw, other, eid)).status_code == 404


async def test_concurrent_refunds_refund_once(gw: Any, redis) -> None:
    org, h, _ = await gw.tenant()
    drained_id = await consume(gw, h, 6, user_id="ann")
    w = gw.worker()
    await w.start()
    await drained(redis, gw, org, drained_id, h)
    await w.kill()
    in_stream = await consume(gw, h, 4, user_id="ann")  # after the drain: the stream holds it
    before = await state(redis, gw, org, h)
    answers = await asyncio.gather(*(refund(gw, h, e) for e in (in_stream, drained_id) for _ in range(8)))
    assert all(a.status_code == 200 for a in answers), [a.text for a in answers if a.status_code != 200]
    for e in (in_stream, drained_id):
        assert len({a.json()["event_id"] for a in answers if a.request.content.find(e.encode()) >= 0}) == 1
    assert sum(a.headers.get("Idempotent-Replayed") != "true" for a in answers) == 2
    a, p, used, ann, red = before
    assert await state(redis, gw, org, h) == (a + 10, p, used - 10, ann - 10, red - 10)
    refunds = [f for f in entries(await redis.xrange(gw.layout.stream(org))) if f["kind"] == "refund"]
    assert sorted(int(f["cost"]) for f in refunds) == [-6, -4]


async def test_refund_after_the_window_is_404(gw: Any, redis) -> None:
    org, h, _ = await gw.tenant()
    await consume(gw, h, 1)
    eid = uuid.uuid4().hex
    window = gw.config.behaviour.refund_window_s
    ts = datetime.now(timezone.utc) - timedelta(seconds=window + 600)
    await gw.pg.execute(
        """INSERT INTO usage_events (event_id, ts, kind, org_id, user_id, meter, feature, delta, delta_purchased, cost)
           VALUES ($1, $2, 'consume', $3, 'ann', 'general', 'generate_insight', -3, 0, 3)""", uuid.UUID(eid), ts, org)
    before = await state(redis, gw, org, h)
    r = await refund(gw, h, eid)
    assert r.status_code == 404 and r.json()["code"] == "not_found", r.text
    assert await state(redis, gw, org, h) == before
    assert not await redis.exists(gw.layout.refund_guard(org, eid))


async def test_refund_while_the_ledger_is_down(gw: Any, redis) -> None:
    """A drained event cannot be read: 503 with Retry-After, nothing changed, and the same
    refund later works. An event the stream still holds needs no ledger."""
    org, h, key = await gw.tenant()
    drained_id = await consume(gw, h, 3, user_id="ann")
    w = gw.worker()
    await w.start()
    await drained(redis, gw, org, drained_id, h)
    await w.kill()
    in_stream = await consume(gw, h, 2, user_id="ann")
    down = Database("postgresql://postgres@127.0.0.1:1/nowhere")  # nothing listens on port 1
    decider = Decider(redis, gw.config, gw.layout, ledger=down)
    ident = Identity("key_down", org, None, frozenset({"consume"}), "bulk")
    before = await state(redis, gw, org, h)
    with pytest.raises(Problem) as e:
        await decider.refund(ident, drained_id)
    assert e.value.status == 503 and "Retry-After" in e.value.headers
    assert await state(redis, gw, org, h) == before
    assert (await decider.refund(ident, in_stream)).cost == 2
    assert (await refund(gw, h, drained_id)).json()["refunded"] == 3  # the ledger is back (the gateway's)
    a, p, used, ann, red = before
    assert await state(redis, gw, org, h) == (a + 5, p, used - 5, ann - 5, red - 5)
    await decider.aclose()


class DrainsAfterFirstPage(aioredis.Redis):
    """Redis as a refund racing the worker sees it: the event is drained and trimmed after the
    first page of the stream was read, before the page that held it."""

    def __init__(self, url: str, drain: Callable[[], Awaitable[None]]) -> None:
        super().__init__(connection_pool=aioredis.ConnectionPool.from_url(url, decode_responses=True))
        self.drain, self.pages = drain, 0

    async def xrevrange(self, *args: Any, **kw: Any) -> Any:
        self.pages += 1
        if self.pages == 2:
            await self.drain()
        return await super().xrevrange(*args, **kw)


async def test_a_refund_overtaken_by_the_drain_finds_the_event_in_the_ledger(gw: Any, redis, redis_url: str,
                                                                           database_url: str) -> None:
    org, h, _ = await gw.tenant()
    eid = await consume(gw, h, 7, user_id="ann")
    for _ in range(charges.STREAM_PAGE):  # newer entries (refusals: they change nothing): the event is on page 2
        r = await gw.client.post("/v1/consume", json={"feature": "generate_insight", "units": 10**6}, headers=h)
        assert r.status_code == 402, r.text
    before = await state(redis, gw, org, h)

    async def drain() -> None:
        w = gw.worker()
        await w.start()
        await drained(redis, gw, org, eid, h)
        await w.kill()

    r = DrainsAfterFirstPage(redis_url, drain)
    ledger = Database(database_url)
    decider = Decider(r, gw.config, gw.layout, ledger=ledger)
    d = await decider.refund(Identity("key_race", org, None, frozenset({"consume"}), "bulk"), eid)
    assert d.status == 200 and d.cost == 7, d
    assert r.pages == 2
    a, p, used, ann, red = before
    assert await state(redis, gw, org, h) == (a + 7, p, used - 7, ann - 7, red - 7)
    await decider.aclose()
    await ledger.close()
    await r.aclose()


async def test_a_charge_refunded_before_the_upgrade_is_not_refunded_again(gw: Any, redis) -> None:
    """Records the previous version wrote per charge (`…:ev:…`) expire within the refund window;
    until then, one that says the charge was refunded stands for the guard."""
    org, h, _ = await gw.tenant()
    eid = await consume(gw, h, 4, user_id="ann")
    answer = [200, "", "", 4, 96, uuid.uuid4().hex, 0, -1, -1, 0, 0, "", ""]
    await redis.set(gw.layout.event_record(org, eid), orjson.dumps(
        {"m": "general", "a": 4, "p": 0, "cost": 4, "u": "ann", "f": "generate_insight", "pe": 0, "ut": "u:ann",
         "tt": "t:red", "refunded": answer, "refunded_fp": "refund"}), ex=600)
    before = await state(redis, gw, org, h)
    r = await refund(gw, h, eid)
    assert r.status_code == 200 and r.headers.get("Idempotent-Replayed") == "true", r.text
    assert r.json()["event_id"] == answer[5]
    assert await state(redis, gw, org, h) == before
