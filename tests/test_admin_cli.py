"""Operator reads and the admin CLI, against real Redis and Postgres.

GET /v1/admin/orgs pages every org once with an opaque cursor and `low=true` keeps the orgs
with a meter under the low-balance mark; GET /v1/admin/worker reports per shard what the
worker's group has not acked, its age, the dead letters and the consumers. The CLI commands are
the same admin API run in process: their writes show in the API, their refusals are one line
with the documented exit code."""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import subprocess
import sys
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis
import yaml

from conftest import ADMIN_TOKEN, Admin, test_config_data
from worker_support import WorkerProc
from quota_gw.app import create_app
from quota_gw.layout import Layout
from sync_worker.worker import GROUP

H = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
OUR_VARS = ("REDIS_URL", "DATABASE_URL", "QUOTA_GW_CONFIG", "QUOTA_GW_PREFIX", "QUOTA_GW_ADMIN_TOKEN")


@pytest.fixture(scope="module")
def cli_env(tmp_path_factory: pytest.TempPathFactory, redis_url: str, database_url: str, prefix: str) -> dict[str, str]:
    """The CLI on the same stores, prefix and config as the `client` app (no admin token: the CLI
    needs none)."""
    path = tmp_path_factory.mktemp("admincli") / "quota-gw.yaml"
    path.write_text(yaml.safe_dump(test_config_data()))
    env = {k: v for k, v in os.environ.items() if k not in OUR_VARS}
    return {**env, "REDIS_URL": redis_url, "DATABASE_URL": database_url, "QUOTA_GW_PREFIX": prefix,
            "QUOTA_GW_CONFIG": str(path)}


