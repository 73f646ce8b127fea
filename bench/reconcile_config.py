"""What `quota-gw reconcile`'s configuration check adds to a run: the balance check (reconcile())
and the configuration check (config_drift()) side by side, on the same generated deployment.

    .venv/bin/python bench/reconcile_config.py [--orgs 2000] [--users 10] [--events 500000] [--runs 5]

Uses DATABASE_URL (default postgres@127.0.0.1:5432) to make a scratch database of its own,
migrated, dropped at the end, and REDIS_URL (default 127.0.0.1:6379) under a prefix of its own,
deleted at the end. The deployment: --orgs orgs, each with --users users (every other one in a
team), two sub-quotas and every fifth an entitlements override; --events ledger rows over them
(server-side generate_series, the rollup trigger disabled), each naming a user of its org, half
of them users not in the users table (registered on first use). Redis is filled by `rebuild`.

Each check: one warm-up, then --runs timed runs taking turns; median and fastest reported. The
machine is shared: the load average is printed; medians move with the neighbours.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import secrets
import statistics
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import asyncpg
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from quota_gw import cluster, db  # noqa: E402
from quota_gw import config as config_mod  # noqa: E402
from quota_gw.layout import Layout  # noqa: E402
from sync_worker.config_drift import config_drift  # noqa: E402
from sync_worker.recovery import rebuild, reconcile  # noqa: E402


async def seed(pg: asyncpg.Connection, orgs: int, users: int, events: int) -> None:
    await pg.execute("""INSERT INTO orgs (org_id, plan) SELECT 'o' || i, 'pro' FROM generate_series(1, $1) i""", orgs)
    await pg.execute("""INSERT INTO users (org_id, user_id, team)
                        SELECT 'o' || i, 'u' || j, CASE WHEN j % 2 = 0 THEN 't' || (j % 3) END
                        FROM generate_series(1, $1) i, generate_series(1, $2) j""", orgs, users)
    await pg.execute("""INSERT INTO sub_quotas (org_id, meter, scope, subject, quota)
                        SELECT 'o' || i, 'general', s.scope, s.subject, 100
                        FROM generate_series(1, $1) i, (VALUES ('user', 'u1'), ('team', 't0')) s(scope, subject)""",
                     orgs)
    await pg.execute("""INSERT INTO org_entitlements (org_id, entitlements)
                        SELECT 'o' || i, '{"overflow": "credit"}' FROM generate_series(1, $1, 5) i""", orgs)
    await pg.execute("ALTER TABLE usage_events DISABLE TRIGGER USER")
    # Users 1..users are in the table; users+1..2*users are registered on first use (ledger only).
    await pg.execute("""INSERT INTO usage_events (event_id, ts, kind, org_id, user_id, meter, feature, delta, cost)
                        SELECT gen_random_uuid(), now() - (n % 86400) * interval '1 second', 'consume',
                               'o' || (1 + n % $2), 'u' || (1 + (n / $2) % (2 * $3)), 'general',
                               'generate_insight', -1, 1
                        FROM generate_series(1, $1) n""", events, orgs, users)
    await pg.execute("ALTER TABLE usage_events ENABLE TRIGGER USER")
    await pg.execute("ANALYZE")


@contextlib.asynccontextmanager
async def scratch(tag: str) -> AsyncIterator[tuple[asyncpg.Connection, Any, Layout, config_mod.Config]]:
    """A migrated database and a key prefix of their own (DATABASE_URL, REDIS_URL), and the
    example config; both removed at the end."""
    admin_url = os.environ.get("DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
    admin_url = admin_url.rsplit("/", 1)[0] + "/postgres"
    redis_url = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
    cfg = config_mod.parse(yaml.safe_load((ROOT / "examples" / "quota-gw.yaml").read_text()), "bench")
    name = f"qgw_bench_{tag}_{secrets.token_hex(3)}"
    conn = await asyncpg.connect(admin_url)
    await conn.execute(f'CREATE DATABASE "{name}"')
    await conn.close()
    pg = await asyncpg.connect(admin_url.rsplit("/", 1)[0] + "/" + name)
    r = await cluster.connect(redis_url)
    layout = Layout(f"qgwbench{secrets.token_hex(3)}", 16)
    try:
        await db.migrate(pg)
        yield pg, r, layout, cfg
    finally:
        async for k in r.scan_iter(match=f"{layout.prefix}:*", count=5000):
            await r.delete(k)
        await r.aclose()
        await pg.close()
        conn = await asyncpg.connect(admin_url)
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await conn.close()


async def taking_turns(checks: dict[str, Callable[[], Awaitable[int]]], runs: int, base: str, of: str) -> None:
    """Each check once to warm up (it must find no drift), then `runs` rounds taking turns;
    prints each one's median and fastest, and its median against `base`'s."""
    times: dict[str, list[float]] = {k: [] for k in checks}
    for k, f in checks.items():
        assert await f() == 0, k  # warm-up; a clean deployment
    for _ in range(runs):
        for k, f in checks.items():
            t = time.perf_counter()
            await f()
            times[k].append(time.perf_counter() - t)
    print(f"load average {os.getloadavg()[0]:.2f}; {runs} runs each, taking turns")
    width = max(len(k) for k in checks)
    for k, ts in times.items():
        print(f"  {k:<{width}} median {statistics.median(ts) * 1000:8.1f} ms  fastest {min(ts) * 1000:8.1f} ms  "
              f"x{statistics.median(ts) / statistics.median(times[base]):.2f} of {of}")


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--orgs", type=int, default=2000)
    ap.add_argument("--users", type=int, default=10)
    ap.add_argument("--events", type=int, default=500_000)
    ap.add_argument("--runs", type=int, default=5)
    a = ap.parse_args()
    async with scratch("rc") as (pg, r, layout, cfg):
        t0 = time.perf_counter()
        await seed(pg, a.orgs, a.users, a.events)
        await rebuild(r, pg, cfg, layout)
        print(f"seeded {a.orgs} orgs x {a.users} users (+{a.users} registered on first use), "
              f"{a.events} events, rebuilt in {time.perf_counter() - t0:.1f}s")

        async def balances() -> int:
            drift, _ = await reconcile(r, pg, layout)
            return len(drift)

        async def configs() -> int:
            drift, _ = await config_drift(r, pg, layout)
            return len(drift)

        await taking_turns({"balances (reconcile())": balances, "configuration (config_drift())": configs}, a.runs,
                           "balances (reconcile())", "the balance check")


if __name__ == "__main__":
    asyncio.run(main())
