"""How fast the sync worker drains the event streams into Postgres, beside raw COPY (issue 3).

    .venv/bin/python bench/drain.py [--events 200000] [--batch 1000] [--rate 10000] [--seconds 10]

Uses REDIS_URL / DATABASE_URL (default 127.0.0.1:6379 and postgres@127.0.0.1:5432), a fresh
database and a fresh key prefix of its own, both removed at the end.

1. Drain: pre-fills the 16 shard streams with --events entries in the exact format the Lua
   scripts write (mixed kinds, a third with JSON metadata), starts a real `quota-gw worker`
   subprocess and times it from its first delivery to the last ack.
2. Raw COPY: the same rows, read back from Postgres, COPYed again (binary, asyncpg
   copy_records_to_table) into the emptied usage_events in batches of the same size, one
   transaction each: the ceiling for writing these rows into this schema on this machine.
   Both run --rounds times, alternating; the medians and the median ratio are printed. The
   machine is shared: the ratio is the figure, absolute numbers move with the neighbours.
3. Write paths: the worker's fast path (COPY straight into usage_events) beside its idempotent
   path (COPY into a temp table + INSERT ... ON CONFLICT DO NOTHING), same lines, Postgres only.
4. Lag: XADDs --rate events/s for --seconds while the worker runs, and samples the age of the
   oldest entry the group has not acked every 50 ms (what qgw_worker_stream_lag_seconds shows).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import secrets
import statistics
import sys
import time
import uuid
from pathlib import Path

import asyncpg
import redis.asyncio as aioredis
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from quota_gw import db, events  # noqa: E402
from quota_gw.layout import Layout  # noqa: E402
from sync_worker import sql  # noqa: E402
from sync_worker import packing  # noqa: E402
from sync_worker.encoding import copy_line  # noqa: E402
from sync_worker.ledger import Ledger  # noqa: E402
from sync_worker.stream import GROUP, MAINTAIN_LUA  # noqa: E402

SHARDS = 16
KINDS = ["consume"] * 6 + ["denied", "refund", "reserve", "commit", "release", "grant"]


def event(i: int, now_us: int) -> dict[str, str]:
    kind = KINDS[i % len(KINDS)]
    meta = ""
    if kind == "denied":
        meta = '{"code":"insufficient_balance","status":402,"cost":3}'
    elif kind in ("commit", "release", "reserve"):
        meta = '{"reservation_id":"%s","held":12}' % uuid.uuid4().hex
    return {"id": uuid.uuid4().hex, "kind": kind, "org": f"org-{i % 500}", "user": f"user-{i % 37}",
            "key": "key_0123456789abcdef", "meter": "general", "feature": "generate_insight",
            "delta": "-3" if kind in ("consume", "commit") else "0", "dp": "0",
            "cost": "3" if kind in ("consume", "commit") else "0", "bal": str(100000 - i), "ts": str(now_us + i),
            "src": "allocated:3" if kind in ("consume", "commit") else "", "meta": meta}


def entry(e: dict[str, str]) -> dict[str, str]:
    """A stream entry as the scripts write it: one field, the values in the schema's order."""
    return {events.ENTRY_FIELD: "\t".join(e[n] for n in events.NAMES)}


async def xadd_many(r: aioredis.Redis, layout: Layout, start: int, n: int) -> None:
    now_us = int(time.time() * 1e6)
    async with r.pipeline(transaction=False) as p:
        for i in range(start, start + n):
            e = event(i, now_us)
            p.xadd(layout.stream(e["org"]), entry(e))
        await p.execute()


async def lag_seconds(r: aioredis.Redis, layout: Layout, script) -> float:
    worst = 0.0
    for s in layout.streams():
        _, _, _, oldest, now_ms = await script(keys=[s], args=[GROUP, 0])
        if int(oldest) >= 0:
            worst = max(worst, (int(now_ms) - int(oldest)) / 1000)
    return worst


async def group_state(r: aioredis.Redis, layout: Layout) -> tuple[bool, bool]:
    """(started: something delivered, drained: everything delivered and acked), in one pipeline
    so that polling costs the machine little (it shares the cores with what it measures)."""
    streams = layout.streams()
    async with r.pipeline(transaction=False) as p:
        for s in streams:
            p.xinfo_stream(s)
            p.xinfo_groups(s)
        res = await p.execute(raise_on_error=False)
    started, done = False, True
    for i in range(len(streams)):
        info, groups = res[2 * i], res[2 * i + 1]
        if isinstance(info, Exception):
            continue  # no such stream yet
        g = next((g for g in groups if g["name"] == GROUP), None) if not isinstance(groups, Exception) else None
        if g is None:
            return started, False
        started |= g["last-delivered-id"] != "0-0"
        done &= g["pending"] == 0 and g["last-delivered-id"] == info["last-generated-id"]
    return started, done


