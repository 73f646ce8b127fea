"""What one more decision leaves in Redis once the worker has drained it (issue 11).

    .venv/bin/python bench/redis_memory.py [--decisions 200000] [--users 1000] [--warmup 20000]

Starts a Valkey of its own (so `used_memory` is this run's alone) and uses DATABASE_URL
(default postgres@127.0.0.1:5432) for a fresh database, dropped at the end. One org on a plan
with the example's enterprise allocations, a per-user rate limit (high enough to pass every
call: the limiter's keys are written, nothing is refused) and purchased credit for the whole run;
`generate_insight` consumes through the real Decider (coalesced, as the gateway sends them),
each for a random user out of --users, auto-registered on first use. A real `quota-gw worker`
drains the streams into Postgres and trims them while the decisions run.

Per mode: --warmup decisions (every user registered, every per-user key there), wait until
drained and trimmed, read `used_memory`; then --decisions more, drained and trimmed, read it
again: (after - before) / decisions is what one more decision leaves. Two modes, same run:
- `now`: the code as it is;
- `with the refund record`: the same decisions, and beside each charge the per-charge refund
  record lua/consume.lua used to write (same key, same JSON fields, same TTL: refund_window_s),
  written by a pipeline here: what the code left per decision before this change.
Valkey is flushed between the modes (the worker stopped meanwhile).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import secrets
import sys
import time
from pathlib import Path
from typing import Any

import asyncpg
import orjson
import redis.asyncio as aioredis
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from quota_gw import db, embedded  # noqa: E402
from quota_gw.app import redis_client  # noqa: E402
from quota_gw.config import parse  # noqa: E402
from quota_gw.decisions import Decider, Identity  # noqa: E402
from quota_gw.layout import Layout  # noqa: E402
from sync_worker.worker import GROUP  # noqa: E402

IN_FLIGHT = 256


def config_data() -> dict[str, Any]:
    data = yaml.safe_load((ROOT / "examples" / "quota-gw.yaml").read_text())
    plan = dict(data["plans"]["enterprise"])
    plan["rate_limits"] = {"user": {"limit": 6_000_000, "window": "1m"}}
    data["plans"]["bench"] = plan
    data["routes"] = []
    return data


async def used_memory(r: aioredis.Redis) -> tuple[int, int]:
    """(used_memory, the part of it that is client buffers), once the server has shrunk the idle
    clients' query buffers (its clients cron, every few seconds): the worker's large reads and
    the decision connection's batches are not what the data costs."""
    await asyncio.sleep(3)
    m = await r.info("memory")
    return int(m["used_memory"]), int(m["mem_clients_normal"])


async def settled(r: aioredis.Redis, layout: Layout) -> bool:
    """Every stream's group has read and acked everything, and the trim has left at most the
    last entry read (XTRIM MINID keeps it)."""
    async with r.pipeline(transaction=False) as p:
        for s in layout.streams():
            p.xinfo_stream(s)
            p.xinfo_groups(s)
        res = await p.execute(raise_on_error=False)
    for i in range(0, len(res), 2):
        info, groups = res[i], res[i + 1]
        if isinstance(info, Exception):
            continue  # no such stream
        g = next((g for g in groups if g["name"] == GROUP), None) if not isinstance(groups, Exception) else None
        if g is None or g["pending"] or g["last-delivered-id"] != info["last-generated-id"] or info["length"] > 1:
            return False
    return True


async def wait_settled(r: aioredis.Redis, layout: Layout, worker: asyncio.subprocess.Process) -> float:
    t0 = time.perf_counter()
    while not await settled(r, layout):
        if worker.returncode is not None:
            raise SystemExit(f"the worker exited ({worker.returncode})")
        await asyncio.sleep(0.2)
    return time.perf_counter() - t0


async def decide(decider: Decider, r: aioredis.Redis, ident: Identity, n: int, users: int, rng: random.Random,
                 with_record: bool, window: int) -> tuple[int, int]:
    """n consumes for random users; with_record also writes the old per-charge refund record.
    Returns (charged, refused)."""
    charged = refused = 0
    L = decider.layout
    sem = asyncio.Semaphore(IN_FLIGHT)
    pe = 1_800_000_000  # a period end as consume.lua recorded it (10 digits)

    async def one(user: str) -> None:
        nonlocal charged, refused
        async with sem:
            d = await decider.consume(ident, "generate_insight", 1, user)
            if not d.ok:
                refused += 1
                return
            charged += 1
            if with_record:
                rec = {"m": "general", "a": 0, "p": 1, "cost": 1, "u": user, "f": "generate_insight", "pe": pe,
                       "ut": "", "tt": ""}
                records.append((L.event_record(ident.org_id, d.event_id), orjson.dumps(rec)))

    for start in range(0, n, 20_000):
        records: list[tuple[str, bytes]] = []
        await asyncio.gather(*(one(f"user-{rng.randrange(users)}") for _ in range(min(20_000, n - start))))
        for i in range(0, len(records), 1000):
            async with r.pipeline(transaction=False) as p:
                for k, v in records[i:i + 1000]:
                    p.set(k, v, ex=window)
                await p.execute()
    return charged, refused