async def qgw(env: dict[str, str], *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(subprocess.run, [sys.executable, "-m", "quota_gw.cli", *args], input=stdin,
                                   capture_output=True, text=True, timeout=90, env=env)


def refused(r: subprocess.CompletedProcess[str], code: int, *words: str) -> None:
    err = r.stderr.strip()
    assert r.returncode == code and len(err.splitlines()) == 1 and "Traceback" not in err, r.stderr
    for w in words:
        assert w in err, err


def org_id(tag: str = "o") -> str:
    return f"cli-{tag}-{secrets.token_hex(5)}"


async def all_orgs(client: httpx.AsyncClient, **params: str) -> list[dict[str, Any]]:
    out, cursor = [], None
    while True:
        q = {**params, **({"cursor": cursor} if cursor else {})}
        r = await client.get("/v1/admin/orgs", params=q, headers=H)
        assert r.status_code == 200, r.text
        page = r.json()
        assert len(page["orgs"]) <= int(params.get("limit", 100))
        out += page["orgs"]
        cursor = page["next_cursor"]
        if cursor is None:
            return out


async def test_admin_orgs_pages_every_org_once_in_id_order(client: httpx.AsyncClient, admin: Admin):
    mine = sorted([await admin.org("pro", org_id("page")) for _ in range(5)])
    seen = await all_orgs(client, limit="2")
    ids = [o["org_id"] for o in seen]
    assert len(ids) == len(set(ids)) and ids == sorted(ids)
    assert [i for i in ids if i in mine] == mine
    one = next(o for o in seen if o["org_id"] == mine[0])
    assert one["plan"] == "pro" and one["created_at"].endswith("Z") and one["low"] is False
    assert one["meters"]["general"]["balance"] == 50 and one["meters"]["tokens"]["limit"] == 100000


async def test_admin_orgs_low_keeps_orgs_under_the_low_balance_mark(client: httpx.AsyncClient, admin: Admin,
                                                                    tenant: Any):
    low_org, h = await tenant("hourly")  # general: 10 a period; 25% is the mark
    for _ in range(8):
        r = await client.post("/v1/consume", json={"feature": "generate_insight"}, headers=h)
        assert r.status_code == 200, r.text
    full_org = await admin.org("hourly", org_id("full"))
    low = await all_orgs(client, low="true", limit="3")
    ids = {o["org_id"] for o in low}
    assert low_org in ids and full_org not in ids
    assert all(o["low"] for o in low)
    entry = next(o for o in low if o["org_id"] == low_org)
    assert entry["meters"]["general"] == {**entry["meters"]["general"], "balance": 2, "low": True}
    assert full_org in {o["org_id"] for o in await all_orgs(client, low="false", limit="1000")}


@pytest.mark.parametrize("query, field", [("limit=0", "limit"), ("limit=1001", "limit"), ("limit=ten", "limit"), ("limit=%C2%B2", "limit"),
                                          ("cursor=not-a-cursor", "cursor"), ("low=maybe", "low")])
async def test_admin_orgs_bad_params_are_422_naming_the_param(client: httpx.AsyncClient, query: str, field: str):
    r = await client.get(f"/v1/admin/orgs?{query}", headers=H)
    assert r.status_code == 422 and r.headers["content-type"] == "application/problem+json"
    assert r.json()["field"] == field and r.json()["detail"].startswith(f"{field}:")


async def test_admin_reads_need_the_admin_token(client: httpx.AsyncClient):
    for path in ("/v1/admin/orgs", "/v1/admin/worker"):
        r = await client.get(path, headers={"Authorization": "Bearer nope"})
        assert r.status_code == 401 and r.json()["code"] == "unauthorized"


@pytest.fixture
async def own_prefix(config: Any, redis_url: str, database_url: str) -> AsyncIterator[tuple[httpx.AsyncClient, str]]:
    """An app on a key prefix of its own, so the streams hold exactly what the test puts there."""
    prefix = f"qgwws{secrets.token_hex(4)}"
    app = create_app(config, redis_url, database_url, prefix)
    r = aioredis.from_url(redis_url, decode_responses=True)
    try:
        async with app.router.lifespan_context(app):
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw") as c:
                yield c, prefix
    finally:
        async for k in r.scan_iter(match=f"{prefix}:*"):
            await r.delete(k)
        await r.aclose()


async def _worker_state(redis_url: str, stream: str) -> None:
    """5 entries; a consumer `w1` reads 3 (pending), 2 are not delivered; one dead letter."""
    r = aioredis.from_url(redis_url, decode_responses=True)
    try:
        for i in range(5):
            await r.xadd(stream, {"id": str(i)})
        await r.xgroup_create(stream, GROUP, id="0")
        await r.xreadgroup(GROUP, "w1", {stream: ">"}, count=3)
        await r.xadd(stream + ":dead", {"error": "bad row"})
    finally:
        await r.aclose()


async def test_admin_worker_reports_lag_pending_dead_letters_and_consumers(own_prefix, redis_url: str):
    client, prefix = own_prefix
    stream = f"{prefix}:{{s03}}:events"
    await _worker_state(redis_url, stream)
    r = await client.get("/v1/admin/worker", headers=H)
    assert r.status_code == 200, r.text
    st = r.json()
    assert st["group"] == GROUP and st["shards"] == 16 and len(st["streams"]) == 16
    s = next(x for x in st["streams"] if x["stream"] == stream)
    assert s["group_exists"] and s["length"] == 5 and s["pending"] == 3 and s["undelivered"] == 2
    assert s["unacked"] == 5 and s["dead_letters"] == 1 and s["oldest_unacked_age_s"] >= 0
    assert s["last_delivered_id"] and s["last_delivered_at"].endswith("Z")
    assert [(c["name"], c["pending"]) for c in s["consumers"]] == [("w1", 3)]
    quiet = next(x for x in st["streams"] if x["stream"] != stream)
    assert quiet["unacked"] == 0 and quiet["group_exists"] is False and quiet["oldest_unacked_age_s"] is None
    assert st["totals"] == {**st["totals"], "unacked": 5, "pending": 3, "dead_letters": 1, "consumers": ["w1"]}


async def test_cli_worker_status_is_the_route(own_prefix, redis_url: str, cli_env: dict[str, str]):
    _, prefix = own_prefix
    stream = f"{prefix}:{{s07}}:events"
    await _worker_state(redis_url, stream)
    r = await qgw({**cli_env, "QUOTA_GW_PREFIX": prefix}, "worker-status", "--json")
    assert r.returncode == 0, r.stderr
    s = next(x for x in json.loads(r.stdout)["streams"] if x["stream"] == stream)
    assert (s["pending"], s["undelivered"], s["dead_letters"]) == (3, 2, 1)
    table = await qgw({**cli_env, "QUOTA_GW_PREFIX": prefix}, "worker-status")
    assert table.returncode == 0 and "1 dead letters" in table.stdout and "w1(3," in table.stdout, table.stdout


async def test_cli_orgs_create_then_list_and_refusals(client: httpx.AsyncClient, cli_env: dict[str, str]):
    org = org_id("new")
    r = await qgw(cli_env, "orgs", "create", org, "--plan", "bulk", "--name", "New Co")
    assert r.returncode == 0 and f"created org {org} (plan bulk)" in r.stdout, r.stderr
    row = next(o for o in await all_orgs(client, limit="1000") if o["org_id"] == org)
    assert row["name"] == "New Co" and row["plan"] == "bulk"
    refused(await qgw(cli_env, "orgs", "create", org, "--plan", "bulk"), 1, f"org {org} exists")
    refused(await qgw(cli_env, "orgs", "create", org_id(), "--plan", "gold"), 2, "plan: one of")
    refused(await qgw(cli_env, "orgs", "create", "bad id!", "--plan", "pro"), 2, "org_id")
    listed = await qgw(cli_env, "orgs", "list", "--json")
    assert listed.returncode == 0, listed.stderr
    assert any(o["org_id"] == org and o["meters"]["general"]["balance"] == 100 for o in json.loads(listed.stdout))
    table = await qgw(cli_env, "orgs", "list")
    assert any(line.startswith(org) and "general=100/100" in line for line in table.stdout.splitlines())


async def test_cli_keys_create_prints_a_working_key_and_revoke_ends_it(client: httpx.AsyncClient, admin: Admin,
                                                                       cli_env: dict[str, str]):
    org = await admin.org("pro", org_id("keys"))
    r = await qgw(cli_env, "keys", "create", org, "--user", "ann", "--scopes", "read")
    assert r.returncode == 0, r.stderr
    key = r.stdout.strip()
    assert key.startswith("qgw_") and len(r.stdout.splitlines()) == 1  # stdout is the key alone
    key_id = r.stderr.split("created key ", 1)[1].split()[0]
    h = {"Authorization": f"Bearer {key}"}
    assert (await client.get("/v1/balance", headers=h)).status_code == 200
    denied = await client.post("/v1/consume", json={"feature": "generate_insight"}, headers=h)
    assert denied.status_code == 403  # the scopes given were kept: read only
    refused(await qgw(cli_env, "keys", "create", org_id("ghost")), 1, "no org")
    refused(await qgw(cli_env, "keys", "create", org, "--scopes", "consume,admin"), 2, "scopes")
    rv = await qgw(cli_env, "keys", "revoke", key_id)
    assert rv.returncode == 0 and f"revoked key {key_id}" in rv.stdout, rv.stderr
    async with asyncio.timeout(10):  # the gateway's key cache holds an entry up to key_cache_s
        while (await client.get("/v1/balance", headers=h)).status_code != 401:
            await asyncio.sleep(0.1)
    refused(await qgw(cli_env, "keys", "revoke", "key_doesnotexist"), 1, "no key")


async def test_cli_grant_adds_credit_once_per_idempotency_key(client: httpx.AsyncClient, tenant: Any,
                                                              cli_env: dict[str, str]):
    org, h = await tenant("pro")
    events = set()
    for _ in range(2):
        r = await qgw(cli_env, "grant", org, "general", "25", "--reason", "support ticket 42", "--idempotency-key", "t42")
        assert r.returncode == 0 and f"granted 25 general to {org}" in r.stdout, r.stdout + r.stderr
        events.add(r.stdout.split("(event ", 1)[1].rstrip(")\n"))
    assert len(events) == 1  # the retry answered with the first grant's event
    assert (await client.get("/v1/balance", headers=h)).json()["meters"]["general"]["balance"] == 75
    refused(await qgw(cli_env, "grant", org, "gold", "5", "--reason", "r"), 2, "meter: one of")
    refused(await qgw(cli_env, "grant", org, "general", "0", "--reason", "r"), 2, "amount")
    refused(await qgw(cli_env, "grant", org_id("ghost"), "general", "5", "--reason", "r"), 1, "no org")


async def allowed_within(client: httpx.AsyncClient, h: dict[str, str], allowed: bool) -> None:
    """Waits out the gateway's key cache (≤ 1 s) until a check answers `allowed`."""
    async with asyncio.timeout(10):
        while (await client.post("/v1/check", json={"feature": "generate_insight"}, headers=h)).json()["allowed"] \
                is not allowed:
            await asyncio.sleep(0.1)


async def test_cli_entitlements_set_turns_a_429_into_a_charged_call_and_clear_restores_the_plan(
        client: httpx.AsyncClient, tenant: Any, cli_env: dict[str, str], tmp_path: Any):
    org, h = await tenant("pro", "ann", general=10)  # pro: 5 calls a minute a user, no overflow
    for _ in range(5):
        assert (await client.post("/v1/consume", json={"feature": "generate_insight"}, headers=h)).status_code == 200
    assert (await client.post("/v1/consume", json={"feature": "generate_insight"}, headers=h)).status_code == 429

    shown = await qgw(cli_env, "orgs", "entitlements", org)
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout) == {"org_id": org, "plan": "pro", "entitlements": {}, "effective": {
        "overflow": "credit", "overflow_cost": 1, "credit_order": ["grants", "purchased"],
        "rate_limits": {"user": {"overflow": "none", "overflow_cost": 1}}}}

    body = tmp_path / "ent.json"
    body.write_text('{"rate_limits": {"user": {"overflow": "credit", "overflow_cost": 2}}}')
    r = await qgw(cli_env, "orgs", "entitlements", org, "--set", str(body))
    assert r.returncode == 0, r.stderr
    set_ = json.loads(r.stdout)
    api = await client.get(f"/v1/admin/orgs/{org}/entitlements", headers=H)
    assert api.status_code == 200 and api.json() == set_, api.text
    assert set_["entitlements"] == {"rate_limits": {"user": {"overflow": "credit", "overflow_cost": 2}}}
    assert set_["effective"]["rate_limits"]["user"] == {"overflow": "credit", "overflow_cost": 2}
    await allowed_within(client, h, True)
    r6 = await client.post("/v1/consume", json={"feature": "generate_insight"}, headers=h)
    assert r6.status_code == 200 and (r6.json()["cost"], r6.headers["X-Quota-Source"]) == (2, "purchased"), r6.text

    cleared = await qgw(cli_env, "orgs", "entitlements", org, "--clear")
    assert cleared.returncode == 0 and json.loads(cleared.stdout)["entitlements"] == {}, cleared.stderr
    assert (await client.get(f"/v1/admin/orgs/{org}/entitlements", headers=H)).json()["entitlements"] == {}
    await allowed_within(client, h, False)
    assert (await client.post("/v1/consume", json={"feature": "generate_insight"}, headers=h)).status_code == 429
    assert (await client.get("/v1/balance", headers=h)).json()["meters"]["general"]["purchased"] == 8


