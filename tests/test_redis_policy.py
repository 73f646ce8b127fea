"""Redis' maxmemory-policy: an evicting policy can drop a balance (it comes back full), a hold
or an idempotency key, so the gateway refuses to start on one unless the operator allows it
explicitly (then it warns), /readyz reports the policy and is 503 when it is unsafe and not
allowed, and a Redis that refuses CONFIG (managed services) is reported `unknown`, not refused.
Uses a Redis of its own, started with `--maxmemory-policy allkeys-lru`."""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import redis.asyncio as aioredis
import yaml

from conftest import RUN, test_config_data
from quota_gw import config as config_mod
from quota_gw import embedded
from quota_gw.app import create_app
from quota_gw.redis_policy import UnsafeRedis


@pytest.fixture
async def lru_redis(tmp_path: Path):
    rs = await asyncio.to_thread(embedded.start_redis, tmp_path / "lru", None,
                                 args=("--maxmemory-policy", "allkeys-lru"))
    yield rs
    await asyncio.to_thread(rs.stop)


def cfg(**behaviour) -> config_mod.Config:
    data = test_config_data()
    data["behaviour"] = behaviour
    return config_mod.parse(data)


async def test_start_is_refused_on_an_evicting_redis(lru_redis, database_url) -> None:
    app = create_app(cfg(), lru_redis.url, database_url, f"pol{RUN}")
    with pytest.raises(UnsafeRedis, match="allkeys-lru"):
        async with app.router.lifespan_context(app):
            pass


async def test_override_starts_warns_and_readyz_reports_the_policy(lru_redis, database_url, caplog) -> None:
    app = create_app(cfg(allow_evicting_redis=True), lru_redis.url, database_url, f"pol{RUN}")
    with caplog.at_level(logging.WARNING, logger="quota_gw"):
        async with app.router.lifespan_context(app), httpx.AsyncClient(
                transport=httpx.ASGITransport(app=app), base_url="http://gw") as c:
            r = await c.get("/readyz")
            assert r.status_code == 200, r.text
            assert r.json()["redis_maxmemory_policy"] == "allkeys-lru" and "evict" in r.json()["warning"]
    assert any(rec.levelno >= logging.ERROR and "allkeys-lru" in rec.getMessage() for rec in caplog.records)


async def test_env_override_starts_too(lru_redis, database_url, monkeypatch) -> None:
    monkeypatch.setenv("QUOTA_GW_ALLOW_EVICTING_REDIS", "1")
    app = create_app(cfg(), lru_redis.url, database_url, f"pol{RUN}")
    async with app.router.lifespan_context(app), httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://gw") as c:
        assert (await c.get("/readyz")).status_code == 200


async def test_readyz_is_503_when_the_policy_turns_unsafe(tmp_path: Path, database_url) -> None:
    rs = await asyncio.to_thread(embedded.start_redis, tmp_path / "r", None)
    r = aioredis.from_url(rs.url, decode_responses=True)
    try:
        app = create_app(cfg(), rs.url, database_url, f"pol{RUN}")
        async with app.router.lifespan_context(app), httpx.AsyncClient(
                transport=httpx.ASGITransport(app=app), base_url="http://gw") as c:
            ok = await c.get("/readyz")
            assert ok.status_code == 200 and ok.json()["redis_maxmemory_policy"] == "noeviction"
            await r.config_set("maxmemory-policy", "volatile-lru")  # an operator changes it live
            bad = await c.get("/readyz")
            assert bad.status_code == 503 and bad.json()["ready"] is False
            assert bad.json()["redis_maxmemory_policy"] == "volatile-lru" and bad.json()["redis"].startswith("unsafe")
            await r.config_set("maxmemory-policy", "noeviction")
            assert (await c.get("/readyz")).status_code == 200
    finally:
        await r.aclose()
        await asyncio.to_thread(rs.stop)


async def test_a_redis_that_refuses_config_is_unknown_not_refused(tmp_path: Path, database_url, caplog) -> None:
    rs = await asyncio.to_thread(embedded.start_redis, tmp_path / "noconf", None,
                                 args=("--maxmemory-policy", "allkeys-lru", "--rename-command", "CONFIG", ""))
    try:
        app = create_app(cfg(), rs.url, database_url, f"pol{RUN}")
        with caplog.at_level(logging.WARNING, logger="quota_gw"):
            async with app.router.lifespan_context(app), httpx.AsyncClient(
                    transport=httpx.ASGITransport(app=app), base_url="http://gw") as c:
                r = await c.get("/readyz")
                assert r.status_code == 200 and r.json()["redis_maxmemory_policy"] == "unknown"
        assert any("maxmemory-policy" in rec.getMessage() for rec in caplog.records)
    finally:
        await asyncio.to_thread(rs.stop)


def test_serve_exits_on_an_evicting_redis(lru_redis, database_url, tmp_path: Path) -> None:
    path = tmp_path / "gw.yaml"
    path.write_text(yaml.safe_dump(test_config_data()))
    env = {**os.environ, "REDIS_URL": lru_redis.url, "DATABASE_URL": database_url, "QUOTA_GW_PREFIX": f"pol{RUN}"}
    env.pop("QUOTA_GW_ALLOW_EVICTING_REDIS", None)
    r = subprocess.run([sys.executable, "-m", "quota_gw.cli", "serve", "--config", str(path), "--port",
                        str(embedded.free_port())], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode != 0
    assert "maxmemory-policy" in r.stderr and "allow_evicting_redis" in r.stderr
