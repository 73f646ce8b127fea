"""The gateway outlives Postgres: it starts without it, decisions keep working (they are
Redis-only), /readyz stays 200 and shows Postgres down, the routes that need Postgres answer
503 `unavailable` with Retry-After, and once Postgres is back they work without a restart.
Uses a Postgres of its own (embedded), so it can be stopped."""

from __future__ import annotations

import asyncio
import secrets
from pathlib import Path

import httpx

from conftest import ADMIN_TOKEN, RUN, served, test_config_data
from quota_gw import config as config_mod
from quota_gw import db, embedded
from quota_gw.app import create_app

ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


async def wait_until(cond, timeout: float = 20.0) -> None:
    async with asyncio.timeout(timeout):
        while not await cond():
            await asyncio.sleep(0.05)


def assert_unavailable(r: httpx.Response) -> None:
    assert r.status_code == 503, r.text
    assert r.headers["content-type"] == "application/problem+json"
    assert r.json()["code"] == "unavailable" and int(r.headers["Retry-After"]) > 0


async def test_gateway_starts_and_decides_with_postgres_down_and_recovers_without_restart(
        pg_dir: Path, redis_url: str, redis) -> None:
    pg = await asyncio.to_thread(embedded.start_postgres, pg_dir)
    prefix = f"av{RUN}"
    try:
        await db.migrate_url(pg.url)
        cfg = config_mod.parse(test_config_data())
        # Made while Postgres is up: an org and a key (written to Redis by the admin API).
        app = create_app(cfg, redis_url, pg.url, prefix)
        async with app.router.lifespan_context(app), httpx.AsyncClient(
                transport=httpx.ASGITransport(app=app), base_url="http://gw") as c:
            org = f"avail-{secrets.token_hex(4)}"
            assert (await c.post("/v1/admin/orgs", json={"org_id": org, "plan": "pro"}, headers=ADMIN)).status_code == 201
            key = (await c.post(f"/v1/admin/orgs/{org}/keys", json={"scopes": ["consume", "read"]},
                                headers=ADMIN)).json()["key"]
            only_in_pg = (await c.post(f"/v1/admin/orgs/{org}/keys", json={"scopes": ["consume"]},
                                       headers=ADMIN)).json()["key"]
        h = {"Authorization": f"Bearer {key}"}
        from quota_gw.auth import hash_key
        from quota_gw.layout import Layout

        await redis.delete(Layout(prefix, cfg.shards).api_key(hash_key(only_in_pg)))  # as after a flush

        await asyncio.to_thread(pg.stop)
        app = create_app(cfg, redis_url, pg.url, prefix)
        async with app.router.lifespan_context(app), httpx.AsyncClient(
                transport=httpx.ASGITransport(app=app), base_url="http://gw") as c:
            # started: decisions work
            r = await c.post("/v1/consume", json={"feature": "generate_goal"}, headers=h)
            assert r.status_code == 200, r.text
            r = await c.get("/readyz")
            assert r.status_code == 200 and r.json()["ready"] is True and r.json()["redis"] == "ok"
            assert r.json()["postgres"].startswith("down")
            # the Postgres-backed routes: 503 unavailable with Retry-After, never 500
            assert_unavailable(await c.get(f"/v1/admin/orgs/{org}/keys", headers=ADMIN))
            assert_unavailable(await c.post("/v1/admin/orgs", json={"org_id": f"{org}-2", "plan": "pro"},
                                            headers=ADMIN))
            assert_unavailable(await c.get("/v1/usage", headers=h))
            assert_unavailable(await c.get("/v1/analytics", headers=h))
            # a key Redis does not hold is looked up in Postgres: unavailable, not 500 or 401
            assert_unavailable(await c.post("/v1/consume", json={"feature": "generate_goal"},
                                            headers={"Authorization": f"Bearer {only_in_pg}"}))

            pg = await asyncio.to_thread(embedded.start_postgres, pg_dir, pg.port)

            async def admin_works() -> bool:
                return (await c.get(f"/v1/admin/orgs/{org}/keys", headers=ADMIN)).status_code == 200

            await wait_until(admin_works)
            assert (await c.get("/readyz")).json()["postgres"] == "ok"
            assert (await c.post("/v1/consume", json={"feature": "generate_goal"},
                                 headers={"Authorization": f"Bearer {only_in_pg}"})).status_code == 200

            # down again while the pool is connected: 503 as well, and back again
            await asyncio.to_thread(pg.stop)
            assert_unavailable(await c.get(f"/v1/admin/orgs/{org}/keys", headers=ADMIN))
            assert_unavailable(await c.get("/v1/usage", headers=h))
            assert (await c.post("/v1/consume", json={"feature": "generate_goal"}, headers=h)).status_code == 200
            r = await c.get("/readyz")
            assert r.status_code == 200 and r.json()["postgres"].startswith("down")
            pg = await asyncio.to_thread(embedded.start_postgres, pg_dir, pg.port)
            await wait_until(admin_works)
            assert (await c.get("/v1/usage", headers=h)).status_code == 200
    finally:
        await asyncio.to_thread(pg.stop)
        async for k in redis.scan_iter(match=f"{prefix}:*", count=1000):
            await redis.delete(k)


def test_serve_starts_with_postgres_unreachable(tmp_path: Path, redis_url: str, prefix: str) -> None:
    """`quota-gw serve` with DATABASE_URL at a closed port: ready, deciding, admin 503."""
    dead = embedded.free_port()
    env = {"REDIS_URL": redis_url, "DATABASE_URL": f"postgresql://postgres@127.0.0.1:{dead}/x", "QUOTA_GW_PREFIX": prefix}
    with served(tmp_path, test_config_data(), env) as (base, r):
        assert r.status_code == 200 and r.json()["postgres"].startswith("down"), r.text
        assert_unavailable(httpx.get(f"{base}/v1/admin/orgs/x/keys", headers=ADMIN, timeout=10))
