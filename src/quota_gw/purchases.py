"""Selling credit packs through Stripe Checkout (SPEC §4): POST/GET /v1/purchases and the
Stripe webhook.

The rule: credit follows a *signed* fact from Stripe, never the buyer's word. POST /v1/purchases
only opens a checkout and records a `pending` purchase; the pack's tokens are credited when
Stripe's `checkout.session.completed` (paid) arrives on POST /v1/webhooks/stripe, verified by the
`stripe` SDK with the endpoint secret. The session's signed metadata (org_id, pack) is enough, so
a payment link made in Stripe's dashboard works as well as our own checkout.

Stripe delivers at least once, concurrently at times, and may send several events for one
session: the credit is one `purchase` event through the grant script, whose two idempotency
keys (the Stripe event id and the checkout session id) make it once per event and once per
session, atomically in Redis. Postgres records the purchase's status after the credit, so a
crash in between is repaired by Stripe's next delivery (replayed, not credited twice); once a
purchase is `paid` there, a delivery days later (the Redis keys gone) credits nothing either.
"""

from __future__ import annotations

import hashlib
import logging
import os
import uuid
from typing import TYPE_CHECKING, Any

import orjson
import stripe
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from .api import Context, bounded_body, ctx, json_body, json_response
from .config import Config, Pack, is_name
from .decisions import Identity
from .problems import Problem, invalid
from .queries import Q

if TYPE_CHECKING:
    from stripe.params.checkout import SessionCreateParamsLineItem

log = logging.getLogger("quota_gw.purchases")

STATUSES = ("pending", "paid", "expired", "refunded")
# Stripe retries a webhook for up to 3 days; the Redis keys outlive that (Postgres guards after).
STRIPE_IDEM_TTL_S = 30 * 86400
_NAMESPACE = uuid.UUID("5f0c3c55-1f0e-4b8a-9d7e-3b1c2a8e6f10")


def new_purchase_id() -> str:
    return "pur_" + uuid.uuid4().hex


def purchase_event_id(session_id: str) -> str:
    """The `purchase` event of a session has one id, whichever delivery credits it."""
    return uuid.uuid5(_NAMESPACE, "checkout:" + session_id).hex


def _secret(env_name: str, what: str) -> str:
    value = os.environ.get(env_name)
    if not value:
        raise Problem(503, "unavailable", f"{what} is not configured: environment variable {env_name} is not set",
                      headers={"Retry-After": "60"})
    return value


def _stripe_cfg(c: Context) -> Any:
    if c.config.stripe is None:
        raise Problem(503, "unavailable", "purchases are not configured: the config has no `stripe` section",
                      headers={"Retry-After": "60"})
    return c.config.stripe


_clients: dict[tuple[str, str | None], stripe.StripeClient] = {}


def stripe_client(cfg: Config, api_key: str) -> stripe.StripeClient:
    """One client (and connection pool) per key and API base; the key is read per request, so
    a rotated key takes effect without a restart."""
    api_base = cfg.stripe.api_base if cfg.stripe else None
    client = _clients.get((api_key, api_base))
    if client is None:
        client = _clients[(api_key, api_base)] = stripe.StripeClient(
            api_key, base_addresses={"api": api_base} if api_base else None, http_client=stripe.HTTPXClient(),
            max_network_retries=2)
    return client


async def _any_key(c: Context, request: Request) -> Identity:
    """Any API key of the org (read or consume); a dashboard link only reads."""
    try:
        return await c.keys.authenticate(request, "read")
    except Problem as p:
        if p.status != 403:
            raise
        return await c.keys.authenticate(request, "consume")


def _line_items(name: str, pack: Pack) -> list[SessionCreateParamsLineItem]:
    if pack.stripe_price:
        return [{"price": pack.stripe_price, "quantity": 1}]
    return [{"quantity": 1, "price_data": {
        "currency": pack.currency, "unit_amount": pack.price_cents,
        "product_data": {"name": pack.name or f"{pack.tokens} {pack.meter} tokens"}}}]


def _row(r: Any) -> dict[str, Any]:
    def t(v: Any) -> str | None:
        return v.isoformat().replace("+00:00", "Z") if v else None

    return {"purchase_id": r["purchase_id"], "pack": r["pack"], "meter": r["meter"], "tokens": r["tokens"],
            "amount_cents": r["amount_cents"], "currency": r["currency"], "status": r["status"],
            "user_id": r["user_id"], "created_at": t(r["created_at"]), "paid_at": t(r["paid_at"]),
            "updated_at": t(r["updated_at"])}


