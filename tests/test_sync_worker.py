"""The sync worker against real Redis and Postgres (SPEC §3.2 exactly-once audit): SIGKILLs at
random moments and at injected points (mid-COPY, between COMMIT and XACK), Postgres connections
killed, poison entries, two workers at once, and trimming that never drops an unacked entry.

The default run is the issue's full size (20,000 events, 20 kills, 5 backends terminated);
QUOTA_GW_SOAK=1 (make test-long) runs 100,000 events with 60 kills and 20 terminations."""

from __future__ import annotations

import asyncio
import random
import secrets
import socket
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import asyncpg
import httpx
import pytest
from redis.exceptions import ResponseError

from conftest import test_config_data
from quota_gw.decisions import Decider
from quota_gw.embedded import free_port
from quota_gw.layout import Layout
from sync_worker.recovery import rollup_drift
from sync_worker.encoding import copy_line
from sync_worker.worker import GROUP, Worker
from worker_support import (SOAK, WorkerProc, drained, hold_streams, identities, ledger_vs_redis, seed_orgs,
                            stream_events, traffic, wait_drained, write_config)


@pytest.fixture
async def wenv(redis, redis_url: str, database_url: str, prefix: str, config, tmp_path: Path) -> AsyncIterator[Any]:
    """A key prefix of its own, a Decider on it, and a way to start workers on it."""
    sub = f"{prefix}:w{secrets.token_hex(3)}"
    layout = Layout(sub, config.shards)
    cfg = write_config(tmp_path, test_config_data())
    procs: list[WorkerProc] = []

    def worker(consumer: str, *extra: str, faults: str = "") -> WorkerProc:
        w = WorkerProc(cfg, redis_url, database_url, sub, consumer, tmp_path, *extra, faults=faults)
        procs.append(w)
        return w

    pg = await asyncpg.connect(database_url)
    env = SimpleNamespace(prefix=sub, layout=layout, decider=Decider(redis, config, layout), worker=worker, pg=pg,
                          meters=config.meter_names, redis_url=redis_url, database_url=database_url)
    yield env
    for w in procs:
        await w.kill()
    await pg.close()
    async for k in redis.scan_iter(match=f"{sub}:*", count=5000):
        await redis.delete(k)


async def ledger_ids(env: Any) -> Counter[str]:
    rows = await env.pg.fetch("SELECT replace(event_id::text, '-', '') AS id FROM usage_events WHERE stream_id LIKE $1",
                              env.prefix + ":%")
    return Counter(r["id"] for r in rows)


async def assert_exactly_once(env: Any, redis, orgs, answered: list[str]) -> int:
    """The streams (kept whole by an idle group) against usage_events, id by id, and every
    (org, meter) ledger sum against the Redis balance."""
    xadded = [f["id"] for f in await stream_events(redis, env.layout)]
    assert len(xadded) == len(set(xadded)), "an event was XADDed twice"
    written = await ledger_ids(env)
    dups = {k: n for k, n in written.items() if n > 1}
    assert not dups, f"duplicates in usage_events: {list(dups.items())[:5]}"
    missing = set(xadded) - set(written)
    extra = set(written) - set(xadded)
    assert not missing, f"{len(missing)} events never reached Postgres, e.g. {sorted(missing)[:3]}"
    assert not extra, f"{len(extra)} rows that no stream holds, e.g. {sorted(extra)[:3]}"
    assert set(answered) <= set(written)
    assert await ledger_vs_redis(env.pg, redis, env.layout, orgs, env.meters) == []
    # The rollups count every event once too: per (org, meter) they equal the ledger's sums.
    drift, pairs = await rollup_drift(env.pg)
    assert drift == [] and pairs >= len(orgs), drift[:5]
    return len(xadded)