async def run_mode(name: str, with_record: bool, args: argparse.Namespace, redis_url: str, database_url: str,
                   cfg_path: Path) -> dict[str, Any]:
    config = parse(config_data(), str(cfg_path))
    prefix = f"qgwmem{secrets.token_hex(3)}"
    layout = Layout(prefix, config.shards)
    r = redis_client(redis_url)  # the gateway's pool
    await r.flushall()
    decider = Decider(r, config, layout)
    org = f"org-mem-{secrets.token_hex(3)}"
    ident = Identity("key_bench", org, None, frozenset({"consume"}), "bench")
    await decider.grant(org, "general", 10 * (args.decisions + args.warmup))
    env = {**os.environ, "REDIS_URL": redis_url, "DATABASE_URL": database_url, "QUOTA_GW_PREFIX": prefix}
    exe = str(Path(sys.executable).with_name("quota-gw"))
    worker = await asyncio.create_subprocess_exec(exe, "worker", "--config", str(cfg_path), "--consumer", "mem",
                                                  "--log-level", "warning", env=env)
    rng = random.Random(1)
    window = config.behaviour.refund_window_s
    try:
        await decide(decider, r, ident, args.warmup, args.users, rng, with_record, window)
        await wait_settled(r, layout, worker)
        (before, clients_before), keys_before = await used_memory(r), await r.dbsize()
        t0 = time.perf_counter()
        charged, refused = await decide(decider, r, ident, args.decisions, args.users, rng, with_record, window)
        took = time.perf_counter() - t0
        drain_wait = await wait_settled(r, layout, worker)
        (after, clients_after), keys_after = await used_memory(r), await r.dbsize()
        pg = await asyncpg.connect(database_url)
        rows = await pg.fetchval("SELECT count(*) FROM usage_events")
        await pg.close()
        sample = None
        if with_record:
            async for k in r.scan_iter(match=f"{prefix}:*:ev:*", count=1000):
                sample = await r.memory_usage(k)
                break
    finally:
        worker.terminate()
        await worker.wait()
        await decider.aclose()
        await r.aclose()
    return {"name": name, "before": before, "after": after, "keys": keys_after - keys_before, "charged": charged,
            "refused": refused, "rows": rows, "per": (after - before) / args.decisions, "took": took,
            "drain_wait": drain_wait, "sample": sample, "clients": clients_after - clients_before}


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--decisions", type=int, default=200_000, help="decisions measured per mode")
    ap.add_argument("--users", type=int, default=1000, help="distinct users the decisions pick from")
    ap.add_argument("--warmup", type=int, default=20_000, help="decisions before the first reading")
    args = ap.parse_args()

    tmp = Path(f"/tmp/qgwmem-{secrets.token_hex(3)}")
    server = embedded.start_redis(tmp / "valkey")
    admin_url = os.environ.get("DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
    dbname = f"qgw_mem_{secrets.token_hex(3)}"
    conn = await asyncpg.connect(admin_url)
    await conn.execute(f'CREATE DATABASE "{dbname}"')
    await conn.close()
    database_url = admin_url.rsplit("/", 1)[0] + "/" + dbname
    cfg_path = tmp / "quota-gw.yaml"
    cfg_path.write_text(yaml.safe_dump(config_data()))
    try:
        await db.migrate_url(database_url)
        results = []
        for name, with_record in (("now", False), ("with the refund record", True)):
            res = await run_mode(name, with_record, args, server.url, database_url, cfg_path)
            results.append(res)
            pg = await asyncpg.connect(database_url)
            await pg.execute("TRUNCATE usage_events")
            await pg.close()
        print(f"{args.decisions:,} consumes after {args.warmup:,} warm-up, {args.users:,} users (rate limit and "
              f"registration on), worker draining and trimming; Valkey `used_memory`:")
        print(f"{'mode':<24} {'before':>12} {'after':>12} {'growth':>12} {'bytes/decision':>15} {'keys added':>11} "
              f"{'charged':>9} {'ledger rows':>12} {'of it clients':>14}")
        for x in results:
            print(f"{x['name']:<24} {x['before']:>12,} {x['after']:>12,} {x['after'] - x['before']:>12,} "
                  f"{x['per']:>15.1f} {x['keys']:>11,} {x['charged']:>9,} {x['rows']:>12,} {x['clients']:>14,}")
        now, old = results
        if old["sample"]:
            print(f"one refund record: MEMORY USAGE {old['sample']} bytes")
        print(f"ratio now / with the record: {now['per'] / old['per']:.3f} "
              f"({now['per']:.1f} vs {old['per']:.1f} bytes per drained decision)")
    finally:
        server.stop()
        conn = await asyncpg.connect(admin_url)
        await conn.execute(f'DROP DATABASE IF EXISTS "{dbname}" WITH (FORCE)')
        await conn.close()


if __name__ == "__main__":
    asyncio.run(main())
