"""Credit packs sold through Stripe (SPEC §4, issue 12): POST/GET /v1/purchases open and list
checkouts through the real `stripe` SDK (pointed at a local stand-in for Stripe's servers), and
POST /v1/webhooks/stripe credits a paid session once, verified with the SDK's own signature check.
Runs seed 000's catalogue (examples/seed-000.yaml) on real Redis and Postgres."""

from __future__ import annotations

import asyncio
import os
import secrets
import time
from datetime import datetime
from collections.abc import AsyncIterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
import yaml

from conftest import Admin
from quota_gw import config as config_mod
from quota_gw.app import create_app
from stripe_support import FakeStripeAPI, paid, session_event, signed

ROOT = Path(__file__).resolve().parent.parent
KEY_ENV, HOOK_ENV = "QGW_TEST_STRIPE_SECRET_KEY", "QGW_TEST_STRIPE_WEBHOOK_SECRET"
WHSEC = "whsec_test_" + secrets.token_hex(16)


def seed_config(api_base: str) -> config_mod.Config:
    data = yaml.safe_load((ROOT / "examples" / "seed-000.yaml").read_text())
    data["stripe"].update(api_base=api_base, secret_key_env=KEY_ENV, webhook_secret_env=HOOK_ENV)
    data["plans"]["free_2s"] = {"period": "2s", "allocations": {"tokens": 100}}
    data["packs"]["trial_30d"] = {"meter": "tokens", "tokens": 40, "price_cents": 100, "expires_in": "30d"}
    return config_mod.parse(data, "examples/seed-000.yaml (test)")


@pytest.fixture(scope="module")
async def shop(redis, redis_url: str, database_url: str, prefix: str) -> AsyncIterator[Any]:
    fake = FakeStripeAPI()
    await fake.start()
    os.environ[KEY_ENV] = "sk_test_" + secrets.token_hex(12)
    os.environ[HOOK_ENV] = WHSEC
    sub = f"{prefix}:shop"
    app = create_app(seed_config(fake.url), redis_url, database_url, sub)
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw") as client:
            admin = Admin(client)

            async def tenant(plan: str = "free", user_id: str | None = None) -> tuple[str, dict[str, str]]:
                org = await admin.org(plan)
                return org, {"Authorization": f"Bearer {await admin.key(org, user_id)}"}

            async def deliver(event: dict[str, Any], secret: str = WHSEC, t: int | None = None) -> httpx.Response:
                body, headers = signed(event, secret, t)
                return await client.post("/v1/webhooks/stripe", content=body, headers=headers)

            async def tokens(h: dict[str, str]) -> dict[str, Any]:
                r = await client.get("/v1/balance", headers=h)
                assert r.status_code == 200, r.text
                return r.json()["meters"]["tokens"]

            async def buy(h: dict[str, str], pack: str = "tokens_100") -> dict[str, Any]:
                r = await client.post("/v1/purchases", json={"pack": pack}, headers=h)
                assert r.status_code == 201, r.text
                return r.json()

            yield SimpleNamespace(client=client, admin=admin, fake=fake, tenant=tenant, deliver=deliver,
                                  tokens=tokens, buy=buy)
    await fake.stop()
    os.environ.pop(KEY_ENV, None)
    os.environ.pop(HOOK_ENV, None)


def session_of(shop: Any, purchase: dict[str, Any]) -> dict[str, Any]:
    return next(s for s in shop.fake.sessions.values() if s["client_reference_id"] == purchase["purchase_id"])


async def purchase_status(shop: Any, h: dict[str, str], pid: str) -> str:
    r = await shop.client.get("/v1/purchases", headers=h)
    assert r.status_code == 200, r.text
    return next(p["status"] for p in r.json()["purchases"] if p["purchase_id"] == pid)


async def test_purchase_opens_a_stripe_checkout_and_records_it_pending(shop: Any) -> None:
    org, h = await shop.tenant(user_id="ann")
    p = await shop.buy(h, "tokens_500")
    assert p["status"] == "pending" and p["pack"] == "tokens_500" and p["meter"] == "tokens"
    assert (p["tokens"], p["amount_cents"], p["currency"]) == (500, 3900, "usd")
    s = session_of(shop, p)
    assert p["checkout_url"] == s["url"]
    assert s["metadata"] == {"org_id": org, "pack": "tokens_500", "purchase_id": p["purchase_id"]}
    sent = next(r for r in shop.fake.requests if r["form"].get("client_reference_id") == p["purchase_id"])
    assert sent["auth"] == f"Bearer {os.environ[KEY_ENV]}"
    assert sent["form"]["mode"] == "payment" and sent["form"]["line_items[0][price_data][unit_amount]"] == "3900"
    r = await shop.client.get("/v1/purchases", headers=h)
    [listed] = r.json()["purchases"]
    assert listed["purchase_id"] == p["purchase_id"] and listed["user_id"] == "ann" and listed["status"] == "pending"
    assert (await shop.tokens(h))["purchased"] == 0  # opening a checkout credits nothing