async def drain_round(r: aioredis.Redis, pg: asyncpg.Connection, layout: Layout, args: argparse.Namespace,
                      exe: str, cfg: Path, env: dict[str, str]) -> tuple[float, float]:
    """Pre-fill, drain with a fresh `quota-gw worker`, then raw COPY the same rows: (drain/s, copy/s)."""
    await pg.execute("TRUNCATE usage_events")
    for start in range(0, args.events, 20_000):
        await xadd_many(r, layout, start, min(20_000, args.events - start))
    worker = await asyncio.create_subprocess_exec(exe, "worker", "--config", str(cfg), "--consumer", "bench",
                                                  "--batch", str(args.batch), "--log-level", "warning", env=env)
    try:
        while not (await group_state(r, layout))[0]:
            await asyncio.sleep(0.002)
        t0 = time.perf_counter()
        while not (await group_state(r, layout))[1]:
            await asyncio.sleep(0.01)
        drain_s = time.perf_counter() - t0
    finally:
        worker.terminate()
        await worker.wait()
    count = await pg.fetchval("SELECT count(*) FROM usage_events")
    assert count == args.events, f"{count} rows for {args.events} events"
    for s in layout.streams():  # the next round starts from empty streams
        await r.xtrim(s, maxlen=0)

    rows = [tuple(x) for x in await pg.fetch(f"SELECT {', '.join(sql.COLUMNS)} FROM usage_events")]
    await pg.execute("TRUNCATE usage_events")
    per_tx = min(args.events, args.batch * SHARDS)  # what one worker round reads with a full backlog
    t0 = time.perf_counter()
    for i in range(0, len(rows), per_tx):
        async with pg.transaction():
            await pg.copy_records_to_table("usage_events", records=rows[i:i + per_tx], columns=sql.COLUMNS)
    copy_s = time.perf_counter() - t0
    return args.events / drain_s, len(rows) / copy_s


async def write_paths(pg: asyncpg.Connection, layout: Layout, args: argparse.Namespace) -> dict[str, float]:
    """The worker's two write paths alone, on the same COPY lines: straight COPY into
    usage_events (the fast path) and COPY into the temp table + INSERT ... ON CONFLICT DO NOTHING
    (the idempotent path, taken after a redelivery), both through Ledger.transaction."""
    now_us = int(time.time() * 1e6)
    lines = []
    for i in range(args.events):
        e = event(i, now_us)
        fields = [x for k, v in entry(e).items() for x in (k.encode(), v.encode())]
        lines.append(copy_line(layout.stream(e["org"]).encode() + b"/", b"%d-0" % i, fields))
    ledger = Ledger(pg)
    await pg.execute(sql.CREATE_STAGE)
    per_tx = min(args.events, args.batch * SHARDS)
    out = {}
    for name, fast in (("COPY into usage_events", True), ("temp table + INSERT ON CONFLICT", False),
                       ("temp table + INSERT, every row a duplicate", False)):
        if "duplicate" not in name:
            await pg.execute("TRUNCATE usage_events")
        t0 = time.perf_counter()
        for i in range(0, len(lines), per_tx):
            await ledger.transaction(lines[i:i + per_tx], fast=fast)
        out[name] = len(lines) / (time.perf_counter() - t0)
    await pg.execute("TRUNCATE usage_events")
    return out


