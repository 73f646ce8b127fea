"""One command: start everything on 127.0.0.1, run Locust headless, drain, check the invariants.

    .venv/bin/python loadtests/run.py [--users 50] [--duration 30] [--workers 1] [--no-proxy] [--via http]

Prints req/s and p50/p95/p99 per request kind, then checks against Postgres and Redis after
the worker has drained: no overspend (no balance ever below zero, per event), every event
exactly once (and exactly as many consume events as Locust saw 200s), refused calls cost
nothing, and `quota-gw reconcile` finds no drift. Exits 1 on any violation.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import redis
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from quota_gw import embedded  # noqa: E402
from quota_gw.layout import Layout  # noqa: E402

BIN = Path(sys.executable).parent
ADMIN = "load-" + secrets.token_hex(8)


def wait_http(url: str, proc: subprocess.Popen, what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{what} exited with {proc.returncode}")
        try:
            if httpx.get(url, timeout=1).status_code < 500:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise SystemExit(f"{what} did not start")


def seed(base: str, proxy: bool) -> list[dict[str, Any]]:
    """Tenants by kind: typical (pro/enterprise), heavy spenders (pro), LLM callers."""
    h = {"Authorization": f"Bearer {ADMIN}"}
    tenants = []
    with httpx.Client(base_url=base, headers=h, timeout=10) as c:
        plan_of = [("typical", "pro")] * 6 + [("typical", "enterprise")] * 2 + [("heavy", "pro")] * 2
        if proxy:
            plan_of += [("llm", "starter")] * 2 + [("llm", "pro")]
        for i, (kind, plan) in enumerate(plan_of):
            org = f"load-{kind}-{i}"
            assert c.post("/v1/admin/orgs", json={"org_id": org, "plan": plan}).status_code == 201
            key = c.post(f"/v1/admin/orgs/{org}/keys", json={"scopes": ["consume", "read"]}).json()["key"]
            if kind == "typical" and i % 3 == 0:
                c.post(f"/v1/admin/orgs/{org}/grants", json={"meter": "general", "amount": 200, "reason": "load"})
                c.put(f"/v1/admin/orgs/{org}/quotas", json={"meter": "general", "team": "t0", "limit": 40})
                for u in range(5):
                    c.post(f"/v1/admin/orgs/{org}/users", json={"user_id": f"typical-{u}", "team": "t0"})
            if kind == "llm" and plan == "starter":
                c.post(f"/v1/admin/orgs/{org}/grants", json={"meter": "tokens", "amount": 3000, "reason": "load"})
            tenants.append({"org_id": org, "key": key, "plan": plan, "kind": kind,
                            "users": 2 if kind == "heavy" else 200})
    return tenants


def stats(csv_prefix: Path) -> list[dict[str, str]]:
    with open(f"{csv_prefix}_stats.csv") as f:
        return list(csv.DictReader(f))


async def check(pg_url: str, redis_url: str, prefix: str, shards: int, orgs: list[str],
                outcomes: dict[str, int]) -> list[str]:
    problems = []
    conn = await asyncpg.connect(pg_url)
    try:
        rows = await conn.fetch("""SELECT kind, count(*) AS n, count(DISTINCT event_id) AS distinct_ids,
                                          sum(delta) AS delta, min(balance_after) AS min_bal
                                   FROM usage_events WHERE org_id = ANY($1) GROUP BY kind""", orgs)
        by_kind = {r["kind"]: r for r in rows}
        total = sum(r["n"] for r in rows)
        distinct = await conn.fetchval("SELECT count(DISTINCT event_id) FROM usage_events WHERE org_id = ANY($1)", orgs)
        print(f"\nledger: {total} events, {distinct} distinct ids; by kind: "
              + ", ".join(f"{k}={r['n']}" for k, r in sorted(by_kind.items())))
        if total != distinct:
            problems.append(f"duplicate events: {total} rows, {distinct} distinct ids")
        neg = await conn.fetchval("SELECT count(*) FROM usage_events WHERE org_id = ANY($1) AND balance_after < 0", orgs)
        if neg:
            problems.append(f"overspend: {neg} events left a balance below zero")
        consumed_ok = outcomes.get("consume:200", 0)
        in_ledger = by_kind["consume"]["n"] if "consume" in by_kind else 0
        proxied = await conn.fetchval("""SELECT count(*) FROM usage_events WHERE org_id = ANY($1) AND kind = 'consume'
                                         AND feature NOT IN (SELECT unnest($2::text[]))""", orgs,
                                      ["generate_insight", "analyze_strategy", "generate_goal", "generate_leads",
                                       "forecast_revenue"])
        if in_ledger - proxied != consumed_ok:
            problems.append(f"exactly-once: Locust saw {consumed_ok} consumes succeed, the ledger holds "
                            f"{in_ledger - proxied}")
        else:
            print(f"exactly once: {consumed_ok} successful consumes seen by Locust = {consumed_ok} consume events")
        if "denied" in by_kind and by_kind["denied"]["delta"] != 0:
            problems.append(f"refused calls cost {by_kind['denied']['delta']}")
        refused = sum(v for k, v in outcomes.items() if k.split(":")[0] == "consume" and k.split(":")[1] in ("402", "403", "429"))
        denied_api = await conn.fetchval("""SELECT count(*) FROM usage_events WHERE org_id = ANY($1) AND kind = 'denied'
                                            AND feature <> 'chat'""", orgs)
        refused_reserve = sum(v for k, v in outcomes.items() if k.startswith("reserve:") and k != "reserve:201")
        if denied_api != refused + refused_reserve:
            problems.append(f"denied events {denied_api} != refused decisions {refused + refused_reserve}")
        else:
            print(f"refused calls: {denied_api} denied events, all delta 0")
    finally:
        await conn.close()
    r = redis.Redis.from_url(redis_url, decode_responses=True)
    layout = Layout(prefix, shards)
    for org in orgs:
        for field, v in r.hgetall(layout.balances(org)).items():
            if field.rsplit(":", 1)[1] in ("a", "p", "h") and int(v) < 0:
                problems.append(f"overspend: Redis {org} {field} = {v}")
    return problems


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--users", type=int, default=50)
    ap.add_argument("--spawn-rate", type=int, default=25)
    ap.add_argument("--duration", type=int, default=30, help="seconds of load")
    ap.add_argument("--workers", type=int, default=1, help="gateway processes")
    ap.add_argument("--no-proxy", action="store_true", help="decision API only")
    ap.add_argument("--via", choices=("client", "http"), default="client",
                    help="decision calls through quota_gw.client (default) or Locust's own HTTP client, "
                         "which costs the load generator less CPU (the gateway's numbers alone)")
    args = ap.parse_args()
    proxy = not args.no_proxy

    tmp = Path(tempfile.mkdtemp(prefix="qgw-load-"))
    redis_url, pg_admin, started = embedded.servers(tmp)
    run = secrets.token_hex(4)
    db_name, prefix = f"qgw_load_{run}", f"qgwload{run}"
    procs: list[subprocess.Popen] = []

    async def create_db() -> None:
        c = await asyncpg.connect(pg_admin)
        await c.execute(f'CREATE DATABASE "{db_name}"')
        await c.close()

    async def drop_db() -> None:
        c = await asyncpg.connect(pg_admin)
        await c.execute(f'DROP DATABASE IF EXISTS "{db_name}" WITH (FORCE)')
        await c.close()

    asyncio.run(create_db())
    pg_url = pg_admin.rsplit("/", 1)[0] + "/" + db_name
    up_port, gw_port = embedded.free_port(), embedded.free_port()
    cfg = yaml.safe_load((ROOT / "examples" / "quota-gw.yaml").read_text())
    for route in cfg.get("routes", []):
        route["upstream"] = f"http://127.0.0.1:{up_port}"
    cfg_path = tmp / "load.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "REDIS_URL": redis_url, "DATABASE_URL": pg_url, "QUOTA_GW_PREFIX": prefix,
           "QUOTA_GW_ADMIN_TOKEN": ADMIN, "QUOTA_GW_CONFIG": str(cfg_path)}
    problems: list[str] = []
    try:
        subprocess.run([str(BIN / "quota-gw"), "migrate"], env=env, check=True, stdout=subprocess.DEVNULL)
        procs.append(subprocess.Popen([str(BIN / "quota-gw"), "demo-upstream", "--port", str(up_port),
                                       "--token-delay-ms", "1", "--log-level", "warning"], env=env))
        procs.append(subprocess.Popen([str(BIN / "quota-gw"), "serve", "--port", str(gw_port), "--workers",
                                       str(args.workers), "--log-level", "warning"], env=env))
        procs.append(subprocess.Popen([str(BIN / "quota-gw"), "worker", "--consumer", f"load-{run}",
                                       "--log-level", "warning"], env=env))
        base = f"http://127.0.0.1:{gw_port}"
        wait_http(f"{base}/readyz", procs[1], "gateway")
        tenants = seed(base, proxy)
        (tmp / "tenants.json").write_text(json.dumps(tenants))
        outcomes_path = tmp / "outcomes.json"
        lenv = {**env, "QGW_TENANTS": str(tmp / "tenants.json"), "QGW_OUTCOMES": str(outcomes_path),
                "QGW_PROXY": "1" if proxy else "0", "QGW_VIA": args.via}
        started_at = time.monotonic()
        subprocess.run([str(BIN / "locust"), "-f", str(ROOT / "loadtests" / "locustfile.py"), "--headless",
                        "-u", str(args.users), "-r", str(args.spawn_rate), "-t", f"{args.duration}s",
                        "--host", base, "--csv", str(tmp / "locust"), "--only-summary", "--stop-timeout", "5",
                        "--loglevel", "WARNING"], env=lenv, check=False, timeout=args.duration + 120,
                       stdout=subprocess.DEVNULL)
        print(f"\nLocust: {args.users} users, {args.duration}s, {args.workers} gateway worker(s), "
              f"proxy {'on' if proxy else 'off'}, decisions via {args.via} ({time.monotonic() - started_at:.0f}s wall)")
        print(f"{'name':<16}{'requests':>10}{'failures':>10}{'req/s':>10}{'p50 ms':>9}{'p95 ms':>9}{'p99 ms':>9}")
        for row in stats(tmp / "locust"):
            print(f"{row['Name']:<16}{row['Request Count']:>10}{row['Failure Count']:>10}"
                  f"{float(row['Requests/s']):>10.1f}{row['50%']:>9}{row['95%']:>9}{row['99%']:>9}")
            if row["Name"] == "Aggregated" and int(row["Failure Count"]):
                problems.append(f"{row['Failure Count']} Locust failures (unexpected statuses or idempotency)")
        outcomes = json.loads(outcomes_path.read_text()) if outcomes_path.exists() else {}
        print("outcomes:", ", ".join(f"{k}={v}" for k, v in sorted(outcomes.items())))

        # Drain: the worker has caught up when reconcile (which counts undrained events) agrees
        # and the streams have nothing pending for the group.
        r = redis.Redis.from_url(redis_url, decode_responses=True)
        layout = Layout(prefix, cfg.get("shards", 16))
        deadline = time.monotonic() + 60
        while True:
            pending = 0
            for s in layout.streams():
                try:
                    groups = r.xinfo_groups(s)
                except redis.ResponseError:
                    continue
                pending += sum(int(g.get("pending", 0)) + int(g.get("lag") or 0) for g in groups)
            if pending == 0 or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        if pending:
            problems.append(f"worker did not drain: {pending} entries left")
        rc = subprocess.run([str(BIN / "quota-gw"), "reconcile"], env=env, capture_output=True, text=True)
        print(f"reconcile: exit {rc.returncode} {rc.stdout.strip().splitlines()[-1] if rc.stdout.strip() else ''}")
        if rc.returncode != 0:
            problems.append("reconcile found drift:\n" + rc.stdout + rc.stderr)
        problems += asyncio.run(check(pg_url, redis_url, prefix, cfg.get("shards", 16),
                                      [t["org_id"] for t in tenants], outcomes))
    finally:
        for p in reversed(procs):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
        r = redis.Redis.from_url(redis_url)
        for k in r.scan_iter(match=f"{prefix}:*", count=1000):
            r.delete(k)
        asyncio.run(drop_db())
        for s in started:
            s.stop()
    if problems:
        print("\nINVARIANT VIOLATIONS:\n- " + "\n- ".join(problems))
        return 1
    print("\ninvariants: 0 violations")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