@pytest.mark.soak
async def test_exactly_once_across_sigkills(wenv, redis) -> None:
    n_ops, kills = (100_000, 60) if SOAK else (20_000, 20)
    orgs = identities(12)
    await hold_streams(redis, wenv.layout)
    await seed_orgs(wenv.decider, orgs)
    w = wenv.worker("crashy", "--batch", "100", "--claim-idle", "1")
    rng = random.Random(20240611)
    answered: list[str] = []
    per_round = n_ops // kills
    modes = Counter()
    for i in range(kills):
        # Most kills come from outside at a random moment (starting up, blocked in XREADGROUP, in
        # COPY, in COMMIT, in XACK); every 4th incarnation crashes itself at an exact point.
        mode = ("outside", "commit", "outside", "copy")[i % 4]
        w.faults = "" if mode == "outside" else f"{mode}:1"
        await w.start()
        gen = asyncio.create_task(traffic(wenv.decider, orgs, per_round, seed=i))
        if mode == "outside":
            await asyncio.sleep(rng.uniform(0.2, 1.2))  # when to pull the plug, not a wait for anything
            await w.kill()
        else:
            assert w.proc is not None
            await asyncio.wait_for(w.proc.wait(), 30)  # it kills itself at the fault point
            assert w.proc.returncode == -9, w.output()[-2000:]
        modes[mode] += 1
        answered += await gen
    w.faults = ""
    await w.start()
    await wait_drained(redis, wenv.layout, 60, w)
    assert await w.stop() == 0, w.output()[-2000:]
    n = await assert_exactly_once(wenv, redis, orgs, answered)
    assert n >= n_ops
    log = w.output()
    assert "already in Postgres (redelivered)" in log  # the crash between COMMIT and XACK was replayed
    assert sum(modes.values()) == kills and w.starts == kills + 1


@pytest.mark.soak
async def test_postgres_connections_killed_mid_run(wenv, redis) -> None:
    orgs = identities(6)
    await hold_streams(redis, wenv.layout)
    await seed_orgs(wenv.decider, orgs)
    w = wenv.worker("pgkill", "--batch", "100")
    await w.start()
    killed, rounds = 0, 0
    target = 20 if SOAK else 5
    answered: list[str] = []
    while killed < target:
        # Terminate the worker's backend at a random moment while events flow (an idle worker
        # only notices at its next write, and a reconnecting one has no backend to kill).
        rounds += 1
        assert rounds < 20 * target, f"only {killed} backends terminated in {rounds} rounds"
        gen = asyncio.create_task(traffic(wenv.decider, orgs, 300, seed=100 + rounds))
        await asyncio.sleep(random.uniform(0.02, 0.2))  # fault timing
        killed += await wenv.pg.fetchval(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE application_name = $1",
            "qgw-sync:pgkill")
        answered += await gen
    await wait_drained(redis, wenv.layout, 60, w)
    assert await w.stop() == 0
    assert "postgres error" in w.output()
    await assert_exactly_once(wenv, redis, orgs, answered)


async def test_poison_entries_go_to_dead_letters_and_the_rest_drains(wenv, redis) -> None:
    orgs = identities(3)
    await hold_streams(redis, wenv.layout)
    await seed_orgs(wenv.decider, orgs)
    answered = await traffic(wenv.decider, orgs, 300, seed=1)
    stream = wenv.layout.stream(orgs[0].org_id)

    def event(**over: Any) -> dict[str, Any]:
        e = {"id": uuid.uuid4().hex, "kind": "grant", "org": orgs[0].org_id, "user": "", "key": "admin",
             "meter": "general", "feature": "", "delta": 0, "dp": 0, "cost": 0, "bal": 0,
             "ts": int(time.time() * 1e6), "meta": ""}
        return {**e, **over}

    poison = [await redis.xadd(stream, {"junk": "x"}),
              await redis.xadd(stream, event(id="not-a-uuid")),
              await redis.xadd(stream, event(delta="12abc")),
              await redis.xadd(stream, event(ts="soon"))]
    # Only the metadata is bad: the balance change is kept, the metadata replaced by a note.
    odd_meta = [event(meta="{not json"), event(meta='{"x": "a\\u0000b"}')]
    for e in odd_meta:
        await redis.xadd(stream, e)
    answered += await traffic(wenv.decider, orgs, 300, seed=2)

    w = wenv.worker("poison")
    await w.start()
    await wait_drained(redis, wenv.layout, 30, w)
    assert w.alive
    dead = await redis.xrange(stream + ":dead")
    assert sorted(f["entry_id"] for _, f in dead) == sorted(poison)
    errors = " | ".join(f["error"] for _, f in dead)
    assert "unexpected fields" in errors and "uuid" in errors and "bigint" in errors and "bad ts" in errors
    assert await w.stop() == 0
    assert "error, retrying" not in w.output()  # poison is handled, not retried
    # The poison entries are gone from the ledger, and everything else is in it exactly once.
    for _, f in await redis.xrange(stream):
        if f.get("id") in ("not-a-uuid",) or "junk" in f or f.get("delta") == "12abc" or f.get("ts") == "soon":
            await redis.xdel(stream, _)
    await assert_exactly_once(wenv, redis, orgs, answered)
    for e in odd_meta:
        meta = await wenv.pg.fetchval("SELECT metadata FROM usage_events WHERE event_id = $1", uuid.UUID(e["id"]))
        assert "_invalid_metadata" in meta and "raw" in meta


