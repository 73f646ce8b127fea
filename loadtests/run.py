"""One command: start everything on 127.0.0.1, run Locust headless, drain, check the invariants.

    .venv/bin/python loadtests/run.py [--users 50] [--duration 30] [--workers 1] [--no-proxy] [--via http]
    .venv/bin/python loadtests/run.py --rate-fraction 0.5 --faults 6 --duration 600   # the soak

The soak (`--faults N`, make test-long) measures the capacity first (`--measure` seconds
flat out), then runs Locust paced at `--rate-fraction` of it while SIGKILLing the sync worker
and restarting Redis (AOF on, its own server) N times in turn, sampling the gateway's RSS.

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
        refused_reserve = sum(v for k, v in outcomes.items()
                              if k.startswith("reserve:") and k.split(":")[1] in ("402", "403", "429"))
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
            meter, _, suffix = field.rpartition(":")  # '<meter>:<suffix>'; holds_due is the org's
            if meter and suffix in ("a", "p", "h") and int(v) < 0:
                problems.append(f"overspend: Redis {org} {field} = {v}")
    return problems


def rss_mb(pid: int) -> float:
    """Resident memory of a process, from /proc (Linux)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def locust(args: argparse.Namespace, lenv: dict[str, str], base: str, csv_prefix: Path, duration: int,
           users: int) -> subprocess.Popen:
    return subprocess.Popen([str(BIN / "locust"), "-f", str(ROOT / "loadtests" / "locustfile.py"), "--headless",
                             "-u", str(users), "-r", str(args.spawn_rate), "-t", f"{duration}s",
                             "--host", base, "--csv", str(csv_prefix), "--only-summary", "--stop-timeout", "5",
                             "--loglevel", "WARNING"], env=lenv, stdout=subprocess.DEVNULL)


