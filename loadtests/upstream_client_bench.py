"""Which async HTTP client should the sidecar forward with? httpx vs aiohttp, measured.

Starts the demo upstream (uvicorn, its own process) and drives it from this process with each
client the way the proxy would: pooled, 50 concurrent, small JSON calls and streamed SSE
completions read chunk by chunk. Reports calls/s and CPU ms per call of this process (the
client's cost is what the gateway pays). Run: .venv/bin/python loadtests/upstream_client_bench.py
"""

from __future__ import annotations

import asyncio
import os
import resource
import subprocess
import sys
import time

import aiohttp
import httpx
import uvloop

from quota_gw.embedded import free_port, reachable

CONC = int(os.environ.get("CONC", 50))
N_JSON = int(os.environ.get("N_JSON", 4000))
N_SSE = int(os.environ.get("N_SSE", 400))
SSE_BODY = b'{"model":"demo-1","stream":true,"max_tokens":100,"messages":[{"role":"user","content":"hi"}]}'


def cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


async def run(name: str, n: int, call) -> tuple[float, float]:
    sem = asyncio.Semaphore(CONC)

    async def one(i: int) -> None:
        async with sem:
            await call()

    c0, t0 = cpu(), time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(n)))
    dt, dc = time.perf_counter() - t0, cpu() - c0
    return n / dt, dc * 1000 / n


async def bench(base: str) -> list[tuple[str, str, float, float]]:
    out = []
    limits = httpx.Limits(max_connections=200, max_keepalive_connections=200)
    async with httpx.AsyncClient(base_url=base, limits=limits, timeout=30) as hc:
        async def hx_json() -> None:
            r = await hc.post("/ai/goals", content=b'{"x":1}', headers={"content-type": "application/json"})
            await r.aread()

        async def hx_sse() -> None:
            async with hc.stream("POST", "/v1/chat/completions", content=SSE_BODY,
                                 headers={"content-type": "application/json"}) as r:
                async for _ in r.aiter_raw():
                    pass

        await run("warm", 200, hx_json)
        out.append(("httpx", "json", *await run("httpx json", N_JSON, hx_json)))
        out.append(("httpx", "sse", *await run("httpx sse", N_SSE, hx_sse)))
    conn = aiohttp.TCPConnector(limit=200, ttl_dns_cache=300)
    async with aiohttp.ClientSession(base, connector=conn, auto_decompress=False) as ac:
        async def ah_json() -> None:
            async with ac.post("/ai/goals", data=b'{"x":1}', headers={"content-type": "application/json"}) as r:
                await r.read()

        async def ah_sse() -> None:
            async with ac.post("/v1/chat/completions", data=SSE_BODY,
                               headers={"content-type": "application/json"}) as r:
                async for _ in r.content.iter_any():
                    pass

        await run("warm", 200, ah_json)
        out.append(("aiohttp", "json", *await run("aiohttp json", N_JSON, ah_json)))
        out.append(("aiohttp", "sse", *await run("aiohttp sse", N_SSE, ah_sse)))
    return out


def main() -> None:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "quota_gw.cli", "demo-upstream", "--port", str(port),
                             "--log-level", "warning"])
    try:
        deadline = time.monotonic() + 20
        while not reachable("127.0.0.1", port):
            if time.monotonic() > deadline:
                raise SystemExit("demo upstream did not start")
            time.sleep(0.05)
        rows = uvloop.run(bench(f"http://127.0.0.1:{port}"))
    finally:
        proc.terminate()
        proc.wait()
    print(f"{'client':8} {'call':5} {'calls/s':>9} {'cpu ms/call':>12}")
    for client, kind, rps, cpu_ms in rows:
        print(f"{client:8} {kind:5} {rps:9.0f} {cpu_ms:12.3f}")


if __name__ == "__main__":
    main()
