"""Low-balance alerts (issue 12): the decision that crosses a threshold records one `alert`
event in its own script; a real worker drains it to Postgres; the notifier POSTs it, signed, to
the org's webhook (a local receiver here) until a 2xx, recording every attempt."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import subprocess
import time
from collections.abc import AsyncIterator
from types import SimpleNamespace
from typing import Any

import asyncpg
import httpx
import orjson
import pytest
from aiohttp import web

from conftest import Admin, test_config_data
from quota_gw import config as config_mod
from quota_gw import notifier
from quota_gw.app import create_app
from worker_support import QUOTA_GW, WorkerProc, write_config

class Receiver:
    """An org's webhook endpoint: records each POST; `/flaky/...` answers 500 to the first two
    attempts of each event id."""

    def __init__(self) -> None:
        self.got: list[dict[str, Any]] = []
        self.url = ""
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/{kind}/{org}", self._post)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"  # type: ignore[union-attr]

    async def stop(self) -> None:
        if self._runner:
            await self._runner.cleanup()

    async def _post(self, request: web.Request) -> web.Response:
        raw = await request.read()
        body = orjson.loads(raw)
        seen = sum(1 for g in self.got if g["body"]["id"] == body["id"])
        status = 500 if request.match_info["kind"] == "flaky" and seen < 2 else 200
        self.got.append({"org": request.match_info["org"], "raw": raw, "body": body, "status": status,
                         "signature": request.headers.get("X-Quota-Signature", "")})
        return web.Response(status=status)

    def of(self, org: str) -> list[dict[str, Any]]:
        return [g for g in self.got if g["org"] == org]


def verifies(secret: str, raw: bytes, header: str) -> bool:
    parts = dict(p.split("=", 1) for p in header.split(","))
    mac = hmac.new(secret.encode(), f"{parts['t']}.".encode() + raw, hashlib.sha256).hexdigest()
    return hmac.compare_digest(mac, parts["v1"]) and abs(time.time() - int(parts["t"])) < 300


async def until(cond: Any, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not await cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.1)


@pytest.fixture(scope="module")
async def env(redis, redis_url: str, database_url: str, prefix: str, tmp_path_factory: Any) -> AsyncIterator[Any]:
    data = test_config_data()
    data["alerts"] = {"thresholds": [25, 10, 0], "retry_initial_s": 0.3, "retry_max_s": 1}
    cfg = config_mod.parse(data, "tests/test_alerts.py")
    sub = f"{prefix}:al"
    tmp = tmp_path_factory.mktemp("alerts")
    worker = WorkerProc(write_config(tmp, data), redis_url, database_url, sub, "alerts", tmp)
    await worker.start()
    receiver = Receiver()
    await receiver.start()
    stop = asyncio.Event()
    task = asyncio.create_task(notifier.run(database_url, cfg, 0.1, stop))
    app = create_app(cfg, redis_url, database_url, sub)
    pg = await asyncpg.connect(database_url)
    try:
        async with app.router.lifespan_context(app):
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw") as client:
                admin = Admin(client)

                async def tenant() -> tuple[str, dict[str, str], str]:
                    org = await admin.org("pro")
                    key = await admin.key(org)
                    return org, {"Authorization": f"Bearer {key}"}, key

                async def hook(org: str, kind: str = "ok") -> str:
                    r = await client.put(f"/v1/admin/orgs/{org}/webhook", json={"url": f"{receiver.url}/{kind}/{org}"},
                                         headers=admin.h)
                    assert r.status_code == 200, r.text
                    return r.json()["secret"]

                yield SimpleNamespace(client=client, admin=admin, tenant=tenant, hook=hook, receiver=receiver,
                                      worker=worker, pg=pg)
    finally:
        await pg.close()
        stop.set()
        await task
        await receiver.stop()
        await worker.kill()


async def spend(env: Any, h: dict[str, str], units: int) -> httpx.Response:
    return await env.client.post("/v1/consume", json={"feature": "generate_insight", "units": units}, headers=h)


async def test_spending_50_to_0_delivers_three_signed_alerts_and_balance_turns_low(env: Any) -> None:
    org, h, _ = await env.tenant()
    secret = await env.hook(org)
    lows = []
    for _ in range(50):
        r = await spend(env, h, 1)
        assert r.status_code == 200, r.text
        b = (await env.client.get("/v1/balance", headers=h)).json()["meters"]["general"]
        lows.append((b["balance"], b["low"]))
    assert (12, True) in lows and (13, False) in lows  # below 25 % of 50
    assert (await spend(env, h, 1)).status_code == 402

    async def three() -> bool:
        return len(env.receiver.of(org)) >= 3
    await until(three, "three alerts")
    got = env.receiver.of(org)
    assert [g["body"]["threshold"] for g in got] == [25, 10, 0]
    assert [g["body"]["balance"] for g in got] == [12, 5, 0]
    first = got[0]["body"]
    assert first["type"] == "balance.low" and first["org_id"] == org and first["meter"] == "general"
    assert set(first) == {"id", "type", "org_id", "meter", "threshold", "balance", "allocated", "purchased",
                          "period_end"}
    assert len({g["body"]["id"] for g in got}) == 3
    assert all(verifies(secret, g["raw"], g["signature"]) for g in got)
    assert not verifies("whsec_other", got[0]["raw"], got[0]["signature"])
    # Nothing more this period: refusals and a later top-up and re-spend cross no threshold again.
    await env.admin.grant(org, "general", 10)
    r = await spend(env, h, 10)
    assert r.status_code == 200
    last = r.json()["event_id"]

    async def drained() -> bool:
        return bool(await env.pg.fetchval("SELECT 1 FROM usage_events WHERE event_id = $1::uuid", last))
    await until(drained, "the last charge in the ledger")
    assert await env.pg.fetchval("SELECT count(*) FROM usage_events WHERE org_id = $1 AND kind = 'alert'", org) == 3
    await asyncio.sleep(0.5)  # several notifier polls (0.1 s): none may send a fourth
    assert len(env.receiver.of(org)) == 3


async def test_a_receiver_answering_500_twice_gets_the_same_event_again_until_200(env: Any) -> None:
    org, h, _ = await env.tenant()
    await env.hook(org, "flaky")
    assert (await spend(env, h, 38)).status_code == 200  # 50 -> 12: the 25 % threshold only

    async def answered() -> bool:
        return any(g["status"] == 200 for g in env.receiver.of(org))
    await until(answered, "a delivery answered 200")
    got = env.receiver.of(org)
    assert [g["status"] for g in got] == [500, 500, 200]
    assert len({g["body"]["id"] for g in got}) == 1 and got[0]["raw"] == got[2]["raw"]

    async def listed() -> list[dict[str, Any]]:
        r = await env.client.get(f"/v1/admin/orgs/{org}/webhook/deliveries", headers=env.admin.h)
        assert r.status_code == 200, r.text
        return r.json()["deliveries"]

    async def three_listed() -> bool:
        return len(await listed()) == 3
    await until(three_listed, "three recorded attempts")
    d = await listed()
    assert [x["status"] for x in d] == [200, 500, 500] and [x["attempt"] for x in d] == [3, 2, 1]
    assert all(x["delivered"] for x in d) and d[0]["event_id"] == got[0]["body"]["id"]


async def test_webhook_url_must_be_http_and_the_route_needs_the_admin_token(env: Any) -> None:
    org, h, _ = await env.tenant()
    r = await env.client.put(f"/v1/admin/orgs/{org}/webhook", json={"url": "ftp://x"}, headers=env.admin.h)
    assert r.status_code == 422 and r.json()["field"] == "url"
    r = await env.client.put(f"/v1/admin/orgs/{org}/webhook", json={"url": "http://127.0.0.1/x"}, headers=h)
    assert r.status_code == 401
    r = await env.client.put("/v1/admin/orgs/no-such-org/webhook", json={"url": "http://127.0.0.1/x"},
                             headers=env.admin.h)
    assert r.status_code == 404


def test_notifier_command_is_documented() -> None:
    out = subprocess.run([QUOTA_GW, "notifier", "--help"], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0 and "DATABASE_URL" in out.stdout


# --- Spent through a reservation (reserve -> commit: the decision API and the sidecar's LLM routes) ---

async def reserve(env: Any, h: dict[str, str], units: int) -> str:
    r = await env.client.post("/v1/reservations", json={"feature": "generate_insight", "units": units}, headers=h)
    assert r.status_code == 201, r.text
    return r.json()["reservation_id"]


async def commit(env: Any, h: dict[str, str], rid: str, units: int) -> str:
    r = await env.client.post(f"/v1/reservations/{rid}/commit", json={"units": units}, headers=h)
    assert r.status_code == 200, r.text
    return r.json()["event_id"]


async def ledger_until(env: Any, org: str, event_id: str) -> list[asyncpg.Record]:
    """The org's ledger, in the order the scripts wrote it, once `event_id` (its last write) is in."""
    async def drained() -> bool:
        return bool(await env.pg.fetchval("SELECT 1 FROM usage_events WHERE event_id = $1::uuid", event_id))
    await until(drained, f"event {event_id} in the ledger")
    return await env.pg.fetch("SELECT kind, user_id, meter, feature, delta, cost, balance_after, metadata::text AS meta "
                              "FROM usage_events WHERE org_id = $1 ORDER BY ts, stream_id", org)


