"""Redis time per decision: the real consume beside a minimal script, same Redis, one run.

    .venv/bin/python bench/redis_cost.py [--calls 20000] [--users 200000] [--plan enterprise] [--layers] [--cpu N]
        [--server PATH] [--interleave]

Starts its own redis-server (7.x, on a free port, no persistence; --server: another one, e.g. the
embedded package's valkey-server) so `INFO commandstats` counts only this run. One org on the plan of examples/quota-gw.yaml (rate limits on), funded so no call
is refused; each consume goes through the real Decider (coalesced, as the gateway sends them)
with a random user id out of --users, so users register and per-user rate limits start. Then
the same number of calls of a minimal check-and-decrement script (HGET, HINCRBY, TIME, XADD of
4 fields). CONFIG RESETSTAT before each side; the figure is `usec_per_call` of the command
that ran the script (evalsha or fcall). Compare the ratio, not the absolute numbers: the
machine is shared.

--layers adds a third side, measured in the same rounds: consumes of a second org whose meter
has three layers (the waterfall): its allocation spent, an expiring grant (the credit lots, read
and written by every call) and purchased credit, so every call walks past the allocation.

--cpu N holds the server to core N (taskset) and this client off it: the scheduler moving the
server between cores, or the client onto its core, no longer swells a round. Time inside a
command (`usec_per_call`) still counts a preemption by anything else on that core.

--interleave: in each round a side's batches (64 calls) take turns with the minimal script's, in
one INFO commandstats window (FCALL and EVALSHA are counted apart), so a burst of other work on
the shared machine falls on both sides of the ratio alike; then the same for three layers. (No
CPU column: INFO cpu cannot tell the two apart.)
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
from typing import Any
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


def start_redis(cpu: int | None = None, server: str | None = None) -> tuple[subprocess.Popen[bytes], int, str]:
    """The server (`server`, else redis-server on PATH) on a free port; with `cpu`, held to that
    core (taskset) and this process kept off it, so the scheduler moving either does not swell a
    round."""
    exe = server or shutil.which("redis-server") or shutil.which("valkey-server")
    if exe is None:
        sys.exit("redis-server (7.x) is not on PATH")
    port = free_port()
    d = tempfile.mkdtemp(prefix="qgw-redis-cost-")
    pin: list[str] = []
    if cpu is not None:
        pin = ["taskset", "-c", str(cpu)]
        others = os.sched_getaffinity(0) - {cpu}
        if others:
            os.sched_setaffinity(0, others)
    proc = subprocess.Popen(pin + [exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
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


async def cpu_s(r: aioredis.Redis) -> float:
    """CPU seconds of Redis's main thread (user + sys): unlike commandstats' wall time, not
    inflated when the shared machine preempts Redis mid-script."""
    info = await r.info("cpu")
    return float(info["used_cpu_user_main_thread"]) + float(info["used_cpu_sys_main_thread"])


def per_call(stats: dict[str, tuple[int, float]]) -> float:
    calls = sum(c for c, _ in stats.values())
    return sum(c * u for c, u in stats.values()) / calls if calls else 0.0


async def interleaved_rounds(r: aioredis.Redis, ids: list[str], rounds: int, consumes: Any, minimals: Any,
                             ident3: Identity | None) -> None:
    """--interleave: in each round, the consumes and the minimal script take turns, a batch each
    (FCALL and EVALSHA are counted apart in one INFO commandstats window), so whatever else the
    machine runs falls on both sides of the ratio alike; then the same for three layers."""
    med = statistics.median
    rows: list[tuple[float, float, float, float]] = []  # consume, its minimal, 3 layers, its minimal
    step = len(ids) // rounds
    for k in range(rounds):
        part = ids[k * step:(k + 1) * step]
        row: list[float] = []
        for who in ([None, ident3] if ident3 else [None]):
            await r.config_resetstat()
            for i in range(0, len(part), 64):
                await consumes(part[i:i + 64], *([who] if who else []))
                await minimals(part[i:i + 64])
            stats = await commandstats(r)
            row += [stats["fcall"][1], stats["evalsha"][1]]
        rows.append((row[0], row[1], *(row[2:] if ident3 else (0.0, 0.0))))  # type: ignore[arg-type]
    print(f"usec_per_call (INFO commandstats), {step * rounds} calls a side in {rounds} rounds, each side's batches "
          "taking turns with the minimal script's in one stats window")
    print(f"{'round':<6}{'consume':>10}{'minimal':>10}{'ratio':>8}" + (f"{'3 layers':>12}{'minimal':>10}{'ratio':>8}"
                                                                      if ident3 else ""))
    for k, (c, m, t, tm) in enumerate(rows):
        print(f"{k + 1:<6}{c:>10.2f}{m:>10.2f}{c / m:>8.2f}" + (f"{t:>12.2f}{tm:>10.2f}{t / tm:>8.2f}" if ident3 else ""))
    print(f"{'median':<6}{med(x[0] for x in rows):>10.2f}{med(x[1] for x in rows):>10.2f}{med(x[0] / x[1] for x in rows):>8.2f}"
          + (f"{med(x[2] for x in rows):>12.2f}{med(x[3] for x in rows):>10.2f}{med(x[2] / x[3] for x in rows):>8.2f}"
             if ident3 else ""))


async def run(calls: int, users: int, plan: str, feature: str, concurrency: int, rounds: int,
              layers: bool = False, cpu: int | None = None, server: str | None = None,
              interleave: bool = False) -> None:
    proc, port, _ = start_redis(cpu, server)
    r = aioredis.Redis(port=port)
    try:
        for _ in range(200):
            try:
                await r.ping()
                break
            except Exception:
                await asyncio.sleep(0.05)
        info = await r.info("server")
        version = f"{Path(info['executable']).name} {info.get('valkey_version') or info['redis_version']}" \
            if info.get("executable") else info["redis_version"]
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
        ident3 = Identity("key3", "org3", None, frozenset({"decide"}), plan)
        if layers:  # allocation spent, then an expiring grant and purchased credit
            await decider.consume(ident3, feature, 1, "warm")
            alloc = cfg.plans[plan].allocation(meter)
            spent = await decider.consume(ident3, feature, (alloc - cost) // cost, "warm")
            assert spent.status == 200, spent
            await decider.grant("org3", meter, cost * calls * 2, kind="grant", expires="+86400")
            await decider.grant("org3", meter, cost * calls * 2, kind="grant")
            d3 = await decider.consume(ident3, feature, 1, "warm")
            assert d3.status == 200 and d3.sources.startswith("grant:"), d3

        minimal = r.register_script(MINIMAL_LUA)
        await r.hset("min:{s00}:bal", "left", cost * calls * 2)
        await minimal(keys=["min:{s00}:bal", "min:{s00}:events"], args=[cost, "org1", "warm"])

        async def consumes(part: list[str], who: Identity = ident) -> list[int]:
            statuses = []
            for i in range(0, len(part), concurrency):
                ds = await asyncio.gather(*[decider.consume(who, feature, 1, u) for u in part[i:i + concurrency]])
                statuses += [d.status for d in ds]
            return statuses

        async def minimals(part: list[str]) -> None:
            for i in range(0, len(part), concurrency):
                p = r.pipeline(transaction=False)
                for u in part[i:i + concurrency]:
                    p.evalsha(minimal.sha, 2, "min:{s00}:bal", "min:{s00}:events", cost, "org1", u)
                await p.execute()

        if interleave:
            await interleaved_rounds(r, ids, rounds, consumes, minimals, ident3 if layers else None)
            await decider.aclose()
            return

        # Alternating rounds, each side measured right after the other: the machine is shared, so
        # the ratio of one round is fairer than the ratio of two separate runs.
        rows: list[tuple[float, float, float, float]] = []
        rows3: list[tuple[float, float]] = []  # --layers: usec_per_call, cpu us/call
        refused = 0
        cmd = "evalsha"
        step = calls // rounds
        for k in range(rounds):
            part = ids[k * step:(k + 1) * step]
            await r.config_resetstat()
            t0 = await cpu_s(r)
            refused += sum(1 for s in await consumes(part) if s != 200)
            c_cpu = (await cpu_s(r) - t0) * 1e6 / len(part)
            stats = await commandstats(r)
            cmd = ",".join(stats)
            c = per_call(stats)
            await r.config_resetstat()
            t0 = await cpu_s(r)
            await minimals(part)
            m_cpu = (await cpu_s(r) - t0) * 1e6 / len(part)
            m = per_call(await commandstats(r))
            rows.append((c, m, c_cpu, m_cpu))
            if layers:
                await r.config_resetstat()
                t0 = await cpu_s(r)
                refused += sum(1 for s in await consumes(part, ident3) if s != 200)
                l_cpu = (await cpu_s(r) - t0) * 1e6 / len(part)
                rows3.append((per_call(await commandstats(r)), l_cpu))
        print(f"{version}, plan {plan}, feature {feature}, {step * rounds} calls in {rounds} rounds, "
              f"{users} user ids, {refused} refused; usec_per_call ({cmd} for consume, evalsha for minimal)")
        print("usec_per_call: INFO commandstats (wall time inside the command); cpu us/call: Redis main-thread "
              "CPU per call (INFO cpu), network I/O included")
        print(f"{'round':<6}{'consume':>10}{'minimal':>10}{'ratio':>8}   {'cpu us/call':>12}{'minimal':>10}{'ratio':>8}")
        for k, (c, m, cc, mc) in enumerate(rows):
            print(f"{k + 1:<6}{c:>10.2f}{m:>10.2f}{c / m:>8.2f}   {cc:>12.2f}{mc:>10.2f}{cc / mc:>8.2f}")
        med = statistics.median
        print(f"{'median':<6}{med(x[0] for x in rows):>10.2f}{med(x[1] for x in rows):>10.2f}"
              f"{med(x[0] / x[1] for x in rows):>8.2f}   {med(x[2] for x in rows):>12.2f}"
              f"{med(x[3] for x in rows):>10.2f}{med(x[2] / x[3] for x in rows):>8.2f}")
        if layers:
            print("3 layers (allocation spent, expiring grant, purchased), same rounds:")
            print(f"{'round':<6}{'3 layers':>10}{'consume':>10}{'ratio':>8}   {'cpu us/call':>12}{'consume':>10}{'ratio':>8}")
            for k, ((layered, lc), (c, _, cc, _)) in enumerate(zip(rows3, rows)):
                print(f"{k + 1:<6}{layered:>10.2f}{c:>10.2f}{layered / c:>8.2f}   {lc:>12.2f}{cc:>10.2f}{lc / cc:>8.2f}")
            print(f"{'median':<6}{med(x[0] for x in rows3):>10.2f}{med(x[0] for x in rows):>10.2f}"
                  f"{med(a[0] / b[0] for a, b in zip(rows3, rows)):>8.2f}   {med(x[1] for x in rows3):>12.2f}"
                  f"{med(x[2] for x in rows):>10.2f}{med(a[1] / b[2] for a, b in zip(rows3, rows)):>8.2f}")
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
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--layers", action="store_true", help="also consumes that walk three layers (the waterfall)")
    ap.add_argument("--cpu", type=int, default=None,
                    help="hold the server to this core (taskset) and the client off it")
    ap.add_argument("--server", default=None, help="the redis-server or valkey-server to run (default: redis-server)")
    ap.add_argument("--interleave", action="store_true",
                    help="each side's batches take turns with the minimal script's in one stats window")
    a = ap.parse_args()
    asyncio.run(run(a.calls, a.users, a.plan, a.feature, a.concurrency, a.rounds, a.layers, a.cpu, a.server,
                    a.interleave))


if __name__ == "__main__":
    main()