async def lag_phase(r: aioredis.Redis, layout: Layout, args: argparse.Namespace, exe: str, cfg: Path,
                    env: dict[str, str]) -> tuple[float, list[float]]:
    maintain = r.register_script(MAINTAIN_LUA)
    worker = await asyncio.create_subprocess_exec(exe, "worker", "--config", str(cfg), "--consumer", "bench",
                                                  "--batch", str(args.batch), "--log-level", "warning", env=env)
    try:
        await asyncio.sleep(1)  # let it start; the producer then runs at a fixed rate
        samples: list[float] = []
        tick, sent = 0.1, 0
        per_tick = int(args.rate * tick)
        start = time.perf_counter()
        nxt = sampler_next = start
        while time.perf_counter() - start < args.seconds:
            now = time.perf_counter()
            if now >= nxt:
                await xadd_many(r, layout, 10_000_000 + sent, per_tick)
                sent += per_tick
                nxt += tick
            if now >= sampler_next:
                samples.append(await lag_seconds(r, layout, maintain))
                sampler_next += 0.05
            await asyncio.sleep(0.002)
        achieved = sent / (time.perf_counter() - start)
        while not (await group_state(r, layout))[1]:
            await asyncio.sleep(0.01)
    finally:
        worker.terminate()
        await worker.wait()
    return achieved, sorted(samples)


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--events", type=int, default=200_000, help="events per drain round")
    ap.add_argument("--rounds", type=int, default=3, help="drain/COPY rounds (the median is reported)")
    ap.add_argument("--batch", type=int, default=1000, help="the worker's --batch (per stream per round)")
    ap.add_argument("--rate", type=int, default=10_000, help="events/s for the lag phase")
    ap.add_argument("--seconds", type=float, default=10, help="length of the lag phase (0: skip)")
    args = ap.parse_args()

    redis_url = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
    admin_url = os.environ.get("DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
    run = secrets.token_hex(3)
    prefix, dbname = f"qgwbench{run}", f"qgw_bench_{run}"
    conn = await asyncpg.connect(admin_url)
    await conn.execute(f'CREATE DATABASE "{dbname}"')
    await conn.close()
    database_url = admin_url.rsplit("/", 1)[0] + "/" + dbname
    pg = await asyncpg.connect(database_url)
    await db.migrate(pg)
    await pg.set_type_codec("jsonb", encoder=lambda s: b"\x01" + s.encode(), decoder=lambda b: b[1:].decode(),
                            schema="pg_catalog", format="binary")
    r = aioredis.from_url(redis_url, decode_responses=True, **packing.client_options(redis_url))
    layout = Layout(prefix, SHARDS)
    cfg = Path(f"/tmp/{prefix}.yaml")
    cfg.write_text(yaml.safe_dump({"shards": SHARDS, "meters": ["general"],
                                   "features": {"generate_insight": {"meter": "general", "cost": 3}},
                                   "plans": {"pro": {"allocations": {"general": 100}}}}))
    env = {**os.environ, "REDIS_URL": redis_url, "DATABASE_URL": database_url, "QUOTA_GW_PREFIX": prefix}
    exe = str(Path(sys.executable).with_name("quota-gw"))
    try:
        results = []
        for i in range(args.rounds):
            drain, copy = await drain_round(r, pg, layout, args, exe, cfg, env)
            results.append((drain, copy))
            print(f"round {i + 1}: drain {drain:>9,.0f} events/s   raw COPY {copy:>9,.0f} rows/s   "
                  f"ratio {drain / copy:.2f}", flush=True)
        drain = statistics.median(d for d, _ in results)
        copy = statistics.median(c for _, c in results)
        ratio = statistics.median(d / c for d, c in results)
        print()
        print(f"events drained into Postgres   {drain:>10,.0f} events/s  (median of {args.rounds} rounds of "
              f"{args.events:,}, --batch {args.batch})")
        print(f"raw COPY of the same rows      {copy:>10,.0f} rows/s    (binary, {min(args.events, args.batch * SHARDS)} "
              f"rows a transaction)")
        print(f"ratio drain / raw COPY         {ratio:>10.2f}")
        for name, rate in (await write_paths(pg, layout, args)).items():
            print(f"write path: {name:<43} {rate:>10,.0f} rows/s")
        if args.seconds > 0:
            achieved, samples = await lag_phase(r, layout, args, exe, cfg, env)
            p50 = statistics.median(samples)
            p99 = samples[min(len(samples) - 1, int(len(samples) * 0.99))]
            print(f"lag at {achieved:,.0f} events/s for {args.seconds:.0f} s: p50 {p50 * 1000:.0f} ms, "
                  f"p99 {p99 * 1000:.0f} ms, max {samples[-1] * 1000:.0f} ms ({len(samples)} samples)")
    finally:
        async for k in r.scan_iter(match=f"{prefix}:*", count=1000):
            await r.delete(k)
        await r.aclose()
        await pg.close()
        conn = await asyncpg.connect(admin_url)
        await conn.execute(f'DROP DATABASE IF EXISTS "{dbname}" WITH (FORCE)')
        await conn.close()
        cfg.unlink(missing_ok=True)


if __name__ == "__main__":
    random.seed(1)
    asyncio.run(main())
