"""CPU per LLM call of every process on the path: the gateway, the upstream, Redis and wrk.

    .venv/bin/python bench/llm_chain.py [--rounds 2] [--duration 5] [--connections 64] [--stream]

bench.py's `llm` section gives the ratio against the upstream direct and the CPU of the gateway
and the upstream; the chain also has Redis (two decisions a call: reserve before the upstream is
asked, commit after) and the load generator. On a 2-core machine the sum is what bounds the
rate through the gateway. Starts its own embedded Redis, the demo upstream and the gateway
(uvicorn, one process, as bench.py does), then wrk (one thread) at the `openai` route: CPU µs
per call of each process from /proc (wrk's from its rusage), and `usec_per_call` of FCALL from
`INFO commandstats` (the time Redis spends inside one decision's script).
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

import redis

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench as B
from app_instructions import wait_listening

from quota_gw import embedded


def fcall_usec(r: redis.Redis) -> float:
    stats = r.info("commandstats")
    return float(stats.get("cmdstat_fcall", {}).get("usec_per_call", 0.0))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--duration", type=int, default=5)
    ap.add_argument("--connections", type=int, default=64)
    ap.add_argument("--stream", action="store_true", help="streamed calls instead of JSON")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="qgw-chain-"))
    rs = embedded.start_redis(tmp / "redis")
    up_port = embedded.free_port()
    upstream = subprocess.Popen([str(Path(sys.executable).parent / "quota-gw"), "demo-upstream", "--port",
                                 str(up_port), "--log-level", "warning"])
    gw = None
    try:
        wait_listening(up_port)
        r = redis.Redis.from_url(rs.url, decode_responses=True)
        key = B.seed(rs.url, "chain", 16)
        script = tmp / "llm.lua"
        script.write_text(B.LLM_LUA % ('"stream":true,' if args.stream else "", key))
        port = embedded.free_port()
        env = {**os.environ, "QUOTA_GW_CONFIG": str(B.config_file(tmp, f"http://127.0.0.1:{up_port}")),
               "REDIS_URL": rs.url, "QUOTA_GW_PREFIX": "chain"}
        env.pop("DATABASE_URL", None)
        gw = B.start_server("uvicorn", port, env)
        url = f"http://127.0.0.1:{port}/v1/chat/completions"
        pids = {"gateway": gw.pid, "upstream": upstream.pid, "redis": int(r.info("server")["process_id"])}
        B.wrk(url, 2, args.connections, script)  # warm up
        print("| req/s | gateway | upstream | Redis | wrk | sum (µs CPU a call) | FCALL usec_per_call | load |")
        print("|---|---|---|---|---|---|---|---|")
        for _ in range(args.rounds):
            r.config_resetstat()
            before = {k: B.cpu_s(p) for k, p in pids.items()}
            children = resource.getrusage(resource.RUSAGE_CHILDREN)
            res = B.wrk(url, args.duration, args.connections, script)
            after = resource.getrusage(resource.RUSAGE_CHILDREN)
            calls = max(res["rps"] * args.duration, 1)
            cpu = {k: (B.cpu_s(p) - before[k]) / calls * 1e6 for k, p in pids.items()}
            cpu["wrk"] = (after.ru_utime + after.ru_stime - children.ru_utime - children.ru_stime) / calls * 1e6
            print(f"| {res['rps']:,.0f} | {cpu['gateway']:.0f} | {cpu['upstream']:.0f} | {cpu['redis']:.0f} | "
                  f"{cpu['wrk']:.0f} | {sum(cpu.values()):.0f} | {fcall_usec(r):.1f} | {os.getloadavg()[0]:.2f} |")
    finally:
        for p in (gw, upstream):
            if p is not None:
                p.terminate()
                p.wait(timeout=20)
        rs.stop()


if __name__ == "__main__":
    main()
