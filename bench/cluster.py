"""Decisions per second and Redis CPU per decision: one Redis, a 3-primary cluster, and the
cluster with behaviour.replica_wait_ms (WAIT 1 after each batch), side by side in one run.

    .venv/bin/python bench/cluster.py [--seconds 5] [--concurrency 256] [--orgs 64]

Drives `Decider.consume` in-process (no HTTP: the gateway's own cost is bench/cpu_per_request.py),
one gateway process, so it measures what Redis and the routing cost. Redis CPU per decision is
INFO cpu (user + sys) summed over the primaries, divided by the decisions: the figure to size
primaries with. Memory-only servers (no AOF), replicas on the cluster.
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import sys
import tempfile
import time
from pathlib import Path

import redis

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
import cluster_support  # noqa: E402

from quota_gw import cluster, embedded  # noqa: E402
from quota_gw import config as config_mod  # noqa: E402
from quota_gw.decisions import Decider, Identity  # noqa: E402
from quota_gw.layout import Layout  # noqa: E402


def redis_cpu(ports: list[int]) -> float:
    total = 0.0
    for p in ports:
        info = redis.Redis(port=p).info("cpu")
        total += float(info["used_cpu_sys"]) + float(info["used_cpu_user"])
    return total


async def run(url: str, ports: list[int], wait_ms: int, seconds: float, concurrency: int, n_orgs: int) -> dict:
    import yaml

    data = yaml.safe_load((ROOT / "examples" / "quota-gw.yaml").read_text())
    data["plans"]["bulk"] = {"allocations": {"general": 10**12}}
    data.setdefault("behaviour", {})["replica_wait_ms"] = wait_ms
    cfg = config_mod.parse(data, "bench")
    r = await cluster.connect(url)
    from quota_gw import scripts

    await scripts.load_everywhere(r)
    decider = Decider(r, cfg, Layout(f"bench{secrets.token_hex(3)}", cfg.shards))
    orgs = [Identity(f"k{i}", f"org-{secrets.token_hex(5)}", None, frozenset({"consume"}), "bulk") for i in range(n_orgs)]
    for o in orgs:  # warm: scripts, lanes, balances
        await decider.consume(o, "generate_insight", 1, "u")
    done = 0
    stop = time.monotonic() + seconds

    async def loop(i: int) -> None:
        nonlocal done
        o = orgs[i % n_orgs]
        while time.monotonic() < stop:
            d = await decider.consume(o, "generate_insight", 1, "u")
            assert d.ok, d
            done += 1

    c0, t0 = redis_cpu(ports), time.monotonic()
    await asyncio.gather(*(loop(i) for i in range(concurrency)))
    dt, cpu = time.monotonic() - t0, redis_cpu(ports) - c0
    await decider.aclose()
    await r.aclose()
    return {"rps": done / dt, "redis_us": 1e6 * cpu / done}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=5)
    ap.add_argument("--concurrency", type=int, default=256)
    ap.add_argument("--orgs", type=int, default=64)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="qgw-bench-cluster-"))
    single = embedded.start_redis(tmp / "single")
    cl = cluster_support.start(tmp / "cluster")
    try:
        rows = [("1 Redis", single.url, [single.port], 0),
                ("cluster, 3 primaries", cl.url, cl.primaries(), 0),
                ("cluster, replica_wait_ms 100", cl.url, cl.primaries(), 100)]
        base = None
        print(f"{'setup':<30} {'decisions/s':>12} {'ratio':>6} {'Redis µs/decision':>18}")
        for name, url, ports, wait in rows:
            res = asyncio.run(run(url, ports, wait, args.seconds, args.concurrency, args.orgs))
            base = base or res["rps"]
            print(f"{name:<30} {res['rps']:>12,.0f} {res['rps'] / base:>5.2f}× {res['redis_us']:>18.0f}")
    finally:
        single.stop()
        cl.stop()


if __name__ == "__main__":
    main()
