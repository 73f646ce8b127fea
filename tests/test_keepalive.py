"""Keep-alive races: a request sent on a pooled connection the upstream is closing (uvicorn
closes idle ones after `timeout_keep_alive`) reaches no one and, before the fix, came back as a
502. The upstream pool gives connections up before the upstream does (`upstream_keepalive_s`)
and checks a pooled connection before reusing it, so idle gaps around the upstream's own
timeout give no errors. The bounded run uses a 1 s upstream keep-alive; the soak (make
test-long) the real thing: uvicorn's default 5 s and 200 calls."""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from conftest import test_config_data
from quota_gw import config as config_mod
from quota_gw.app import create_app
from quota_gw.demo import create_demo_app
from quota_gw.dev import serve
from worker_support import SOAK


async def saturated_loop() -> None:
    """Keeps the event loop as a saturated gateway's is: every turn takes a few milliseconds,
    so a close from the upstream is read a turn after the request that reuses the connection
    was already on its way (the race the benchmarks hit past saturation)."""
    while True:
        time.sleep(0.004)  # blocking on purpose: this is the CPU of other requests
        await asyncio.sleep(0)


async def idle_gap_calls(tenant, redis_url, database_url, prefix, upstream_keepalive: float, lanes: int,
                         calls: int, route_keepalive: float | None) -> tuple[list[int], int]:
    """`lanes` callers, each making `calls` calls with idle gaps jittered around the upstream's
    keep-alive timeout. Returns every status and how many calls the upstream saw."""
    demo = create_demo_app()
    async with serve(demo, lifespan="off", timeout_keep_alive=upstream_keepalive) as up:
        data = test_config_data()
        route = {"prefix": "/ai/goals", "upstream": f"http://127.0.0.1:{up.port}", "feature": "generate_goal",
                 "metering": "none"}
        if route_keepalive is not None:
            route["upstream_keepalive_s"] = route_keepalive
        data["routes"] = [route]
        app = create_app(config_mod.parse(data), redis_url, database_url, prefix)
        _, h = await tenant("pro")
        rng = random.Random(8)
        statuses: list[int] = []
        async with app.router.lifespan_context(app), httpx.AsyncClient(
                transport=httpx.ASGITransport(app=app), base_url="http://gw", timeout=30) as c:

            async def lane(i: int) -> None:
                await asyncio.sleep(i * upstream_keepalive / lanes)  # spread the lanes over one period
                for _ in range(calls):
                    statuses.append((await c.post("/ai/goals", headers=h, content=b"{}")).status_code)
                    # the gap is the point of the test: around the upstream's idle timeout
                    await asyncio.sleep(upstream_keepalive * rng.uniform(0.97, 1.03))

            busy = asyncio.ensure_future(saturated_loop())
            try:
                await asyncio.gather(*(lane(i) for i in range(lanes)))
            finally:
                busy.cancel()
        return statuses, demo.state.demo.stats.count


async def test_idle_gaps_around_the_upstream_keepalive_give_no_errors(tenant, redis_url, database_url, prefix):
    statuses, seen = await idle_gap_calls(tenant, redis_url, database_url, prefix, upstream_keepalive=1,
                                          lanes=25, calls=8, route_keepalive=0.7)
    assert len(statuses) == 200
    assert statuses.count(200) == 200, sorted(set(statuses))
    assert seen == 200  # each call reached the upstream exactly once


@pytest.mark.soak
@pytest.mark.skipif(not SOAK, reason="long: make test-long (QUOTA_GW_SOAK=1)")
async def test_idle_gaps_around_uvicorns_5s_keepalive_give_no_errors(tenant, redis_url, database_url, prefix):
    """The issue's case: a uvicorn upstream (5 s) and the default pool setting (4 s)."""
    statuses, seen = await idle_gap_calls(tenant, redis_url, database_url, prefix, upstream_keepalive=5,
                                          lanes=20, calls=10, route_keepalive=None)
    assert statuses.count(200) == len(statuses) == 200, sorted(set(statuses))
    assert seen == 200


