"""The sync worker on a real Redis Cluster (tests/cluster_support.py): real `quota-gw worker`
processes, decisions from two gateways' decision paths, every event exactly once in Postgres;
the consumer group moved back (as after a failover); a primary killed under load, the drift
`reconcile` reports equal to what was lost, and `rebuild --org` repairing it."""

from __future__ import annotations

import asyncio
import os
import secrets
import signal
from collections.abc import AsyncIterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import asyncpg
import pytest

from cluster_support import command, orgs_on_every_primary, owner_port
from conftest import drop_database, fresh_database, test_config_data, test_meters
from quota_gw import cluster, metrics
from quota_gw import config as config_mod
from quota_gw.decisions import Decider, Identity
from quota_gw.layout import Layout
from sync_worker.recovery import reconcile, repair
from worker_support import GROUP, QUOTA_GW, SOAK, WorkerProc, hold_streams, seed_orgs, traffic, wait_drained, write_config

pytestmark = pytest.mark.cluster


@pytest.fixture
async def env(redis_cluster, servers, tmp_path: Path) -> AsyncIterator[Any]:
    """A database and key prefix of the test's own; two decision paths (two cluster clients, each
    with its own coalescer per primary), as two gateways would have."""
    url = await fresh_database(servers, f"cw{secrets.token_hex(3)}")
    prefix = f"qgwcw{secrets.token_hex(3)}"
    data = test_config_data()
    cfg = config_mod.parse(data, "test_cluster_worker")
    layout = Layout(prefix, cfg.shards)
    clients = [await cluster.connect(redis_cluster.url) for _ in range(2)]
    deciders = [Decider(c, cfg, layout) for c in clients]
    pg = await asyncpg.connect(url)
    config_path = write_config(tmp_path, data)
    workers: list[WorkerProc] = []

    def worker(name: str, *extra: str) -> WorkerProc:
        w = WorkerProc(config_path, redis_cluster.url, url, prefix, name, tmp_path, "--claim-idle", "1", *extra)
        workers.append(w)
        return w

    try:
        yield SimpleNamespace(r=clients[0], deciders=deciders, pg=pg, layout=layout, worker=worker,
                              cluster=redis_cluster, cli=lambda *a: cli(redis_cluster.url, url, prefix, config_path, *a))
    finally:
        for w in workers:
            await w.kill()
        for d in deciders:
            await d.aclose()
        for c in clients:
            await c.aclose()
        await pg.close()
        await drop_database(servers, url)


async def cli(redis_url: str, database_url: str, prefix: str, config_path: str, *args: str) -> Any:
    """`quota-gw <args>` as an operator runs it, against the cluster."""
    import subprocess

    env = {**os.environ, "REDIS_URL": redis_url, "DATABASE_URL": database_url, "QUOTA_GW_PREFIX": prefix,
           "QUOTA_GW_CONFIG": config_path}
    return await asyncio.to_thread(subprocess.run, [QUOTA_GW, *args], env=env, capture_output=True, text=True,
                                   timeout=120)


def spread_orgs(e: Any, n: int) -> list[Identity]:
    """n orgs whose shards cover every primary."""
    return [Identity(f"key_{secrets.token_hex(4)}", o, None, frozenset({"consume", "read"}), "bulk")
            for o in orgs_on_every_primary(e.cluster, e.layout, n)]


async def exactly_once(pg: asyncpg.Connection, ids: list[str]) -> None:
    rows = await pg.fetch("SELECT event_id::text AS id, count(*) AS n FROM usage_events "
                          "WHERE replace(event_id::text, '-', '') = ANY($1) GROUP BY 1", ids)
    assert len(rows) == len(set(ids)), f"{len(set(ids)) - len(rows)} events missing from Postgres"
    assert all(r["n"] == 1 for r in rows)