async def test_a_commit_crossing_a_threshold_records_the_alert_a_consume_would_and_the_notifier_posts_it(
        env: Any) -> None:
    org, h, _ = await env.tenant()
    await env.hook(org)
    rid = await reserve(env, h, 40)  # held: 10 left to spend, nothing spent yet
    await commit(env, h, rid, 38)  # 50 -> 12: below 25 %
    last = await commit(env, h, await reserve(env, h, 1), 1)  # 12 -> 11: below 25 % again, no new threshold
    rows = await ledger_until(env, org, last)
    assert [r["kind"] for r in rows] == ["reset", "reserve", "commit", "alert", "reserve", "commit"]
    alert = rows[3]
    assert orjson.loads(alert["meta"])["threshold"] == 25 and orjson.loads(alert["meta"])["balance"] == 12
    # The same crossing by a consume, in another org: the same event, field for field.
    other, oh, _ = await env.tenant()
    by_consume = await ledger_until(env, other, (await spend(env, oh, 38)).json()["event_id"])
    assert [r["kind"] for r in by_consume] == ["reset", "consume", "alert"]
    assert dict(by_consume[2]) == dict(alert)

    async def delivered() -> bool:
        return len(env.receiver.of(org)) >= 1
    await until(delivered, "the alert POSTed")
    body = env.receiver.of(org)[0]["body"]
    assert (body["type"], body["threshold"], body["balance"], body["allocated"]) == ("balance.low", 25, 12, 12)
    await asyncio.sleep(0.5)  # several notifier polls (0.1 s): none may send a second
    assert len(env.receiver.of(org)) == 1
    # The org's own usage lists it by its kind.
    r = await env.client.get("/v1/usage", params={"kind": "alert"}, headers=h)
    assert r.status_code == 200, r.text
    assert [(e["kind"], e["metadata"]["threshold"]) for e in r.json()["events"]] == [("alert", 25)]


