"""CPU time per request of the gateway process and of Redis, hello world vs consume.

    .venv/bin/python bench/cpu_per_request.py [--duration 5]

Throughput on a shared 2-core machine says little on its own; CPU per request (from
/proc/<pid>/stat and Redis INFO cpu around a wrk run) says where the time goes.
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
    server = B.start_server("uvicorn", port, env)
    try:
        for path, script in [("/hello", None), ("/v1/consume", lua)] * 2:
            c0, r0, t0 = proc_cpu(server.pid), redis_cpu(r), time.time()
            res = B.wrk(f"http://127.0.0.1:{port}{path}", args.duration, 64, script)
            dt = time.time() - t0
            n = res["rps"] * args.duration
            c, rc = proc_cpu(server.pid) - c0, redis_cpu(r) - r0
            print(f"{path:<12} {res['rps']:>7,.0f} req/s  server CPU {100 * c / dt:3.0f}% = {1e6 * c / n:4.0f} µs/req"
                  f"  Redis {1e6 * rc / n:4.0f} µs/req")
    finally:
        server.terminate()
        server.wait(timeout=20)
        rs.stop()


if __name__ == "__main__":
    main()