async def test_two_workers_share_the_streams_without_duplicates(wenv, redis) -> None:
    orgs = identities(16)
    await hold_streams(redis, wenv.layout)
    await seed_orgs(wenv.decider, orgs)
    a, b = wenv.worker("a", "--batch", "50"), wenv.worker("b", "--batch", "50")
    await a.start()
    await b.start()
    # Both have joined (a consumer appears in the group with its first read) before traffic starts.
    async def joined() -> set[str]:
        try:
            return {c["name"] for c in await redis.xinfo_consumers(wenv.layout.streams()[0], GROUP)}
        except ResponseError:  # no group yet
            return set()

    deadline = time.monotonic() + 30
    while {"a", "b"} - await joined():
        assert time.monotonic() < deadline and a.alive and b.alive, a.output() + b.output()
        await asyncio.sleep(0.05)
    answered: list[str] = []
    for i in range(10):
        answered += await traffic(wenv.decider, orgs, 400, seed=300 + i)
    await wait_drained(redis, wenv.layout, 60, a)
    assert await a.stop() == 0 and await b.stop() == 0
    n = await assert_exactly_once(wenv, redis, orgs, answered)
    assert "error, retrying" not in a.output() + b.output()  # no fault here: no round may have failed
    inserted = [int(p.output().split("stopped: ")[1].split(" inserted")[0]) for p in (a, b)]
    assert all(k > 0 for k in inserted), inserted  # both made progress
    assert sum(inserted) == n  # and between them wrote each event once


async def test_trim_only_below_what_every_group_acked(wenv, redis, database_url) -> None:
    orgs = identities(1)
    stream = wenv.layout.stream(orgs[0].org_id)
    w = Worker(wenv.redis_url, database_url, wenv.layout, "trimmer", block_ms=50)
    await w._connect()
    await redis.xgroup_create(stream, "slow", id="0", mkstream=True)
    await seed_orgs(wenv.decider, orgs)
    await traffic(wenv.decider, orgs, 40, seed=5)
    ids = [i for i, _ in await redis.xrange(stream)]
    # "slow" reads 10 and acks the first 4: it still needs the 5th onwards.
    got = await redis.xreadgroup("slow", "s1", {stream: ">"}, count=10)
    await redis.xack(stream, "slow", *[i for i, _ in got[0][1][:4]])
    while not await drained(redis, wenv.layout):
        await w._round()
    await w.maintain()
    left = [i for i, _ in await redis.xrange(stream)]
    assert left == ids[4:], "trimmed an entry the slow group has not acked (or kept an acked one)"
    # Once "slow" acks everything it read and reads no more, the floor is its last delivered id.
    await redis.xack(stream, "slow", *[i for i, _ in got[0][1]])
    await w.maintain()
    assert [i for i, _ in await redis.xrange(stream)] == ids[9:]
    await redis.xgroup_destroy(stream, "slow")
    await w.maintain()
    assert [i for i, _ in await redis.xrange(stream)] == ids[-1:]  # the last delivered entry stays
    await w._disconnect()
    assert w.stats.inserted == len(ids)


async def test_a_fresh_batch_with_rows_already_written_falls_back_and_loses_nothing(wenv, redis,
                                                                                   database_url) -> None:
    """The group's progress rolls back (Redis restored from an older snapshot, failover to a
    lagging replica): a fresh batch, not a redelivery, holds rows already in Postgres next to
    new ones. The fast COPY fails on the primary key; the worker must fall back to the
    idempotent insert, not skip the batch (which would drop the new events in it)."""
    orgs = identities(4)
    await hold_streams(redis, wenv.layout)
    await seed_orgs(wenv.decider, orgs)
    answered = await traffic(wenv.decider, orgs, 200, seed=41)
    w = Worker(wenv.redis_url, database_url, wenv.layout, "rollback", block_ms=50)
    while not await drained(redis, wenv.layout):
        await w._round() if w.ready else await w._connect()
    first = w.stats.inserted
    assert first > 0 and w.stats.duplicates == 0
    for s in wenv.layout.streams():
        if await redis.exists(s):
            await redis.execute_command("XGROUP", "SETID", s, GROUP, "0")  # progress rolled back
    answered += await traffic(wenv.decider, orgs, 200, seed=42)
    while not await drained(redis, wenv.layout):
        await w._round()
    await w._disconnect()
    await assert_exactly_once(wenv, redis, orgs, answered)
    assert w.stats.duplicates == first  # every old row was seen again, and skipped


