"""What the sidecar costs: the same calls straight to the demo upstream and through the proxy.

Starts the demo upstream and `quota-gw serve` (1 process each) on 127.0.0.1 against REDIS_URL
/ DATABASE_URL (default: the local 6379 / 5432; a scratch database and key prefix, removed
afterwards) and drives both with aiohttp, 50 concurrent: a fixed-cost call (consume + forward)
and a streamed 50-token completion (reserve + forward + commit).
Run: .venv/bin/python loadtests/proxy_bench.py
"""

from __future__ import annotations

import asyncio
import os
import secrets
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import asyncpg
import yaml

from quota_gw.embedded import free_port, reachable

CONC = int(os.environ.get("CONC", 50))
N = int(os.environ.get("N", 3000))
N_SSE = int(os.environ.get("N_SSE", 600))
ROOT = Path(__file__).resolve().parent.parent
SSE = {"model": "demo-1", "stream": True, "max_tokens": 50, "messages": [{"role": "user", "content": "hi"}]}


async def drive(url: str, n: int, headers: dict[str, str], body: object, stream: bool) -> tuple[float, float, int]:
    sem = asyncio.Semaphore(CONC)
    lat: list[float] = []
    bad = 0
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as s:
        async def one() -> None:
            nonlocal bad
            async with sem:
                t = time.perf_counter()
                async with s.post(url, json=body, headers=headers) as r:
                    if stream:
                        async for _ in r.content.iter_any():
                            pass
                    else:
                        await r.read()
                    bad += r.status != 200
                lat.append(time.perf_counter() - t)

        await asyncio.gather(*(one() for _ in range(50)))
        lat.clear()
        t0 = time.perf_counter()
        await asyncio.gather(*(one() for _ in range(n)))
        dt = time.perf_counter() - t0
    lat.sort()
    return n / dt, lat[len(lat) // 2] * 1000, bad


def wait(port: int) -> None:
    deadline = time.monotonic() + 30
    while not reachable("127.0.0.1", port):
        if time.monotonic() > deadline:
            raise SystemExit(f"nothing on {port}")
        time.sleep(0.05)


async def main() -> None:
    redis_url = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
    admin_url = os.environ.get("DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
    dbname = "qgw_bench_" + secrets.token_hex(4)
    conn = await asyncpg.connect(admin_url)
    await conn.execute(f'CREATE DATABASE "{dbname}"')
    await conn.close()
    db_url = admin_url.rsplit("/", 1)[0] + "/" + dbname
    up_port, gw_port = free_port(), free_port()
    tmp = Path(tempfile.mkdtemp())
    cfg = yaml.safe_load((ROOT / "examples" / "quota-gw.yaml").read_text())
    cfg["routes"] = [{"prefix": "/ai/insight", "upstream": f"http://127.0.0.1:{up_port}", "feature": "generate_insight"},
                     {"prefix": "/v1", "upstream": f"http://127.0.0.1:{up_port}", "feature": "chat", "metering": "openai"}]
    (tmp / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    token = secrets.token_hex(8)
    env = {**os.environ, "REDIS_URL": redis_url, "DATABASE_URL": db_url, "QUOTA_GW_ADMIN_TOKEN": token,
           "QUOTA_GW_PREFIX": "bench" + secrets.token_hex(3), "QUOTA_GW_CONFIG": str(tmp / "cfg.yaml")}
    subprocess.run([sys.executable, "-m", "quota_gw.cli", "migrate"], env=env, check=True, capture_output=True)
    procs = [subprocess.Popen([sys.executable, "-m", "quota_gw.cli", "demo-upstream", "--port", str(up_port),
                               "--log-level", "warning"], env=env),
             subprocess.Popen([sys.executable, "-m", "quota_gw.cli", "serve", "--port", str(gw_port),
                               "--log-level", "warning"], env=env)]
    try:
        wait(up_port)
        wait(gw_port)
        gw = f"http://127.0.0.1:{gw_port}"
        adm = {"Authorization": f"Bearer {token}"}
        async with aiohttp.ClientSession() as s:
            await (await s.post(f"{gw}/v1/admin/orgs", json={"org_id": "bench", "plan": "enterprise"}, headers=adm)).read()
            await (await s.post(f"{gw}/v1/admin/orgs/bench/grants", json={"meter": "general", "amount": 10**9,
                                                                          "reason": "bench"}, headers=adm)).read()
            key = (await (await s.post(f"{gw}/v1/admin/orgs/bench/keys", json={"scopes": ["consume"]},
                                       headers=adm)).json())["key"]
        h = {"Authorization": f"Bearer {key}"}
        up = f"http://127.0.0.1:{up_port}"
        rows = [
            ("fixed, direct", await drive(f"{up}/ai/insight", N, {}, {"x": 1}, False)),
            ("fixed, via proxy", await drive(f"{gw}/ai/insight", N, h, {"x": 1}, False)),
            ("SSE 50 tokens, direct", await drive(f"{up}/v1/chat/completions", N_SSE, {}, SSE, True)),
            ("SSE 50 tokens, via proxy", await drive(f"{gw}/v1/chat/completions", N_SSE, h, SSE, True)),
        ]
    finally:
        for p in procs:
            p.terminate()
            p.wait()
        conn = await asyncpg.connect(admin_url)
        await conn.execute(f'DROP DATABASE IF EXISTS "{dbname}" WITH (FORCE)')
        await conn.close()
        import redis.asyncio as aioredis

        r = aioredis.from_url(redis_url)
        async for k in r.scan_iter(match=env["QUOTA_GW_PREFIX"] + ":*", count=1000):
            await r.delete(k)
        await r.aclose()
    print(f"{'call':28} {'calls/s':>8} {'p50 ms':>8} {'non-200':>8}")
    for name, (rps, p50, bad) in rows:
        print(f"{name:28} {rps:8.0f} {p50:8.1f} {bad:8d}")


if __name__ == "__main__":
    asyncio.run(main())
