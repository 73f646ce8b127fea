"""Side-by-side benchmarks of the decision path (issue 5), printed as ratios.

    .venv/bin/python bench/bench.py [--duration 10] [--connections 64] [--rounds 2] [--write]

Starts its own Valkey (embedded, on a free port, so `INFO commandstats` counts only this run)
and the gateway on 127.0.0.1, then runs wrk against a hello-world route and POST /v1/consume
on the same server, alternating, several rounds. The machine is shared and noisy: compare the
ratios, not the absolute numbers. --write appends the table to docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import httpx
import redis
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from quota_gw import embedded  # noqa: E402
from quota_gw.auth import hash_key, new_key  # noqa: E402
from quota_gw.layout import Layout  # noqa: E402

CONSUME_LUA = """
wrk.method = "POST"
wrk.body = '{"feature":"generate_insight","user_id":"bench"}'
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer %s"
"""

# The same small JSON call for every proxy path (direct, pass-through, quota).
PROXY_LUA = """
wrk.method = "POST"
wrk.body = '{"input":"hello"}'
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer %s"
"""


def wrk(url: str, duration: int, connections: int, script: Path | None = None) -> dict[str, float]:
    cmd = ["wrk", "-t1", f"-c{connections}", f"-d{duration}s", "--latency"]
    if script:
        cmd += ["-s", str(script)]
    out = subprocess.run(cmd + [url], capture_output=True, text=True, check=True).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)

    def pct(p: str) -> float:
        m = re.search(rf"\s{p}%\s+([\d.]+)(us|ms|s)", out)
        v = float(m.group(1))
        return v / 1000 if m.group(2) == "us" else v * 1000 if m.group(2) == "s" else v

    return {"rps": rps, "p50": pct("50"), "p99": pct("99"), "errors": int(non2xx.group(1)) if non2xx else 0}


def config_file(tmp: Path, upstream: str) -> Path:
    data = yaml.safe_load((ROOT / "examples" / "quota-gw.yaml").read_text())
    data["plans"]["bench"] = {"allocations": {"general": 10**12}}
    data["routes"] = [
        {"prefix": "/plain", "upstream": upstream, "metering": "none"},
        {"prefix": "/quota", "upstream": upstream, "feature": "generate_insight", "metering": "fixed"},
    ]
    p = tmp / "bench.yaml"
    p.write_text(yaml.safe_dump(data))
    return p


def seed(redis_url: str, prefix: str, shards: int) -> str:
    """An org on the bench plan and a key, written as the admin API writes them."""
    r = redis.Redis.from_url(redis_url, decode_responses=True)
    layout = Layout(prefix, shards)
    key_id, key = new_key()
    r.hset(layout.org("bench-org"), mapping={"plan": "bench", "name": "bench"})
    r.hset(layout.api_key(hash_key(key)), mapping={"key_id": key_id, "org": "bench-org", "user": "",
                                                   "scopes": "consume,read"})
    return key


def start_server(kind: str, port: int, env: dict[str, str]) -> subprocess.Popen:
    if kind == "uvicorn":
        cmd = [sys.executable, "-m", "uvicorn", "serve_app:factory", "--factory", "--app-dir", str(ROOT / "bench"),
               "--port", str(port), "--host", "127.0.0.1", "--loop", "uvloop", "--http", "httptools",
               "--no-access-log", "--log-level", "warning"]
    else:
        cmd = [str(Path(sys.executable).parent / "granian"), "--interface", "asgi", "--factory", "--host",
               "127.0.0.1", "--port", str(port), "--workers", "1", "--loop", "uvloop", "--log-level", "warning",
               "--no-ws", "serve_app:factory"]
        env = {**env, "PYTHONPATH": str(ROOT / "bench")}
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT / "bench")
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                return proc
        except httpx.TransportError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError(f"{kind} did not start")


def scrape(port: int, name: str) -> float:
    text = httpx.get(f"http://127.0.0.1:{port}/metrics").text
    m = re.search(rf"^{name} ([\d.e+]+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


def evalsha_calls(r: redis.Redis) -> int:
    """Script calls the server ran, EVALSHA or FCALL (commands inside count under their own names)."""
    stats = r.info("commandstats")
    return sum(stats.get(f"cmdstat_{c}", {}).get("calls", 0) for c in ("evalsha", "fcall", "fcall_ro"))


async def paced(url: str, rate: int, duration: int, headers: dict[str, str]) -> dict[str, float]:
    """Open loop: request i starts at i/rate s whatever the answers do; latency counts from then."""
    import aiohttp

    lat: list[float] = []
    errors = 0
    async with aiohttp.ClientSession(headers=headers) as session:
        loop = asyncio.get_running_loop()
        t0 = loop.time() + 0.1

        async def one(i: int) -> None:
            nonlocal errors
            start = t0 + i / rate
            await asyncio.sleep(max(0.0, start - loop.time()))
            async with session.post(url, json={"input": "hello"}) as resp:
                await resp.read()
                if resp.status >= 300:
                    errors += 1
            lat.append((loop.time() - start) * 1000)

        await asyncio.gather(*(one(i) for i in range(rate * duration)))
    lat.sort()
    return {"rps": len(lat) / duration, "p50": lat[len(lat) // 2], "p99": lat[int(len(lat) * 0.99)], "errors": errors}


def proxy_section(args: argparse.Namespace, tmp: Path, cfg: Path, redis_url: str, up_port: int) -> list[dict]:
    """Direct to the demo upstream, through a pass-through route, through a quota route."""
    prefix = "benchproxy"
    key = seed(redis_url, prefix, 16)
    lua = tmp / "proxy.lua"
    lua.write_text(PROXY_LUA % key)
    port = embedded.free_port()
    env = {**os.environ, "QUOTA_GW_CONFIG": str(cfg), "REDIS_URL": redis_url, "QUOTA_GW_PREFIX": prefix}
    env.pop("DATABASE_URL", None)
    proc = start_server("uvicorn", port, env)
    try:
        urls = [f"http://127.0.0.1:{up_port}/bench", f"http://127.0.0.1:{port}/plain/bench",
                f"http://127.0.0.1:{port}/quota/bench"]
        for u in urls:
            wrk(u, 2, args.connections, lua)
        runs: list[list[dict[str, float]]] = [[], [], []]
        for _ in range(args.rounds):
            for i, u in enumerate(urls):
                runs[i].append(wrk(u, args.duration, args.connections, lua))
        out = [{"rps": statistics.median(x["rps"] for x in rs), "p50": statistics.median(x["p50"] for x in rs),
                "p99": statistics.median(x["p99"] for x in rs), "errors": sum(x["errors"] for x in rs)} for rs in runs]
        # Added latency at half of the quota route's max load: both routes at the same fixed rate
        # (Debian's wrk has no fixed-rate mode, so an open-loop paced client does it).
        rate = int(out[2]["rps"] / 2)
        for u in urls[1:]:
            x = asyncio.run(paced(u, rate, args.duration, {"Authorization": f"Bearer {key}"}))
            x["rate"] = rate
            out.append(x)
        return out
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--duration", type=int, default=8)
    ap.add_argument("--connections", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--servers", default="uvicorn,granian")
    ap.add_argument("--sections", default="decision,proxy", help="decision,proxy")
    ap.add_argument("--write", action="store_true", help="append the results to docs/benchmarks.md")
    args = ap.parse_args()
    if not shutil.which("wrk"):
        sys.exit("wrk is not installed (apt-get install wrk)")

    tmp = Path(tempfile.mkdtemp(prefix="qgw-bench-"))
    rsrv = embedded.start_redis(tmp / "redis")
    r = redis.Redis.from_url(rsrv.url, decode_responses=True)
    up_port = embedded.free_port()
    upstream = subprocess.Popen([str(Path(sys.executable).parent / "quota-gw"), "demo-upstream", "--port",
                                 str(up_port), "--log-level", "warning"])
    cfg = config_file(tmp, f"http://127.0.0.1:{up_port}")
    rows, proxy_rows = [], []
    try:
        if "proxy" in args.sections:
            proxy_rows = proxy_section(args, tmp, cfg, rsrv.url, up_port)
        for server in (args.servers.split(",") if "decision" in args.sections else []):
            for coalesce in (True, False):
                data = yaml.safe_load(cfg.read_text())
                data["behaviour"] = {**data.get("behaviour", {}), "coalesce": coalesce}
                variant = tmp / f"bench-{coalesce}.yaml"
                variant.write_text(yaml.safe_dump(data))
                prefix = f"bench{int(coalesce)}{server[0]}"
                key = seed(rsrv.url, prefix, data["shards"])
                lua = tmp / "consume.lua"
                lua.write_text(CONSUME_LUA % key)
                port = embedded.free_port()
                env = {**os.environ, "QUOTA_GW_CONFIG": str(variant), "REDIS_URL": rsrv.url, "QUOTA_GW_PREFIX": prefix}
                env.pop("DATABASE_URL", None)
                proc = start_server(server, port, env)
                try:
                    base = f"http://127.0.0.1:{port}"
                    wrk(f"{base}/hello", 2, args.connections)  # warm up
                    wrk(f"{base}/v1/consume", 2, args.connections, lua)
                    hello, consume = [], []
                    cmds = trips = calls = 0.0
                    for _ in range(args.rounds):
                        hello.append(wrk(f"{base}/hello", args.duration, args.connections))
                        c0, t0, s0 = evalsha_calls(r), scrape(port, "quota_gw_redis_round_trips_total"), \
                            scrape(port, "quota_gw_redis_script_calls_total")
                        res = wrk(f"{base}/v1/consume", args.duration, args.connections, lua)
                        consume.append(res)
                        cmds += evalsha_calls(r) - c0
                        trips += scrape(port, "quota_gw_redis_round_trips_total") - t0
                        calls += scrape(port, "quota_gw_redis_script_calls_total") - s0
                    h = statistics.median(x["rps"] for x in hello)
                    c = statistics.median(x["rps"] for x in consume)
                    n = sum(x["rps"] for x in consume) * args.duration
                    rows.append({
                        "server": server, "coalesce": coalesce, "hello": h, "consume": c, "ratio": c / h,
                        "p50": statistics.median(x["p50"] for x in consume),
                        "p99": statistics.median(x["p99"] for x in consume),
                        "errors": sum(x["errors"] for x in consume),
                        "cmds_per_decision": cmds / max(calls, 1), "trips_per_decision": trips / max(calls, 1),
                        "decisions": int(calls), "requests": int(n)})
                finally:
                    proc.terminate()
                    proc.wait(timeout=20)
    finally:
        upstream.terminate()
        upstream.wait(timeout=20)
        rsrv.stop()

    head = ("| server | coalesce | hello req/s | consume req/s | ratio | consume p50 ms | p99 ms | non-2xx |"
            " EVALSHA/decision | round trips/decision |")
    lines = [head, "|" + "---|" * 10]
    for x in rows:
        lines.append(f"| {x['server']} | {'on' if x['coalesce'] else 'off'} | {x['hello']:,.0f} | {x['consume']:,.0f} |"
                     f" **{x['ratio']:.2f}×** | {x['p50']:.2f} | {x['p99']:.2f} | {x['errors']} |"
                     f" {x['cmds_per_decision']:.2f} | {x['trips_per_decision']:.3f} |")
    table = "\n".join(lines) if rows else ""
    if proxy_rows:
        plain = proxy_rows[1]
        ptable = ["| path | req/s | vs pass-through | p50 ms | p99 ms | added p50 ms | added p99 ms | non-2xx |",
                  "|---|---|---|---|---|---|---|---|"]
        for name, x in zip(("direct to the upstream", "pass-through route (no quota)", "quota route (consume + forward)"),
                           proxy_rows):
            ptable.append(f"| {name} | {x['rps']:,.0f} | **{x['rps'] / plain['rps']:.2f}×** | {x['p50']:.2f} |"
                          f" {x['p99']:.2f} | {x['p50'] - plain['p50']:+.2f} | {x['p99'] - plain['p99']:+.2f} |"
                          f" {x['errors']} |")
        half = proxy_rows[3:]
        if half:
            ptable.append(f"| at half load ({half[0]['rate']:.0f} req/s): pass-through | {half[0]['rps']:,.0f} | |"
                          f" {half[0]['p50']:.2f} | {half[0]['p99']:.2f} | | | {half[0]['errors']} |")
            ptable.append(f"| at half load: quota route | {half[1]['rps']:,.0f} | | {half[1]['p50']:.2f} |"
                          f" {half[1]['p99']:.2f} | {half[1]['p50'] - half[0]['p50']:+.2f} |"
                          f" {half[1]['p99'] - half[0]['p99']:+.2f} | {half[1]['errors']} |")
        table = "\n".join(ptable) + ("\n\n" + table if table else "")
    print(table)
    if args.write:
        stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        cmd = "python bench/bench.py " + " ".join(sys.argv[1:])
        section = (f"\n### {args.sections} — {stamp}\n\n`{cmd}` on {platform.node()} "
                   f"({os.cpu_count()} cores), wrk -t1 -c{args.connections}, {args.duration}s × {args.rounds} rounds "
                   f"(median), one server worker, embedded Valkey.\n\n{table}\n")
        docs = ROOT / "docs" / "benchmarks.md"
        with docs.open("a") as f:
            f.write(section)
        print(f"appended to {docs}")


if __name__ == "__main__":
    main()