def requests_per_task(rows: list[dict[str, str]]) -> float:
    """Each task makes one first request (consume, reserve, balance, chat) and sometimes a second
    (consume-retry, commit, release): requests / tasks, from a run's stats."""
    by = {r["Name"]: int(r["Request Count"]) for r in rows}
    total = by.get("Aggregated", 0)
    tasks = total - sum(by.get(n, 0) for n in ("consume-retry", "commit", "release"))
    return total / tasks if tasks else 1.0


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
    ap.add_argument("--rate-fraction", type=float, default=0.0,
                    help="pace Locust at this share of the capacity measured first (0: flat out)")
    ap.add_argument("--measure", type=int, default=20, help="seconds of the capacity measurement")
    ap.add_argument("--faults", type=int, default=0,
                    help="SIGKILL the worker and restart Redis (AOF, a server of its own) this many times, in turn")
    ap.add_argument("--rss-every", type=float, default=5.0, help="seconds between gateway RSS samples")
    ap.add_argument("--max-rss-growth-mb", type=float, default=50.0,
                    help="the gateway's RSS may grow this much from the first sample after warm-up to the end")
    args = ap.parse_args()
    proxy = not args.no_proxy

    tmp = Path(tempfile.mkdtemp(prefix="qgw-load-"))
    if args.faults:  # a Redis of our own, with an append-only file, that we may restart
        os.environ.pop("REDIS_URL", None)
        rs = embedded.start_redis(tmp / "redis", persist=True)
        os.environ["REDIS_URL"] = rs.url
    redis_url, pg_admin, started = embedded.servers(tmp)
    if args.faults:
        started.append(rs)
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
           "QUOTA_GW_ADMIN_TOKEN": ADMIN, "QUOTA_GW_CONFIG": str(cfg_path), "QUOTA_GW_SPOOL_DIR": str(tmp / "spool")}
    problems: list[str] = []
    try:
        subprocess.run([str(BIN / "quota-gw"), "migrate"], env=env, check=True, stdout=subprocess.DEVNULL)
        procs.append(subprocess.Popen([str(BIN / "quota-gw"), "demo-upstream", "--port", str(up_port),
                                       "--token-delay-ms", "1", "--log-level", "warning"], env=env))
        procs.append(subprocess.Popen([str(BIN / "quota-gw"), "serve", "--port", str(gw_port), "--workers",
                                       str(args.workers), "--log-level", "warning"], env=env))
        worker_argv = [str(BIN / "quota-gw"), "worker", "--consumer", f"load-{run}", "--log-level", "warning"]
        procs.append(subprocess.Popen(worker_argv, env=env))
        base = f"http://127.0.0.1:{gw_port}"
        wait_http(f"{base}/readyz", procs[1], "gateway")
        tenants = seed(base, proxy)
        (tmp / "tenants.json").write_text(json.dumps(tenants))
        outcomes_path = tmp / "outcomes.json"
        lenv = {**env, "QGW_TENANTS": str(tmp / "tenants.json"), "QGW_OUTCOMES": str(outcomes_path),
                "QGW_PROXY": "1" if proxy else "0", "QGW_VIA": args.via}
        users = args.users
        if args.rate_fraction:
            # Capacity: the same traffic flat out for a while; then every user is paced so that
            # all of them together ask for rate_fraction of it.
            m = locust(args, {**lenv, "QGW_OUTCOMES": str(tmp / "measure-outcomes.json")}, base, tmp / "measure",
                       args.measure, args.users)
            m.wait(timeout=args.measure + 120)
            rows = stats(tmp / "measure")
            capacity = float(next(r for r in rows if r["Name"] == "Aggregated")["Requests/s"])
            per_task = requests_per_task(rows)
            target = capacity * args.rate_fraction
            lenv["QGW_TASKS_PER_USER_S"] = f"{target / per_task / users:.4f}"
            print(f"capacity: {capacity:.0f} req/s flat out ({args.measure}s, {users} users, "
                  f"{per_task:.2f} requests per task); pacing at {target:.0f} req/s")
        if args.faults:
            lenv["QGW_FAULTS"] = "1"
        started_at = time.monotonic()
        run_locust = locust(args, lenv, base, tmp / "locust", args.duration, users)
        gw_pid = procs[1].pid
        rss: list[tuple[float, float]] = []
        fault_times = [args.duration * (i + 1) / (args.faults + 1) for i in range(args.faults)]
        faults_done: list[str] = []
        next_rss = 0.0
        while run_locust.poll() is None:
            t = time.monotonic() - started_at
            if t >= next_rss:
                rss.append((t, rss_mb(gw_pid)))
                next_rss = t + args.rss_every
            if fault_times and t >= fault_times[0]:
                fault_times.pop(0)
                if len(faults_done) % 2 == 0:  # the worker, SIGKILLed mid-whatever, then started again
                    procs[2].kill()
                    procs[2].wait()
                    procs[2] = subprocess.Popen(worker_argv, env=env)
                    faults_done.append(f"{t:.0f}s worker SIGKILL")
                else:  # Redis stopped (SIGTERM: the AOF is written out) and started on the same port
                    rs.stop()
                    down = time.monotonic()
                    rs = embedded.start_redis(tmp / "redis", rs.port, persist=True)
                    started[-1] = rs
                    faults_done.append(f"{t:.0f}s redis restart ({time.monotonic() - down:.1f}s down)")
            time.sleep(0.2)
        rss.append((time.monotonic() - started_at, rss_mb(gw_pid)))
        print(f"\nLocust: {users} users, {args.duration}s, {args.workers} gateway worker(s), "
              f"proxy {'on' if proxy else 'off'}, decisions via {args.via} ({time.monotonic() - started_at:.0f}s wall)")
        if args.faults:
            print("faults: " + "; ".join(faults_done))
        warm = next((mb for t, mb in rss if t >= min(30.0, args.duration * 0.1)), rss[0][1])
        print(f"gateway RSS: start {rss[0][1]:.1f} MB, after warm-up {warm:.1f} MB, end {rss[-1][1]:.1f} MB, "
              f"max {max(mb for _, mb in rss):.1f} MB ({len(rss)} samples)")
        if args.faults and rss[-1][1] - warm > args.max_rss_growth_mb:
            problems.append(f"gateway RSS grew {rss[-1][1] - warm:.1f} MB after warm-up")
        print(f"{'name':<16}{'requests':>10}{'failures':>10}{'req/s':>10}{'p50 ms':>9}{'p95 ms':>9}{'p99 ms':>9}")
        for row in stats(tmp / "locust"):
            print(f"{row['Name']:<16}{row['Request Count']:>10}{row['Failure Count']:>10}"
                  f"{float(row['Requests/s']):>10.1f}{row['50%']:>9}{row['95%']:>9}{row['99%']:>9}")
            if row["Name"] == "Aggregated" and int(row["Failure Count"]):
                problems.append(f"{row['Failure Count']} Locust failures (unexpected statuses or idempotency)")
        outcomes: dict[str, int] = {}
        for path in (outcomes_path, tmp / "measure-outcomes.json"):  # the ledger holds both runs
            for k, v in (json.loads(path.read_text()) if path.exists() else {}).items():
                outcomes[k] = outcomes.get(k, 0) + v
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