async def test_worker_rejoins_after_the_streams_are_deleted(wenv, redis) -> None:
    orgs = identities(2)
    w = wenv.worker("rejoin")
    await w.start()
    await seed_orgs(wenv.decider, orgs)
    await wait_drained(redis, wenv.layout, 30, w)
    for s in wenv.layout.streams():
        await redis.delete(s)  # FLUSHALL, a new Redis: groups are gone with the streams
    answered = await traffic(wenv.decider, orgs, 200, seed=9)
    deadline = time.monotonic() + 30
    while not (set(answered) <= set(await ledger_ids(wenv))):
        assert time.monotonic() < deadline and w.alive, w.output()[-2000:]
        await asyncio.sleep(0.05)
    assert await w.stop() == 0


async def test_metrics_health_and_readiness_port(wenv, redis) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    orgs = identities(2)
    await seed_orgs(wenv.decider, orgs)
    await traffic(wenv.decider, orgs, 200, seed=11)
    await redis.xadd(wenv.layout.stream(orgs[0].org_id), {"junk": "1"})
    n = len(await stream_events(redis, wenv.layout)) - 1
    w = wenv.worker("metrics", "--metrics-port", str(port))
    await w.start()
    await wait_drained(redis, wenv.layout, 30, w)
    base = f"http://127.0.0.1:{port}"
    async with httpx.AsyncClient() as http:
        assert (await http.get(f"{base}/healthz")).text == "ok"
        ready = await http.get(f"{base}/readyz")
        assert ready.status_code == 200 and ready.json()["ready"] is True
        deadline = time.monotonic() + 10
        while True:  # lag and dead letters are refreshed every 2 s
            text = (await http.get(f"{base}/metrics")).text
            metrics = {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
                       for line in text.splitlines() if line and not line.startswith("#")}
            if metrics.get("qgw_worker_dead_letters") == 1:
                break
            assert time.monotonic() < deadline, text
            await asyncio.sleep(0.1)
    assert metrics['qgw_worker_rows_total{outcome="inserted"}'] == n
    assert metrics['qgw_worker_rows_total{outcome="dead"}'] == 1
    assert metrics["qgw_worker_batch_size_count"] >= 1
    lag = [v for k, v in metrics.items() if k.startswith("qgw_worker_stream_lag_entries")]
    assert len(lag) == 16 and sum(lag) == 0
    assert await w.stop() == 0


async def test_derived_event_ids_never_collide_with_the_request_id(wenv, redis) -> None:
    """A period reset written by a consume gets an id derived from the consume's: it must differ
    from every request id, or the ledger (unique per event id) keeps only one of the two."""
    from quota_gw.decisions import Decision

    orgs = identities(4)
    for i, ident in enumerate(orgs):
        eid = uuid.uuid4().hex[:30] + f"{0x81 + i % 2:02x}"  # the first derived ids: ..81, ..82
        keys, args = wenv.decider._gate_call(ident, "generate_insight", 1, "", None, "", None, False, event_id=eid)
        assert Decision.from_reply(await wenv.decider.scripts.consume(keys=keys, args=args)).status == 200
    entries = await stream_events(redis, wenv.layout)
    assert sorted(f["kind"] for f in entries) == ["consume"] * 4 + ["reset"] * 4
    assert len({f["id"] for f in entries}) == 8
    w = wenv.worker("ids")
    await w.start()
    await wait_drained(redis, wenv.layout, 30, w)
    assert await w.stop() == 0
    assert len(await ledger_ids(wenv)) == 8
    assert await ledger_vs_redis(wenv.pg, redis, wenv.layout, orgs, wenv.meters) == []


async def rollup_row(pg: asyncpg.Connection, org: str) -> dict[str, int]:
    row = await pg.fetchrow("""SELECT sum(events)::bigint AS events, sum(calls)::bigint AS calls,
                                      sum(tokens)::bigint AS tokens, sum(delta)::bigint AS delta
                               FROM usage_hourly WHERE org_id = $1""", org)
    return dict(row)


