"""Redis down (SPEC §5): fail closed answers 503 and forwards nothing; fail open forwards,
spools the usage on disk and replays it into Redis (and, through the worker, Postgres)
exactly once when Redis is back. Uses its own embedded Redis, so it can be stopped."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import asyncpg
import httpx
import orjson

from conftest import ADMIN_TOKEN, RUN, test_config_data
from quota_gw import config as config_mod
from quota_gw import embedded
from quota_gw.app import create_app
from quota_gw.demo import create_demo_app
from quota_gw.dev import serve
from quota_gw.layout import Layout
from quota_gw.events import entries


async def wait_until(cond, timeout: float = 15.0) -> None:
    async with asyncio.timeout(timeout):
        while not await cond():
            await asyncio.sleep(0.05)


async def test_fail_open_spools_and_replays_once_fail_closed_forwards_nothing(tmp_path: Path, database_url: str):
    data_dir = tmp_path / "redis"
    rs = await asyncio.to_thread(embedded.start_redis, data_dir, None, persist=True)
    prefix = f"fo{RUN}"
    demo_app = create_demo_app()
    stats = demo_app.state.demo.stats
    try:
        async with serve(demo_app, lifespan="off") as up:
            upstream = f"http://127.0.0.1:{up.port}"
            data = test_config_data()
            data["routes"] = [
                {"prefix": "/ai/goals", "upstream": upstream, "feature": "generate_goal", "fail": "open"},
                {"prefix": "/ai/closed", "upstream": upstream, "feature": "generate_goal"},
                {"prefix": "/v1", "upstream": upstream, "feature": "chat", "metering": "openai", "fail": "open"},
            ]
            data["behaviour"] = {"fail": "closed", "spool_dir": str(tmp_path / "spool")}
            cfg = config_mod.parse(data)
            layout = Layout(prefix, cfg.shards)
            app = create_app(cfg, rs.url, database_url, prefix)
            # No keep-alive: waits here can outlast the server's keep-alive timeout, and a request
            # sent on a connection the server is closing fails with ReadError (seen under CI load).
            async with serve(app) as server, httpx.AsyncClient(
                    base_url=f"http://127.0.0.1:{server.port}", timeout=30,
                    limits=httpx.Limits(max_keepalive_connections=0)) as c:
                adm = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
                org = f"failopen-{RUN}"
                assert (await c.post("/v1/admin/orgs", json={"org_id": org, "plan": "pro"}, headers=adm)).status_code == 201
                key = (await c.post(f"/v1/admin/orgs/{org}/keys", json={"scopes": ["consume", "read"]},
                                    headers=adm)).json()["key"]
                h = {"Authorization": f"Bearer {key}"}
                assert (await c.post("/ai/goals", headers=h)).status_code == 200  # 20 - 3 = 17

                await asyncio.to_thread(rs.stop)
                r = await c.get("/readyz")
                assert r.status_code == 503 and r.json()["redis"].startswith("down")

                n = stats.count
                r = await c.post("/ai/closed", headers=h)
                assert r.status_code == 503 and r.headers["content-type"] == "application/problem+json"
                assert r.json()["code"] == "unavailable"
                assert stats.count == n  # nothing forwarded

                for _ in range(3):
                    r = await c.post("/ai/goals", headers=h)
                    assert r.status_code == 200 and r.headers["X-Quota-Degraded"] == "fail-open"
                r = await c.post("/v1/chat/completions", headers=h, json={
                    "model": "demo-1", "max_tokens": 10, "messages": [{"role": "user", "content": "hello there"}]})
                assert r.status_code == 200
                llm_tokens = r.json()["usage"]["total_tokens"]
                assert stats.count == n + 4
                # auth_request mode too: a fail-open route is allowed (and spooled), a closed one is 503
                r = await c.get("/v1/authorize", headers={**h, "X-Original-URI": "/ai/goals"})
                assert r.status_code == 200 and r.headers["X-Quota-Degraded"] == "fail-open"
                r = await c.get("/v1/authorize", headers={**h, "X-Original-URI": "/ai/closed"})
                assert r.status_code == 503 and r.headers["X-Quota-Status"] == "503"
                spool = app.state.sidecar.spool
                assert spool.pending() == 5
                backup = tmp_path / "backup"
                shutil.copytree(spool.dir, backup)  # as if a replayer crashed before deleting the file

                rs = await asyncio.to_thread(embedded.start_redis, data_dir, rs.port, persist=True)
                await wait_until(lambda: _done(spool))
                assert (await c.get("/readyz")).status_code == 200

                async def balances() -> tuple[int, int]:
                    m = (await c.get("/v1/balance", headers=h)).json()["meters"]
                    return m["goal_generation"]["balance"], m["tokens"]["balance"]

                assert await balances() == (17 - 12, 100000 - llm_tokens)
                for f in backup.iterdir():  # the same entries again: they must not land twice
                    shutil.copy(f, spool.dir / f.name)
                await wait_until(lambda: _done(spool))
                assert spool.replayed == 10
                assert await balances() == (17 - 12, 100000 - llm_tokens)

                redis = app.state.ctx.decider.redis
                events = [f for f in entries(await redis.xrange(layout.stream(org))) if f["org"] == org]
                spooled = [e for e in events if e["kind"] == "consume" and orjson.loads(e["meta"]).get("spooled")]
                assert sorted(e["feature"] for e in spooled) == ["chat"] + ["generate_goal"] * 4
                assert sum(-int(e["delta"]) for e in spooled) == 12 + llm_tokens

                # ... and the worker carries each of them into Postgres once.
                from sync_worker.worker import Worker

                worker = Worker(rs.url, database_url, layout, consumer="failmodes-test", block_ms=100)
                task = asyncio.create_task(worker.run())
                conn = await asyncpg.connect(database_url)
                try:
                    async def landed() -> bool:
                        return await conn.fetchval("SELECT count(*) FROM usage_events WHERE org_id = $1",
                                                   org) == len(events)

                    await wait_until(landed, 30)
                    rows = await conn.fetch("SELECT event_id, delta FROM usage_events WHERE org_id = $1 AND kind = "
                                            "'consume' AND metadata->>'spooled' = 'true'", org)
                    assert len(rows) == 5 and len({r["event_id"] for r in rows}) == 5
                    assert sum(-r["delta"] for r in rows) == 12 + llm_tokens
                finally:
                    worker.stop()
                    await task
                    await conn.close()
    finally:
        await asyncio.to_thread(rs.stop)


async def _done(spool) -> bool:
    return not spool.files()