async def create_purchase(request: Request) -> Response:
    c = ctx(request)
    ident = await _any_key(c, request)
    if ident.key_id == "dashboard-link":
        raise Problem(403, "forbidden", "a dashboard link cannot buy; use an API key of the org")
    data = await json_body(request)
    name = data.get("pack")
    if name is None:
        raise invalid("pack: required", field="pack")
    if not isinstance(name, str) or name not in c.config.packs:
        raise invalid(f"pack: one of {', '.join(c.config.packs) or '(no packs configured)'}", field="pack")
    pack = c.config.packs[name]
    sc = _stripe_cfg(c)
    api_key = _secret(sc.secret_key_env, "Stripe")
    if c.db is None:
        raise Problem(503, "unavailable", "purchases need Postgres (DATABASE_URL)")
    pid = new_purchase_id()
    meta = {"org_id": ident.org_id, "pack": name, "purchase_id": pid}
    try:
        session = await stripe_client(c.config, api_key).v1.checkout.sessions.create_async({
            "mode": "payment", "line_items": _line_items(name, pack),
            "success_url": sc.success_url, "cancel_url": sc.cancel_url,
            "client_reference_id": pid, "metadata": meta,
            "payment_intent_data": {"metadata": meta},
        }, {"idempotency_key": pid})
    except stripe.StripeError as e:
        log.warning("stripe refused a checkout for %s (%s): %s", ident.org_id, name, e)
        raise Problem(502, "unavailable", f"Stripe did not open the checkout: {e.user_message or type(e).__name__}",
                      headers={"Retry-After": "5"}) from None
    row = await c.db.fetchrow(
        Q.insert_purchase, pid, ident.org_id, name, pack.meter, pack.tokens, pack.price_cents, pack.currency,
        session.id, ident.user_id, ident.key_id)
    return json_response({**_row(row), "checkout_url": session.url}, 201)


async def list_purchases(request: Request) -> Response:
    c = ctx(request)
    ident = await c.keys.authenticate(request, "read")
    if c.db is None:
        raise Problem(503, "unavailable", "purchases need Postgres (DATABASE_URL)")
    rows = await c.db.fetch(Q.list_purchases, ident.org_id)
    return json_response({"purchases": [_row(r) for r in rows]})


async def stripe_webhook(request: Request) -> Response:
    """Stripe's events. Anything not signed with the endpoint secret (missing, wrong, older than
    the SDK's 5-minute tolerance) is 400 and changes nothing; an event we do not act on is 200."""
    c = ctx(request)
    sc = _stripe_cfg(c)
    secret = _secret(sc.webhook_secret_env, "the Stripe webhook secret")
    payload = await bounded_body(request, max(c.config.behaviour.max_body_bytes, 256 * 1024))
    sig = request.headers.get("stripe-signature")
    if not sig:
        raise invalid("Stripe-Signature: required", status=400, field="Stripe-Signature")
    try:
        stripe.Webhook.construct_event(payload, sig, secret)
        event = orjson.loads(payload)
    except stripe.SignatureVerificationError as e:
        raise invalid(f"Stripe-Signature: {e.user_message or 'does not verify'}", status=400,
                      field="Stripe-Signature") from None
    except ValueError:
        raise invalid("the signed payload is not a JSON event", status=400) from None
    if c.db is None:
        raise Problem(503, "unavailable", "webhooks need Postgres (DATABASE_URL)", headers={"Retry-After": "5"})
    kind = event.get("type") if isinstance(event, dict) else None
    obj = ((event.get("data") or {}).get("object") or {}) if isinstance(event, dict) else {}
    if not isinstance(obj, dict):
        obj = {}
    if kind in ("checkout.session.completed", "checkout.session.async_payment_succeeded"):
        return json_response(await _completed(c, str(event.get("id") or ""), obj))
    if kind == "charge.refunded":
        return json_response(await _refunded(c, str(event.get("id") or ""), obj))
    if kind == "checkout.session.expired":
        n = await c.db.execute(Q.expire_purchase, str(obj.get("id") or ""))
        return json_response({"received": True, "expired": n != "UPDATE 0"})
    return json_response({"received": True, "ignored": kind})