async def test_two_workers_one_killed_mid_drain_every_event_once(env) -> None:
    orgs = spread_orgs(env, 6)
    await seed_orgs(env.deciders[0], orgs)
    a, b = env.worker("a"), env.worker("b")
    await a.start()
    await b.start()
    ids = []
    for seed in range(3):  # two gateways' traffic, worker a SIGKILLed while it drains
        ids += sum(await asyncio.gather(traffic(env.deciders[0], orgs, 300, seed),
                                        traffic(env.deciders[1], orgs, 300, 100 + seed)), [])
        if seed == 1:
            await a.kill()
    ids += sum(await asyncio.gather(traffic(env.deciders[0], orgs, 100, 7), traffic(env.deciders[1], orgs, 100, 8)), [])
    await wait_drained(env.r, env.layout, 60, b)  # b claims what a held, drains every shard
    await exactly_once(env.pg, ids)
    drift, stats = await reconcile(env.r, env.pg, env.layout, meters=test_meters())
    assert drift == [] and stats["undrained"] == 0
    done = await env.cli("reconcile")
    assert done.returncode == 0, done.stdout + done.stderr
    assert await b.stop() == 0
    # and the whole prefix rebuilt from the ledger into the (emptied) cluster, every primary
    balances = {o.org_id: await env.r.hgetall(env.layout.balances(o.org_id)) for o in orgs}
    async for k in env.r.scan_iter(match=f"{env.layout.prefix}:*", count=1000):  # every primary
        await env.r.delete(k)
    done = await env.cli("rebuild")
    assert done.returncode == 0, done.stdout + done.stderr
    for o in orgs:
        got = await env.r.hgetall(env.layout.balances(o.org_id))
        assert {k: v for k, v in got.items() if k.endswith((":a", ":p"))} == \
            {k: v for k, v in balances[o.org_id].items() if k.endswith((":a", ":p"))}
    done = await env.cli("reconcile")
    assert done.returncode == 0, done.stdout + done.stderr


async def test_group_moved_back_every_event_once(env) -> None:
    """After a failover the promoted replica's consumer group may be behind what Postgres holds:
    entries already written come again as new. Each still lands once."""
    orgs = spread_orgs(env, 3)
    await seed_orgs(env.deciders[0], orgs)
    w = env.worker("solo")
    await hold_streams(env.r, env.layout)  # keep the entries, so the group can be moved back over them
    await w.start()
    ids = await traffic(env.deciders[0], orgs, 300, 1)
    await wait_drained(env.r, env.layout, 60, w)
    await exactly_once(env.pg, ids)
    for s in env.layout.streams():  # as an older replica would have it
        await env.r.execute_command("XGROUP", "SETID", s, GROUP, "0")
    ids += await traffic(env.deciders[1], orgs, 100, 2)
    await wait_drained(env.r, env.layout, 60, w)
    await exactly_once(env.pg, ids)
    assert (await reconcile(env.r, env.pg, env.layout, meters=test_meters()))[0] == []
    assert await w.stop() == 0


@pytest.mark.soak
async def test_failover_under_load_drift_is_what_was_lost_and_repair_clears_it(env) -> None:
    """A primary's replica frozen (SIGSTOP) and its link cut, so what the primary acknowledges is
    not replicated;
    the worker drains it into Postgres; the primary is SIGKILLed and the stale replica promoted.
    Decisions answer 503 meanwhile and succeed again after; the ledger holds the lost charges,
    Redis does not: reconcile reports exactly those, and rebuild --org repairs them."""
    e = env
    orgs = spread_orgs(e, 3)
    await seed_orgs(e.deciders[0], orgs)
    victim = orgs[0]
    primary = owner_port(e.cluster, e.layout.balances(victim.org_id))
    replica = e.cluster.replica_of(primary)
    w = e.worker("fo")
    await w.start()
    await traffic(e.deciders[0], orgs, 200, 1)
    await wait_drained(e.r, e.layout, 60, w)
    e.cluster.sync_replicas()
    os.kill(e.cluster.node(replica).pid, signal.SIGSTOP)
    stopped = True
    # the link cut while the replica cannot reconnect: what follows stays on the primary alone
    command(primary, "CLIENT", "KILL", "TYPE", "replica")
    try:
        lost = 0
        for _ in range(25):  # acknowledged by the primary alone
            d = await e.deciders[0].consume(victim, "generate_insight", 2, "u1")
            assert d.ok
            lost += d.cost
        await wait_drained(e.r, e.layout, 60, w)  # ... and already in the ledger
        e.cluster.kill(primary)
        os.kill(e.cluster.node(replica).pid, signal.SIGCONT)
        stopped = False
        # meanwhile: 503 (a Redis error), never a charge; then the promoted replica answers
        deadline = asyncio.get_running_loop().time() + 60
        while True:
            try:
                d = await e.deciders[1].consume(victim, "generate_insight", 1, "u2")
                break
            except Exception as err:  # noqa: BLE001 - what the gateway turns into 503
                from redis.exceptions import RedisClusterException, RedisError

                assert isinstance(err, (RedisError, RedisClusterException)), err
                assert asyncio.get_running_loop().time() < deadline, "no promotion"
                await asyncio.sleep(0.1)
        assert d.ok
        assert owner_port(e.cluster, e.layout.balances(victim.org_id)) == replica
        await traffic(e.deciders[1], orgs, 100, 3)
        await wait_drained(e.r, e.layout, 60, w)
        drift, _ = await reconcile(e.r, e.pg, e.layout, meters=test_meters())
        # Redis has `lost` more than the ledger (from the allocation or the purchased credit)
        assert {(x.org, x.meter) for x in drift} == {(victim.org_id, "general")}, drift
        assert sum(x.redis - x.ledger for x in drift if x.field in ("a", "p")) == lost, drift
        fixed, left = await repair(e.r, e.pg, e.layout, victim.org_id, meters=test_meters())
        assert left == [] and len(fixed) == len(drift)
        assert (await reconcile(e.r, e.pg, e.layout, meters=test_meters()))[0] == []
        assert await w.stop() == 0
    finally:
        if stopped:
            os.kill(e.cluster.node(replica).pid, signal.SIGCONT)
        if primary not in e.cluster.live_ports():
            e.cluster.restart(primary)
        e.cluster.wait_ok()
        assert command(replica, "PING").strip() == "PONG"


