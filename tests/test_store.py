"""The store (store.py): Postgres is written first, in one transaction, then Redis; a Redis
failure after the commit leaves Postgres written and Redis behind, and a Postgres refusal leaves
Redis untouched. The SQL is named once (queries.sql). The low-balance mark comes from the
config and reaches the `low_balances` view (migration 006). Real Redis and Postgres; the failing
Redis is a real client on a port nothing listens on."""

from __future__ import annotations

import json
import re
import secrets
import uuid
from collections.abc import AsyncIterator
from datetime import datetime, timedelta, timezone
from typing import Any

import asyncpg
import httpx
import pytest
import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError

from conftest import ADMIN_TOKEN, ROOT, test_config_data
from quota_gw import config as config_mod
from quota_gw import db, embedded, store
from quota_gw.app import create_app
from quota_gw.decisions import Decider
from quota_gw.layout import Layout
from quota_gw.problems import Problem
from quota_gw.queries import Q


@pytest.fixture
async def stores(database_url: str, redis_url: str, prefix: str, config) -> AsyncIterator[tuple[Any, Any]]:
    """(a store whose Redis is up, one whose Redis is down), on the same Postgres and key layout."""
    layout = Layout(prefix, config.shards)
    pg = db.Database(database_url)
    up = aioredis.from_url(redis_url, decode_responses=True)
    down = aioredis.from_url(f"redis://127.0.0.1:{embedded.free_port()}/0", decode_responses=True,
                             socket_connect_timeout=1)
    yield store.Store(pg, Decider(up, config, layout)), store.Store(pg, Decider(down, config, layout))
    for r in (up, down):
        await r.aclose()
    await pg.close()


async def test_a_redis_failure_after_the_commit_leaves_postgres_written_and_redis_behind(stores, redis) -> None:
    good, broken = stores
    org = f"st-{secrets.token_hex(5)}"
    with pytest.raises(RedisConnectionError):
        await broken.create_org(org, "Half Written", "pro")
    assert await good.org_plan(org) == "pro"  # committed before Redis was tried
    assert not await redis.exists(good.layout.org(org))  # Redis behind, never ahead
    with pytest.raises(Problem) as again:  # a retry finds it made
        await good.create_org(org, "Half Written", "pro")
    assert again.value.status == 409

    with pytest.raises(RedisConnectionError):
        await broken.set_plan(org, "bulk")
    assert await good.org_plan(org) == "bulk"
    with pytest.raises(RedisConnectionError):
        await broken.set_sub_quota(org, "general", "user", "ann", 7)
    assert not await redis.hexists(good.layout.quotas(org), store.sub_quota_field("user", "ann", "general"))
    quota = await good.db.fetchval("SELECT quota FROM sub_quotas WHERE org_id = $1 AND subject = 'ann'", org)
    assert quota == 7


async def test_a_postgres_refusal_leaves_redis_untouched(stores, redis) -> None:
    good, _ = stores
    org = f"st-{secrets.token_hex(5)}"
    await good.create_org(org, None, "pro")
    field = store.sub_quota_field("team", "ops", "general")
    await good.set_sub_quota(org, "general", "team", "ops", 5)
    assert await redis.hget(good.layout.quotas(org), field) == "5"
    with pytest.raises(asyncpg.CheckViolationError):  # quota >= 0: refused in the transaction
        await good.set_sub_quota(org, "general", "team", "ops", -1)
    assert await redis.hget(good.layout.quotas(org), field) == "5"
    with pytest.raises(Problem) as missing:
        await good.set_plan(f"st-none-{secrets.token_hex(4)}", "bulk")
    assert missing.value.status == 404


def test_every_query_the_code_names_is_defined_once_and_used() -> None:
    text = (ROOT / "src" / "quota_gw" / "queries.sql").read_text()
    names = re.findall(r"^-- (\w+) --$", text, re.M)
    assert len(names) == len(set(names)) == len(Q.names)
    used = set()
    for path in (ROOT / "src").rglob("*.py"):
        used |= set(re.findall(r"\bQ\.([a-z_]+)\b", path.read_text()))
    used.discard("names")
    assert used <= set(Q.names), f"named in code, missing in queries.sql: {used - set(Q.names)}"
    assert set(Q.names) <= used, f"in queries.sql, used nowhere: {set(Q.names) - used}"


def test_route_modules_hold_no_sql() -> None:
    """The admin and account routes read and write through the store, not with SQL of their own."""
    sql = re.compile(r"\b(SELECT|INSERT INTO|UPDATE \w+ SET|DELETE FROM)\b")
    for name in ("admin.py", "account.py", "admin_reads.py", "alerts_admin.py", "purchases.py"):
        found = sql.findall((ROOT / "src" / "quota_gw" / name).read_text())
        assert not found, f"{name}: {found}"


async def _ledger_at(pg: asyncpg.Connection, balance: int) -> str:
    """An org whose ledger holds a period of allocation 100 and `balance` left of it."""
    org = f"st-{secrets.token_hex(5)}"
    period_end = int((datetime.now(timezone.utc) + timedelta(days=20)).timestamp())
    await pg.executemany(
        """INSERT INTO usage_events (event_id, ts, kind, org_id, meter, feature, delta, cost, metadata)
           VALUES ($1, now(), $2, $3, 'general', $4, $5, $6, $7::jsonb)""",
        [(uuid.uuid4(), "reset", org, None, 100, 0, json.dumps({"allocation": 100, "period_end": period_end})),
         (uuid.uuid4(), "consume", org, "generate_insight", balance - 100, 100 - balance, None)])
    return org


async def test_the_low_balance_mark_from_the_config_reaches_the_view(own_database_url: str, redis_url: str,
                                                                      prefix: str) -> None:
    pg = await asyncpg.connect(own_database_url)
    try:
        # migrate seeds the config's default mark (25: the highest default alert threshold)
        assert config_mod.DEFAULT_LOW_BALANCE_MARK == 25
        assert await pg.fetchval("SELECT percent FROM low_balance_mark") == 25
        at_40 = await _ledger_at(pg, 40)
        at_20 = await _ledger_at(pg, 20)

        async def low() -> set[str]:
            return {r["org_id"] for r in await pg.fetch(
                "SELECT org_id FROM low_balances WHERE org_id = ANY($1::text[])", [at_40, at_20])}

        assert await low() == {at_20}

        # A gateway whose config marks `low` under 50 % records it when it connects to Postgres.
        data = test_config_data()
        data["alerts"] = {"thresholds": [10, 50]}
        cfg = config_mod.parse(data, "tests/test_store.py")
        assert cfg.low_balance_mark == 50
        app = create_app(cfg, redis_url, own_database_url, prefix)
        async with app.router.lifespan_context(app):
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw") as c:
                r = await c.post("/v1/admin/orgs", json={"org_id": f"st-{secrets.token_hex(4)}", "plan": "pro"},
                                 headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
                assert r.status_code == 201, r.text
        assert await pg.fetchval("SELECT percent FROM low_balance_mark") == 50
        assert await low() == {at_20, at_40}
        pct = await pg.fetchval("SELECT percent_left FROM low_balances WHERE org_id = $1", at_40)
        assert float(pct) == 40.0
    finally:
        await pg.close()