async def test_replayed_batch_counts_once_in_rollups(wenv, redis, database_url) -> None:
    """A batch written again (fast path refused by the primary key, then the idempotent path),
    and a batch half old and half new: the rollups count only the rows actually inserted."""
    orgs = identities(1)
    org = orgs[0].org_id
    await seed_orgs(wenv.decider, orgs)
    for i in range(20):
        assert (await wenv.decider.consume(orgs[0], "generate_insight", 2, f"u{i % 3}")).ok
    entries = []
    for s in wenv.layout.streams():
        ref = s.encode() + b"/"
        for eid, f in await redis.xrange(s):
            flat = [x.encode() for kv in f.items() for x in kv]
            entries.append(copy_line(ref, eid.encode(), flat))
    assert len(entries) >= 22  # grants, the period resets, 20 consumes
    w = Worker(wenv.redis_url, database_url, wenv.layout, "replay")
    await w._connect()
    try:
        first, rest = entries[: len(entries) // 2], entries[len(entries) // 2:]
        assert await w.ledger.transaction(first, fast=True) == len(first)
        once = await rollup_row(wenv.pg, org)
        assert once["events"] == len(first)
        for fast in (True, False):  # the whole first half again, by either path
            assert await w.ledger.transaction(first, fast=fast) == 0
            assert await rollup_row(wenv.pg, org) == once
        assert await w.ledger.transaction(entries, fast=True) == len(rest)  # half old, half new
        total = await rollup_row(wenv.pg, org)
        assert total["events"] == len(entries) and total["calls"] == 20 and total["tokens"] == 40
        assert await w.ledger.transaction(entries, fast=False) == 0
        assert await rollup_row(wenv.pg, org) == total
        drift, _ = await rollup_drift(wenv.pg, org)
        assert drift == []
        # Drift is reported: a rollup row that disagrees with the events.
        await wenv.pg.execute("UPDATE usage_hourly SET tokens = tokens + 5 WHERE org_id = $1 AND meter = 'general' "
                              "AND feature = 'generate_insight'", org)
        drift, _ = await rollup_drift(wenv.pg, org)
        assert [(d.org, d.meter, d.field, d.rollup - d.source) for d in drift] == [
            (org, "general", "tokens", 5), (org, "general", "tokens", -5)]
        await wenv.pg.execute("SELECT qgw_rollup_rebuild()")  # the repair: recomputed from the events
        assert (await rollup_drift(wenv.pg, org))[0] == []
    finally:
        await w._disconnect()


async def test_postgres_outage_is_counted_as_a_postgres_error(wenv, redis) -> None:
    """Postgres refusing connections (a plain ConnectionRefusedError, not an asyncpg error) is
    labelled postgres, not redis. In process: `quota-gw worker` refuses to start without Postgres."""
    from sync_worker.health import ERRORS

    def count(kind: str) -> float:
        return ERRORS.labels(kind)._value.get()

    before = {k: count(k) for k in ("postgres", "redis", "other")}
    w = Worker(wenv.redis_url, f"postgresql://postgres@127.0.0.1:{free_port()}/none", wenv.layout, "pgdown")
    run = asyncio.create_task(w.run())
    deadline = time.monotonic() + 30
    while count("postgres") < before["postgres"] + 2:  # two rounds failed, each counted once
        assert time.monotonic() < deadline and not run.done()
        await asyncio.sleep(0.05)
    w.stop()
    stats = await asyncio.wait_for(run, 30)
    assert stats.errors >= 2 and stats.inserted == 0
    assert count("redis") == before["redis"] and count("other") == before["other"]


async def test_redis_outage_is_counted_as_a_redis_error(wenv, database_url) -> None:
    """Redis refusing connections is labelled redis (redis-py raises its own ConnectionError),
    Postgres answering all along: each round is counted against the store that failed."""
    from sync_worker.health import ERRORS

    def count(kind: str) -> float:
        return ERRORS.labels(kind)._value.get()

    before = {k: count(k) for k in ("postgres", "redis", "other")}
    w = Worker(f"redis://127.0.0.1:{free_port()}/0", database_url, wenv.layout, "redisdown")
    run = asyncio.create_task(w.run())
    deadline = time.monotonic() + 30
    while count("redis") < before["redis"] + 2:  # two rounds failed, each counted once
        assert time.monotonic() < deadline and not run.done()
        await asyncio.sleep(0.05)
    w.stop()
    stats = await asyncio.wait_for(run, 30)
    assert stats.errors >= 2 and stats.inserted == 0
    assert count("postgres") == before["postgres"] and count("other") == before["other"]


async def test_entries_read_again_are_counted_as_redeliveries(wenv, redis, database_url) -> None:
    from sync_worker.health import REDELIVERED

    orgs = identities(1)
    await seed_orgs(wenv.decider, orgs)
    w = Worker(wenv.redis_url, database_url, wenv.layout, "redeliver", block_ms=50)
    await w._connect()
    try:
        w.streams.backlog = False
        first = await w._read()  # new entries, not acked: they stay pending for this consumer
        assert first.size >= 2 and not first.redelivered
        before = REDELIVERED._value.get()
        w.streams.reread()  # as after a failed write
        again = await w._read()
        assert again.redelivered and again.size == first.size
        assert REDELIVERED._value.get() - before == first.size
    finally:
        await w._disconnect()