@pytest.mark.soak  # bounded here; make test-long (QUOTA_GW_SOAK=1) adds a 2,000-slot redis-cli reshard
async def test_reshard_under_load_fails_nothing_loses_nothing(env) -> None:
    """Every shard slot of one primary moved to another, key by key as `redis-cli --cluster
    reshard` does, while two gateways' decisions and a worker run (the streams and their consumer
    groups move too): no decision fails (ASK/TRYAGAIN/MOVED are resent), every refund finds its
    charge in the moving stream and refunds it exactly once, every event lands once,
    `quota-gw reconcile` exits 0. QUOTA_GW_SOAK=1 also runs `redis-cli --cluster reshard` of
    2,000 slots under the same traffic."""
    import subprocess

    from redis.crc import key_slot

    from cluster_support import cli_binary, owner_of_slot

    orgs = spread_orgs(env, 6)
    await seed_orgs(env.deciders[0], orgs)
    await hold_streams(env.r, env.layout)  # every charge stays in its stream: each refund reads it there
    w = env.worker("rs")
    await w.start()
    src, dst = env.cluster.primaries()[:2]
    slots = sorted({key_slot(t.encode()) for t in env.layout.shard_tags()
                    if owner_of_slot(env.cluster, key_slot(t.encode())) == src})
    assert slots

    def move_all() -> None:
        for slot in slots:
            env.cluster.move_slot(slot, dst)
        if SOAK:
            src_id = command(src, "CLUSTER", "MYID").strip()
            dst_id = command(dst, "CLUSTER", "MYID").strip()
            done = subprocess.run([cli_binary(), "--cluster", "reshard", f"127.0.0.1:{src}", "--cluster-from",
                                   src_id, "--cluster-to", dst_id, "--cluster-slots", "2000", "--cluster-yes"],
                                  capture_output=True, text=True, timeout=600)
            assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]

    before = sum(metrics.REDIS_REDIRECTS.labels(k)._value.get() for k in ("moved", "ask", "tryagain"))
    moving = asyncio.ensure_future(asyncio.to_thread(move_all))
    ids: list[str] = []
    refunded: list[tuple[str, int]] = []
    seed = 0
    while not moving.done():  # traffic for as long as slots move; a failed decision raises here
        ids += sum(await asyncio.gather(traffic(env.deciders[0], orgs, 100, seed, refunded=refunded),
                                        traffic(env.deciders[1], orgs, 100, 1000 + seed, refunded=refunded)), [])
        seed += 1
    await moving
    # a refund reads its charge from the stream on the slot's primary, following ASK/MOVED/TRYAGAIN
    # as decisions do: each one answered 200 (not 503 "TTL exhausted", not 404)
    assert refunded and {status for _, status in refunded} == {200}, refunded
    assert all(owner_of_slot(env.cluster, s) == dst for s in slots)
    assert sum(metrics.REDIS_REDIRECTS.labels(k)._value.get() for k in ("moved", "ask", "tryagain")) > before
    env.cluster.wait_ok()
    ids += await traffic(env.deciders[1], orgs, 100, 99)
    await wait_drained(env.r, env.layout, 60, w)
    await exactly_once(env.pg, ids)
    charged = [eid for eid, _ in refunded]
    rows = await env.pg.fetch("SELECT metadata ->> 'refund_of' AS charge, count(*) AS n FROM usage_events "
                              "WHERE kind = 'refund' AND metadata ->> 'refund_of' = ANY($1) GROUP BY 1", charged)
    assert len(rows) == len(set(charged)) == len(charged) and all(r["n"] == 1 for r in rows)  # each exactly once
    rec = await env.cli("reconcile")
    assert rec.returncode == 0, rec.stdout + rec.stderr
    assert await w.stop() == 0
