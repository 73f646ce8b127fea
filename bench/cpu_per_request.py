"""CPU time per request of the gateway process and of Redis, hello world vs consume.

    .venv/bin/python bench/cpu_per_request.py [--duration 5] [--rounds 2] [--multiproc-metrics]

Throughput on a shared 2-core machine says little on its own; CPU per request (from
/proc/<pid>/stat and Redis INFO cpu around a wrk run) says where the time goes.
--multiproc-metrics runs the server as `quota-gw serve` does (prometheus-client's multiprocess
mode: every observation written to a shared file).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import redis

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench as B

from quota_gw import embedded


def proc_cpu(pid: int) -> float:
    f = open(f"/proc/{pid}/stat").read().split(")")[1].split()
    return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")


def redis_cpu(r: redis.Redis) -> float:
    info = r.info("cpu")
    return float(info["used_cpu_sys"]) + float(info["used_cpu_user"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--duration", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--multiproc-metrics", action="store_true", help="PROMETHEUS_MULTIPROC_DIR set, as `serve` sets it")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="qgw-cpu-"))
    rs = embedded.start_redis(tmp / "redis")
    r = redis.Redis.from_url(rs.url)
    cfg = B.config_file(tmp, "http://127.0.0.1:1")
    key = B.seed(rs.url, "cpu", 16)
    lua = tmp / "consume.lua"
    lua.write_text(B.CONSUME_LUA % key)
    port = embedded.free_port()
    env = {**os.environ, "QUOTA_GW_CONFIG": str(cfg), "REDIS_URL": rs.url, "QUOTA_GW_PREFIX": "cpu"}
    env.pop("DATABASE_URL", None)
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    if args.multiproc_metrics:
        (tmp / "metrics").mkdir()
        env["PROMETHEUS_MULTIPROC_DIR"] = str(tmp / "metrics")
    server = B.start_server("uvicorn", port, env)
    per_req: dict[str, list[float]] = {"/hello": [], "/v1/consume": []}
    rps: dict[str, list[float]] = {"/hello": [], "/v1/consume": []}
    try:
        for path, script in [("/hello", None), ("/v1/consume", lua)] * args.rounds:
            c0, r0, t0 = proc_cpu(server.pid), redis_cpu(r), time.time()
            res = B.wrk(f"http://127.0.0.1:{port}{path}", args.duration, 64, script)
            dt = time.time() - t0
            n = res["rps"] * args.duration
            c, rc = proc_cpu(server.pid) - c0, redis_cpu(r) - r0
            per_req[path].append(1e6 * c / n)
            rps[path].append(res["rps"])
            print(f"{path:<12} {res['rps']:>7,.0f} req/s  server CPU {100 * c / dt:3.0f}% = {1e6 * c / n:4.0f} µs/req"
                  f"  Redis {1e6 * rc / n:4.0f} µs/req")
        # Each consume beside the hello of its own round (the machine's load drifts between rounds).
        ratios = [c / h for h, c in zip(per_req["/hello"], per_req["/v1/consume"])]
        print("server CPU per consume / per hello, by round: " + "  ".join(f"{r:.2f}×" for r in ratios))
        tput = [c / h for h, c in zip(rps["/hello"], rps["/v1/consume"])]
        print("consume / hello req/s, by round:              " + "  ".join(f"{r:.2f}×" for r in tput))
    finally:
        server.terminate()
        server.wait(timeout=20)
        rs.stop()


if __name__ == "__main__":
    main()