async def test_cli_entitlements_refuses_bad_input_naming_the_field_and_writes_nothing(
        client: httpx.AsyncClient, admin: Admin, redis: Any, prefix: str, config: Any, cli_env: dict[str, str],
        tmp_path: Any):
    org = await admin.org("pro", org_id("ent"))
    kept = {"overflow": "credit", "overflow_cost": 3}
    r = await qgw(cli_env, "orgs", "entitlements", org, "--set", "-", stdin=json.dumps(kept))
    assert r.returncode == 0 and json.loads(r.stdout)["entitlements"] == kept, r.stderr
    hash_before = await redis.hget(Layout(prefix, config.shards).org(org), "entitlements")
    assert json.loads(hash_before) == kept
    for text, words in [('{"overflow": "credit",', ["malformed JSON"]), ("[]", ["JSON object"]), ("", ["required"]),
                        ('{"allocations": {"general": 5}}', ["allocations"]),
                        ('{"overflow": "sometimes"}', ["overflow:"]),
                        ('{"overflow_cost": "2"}', ["overflow_cost:"]),
                        ('{"rate_limits": {"user": {"overflow_cost": 1001}}}', ["rate_limits.user.overflow_cost:"]),
                        ('{"credit_order": ["grants"]}', ["credit_order:"])]:
        refused(await qgw(cli_env, "orgs", "entitlements", org, "--set", "-", stdin=text), 2, *words)
    refused(await qgw(cli_env, "orgs", "entitlements", org, "--set", str(tmp_path / "missing.json")), 2,
            "cannot read", "missing.json")
    assert (await client.get(f"/v1/admin/orgs/{org}/entitlements", headers=H)).json()["entitlements"] == kept
    assert await redis.hget(Layout(prefix, config.shards).org(org), "entitlements") == hash_before
    ghost = org_id("ghost")
    for extra in ([], ["--clear"], ["--set", "-"]):
        refused(await qgw(cli_env, "orgs", "entitlements", ghost, *extra, stdin="{}"), 1, f"no org {ghost}")


