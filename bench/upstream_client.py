"""The sidecar's upstream client (sidecar/pool.py) vs aiohttp's, alone, same run.

    .venv/bin/python bench/upstream_client.py [--rounds 2]

Starts the demo upstream (its own process) and drives it from this process with each client
the way the proxy does: 64 calls in flight on pooled keep-alive connections, the LLM call of
bench.py (max_tokens 16), JSON and streamed, each answer read whole. Prints CPU µs per call of
this process (what the gateway pays for its client) and calls/s, alternating the clients.
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp
import uvloop

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from quota_gw import embedded  # noqa: E402
from quota_gw.sidecar import pool  # noqa: E402

BODY = b'{"model":"demo-1","max_tokens":16,%s"messages":[{"role":"user","content":"Say something about quotas."}]}'
# What the proxy sends upstream for bench.py's call (headers.py)
HEADERS = [("content-type", "application/json"), ("user-agent", "wrk"), ("X-Forwarded-For", "127.0.0.1"),
           ("X-Forwarded-Proto", "http"), ("X-Forwarded-Host", "gw"), ("X-Quota-Org", "bench-org"),
           ("Accept-Encoding", "identity")]
LANES = 64


async def with_aiohttp(url: str, body: bytes) -> tuple[Callable[[], Awaitable[None]], Callable[[], Awaitable[None]]]:
    """As the sidecar used it before (one session, no cookie jar, no decompression)."""
    s = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=4), auto_decompress=False,
                              cookie_jar=aiohttp.DummyCookieJar(),
                              skip_auto_headers=("User-Agent", "Accept-Encoding", "Content-Type"))
    t = aiohttp.ClientTimeout(total=None, sock_connect=5, sock_read=60)

    async def one() -> None:
        r = await s.request("POST", url, headers=HEADERS, data=body, allow_redirects=False, timeout=t)
        async with r:
            if r.content.is_eof():
                r.content.read_nowait()
            else:
                async for _ in r.content.iter_any():
                    pass

    return one, s.close


async def with_pool(url: str, body: bytes) -> tuple[Callable[[], Awaitable[None]], Callable[[], Awaitable[None]]]:
    p = pool.Pool(4)

    async def one() -> None:
        r = await p.request("POST", url, HEADERS, body, 5, 60)
        async with r:
            if r.complete():
                r.read_now()
            else:
                async for _ in r.chunks():
                    pass

    return one, p.close


async def measure(client: Callable, url: str, body: bytes, n: int) -> tuple[float, float]:
    one, close = await client(url, body)

    async def lane(k: int) -> None:
        for _ in range(k):
            await one()

    await asyncio.gather(*(lane(10) for _ in range(LANES)))  # connections made, code warm
    c0, t0 = time.process_time(), time.perf_counter()
    await asyncio.gather(*(lane(n // LANES) for _ in range(LANES)))
    c1, t1 = time.process_time(), time.perf_counter()
    await close()
    return (c1 - c0) / n * 1e6, n / (t1 - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    port = embedded.free_port()
    up = subprocess.Popen([str(Path(sys.executable).parent / "quota-gw"), "demo-upstream", "--port", str(port),
                           "--log-level", "warning"])
    try:
        deadline = time.monotonic() + 30
        while not embedded.reachable("127.0.0.1", port):
            if time.monotonic() > deadline:
                raise RuntimeError("the demo upstream did not start")
            time.sleep(0.1)
        url = f"http://127.0.0.1:{port}/v1/chat/completions"
        print("| call | client | CPU µs/call (rounds) | calls/s (rounds) |\n|---|---|---|---|")
        for mode, body, n in (("JSON", BODY % b"", 6400), ("streamed", BODY % b'"stream":true,', 2560)):
            results: dict[str, list[tuple[float, float]]] = {"aiohttp": [], "sidecar pool": []}
            for _ in range(args.rounds):
                for name, client in (("aiohttp", with_aiohttp), ("sidecar pool", with_pool)):
                    results[name].append(uvloop.run(measure(client, url, body, n)))
            for name, rs in results.items():
                print(f"| {mode} | {name} | {', '.join(f'{c:.0f}' for c, _ in rs)} | "
                      f"{', '.join(f'{r:,.0f}' for _, r in rs)} |")
    finally:
        up.terminate()
        up.wait(timeout=20)


if __name__ == "__main__":
    main()
