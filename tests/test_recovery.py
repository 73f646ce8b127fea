"""SPEC §3.6 recoverability: `quota-gw rebuild` restores Redis from Postgres, `quota-gw
reconcile` reports drift, of balances and of configuration (and exits non-zero on it). Runs in a database and key prefix of its
own, through the real gateway API, a real worker and the real commands."""

from __future__ import annotations

import asyncio
import os
import secrets
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import asyncpg
import httpx
import pytest

from conftest import Admin, drop_database, fresh_database, test_config_data, test_meters
from quota_gw.app import create_app
from quota_gw.layout import (HOLDS_DUE, METER_FIELDS, QUOTA_FIELDS, SUB_QUOTAS, USER_PREFIX, Layout, meter_field,
                             user_field, user_key_field, user_of_field)
from sync_worker.config_drift import config_drift
from sync_worker.recovery import reconcile
from worker_support import QUOTA_GW, WorkerProc, wait_drained, write_config

HELD = METER_FIELDS["held"]
ZERO_IS_MISSING = {METER_FIELDS[n] for n in ("allocated", "purchased", "used", "purchased_total")}


@pytest.fixture
async def iso(redis, redis_url: str, servers: Any, prefix: str, config, tmp_path: Path) -> AsyncIterator[Any]:
    """A gateway on its own database and key prefix (rebuild reads every org in the database)."""
    sub = f"{prefix}:r{secrets.token_hex(3)}"
    url = await fresh_database(servers, f"rb{secrets.token_hex(3)}")
    pg = await asyncpg.connect(url)
    app = create_app(config, redis_url, url, sub)
    cfg = write_config(tmp_path, test_config_data())
    env = {**os.environ, "REDIS_URL": redis_url, "DATABASE_URL": url, "QUOTA_GW_PREFIX": sub,
           "QUOTA_GW_CONFIG": cfg}

    def cmd(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([QUOTA_GW, *args], env=env, capture_output=True, text=True, timeout=60)

    async def acmd(*args: str) -> subprocess.CompletedProcess[str]:
        return await asyncio.to_thread(cmd, *args)

    workers: list[WorkerProc] = []  # killed at teardown: a test that fails mid-way leaves none running

    def worker(name: str) -> WorkerProc:
        workers.append(WorkerProc(cfg, redis_url, url, sub, name, tmp_path))
        return workers[-1]

    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw") as client:
            yield SimpleNamespace(
                client=client, admin=Admin(client), pg=pg, prefix=sub, url=url, cmd=acmd,
                layout=Layout(sub, config.shards), worker=worker)
    for w in workers:
        await w.kill()
    await pg.close()
    async for k in redis.scan_iter(match=f"{sub}:*", count=5000):
        await redis.delete(k)
    await drop_database(servers, url)


async def flush(redis, sub: str) -> int:
    n = 0
    async for k in redis.scan_iter(match=f"{sub}:*", count=5000):
        n += await redis.delete(k)
    return n


async def snapshot(redis, iso: Any, orgs: list[str]) -> dict[str, Any]:
    """Everything rebuild restores, as Redis holds it (holds aside: rebuild releases them)."""
    L = iso.layout
    out: dict[str, Any] = {}
    for o in orgs:
        bal = await redis.hgetall(L.balances(o))
        # A missing a/p/u/pt reads as 0 (lua/_lib.lua load_meter); rebuild may write the 0.
        # holds_due and sub_quotas are not restored (rebuild releases the holds; absent, the next
        # decision looks). The users beside the meters ('@<user>...') are compared on their own.
        out[f"b:{o}"] = {k: v for k, v in bal.items() if k not in (HOLDS_DUE, SUB_QUOTAS)
                         and not k.startswith(USER_PREFIX)
                         and not k.endswith(":" + HELD) and not (v == "0" and k.rsplit(":", 1)[1] in ZERO_IS_MISSING)}
        q = await redis.hgetall(L.quotas(o))
        out[f"q:{o}"] = {k: v for k, v in q.items() if not k.endswith(":" + QUOTA_FIELDS["held"])}
        # A user ('@<user>') and its team ('@<user>:t') are restored; its rate window (the value of
        # '@<user>') is not: it starts afresh.
        out[f"users:{o}"] = {u: bal.get(user_field(u, "team"), "") for k in bal if (u := user_of_field(k)) is not None}
        out[f"org:{o}"] = await redis.hgetall(L.org(o))
    async for k in redis.scan_iter(match=f"{iso.prefix}:key:*", count=5000):
        out[k] = await redis.hgetall(k)
    return out


async def test_rebuild_restores_redis_and_reconcile_sees_drift(iso, redis) -> None:
    c, admin = iso.client, iso.admin
    # Three kinds of org: bulk (allocation + grants), hourly (short period), starter (credit only).
    bulk = await admin.org("bulk")
    hourly = await admin.org("hourly")
    starter = await admin.org("starter")
    orgs = [bulk, hourly, starter]
    await admin.user(bulk, "ann", team="red")
    await admin.user(bulk, "bob", team="red")
    await admin.quota(bulk, "general", 40, user_id="ann")
    await admin.quota(bulk, "general", 60, team="red")
    keys = {o: {"Authorization": f"Bearer {await admin.key(o)}"} for o in orgs}
    revoked = await admin.key(bulk)
    key_id = (await c.get(f"/v1/admin/orgs/{bulk}/keys", headers=admin.h)).json()["keys"][-1]["key_id"]
    assert (await c.delete(f"/v1/admin/keys/{key_id}", headers=admin.h)).status_code == 200
    await admin.grant(bulk, "general", 500)
    await admin.grant(starter, "general", 50)
    h = keys[bulk]

    async def consume(org: str, feature: str = "generate_insight", units: int = 1, **kw: Any) -> httpx.Response:
        return await c.post("/v1/consume", json={"feature": feature, "units": units, **kw}, headers=keys[org])

    charged = []
    for i in range(30):
        r = await consume(bulk, user_id=("ann", "bob", "cid")[i % 3], units=1 + i % 3)
        assert r.status_code in (200, 402), r.text
        if r.status_code == 200:
            charged.append(r.json()["event_id"])
    for eid in charged[:3]:
        assert (await c.post("/v1/refunds", json={"event_id": eid}, headers=h)).status_code == 200
    assert (await consume(hourly, units=4)).status_code == 200
    assert (await consume(starter, units=7)).status_code == 200
    assert (await consume(starter, feature="generate_goal")).status_code == 403  # denied: plan forbids
    r = await c.post("/v1/reservations", json={"feature": "generate_goal", "units": 2}, headers=h)
    rid = r.json()["reservation_id"]
    assert (await c.post(f"/v1/reservations/{rid}/commit", json={"units": 1}, headers=h)).status_code == 200
    r = await c.post("/v1/reservations", json={"feature": "generate_goal", "units": 3}, headers=h)
    assert r.status_code == 201  # left open: rebuild releases its hold
    held = r.json()["held"]
    last = await consume(bulk, user_id="ann")
    assert last.status_code == 200

    w = iso.worker("rb")
    await w.start()
    await wait_drained(redis, iso.layout, 30, w)
    assert await w.stop() == 0
    before = await snapshot(redis, iso, orgs)
    balances = {o: (await c.get("/v1/balance", headers=keys[o])).json()["meters"] for o in orgs}
    probes = [(hourly, {}), (starter, {}), (bulk, {"user_id": "ann"})]
    checks = [(await c.post("/v1/check", json={"feature": "generate_insight", **kw}, headers=keys[o])).json()
              for o, kw in probes]
    ok = await iso.cmd("reconcile")
    assert ok.returncode == 0, ok.stdout + ok.stderr

    # Flush this prefix; rebuild into the empty Redis; reconcile is clean again.
    assert await flush(redis, iso.prefix) > 0
    rb = await iso.cmd("rebuild")
    assert rb.returncode == 0, rb.stdout + rb.stderr
    assert "3 orgs" in rb.stdout and "1 revoked" in rb.stdout
    ok = await iso.cmd("reconcile")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert await snapshot(redis, iso, orgs) == before

    # Every meter reads as before, but for the open reservation's hold, which is back.
    for o in orgs:
        now = (await c.get("/v1/balance", headers=keys[o])).json()["meters"]
        for m, b in balances[o].items():
            unheld = None if b["balance"] is None else b["balance"] + b["held"]
            assert now[m] == dict(b, held=0, balance=unheld), (o, m)
    # The next decision sees the balance (and sub-quotas) it would have seen before the flush.
    for (o, kw), before_check in zip(probes, checks):
        r = await c.post("/v1/consume", json={"feature": "generate_insight", **kw}, headers=keys[o])
        assert r.status_code == 200 and r.json()["remaining"] == before_check["remaining"] - 1, (o, r.text)
    # Refunds of charges made before the flush still work, once; revoked keys stay revoked.
    r = await c.post("/v1/refunds", json={"event_id": last.json()["event_id"]}, headers=h)
    assert r.status_code == 200 and r.json()["refunded"] == 1, r.text
    r = await c.post("/v1/refunds", json={"event_id": charged[0]}, headers=h)  # refunded before the flush
    assert r.status_code == 404, r.text  # once: rebuild restored its refund guard
    assert (await c.get("/v1/balance", headers={"Authorization": f"Bearer {revoked}"})).status_code == 401
    assert held > 0

    # Rebuild refuses to overwrite a Redis that has state, unless forced.
    again = await iso.cmd("rebuild")
    assert again.returncode == 2 and "already holds state" in again.stderr

    # Tamper with one balance: reconcile names it and exits 1.
    await redis.hincrby(iso.layout.balances(hourly), meter_field("general", "allocated"), 5)
    bad = await iso.cmd("reconcile")
    assert bad.returncode == 1, bad.stdout
    row = next(line for line in bad.stdout.splitlines() if line.startswith(hourly))
    assert row.split()[1:3] == ["general", "a"] and row.split()[-1] == "5"


async def test_reconcile_is_clean_under_live_traffic(iso, redis) -> None:
    """Events in flight (in the streams, mid-drain, committed but not acked) count once."""
    c, admin = iso.client, iso.admin
    orgs = [await admin.org("bulk") for _ in range(4)]
    keys = [{"Authorization": f"Bearer {await admin.key(o)}"} for o in orgs]
    for o in orgs:
        await admin.grant(o, "general", 100_000)
    stop = asyncio.Event()

    async def load() -> int:
        n = 0
        for _ in range(500):  # at most 2,000 events: the checks read every entry of the streams
            if stop.is_set():
                break
            # New users on the way: each registered on first use, its event in the stream until drained.
            rs = await asyncio.gather(*(c.post("/v1/consume", json={"feature": "generate_insight",
                                                                   "user_id": f"u{n % 40}"}, headers=h)
                                        for h in keys))
            n += sum(r.status_code == 200 for r in rs)
        return n

    task = asyncio.create_task(load())
    checks = []
    # Before the worker starts every event is in the streams only; then they drain meanwhile.
    configs = []
    for _ in range(2):
        checks.append(await reconcile(redis, iso.pg, iso.layout, meters=test_meters()))
        configs.append(await config_drift(redis, iso.pg, iso.layout))
    w = iso.worker("live")
    await w.start()
    deadline = asyncio.get_running_loop().time() + 10
    while await iso.pg.fetchval("SELECT count(*) FROM usage_events") == 0:
        assert asyncio.get_running_loop().time() < deadline, w.output()
        await asyncio.sleep(0.05)
    for _ in range(4):
        checks.append(await reconcile(redis, iso.pg, iso.layout, meters=test_meters()))
        configs.append(await config_drift(redis, iso.pg, iso.layout))
    stop.set()
    assert await task > 0
    assert all(d == [] for d, _ in checks), [d for d, _ in checks if d][0][:5]
    assert all(d == [] for d, _ in configs), [d for d, _ in configs if d][0][:5]
    assert checks[0][1]["undrained"] > 0
    await wait_drained(redis, iso.layout, 30, w)
    assert await w.stop() == 0
    drift, stats = await reconcile(redis, iso.pg, iso.layout, meters=test_meters())
    assert drift == [] and stats["undrained"] == 0 and stats["pairs"] >= 4


async def test_reconcile_reports_configuration_drift_and_rebuild_org_sets_it(iso, redis) -> None:
    """Each org's configuration in Redis (plan, entitlements, user teams, sub-quota limits) is
    checked against Postgres: Redis changed behind Postgres's back is named, field by field,
    with exit 1; `rebuild --org` sets it from Postgres and reconcile is clean again."""
    c, admin, L = iso.client, iso.admin, iso.layout
    ent = await admin.org("pro")
    plain = await admin.org("bulk")
    r = await c.put(f"/v1/admin/orgs/{ent}/entitlements", json={"overflow": "credit", "overflow_cost": 2},
                    headers=admin.h)
    assert r.status_code == 200, r.text
    text = await redis.hget(L.org(ent), "entitlements")
    assert text
    await admin.user(ent, "ann", team="red")
    await admin.user(ent, "bob")
    await admin.quota(ent, "general", 40, user_id="ann")
    await admin.quota(ent, "general", 60, team="red")
    key = await admin.key(ent)
    # A user's rate window (the value of '@<user>') is not configuration.
    await redis.hset(L.balances(ent), mapping={user_key_field("ann"): "123", user_key_field("bob"): "456"})
    # A user registered on first use is in Postgres through the ledger (or the stream until drained).
    assert (await c.post("/v1/consume", json={"feature": "generate_insight", "user_id": "cid"},
                         headers={"Authorization": f"Bearer {key}"})).status_code == 200

    clean = await iso.cmd("reconcile")
    assert clean.returncode == 0, clean.stdout + clean.stderr
    assert " config " not in clean.stdout
    assert "config: 2 orgs' plan, entitlements, user teams and sub-quota limits checked against Postgres, " \
           "0 differ" in clean.stdout

    # Redis behind Postgres's back: each of the four, and configuration Postgres does not have.
    lim = QUOTA_FIELDS["limit"]
    await redis.hset(L.org(ent), "plan", "bulk")
    await redis.hset(L.org(plain), "entitlements", '{"overflow":"credit"}')
    await redis.hset(L.balances(ent), user_field("ann", "team"), "blue")
    await redis.hdel(L.balances(ent), user_key_field("bob"))  # its window with it
    await redis.hset(L.balances(ent), user_key_field("eve"), "")
    await redis.hset(L.quotas(ent), f"u:ann:general:{lim}", "400")
    await redis.hset(L.quotas(ent), f"t:blue:general:{lim}", "5")
    await redis.hdel(L.quotas(ent), f"t:red:general:{lim}")
    await redis.hdel(L.org(ent), "entitlements")
    # An org row Postgres has and Redis never got (the Redis write failed), with a user.
    await iso.pg.execute("INSERT INTO orgs (org_id, plan) VALUES ('pg-only', 'pro')")
    await iso.pg.execute("INSERT INTO users (org_id, user_id, team) VALUES ('pg-only', 'dan', 'ops')")
    await iso.pg.execute("INSERT INTO sub_quotas (org_id, meter, scope, subject, quota) "
                         "VALUES ('pg-only', 'general', 'user', 'dan', 7)")

    bad = await iso.cmd("reconcile")
    assert bad.returncode == 1, bad.stdout + bad.stderr
    lines = {line for line in bad.stdout.splitlines() if " config " in line}
    assert lines == {
        f"{ent} config plan: redis 'bulk' vs postgres 'pro'",
        f"{ent} config entitlements: redis (absent) vs postgres '{text}'",
        f"{plain} config entitlements: redis '{{\"overflow\":\"credit\"}}' vs postgres (absent)",
        f"{ent} config team ann: redis 'blue' vs postgres 'red'",
        f"{ent} config team bob: redis (absent) vs postgres ''",
        f"{ent} config team eve: redis '' vs postgres (absent)",
        f"{ent} config quota u:ann:general:{lim}: redis '400' vs postgres '40'",
        f"{ent} config quota t:blue:general:{lim}: redis '5' vs postgres (absent)",
        f"{ent} config quota t:red:general:{lim}: redis (absent) vs postgres '60'",
        "pg-only config plan: redis (absent) vs postgres 'pro'",
        "pg-only config team dan: redis (absent) vs postgres 'ops'",
        f"pg-only config quota u:dan:general:{lim}: redis (absent) vs postgres '7'",
    }, bad.stdout
    assert "config: 3 orgs' plan, entitlements, user teams and sub-quota limits checked against Postgres, " \
           "3 differ" in bad.stdout
    # The balance table stays as it was: no balance drifted.
    assert "balances checked, 0 differ" in bad.stdout

    one = await iso.cmd("reconcile", "--org", plain)
    assert one.returncode == 1 and [x for x in one.stdout.splitlines() if " config " in x] == [
        f"{plain} config entitlements: redis '{{\"overflow\":\"credit\"}}' vs postgres (absent)"], one.stdout

    fixed = {}
    for o in (ent, plain, "pg-only"):
        fix = await iso.cmd("rebuild", "--org", o)
        assert fix.returncode == 0, fix.stdout + fix.stderr
        assert f"configuration fields of org {o} set from Postgres; 0 still differ" in fix.stdout
        fixed[o] = fix.stdout
    assert f"repaired {ent} config team eve: '' -> (absent)" in fixed[ent]
    assert f"repaired {ent} config plan: 'bulk' -> 'pro'" in fixed[ent]
    assert "8 configuration fields" in fixed[ent] and "3 configuration fields" in fixed["pg-only"], fixed
    ok = await iso.cmd("reconcile")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert await redis.hgetall(L.org(ent)) == {"plan": "pro", "name": "", "entitlements": text}
    assert await redis.hget(L.balances(ent), user_key_field("bob")) == ""  # registered again, no window
    assert await redis.hget(L.balances(ent), user_key_field("ann")) == "123"  # a team repair leaves the window alone


async def test_full_rebuild_removes_configuration_postgres_does_not_have(iso, redis) -> None:
    """`rebuild --force` over a Redis with state: configuration only Redis has (an org, a user, a
    sub-quota limit) is removed, so reconcile is clean after it."""
    admin, L = iso.admin, iso.layout
    org = await admin.org("pro")
    await admin.user(org, "ann", team="red")
    lim = QUOTA_FIELDS["limit"]
    await redis.hset(L.org("ghost"), mapping={"plan": "pro", "entitlements": '{"overflow":"none"}'})
    await redis.hset(L.balances(org), mapping={user_key_field("eve"): "1", user_field("eve", "team"): "x"})
    await redis.hset(L.quotas(org), f"u:eve:general:{lim}", "3")
    bad = await iso.cmd("reconcile")
    assert bad.returncode == 1 and "ghost config plan: redis 'pro' vs postgres (absent)" in bad.stdout, bad.stdout
    rb = await iso.cmd("rebuild", "--force")
    assert rb.returncode == 0, rb.stdout + rb.stderr
    assert "4 configuration fields Postgres does not have were removed" in rb.stdout, rb.stdout
    ok = await iso.cmd("reconcile")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert await redis.exists(L.org("ghost")) == 0
    bal = await redis.hgetall(L.balances(org))
    assert {k: v for k, v in bal.items() if k.startswith(USER_PREFIX)} == {"@ann": "", "@ann:t": "red"}  # eve all gone


@pytest.mark.parametrize("how", ["repair_config", "rebuild"])
async def test_fixing_users_leaves_the_meters_and_org_fields_of_the_balance_hash_alone(iso, redis, config,
                                                                                       how: str) -> None:
    """The users live in the org's balance hash beside its meters and its org fields: setting
    them from Postgres (the configuration repair of `rebuild --org`; the full rebuild, which then
    removes users Postgres does not have) writes and removes '@<user>' fields (a removed user's
    state with it), and nothing else of that hash."""
    from sync_worker.config_drift import repair_config
    from sync_worker.recovery import rebuild

    admin, L = iso.admin, iso.layout
    org = await admin.org("pro")
    await iso.pg.execute("INSERT INTO users (org_id, user_id, team) VALUES ($1, 'ann', 'red'), ($1, 'bob', NULL)", org)
    # Meter fields the ledger knows nothing of (rebuild writes only meters with events), the org
    # fields, a kept user's rate window, and drifting users: ann's team, bob missing, eve stale.
    others = {meter_field("general", n): v for n, v in (("allocated", "100"), ("purchased", "7"), ("held", "3"),
                                                         ("used", "40"), ("period_end", "1900000000"),
                                                         ("limit", "-1"), ("purchased_total", "7"))}
    others |= {HOLDS_DUE: "0", SUB_QUOTAS: "0", user_key_field("ann"): "42"}
    await redis.hset(L.balances(org), mapping={**others, user_field("ann", "team"): "blue", user_key_field("eve"): "9",
                                               user_field("eve", "team"): ""})
    if how == "repair_config":  # rebuild --org's configuration step
        fixed, left = await repair_config(redis, iso.pg, L, org)
        assert left == [] and sorted(d.what for d in fixed) == ["team ann", "team bob", "team eve"], fixed
    else:  # rebuild --force
        rep = await rebuild(redis, iso.pg, config, L)
        assert rep.users == 2 and rep.config_removed == 1  # eve
    bal = await redis.hgetall(L.balances(org))
    assert {k: v for k, v in bal.items() if not k.startswith(USER_PREFIX) or k in others} == others
    assert {k: v for k, v in bal.items() if k.startswith(USER_PREFIX) and k not in others} == {
        user_field("ann", "team"): "red", user_key_field("bob"): ""}


async def test_the_configuration_check_reads_every_user_of_a_large_balance_hash(iso, redis) -> None:
    """An org's users are fields of its balance hash; the check reads it by HSCAN, 1,000 fields a
    command (not one HGETALL holding Redis for all of them): every user of an org with many is
    seen, here 2,500 that only Redis knows, each one drift, and the meter beside them none."""
    org = await iso.admin.org("bulk")
    await iso.admin.grant(org, "general", 5)
    await redis.hset(iso.layout.balances(org), mapping={user_key_field(f"u{i}"): "" for i in range(2500)})
    drift, checked = await config_drift(redis, iso.pg, iso.layout, org)
    assert checked == 1
    assert sorted(d.what for d in drift) == sorted(f"team u{i}" for i in range(2500)), drift[:3]