async def test_cli_entitlements_redis_failing_after_the_commit_exits_3_and_the_same_command_again_sets_it(
        client: httpx.AsyncClient, admin: Admin, redis: Any, prefix: str, config: Any, cli_env: dict[str, str]):
    """A Redis login that may not write the org hash: Postgres commits, the Redis write fails."""
    org = await admin.org("pro", org_id("half"))
    user = f"qgw_nohset_{secrets.token_hex(4)}"
    await redis.execute_command("ACL", "SETUSER", user, "on", ">pw", "~*", "&*", "+@all", "-hset", "-hdel")
    try:
        url = cli_env["REDIS_URL"].replace("redis://", f"redis://{user}:pw@", 1)
        r = await qgw({**cli_env, "REDIS_URL": url}, "orgs", "entitlements", org, "--set", "-",
                      stdin='{"overflow_cost": 3}')
    finally:
        await redis.execute_command("ACL", "DELUSER", user)
    last = r.stderr.strip().splitlines()[-1]
    assert r.returncode == 3 and "Traceback" not in r.stderr, r.stderr
    assert last.startswith("quota-gw orgs entitlements:") and "run the command again" in last, r.stderr
    assert (await client.get(f"/v1/admin/orgs/{org}/entitlements", headers=H)).json()["entitlements"] == {
        "overflow_cost": 3}
    assert await redis.hget(Layout(prefix, config.shards).org(org), "entitlements") is None  # Redis behind
    again = await qgw(cli_env, "orgs", "entitlements", org, "--set", "-", stdin='{"overflow_cost": 3}')
    assert again.returncode == 0, again.stderr
    assert await redis.hget(Layout(prefix, config.shards).org(org), "entitlements") == '{"overflow_cost":3}'