async def test_a_hold_released_unspent_records_no_alert(env: Any) -> None:
    org, h, _ = await env.tenant()
    rid = await reserve(env, h, 45)  # would leave 5 (10 %): judged when spent, not when held
    r = await env.client.delete(f"/v1/reservations/{rid}", headers=h)
    assert r.status_code == 200, r.text
    rows = await ledger_until(env, org, (await spend(env, h, 1)).json()["event_id"])
    assert [r["kind"] for r in rows] == ["reset", "reserve", "release", "consume"]


async def test_commits_walk_down_every_threshold_once_each(env: Any) -> None:
    org, h, _ = await env.tenant()
    last = ""
    # Each hold a little over what is spent (as an LLM hold is): spent 50 -> 30 -> 10 (25 %) -> 5 (10 %) -> 0 (0 %).
    for held, units in ((25, 20), (25, 20), (8, 5), (5, 5)):
        last = await commit(env, h, await reserve(env, h, held), units)
    rows = await ledger_until(env, org, last)
    alerts = [(orjson.loads(r["meta"])["threshold"], orjson.loads(r["meta"])["balance"]) for r in rows
              if r["kind"] == "alert"]
    assert alerts == [(25, 10), (10, 5), (0, 0)]


async def test_a_commit_after_its_period_ended_records_no_alert(redis: Any, config: Any, prefix: str) -> None:
    """The period the charge falls in is over: the next decision starts a new one (and new alerts)."""
    from quota_gw.decisions import Decider, Identity
    from quota_gw.layout import Layout, meter_field
    from quota_gw.events import entries

    layout = Layout(f"{prefix}:alpe", 16)
    decider = Decider(redis, config, layout)
    try:
        kinds = []
        for ended in (False, True):
            org = f"org-{ended}-{time.time_ns()}"
            ident = Identity("k1", org, None, frozenset({"consume"}), "pro")
            r = await decider.reserve(ident, "generate_insight", 45, "", ttl_s=60)
            assert r.status == 201
            if ended:
                await redis.hset(layout.balances(org), meter_field("general", "period_end"), int(time.time()) - 1)
            assert (await decider.commit(ident, r.event_id, 45)).status == 200
            kinds.append([f["kind"] for f in entries(await redis.xrange(layout.stream(org))) if f["org"] == org])
    finally:
        await decider.aclose()
    assert kinds == [["reset", "reserve", "commit", "alert", "alert"], ["reset", "reserve", "commit"]]
