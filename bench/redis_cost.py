"""Redis time per decision (issue 11): the real consume beside a minimal script, same Redis, one run.

    .venv/bin/python bench/redis_cost.py [--calls 20000] [--users 200000] [--plan enterprise]

Starts its own redis-server (7.x, on a free port, no persistence) so `INFO commandstats` counts
only this run. One org on the plan of examples/quota-gw.yaml (rate limits on), funded so no call
is refused; each consume goes through the real Decider (coalesced, as the gateway sends them)
with a random user id out of --users, so users register and per-user rate limits start. Then
the same number of calls of a minimal check-and-decrement script (HGET, HINCRBY, TIME, XADD of
4 fields). CONFIG RESETSTAT before each side; the figure is `usec_per_call` of the command
that ran the script (evalsha or fcall). Compare the ratio, not the absolute numbers: the
machine is shared.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import redis.asyncio as aioredis

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from quota_gw import config as config_mod  # noqa: E402
from quota_gw.decisions import Decider, Identity  # noqa: E402
from quota_gw.embedded import free_port  # noqa: E402
from quota_gw.layout import Layout  # noqa: E402

MINIMAL_LUA = """
local left = tonumber(redis.call('HGET', KEYS[1], 'left')) or 0
if left < tonumber(ARGV[1]) then return 0 end
redis.call('HINCRBY', KEYS[1], 'left', -tonumber(ARGV[1]))
local t = redis.call('TIME')
redis.call('XADD', KEYS[2], '*', 'org', ARGV[2], 'user', ARGV[3], 'cost', ARGV[1], 'ts', t[1])
return 1
"""

SCRIPT_COMMANDS = ("evalsha", "eval", "fcall", "fcall_ro")


def start_redis() -> tuple[subprocess.Popen[bytes], int, str]:
    exe = shutil.which("redis-server") or shutil.which("valkey-server")
    if exe is None:
        sys.exit("redis-server (7.x) is not on PATH")
    port = free_port()
    d = tempfile.mkdtemp(prefix="qgw-redis-cost-")
    proc = subprocess.Popen([exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                             "--dir", d], stdout=subprocess.DEVNULL)
    return proc, port, d


async def commandstats(r: aioredis.Redis) -> dict[str, tuple[int, float]]:
    """{command: (calls, usec_per_call)} for the script commands."""
    info = await r.info("commandstats")
    out = {}
    for name in SCRIPT_COMMANDS:
        s = info.get(f"cmdstat_{name}")
        if s and s["calls"]:
            out[name] = (int(s["calls"]), float(s["usec_per_call"]))
    return out


def per_call(stats: dict[str, tuple[int, float]]) -> float:
    calls = sum(c for c, _ in stats.values())
    return sum(c * u for c, u in stats.values()) / calls if calls else 0.0


async def run(calls: int, users: int, plan: str, feature: str, concurrency: int) -> None:
    proc, port, _ = start_redis()
    r = aioredis.Redis(port=port)
    try:
        for _ in range(200):
            try:
                await r.ping()
                break
            except Exception:  # noqa: BLE001 - starting
                await asyncio.sleep(0.05)
        version = (await r.info("server"))["redis_version"]
        cfg = config_mod.load(ROOT / "examples" / "quota-gw.yaml")
        layout = Layout("bench", cfg.shards)
        decider = Decider(r, cfg, layout)
        ident = Identity("key1", "org1", None, frozenset({"decide"}), plan)
        meter = cfg.features[feature].meter
        cost = cfg.features[feature].cost
        await decider.grant("org1", meter, cost * calls * 2, kind="grant")
        rng = random.Random(1)
        ids = [f"u{rng.randrange(users)}" for _ in range(calls)]
        # Warm: scripts/functions loaded, the period started.
        await decider.consume(ident, feature, 1, "warm")

        async def consumes() -> list[int]:
            statuses = []
            for i in range(0, calls, concurrency):
                ds = await asyncio.gather(*[decider.consume(ident, feature, 1, u) for u in ids[i:i + concurrency]])
                statuses += [d.status for d in ds]
            return statuses

        await r.config_resetstat()
        t0 = time.perf_counter()
        statuses = await consumes()
        wall_consume = time.perf_counter() - t0
        consume_stats = await commandstats(r)
        refused = sum(1 for s in statuses if s != 200)

        minimal = r.register_script(MINIMAL_LUA)
        await r.hset("min:{s00}:bal", "left", cost * calls * 2)
        await minimal(keys=["min:{s00}:bal", "min:{s00}:events"], args=[cost, "org1", "warm"])
        await r.config_resetstat()
        t0 = time.perf_counter()
        for i in range(0, calls, concurrency):
            p = r.pipeline(transaction=False)
            for u in ids[i:i + concurrency]:
                p.evalsha(minimal.sha, 2, "min:{s00}:bal", "min:{s00}:events", cost, "org1", u)
            await p.execute()
        wall_min = time.perf_counter() - t0
        min_stats = await commandstats(r)

        c, m = per_call(consume_stats), per_call(min_stats)
        print(f"redis {version}, plan {plan}, feature {feature}, {calls} calls, {users} user ids, "
              f"{refused} refused")
        print(f"{'what':<34}{'command':<10}{'calls':>8}{'usec_per_call':>15}{'wall s':>8}")
        for label, stats, wall in (("consume (Decider)", consume_stats, wall_consume),
                                   ("minimal check-and-decrement", min_stats, wall_min)):
            for cmd, (n, u) in stats.items():
                print(f"{label:<34}{cmd:<10}{n:>8}{u:>15.2f}{wall:>8.2f}")
        print(f"ratio consume / minimal: {c / m:.2f}x")
        await decider.aclose()
    finally:
        await r.aclose()
        proc.terminate()
        proc.wait(timeout=10)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calls", type=int, default=20000)
    ap.add_argument("--users", type=int, default=200_000)
    ap.add_argument("--plan", default="enterprise")
    ap.add_argument("--feature", default="generate_insight")
    ap.add_argument("--concurrency", type=int, default=64)
    a = ap.parse_args()
    asyncio.run(run(a.calls, a.users, a.plan, a.feature, a.concurrency))


if __name__ == "__main__":
    main()