async def test_purchases_are_listed_newest_first(shop: Any) -> None:
    _, h = await shop.tenant()
    first = await shop.buy(h)
    second = await shop.buy(h, "tokens_2000")
    r = await shop.client.get("/v1/purchases", headers=h)
    assert [p["purchase_id"] for p in r.json()["purchases"]] == [second["purchase_id"], first["purchase_id"]]


async def test_purchase_of_an_unknown_pack_is_422_naming_pack(shop: Any) -> None:
    _, h = await shop.tenant()
    r = await shop.client.post("/v1/purchases", json={"pack": "tokens_7"}, headers=h)
    assert r.status_code == 422 and r.json()["field"] == "pack"


async def test_purchase_without_a_secret_key_is_503_naming_the_variable(shop: Any) -> None:
    _, h = await shop.tenant()
    key = os.environ.pop(KEY_ENV)
    try:
        r = await shop.client.post("/v1/purchases", json={"pack": "tokens_100"}, headers=h)
    finally:
        os.environ[KEY_ENV] = key
    assert r.status_code == 503 and r.json()["code"] == "unavailable"
    assert KEY_ENV in r.json()["detail"]
    assert (await shop.client.get("/v1/purchases", headers=h)).json()["purchases"] == []


async def test_signed_completion_delivered_five_times_at_once_credits_once(shop: Any) -> None:
    _, h = await shop.tenant()
    p = await shop.buy(h)
    event = paid(session_of(shop, p))
    rs = await asyncio.gather(*(shop.deliver(event) for _ in range(5)))
    assert [r.status_code for r in rs] == [200] * 5, [r.text for r in rs]
    assert sum(r.json()["credited"] for r in rs) == 1
    t = await shop.tokens(h)
    assert (t["purchased"], t["balance"]) == (100, 200)
    assert await purchase_status(shop, h, p["purchase_id"]) == "paid"


async def test_a_second_event_for_the_same_session_credits_nothing(shop: Any) -> None:
    _, h = await shop.tenant()
    p = await shop.buy(h)
    s = session_of(shop, p)
    assert (await shop.deliver(paid(s))).json()["credited"] is True
    again = await shop.deliver(paid(s))  # another event id, same session
    assert again.status_code == 200 and again.json()["credited"] is False
    assert (await shop.tokens(h))["purchased"] == 100


@pytest.mark.parametrize("how", ["wrong_secret", "stale", "missing", "tampered"])
async def test_unverified_webhook_is_400_and_credits_nothing(shop: Any, how: str) -> None:
    _, h = await shop.tenant()
    p = await shop.buy(h)
    event = paid(session_of(shop, p))
    if how == "wrong_secret":
        r = await shop.deliver(event, secret="whsec_not_ours")
    elif how == "stale":
        r = await shop.deliver(event, t=int(time.time()) - 3600)
    elif how == "missing":
        body, _ = signed(event, WHSEC)
        r = await shop.client.post("/v1/webhooks/stripe", content=body, headers={"Content-Type": "application/json"})
    else:
        body, headers = signed(event, WHSEC)
        r = await shop.client.post("/v1/webhooks/stripe", content=body.replace(b'"paid"', b'"paid" '),
                                   headers=headers)
    assert r.status_code == 400, r.text
    assert r.headers["content-type"] == "application/problem+json"
    assert r.json()["field"] == "Stripe-Signature" or how == "tampered"
    assert (await shop.tokens(h))["purchased"] == 0
    assert await purchase_status(shop, h, p["purchase_id"]) == "pending"


async def test_a_payment_link_session_naming_org_and_pack_credits_without_a_pending_purchase(shop: Any) -> None:
    org, h = await shop.tenant()
    session = {"id": "cs_test_" + secrets.token_hex(12), "object": "checkout.session", "mode": "payment",
               "metadata": {"org_id": org, "pack": "tokens_500"}, "amount_total": 3900, "currency": "usd",
               "client_reference_id": None}
    r = await shop.deliver(paid(session))
    assert r.status_code == 200 and r.json()["credited"] is True, r.text
    assert (await shop.tokens(h))["purchased"] == 500
    [listed] = (await shop.client.get("/v1/purchases", headers=h)).json()["purchases"]
    assert listed["status"] == "paid" and listed["pack"] == "tokens_500"


async def test_an_unpaid_completion_credits_nothing_and_an_expired_session_is_expired(shop: Any) -> None:
    _, h = await shop.tenant()
    p = await shop.buy(h)
    s = session_of(shop, p)
    r = await shop.deliver(session_event(s, payment_status="unpaid", status="complete"))
    assert r.status_code == 200
    assert (await shop.tokens(h))["purchased"] == 0
    r = await shop.deliver(session_event(s, "checkout.session.expired", status="expired"))
    assert r.status_code == 200
    assert await purchase_status(shop, h, p["purchase_id"]) == "expired"