def test_serve_keeps_idle_connections_longer_than_uvicorns_5s(tmp_path, redis_url, database_url, prefix):
    """`quota-gw serve` defaults to a 75 s keep-alive (nginx keeps idle upstream connections
    60 s): a connection idle for 6 s still carries the next request."""
    import os
    import subprocess
    import sys

    import yaml

    from quota_gw.embedded import free_port

    cfg = tmp_path / "gw.yaml"
    cfg.write_text(yaml.safe_dump(test_config_data()))
    port = free_port()
    env = {**os.environ, "REDIS_URL": redis_url, "DATABASE_URL": database_url, "QUOTA_GW_PREFIX": prefix}
    proc = subprocess.Popen([sys.executable, "-m", "quota_gw.cli", "serve", "--config", str(cfg), "--port", str(port),
                             "--log-level", "warning"], env=env)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                sock = socket.create_connection(("127.0.0.1", port), timeout=5)
                break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, "serve did not start"
                time.sleep(0.1)
        def healthz() -> bytes:
            """One whole answer: the head and the 2-byte body may come in separate reads."""
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: gw\r\n\r\n")
            data = b""
            while not (b"\r\n\r\n" in data and data.endswith(b"ok")):
                chunk = sock.recv(4096)
                assert chunk, f"connection closed after {data!r}"
                data += chunk
            return data

        with sock:
            assert healthz().startswith(b"HTTP/1.1 200")
            time.sleep(6)  # idle past uvicorn's default 5 s: the point of the test
            assert healthz().startswith(b"HTTP/1.1 200")
    finally:
        proc.terminate()
        proc.wait(timeout=20)


@contextlib.asynccontextmanager
async def goals_gateway(tenant, redis_url, database_url, prefix) -> AsyncIterator[tuple[Any, Any, Any, Any, dict]]:
    """A demo upstream and an in-process gateway whose unmetered /ai/goals route forwards to it:
    (upstream server, demo app, gateway app, client, auth headers)."""
    demo = create_demo_app()
    async with serve(demo, lifespan="off") as up:
        data = test_config_data()
        data["routes"] = [{"prefix": "/ai/goals", "upstream": f"http://127.0.0.1:{up.port}",
                           "feature": "generate_goal", "metering": "none"}]
        app = create_app(config_mod.parse(data), redis_url, database_url, prefix)
        _, h = await tenant("pro")
        async with app.router.lifespan_context(app), httpx.AsyncClient(
                transport=httpx.ASGITransport(app=app), base_url="http://gw", timeout=30) as c:
            yield up, demo, app, c, h


async def test_a_connection_the_upstream_closed_while_idle_is_not_reused(tenant, redis_url, database_url, prefix):
    """The upstream closes its idle connections and the gateway reads the close: the next call
    goes on a new connection (nothing is written on the closed one), and the upstream sees it once."""
    async with goals_gateway(tenant, redis_url, database_url, prefix) as (up, demo, app, c, h):
        for method, body in (("POST", b"{}"), ("GET", None)):
            assert (await c.request(method, "/ai/goals", headers=h, content=body)).status_code == 200
            n = demo.state.demo.stats.count
            for conn in list(up.server_state.connections):
                conn.transport.close()
            await asyncio.sleep(0.2)  # the gateway's loop reads the close
            r = await c.request(method, "/ai/goals", headers=h, content=body)
            assert r.status_code == 200, r.text
            assert demo.state.demo.stats.count == n + 1  # reached the upstream once


async def test_a_pooled_connection_found_closed_before_reuse_is_dropped_not_used(tenant, redis_url, database_url,
                                                                                prefix):
    """The upstream closed an idle pooled connection and the gateway has not read the close
    yet (its loop is busy): the liveness check at pick time finds it closed and drops it, so
    the call goes on a new connection and nothing is sent on a dead one."""
    from quota_gw.sidecar import pool

    async with goals_gateway(tenant, redis_url, database_url, prefix) as (up, demo, app, c, h):
        assert (await c.post("/ai/goals", headers=h, content=b"{}")).status_code == 200
        dropped = pool.DROPPED_IDLE._value.get()
        n = demo.state.demo.stats.count
        for conn in list(up.server_state.connections):  # the upstream closes its idle connections:
            conn.transport.get_extra_info("socket").shutdown(socket.SHUT_WR)  # the FIN goes out now
        time.sleep(0.2)  # it has arrived, but the gateway's loop has not run to read it
        r = await c.post("/ai/goals", headers=h, content=b"{}")
        assert r.status_code == 200, r.text
        assert demo.state.demo.stats.count == n + 1
        assert pool.DROPPED_IDLE._value.get() == dropped + 1