async def test_admin_worker_shows_a_running_worker_drain_and_report_its_last_batch(own_prefix, redis_url: str,
                                                                                 database_url: str, cli_env, tmp_path):
    client, prefix = own_prefix
    org = org_id("drain")
    assert (await client.post("/v1/admin/orgs", json={"org_id": org, "plan": "pro"}, headers=H)).status_code == 201
    key = (await client.post(f"/v1/admin/orgs/{org}/keys", json={}, headers=H)).json()["key"]
    for _ in range(3):
        r = await client.post("/v1/consume", json={"feature": "generate_insight"},
                              headers={"Authorization": f"Bearer {key}"})
        assert r.status_code == 200, r.text
    before = (await client.get("/v1/admin/worker", headers=H)).json()
    events = before["totals"]["unacked"]  # the 3 consumes and the period's start (a `reset`)
    assert events >= 3 and before["totals"]["undelivered"] == events and before["workers"] == []
    w = WorkerProc(cli_env["QUOTA_GW_CONFIG"], redis_url, database_url, prefix, "wstatus", tmp_path)
    await w.start()
    try:
        async with asyncio.timeout(90):
            while True:
                assert w.alive, w.output()[-2000:]
                st = (await client.get("/v1/admin/worker", headers=H)).json()
                if st["totals"]["unacked"] == 0 and st["workers"] and st["workers"][0]["last_batch"]:
                    break
                await asyncio.sleep(0.2)
    finally:
        await w.stop()
    rep = st["workers"][0]
    assert rep["consumer"] == "wstatus" and rep["inserted"] == events and rep["errors"] == 0
    assert 1 <= rep["last_batch"]["entries"] <= events and rep["last_batch"]["age_s"] >= 0
    assert st["totals"]["consumers"] == ["wstatus"]