async def test_other_event_types_are_200_and_ignored(shop: Any) -> None:
    r = await shop.deliver({"id": "evt_" + secrets.token_hex(8), "type": "customer.created",
                            "data": {"object": {"id": "cus_1"}}})
    assert r.status_code == 200 and r.json()["ignored"] == "customer.created"


async def test_seed_000_journey_runs_out_then_a_bought_pack_pays_for_the_call(shop: Any) -> None:
    _, h = await shop.tenant()
    assert (await shop.tokens(h))["balance"] == 100
    left = []
    for feature in ("collect_leads", "export_csv", "outbound_calling"):
        r = await shop.client.post("/v1/consume", json={"feature": feature}, headers=h)
        assert r.status_code == 200, r.text
        left.append(r.json()["remaining"])
    assert left == [80, 75, 25]
    r = await shop.client.post("/v1/consume", json={"feature": "outbound_calling"}, headers=h)
    assert r.status_code == 402 and r.json()["code"] == "insufficient_balance"
    p = await shop.buy(h)
    assert (await shop.deliver(paid(session_of(shop, p)))).status_code == 200
    r = await shop.client.post("/v1/consume", json={"feature": "outbound_calling"}, headers=h)
    assert r.status_code == 200 and r.json()["remaining"] == 75, r.text  # 25 allocated + 100 bought - 50


async def test_purchased_credit_survives_the_period_reset_and_allocation_does_not_roll_over(shop: Any) -> None:
    _, h = await shop.tenant("free_2s")
    p = await shop.buy(h)
    await shop.deliver(paid(session_of(shop, p)))
    r = await shop.client.post("/v1/consume", json={"feature": "collect_leads"}, headers=h)
    assert r.status_code == 200, r.text
    before = await shop.tokens(h)
    assert before["allocated"] == 80 and before["purchased"] == 100
    deadline = time.monotonic() + 10
    after = before
    while after["period_end"] == before["period_end"]:
        assert time.monotonic() < deadline, "the 2 s period never ended"
        await asyncio.sleep(0.2)
        after = await shop.tokens(h)
    assert (after["allocated"], after["purchased"]) == (100, 100)  # refilled to 100, not 180; credit kept


async def test_charge_refunded_takes_back_only_the_unspent_part_of_the_pack(shop: Any) -> None:
    _, h = await shop.tenant()
    p = await shop.buy(h)
    event = paid(session_of(shop, p))
    assert (await shop.deliver(event)).json()["credited"] is True
    for feature in ("outbound_calling", "outbound_calling", "collect_leads", "export_csv", "export_csv"):
        r = await shop.client.post("/v1/consume", json={"feature": feature}, headers=h)
        assert r.status_code == 200, r.text  # 100 allocated, then 30 of the pack's 100
    assert (await shop.tokens(h))["purchased"] == 70
    pi = event["data"]["object"]["payment_intent"]
    refund = {"id": "evt_" + secrets.token_hex(12), "type": "charge.refunded",
              "data": {"object": {"id": "ch_" + secrets.token_hex(8), "object": "charge", "payment_intent": pi,
                                  "refunded": True, "amount_refunded": 900}}}
    r = await shop.deliver(refund)
    assert r.status_code == 200 and r.json()["taken"] == 70, r.text
    assert (await shop.tokens(h))["purchased"] == 0
    assert await purchase_status(shop, h, p["purchase_id"]) == "refunded"
    again = await shop.deliver({**refund, "id": "evt_" + secrets.token_hex(12)})
    assert again.status_code == 200 and again.json()["taken"] == 0


async def test_a_refund_never_takes_more_than_is_left(shop: Any) -> None:
    _, h = await shop.tenant()
    p = await shop.buy(h)
    event = paid(session_of(shop, p))
    await shop.deliver(event)
    for _ in range(4):  # 100 allocated + all 100 bought
        assert (await shop.client.post("/v1/consume", json={"feature": "outbound_calling"}, headers=h)).status_code == 200
    r = await shop.deliver({"id": "evt_" + secrets.token_hex(12), "type": "charge.refunded", "data": {"object": {
        "id": "ch_x", "object": "charge", "payment_intent": event["data"]["object"]["payment_intent"]}}})
    assert r.json()["taken"] == 0
    t = await shop.tokens(h)
    assert (t["purchased"], t["balance"]) == (0, 0)


async def test_a_pack_with_expires_in_credits_a_lot_that_expires_then(shop: Any) -> None:
    _, h = await shop.tenant()
    p = await shop.buy(h, "trial_30d")
    before = int(time.time())
    assert (await shop.deliver(paid(session_of(shop, p)))).json()["credited"] is True
    nxt = (await shop.tokens(h))["next_expiry"]
    assert nxt["amount"] == 40
    at = datetime.fromisoformat(nxt["at"].replace("Z", "+00:00")).timestamp()
    assert before + 30 * 86400 - 5 <= at <= time.time() + 30 * 86400 + 5