async def _completed(c: Context, event_id: str, session: dict[str, Any]) -> dict[str, Any]:
    sid = session.get("id")
    if session.get("payment_status") != "paid":  # e.g. a bank debit not settled yet
        return {"received": True, "ignored": "not paid yet"}
    meta = session.get("metadata") or {}
    org, name = meta.get("org_id"), meta.get("pack")
    if not isinstance(sid, str) or not sid or not is_name(org) or name not in c.config.packs:
        log.warning("stripe event %s: session without a known org and pack in its metadata", event_id)
        return {"received": True, "ignored": "no org_id and known pack in the session's metadata"}
    if not await c.store.org_exists(org):
        log.warning("stripe event %s: unknown org %s", event_id, org)
        return {"received": True, "ignored": f"unknown org {org}"}
    pack = c.config.packs[name]
    pid = meta.get("purchase_id") or session.get("client_reference_id")
    if not isinstance(pid, str) or not is_name(pid):  # a payment link: one purchase per session
        pid = "pur_" + hashlib.sha256(sid.encode()).hexdigest()[:32]
    await c.db.execute(
        Q.record_purchase, pid, org, name, pack.meter, pack.tokens,
        int(session.get("amount_total") or pack.price_cents), str(session.get("currency") or pack.currency), sid)
    row = await c.db.fetchrow(Q.purchase_by_checkout, sid)
    if row is None or row["org_id"] != org:
        log.warning("stripe event %s: session %s does not match purchase %s", event_id, sid, pid)
        return {"received": True, "ignored": "the session does not match its purchase"}
    pid = row["purchase_id"]
    if row["status"] in ("paid", "refunded"):
        return {"received": True, "purchase_id": pid, "credited": False}
    d = await c.decider.grant(org, row["meter"], row["tokens"], "purchase",
                              {"purchase_id": pid, "pack": row["pack"], "checkout_session": sid},
                              idem="stripe-session:" + sid, also_idem="stripe-event:" + event_id,
                              actor="stripe", user=row["user_id"] or "", event_id=purchase_event_id(sid),
                              idem_ttl_s=STRIPE_IDEM_TTL_S, lot=pid,
                              expires=f"+{pack.expires_in}" if pack.expires_in else "")
    if not d.ok:
        raise d.problem()
    pi = session.get("payment_intent")
    await c.db.execute(
        Q.mark_purchase_paid, pid, event_id or None, purchase_event_id(sid), pi if isinstance(pi, str) else None)
    return {"received": True, "purchase_id": pid, "credited": not d.replay}


async def _refunded(c: Context, event_id: str, charge: dict[str, Any]) -> dict[str, Any]:
    """A refunded payment takes back what is still unspent of its purchase (its credit lot),
    never below zero; what was spent already is recorded as `lost` in the `revoke` event."""
    pi = charge.get("payment_intent")
    meta = charge.get("metadata") or {}
    row = None
    if isinstance(pi, str) and pi:
        row = await c.db.fetchrow(Q.purchase_by_payment_intent, pi)
    if row is None and isinstance(meta.get("purchase_id"), str):
        row = await c.db.fetchrow(Q.purchase_by_id, meta["purchase_id"])
    if row is None or row["status"] not in ("paid", "refunded"):
        return {"received": True, "ignored": "no paid purchase for this charge"}
    if row["status"] == "refunded":
        return {"received": True, "purchase_id": row["purchase_id"], "taken": 0}
    pid = row["purchase_id"]
    d = await c.decider.grant(row["org_id"], row["meter"], row["tokens"], "revoke",
                              {"purchase_id": pid, "reason": "charge.refunded"},
                              idem="stripe-refund:" + pid, also_idem="stripe-event:" + event_id, actor="stripe",
                              user=row["user_id"] or "", idem_ttl_s=STRIPE_IDEM_TTL_S, lot=pid, take_lot=True)
    if not d.ok:
        raise d.problem()
    await c.db.execute(Q.mark_purchase_refunded, pid)
    return {"received": True, "purchase_id": pid, "taken": -d.cost if not d.replay else 0}


routes = [
    Route("/v1/purchases", create_purchase, methods=["POST"]),
    Route("/v1/purchases", list_purchases, methods=["GET"]),
    Route("/v1/webhooks/stripe", stripe_webhook, methods=["POST"]),
]
