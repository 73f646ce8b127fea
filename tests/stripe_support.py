"""Stands in for Stripe's servers in tests, never for our code.

`FakeStripeAPI` is a small HTTP server on 127.0.0.1 answering `POST /v1/checkout/sessions` in
Stripe's JSON shape, so the real `stripe` SDK (pointed at it by `stripe.api_base`) does the
talking. `signed` signs a webhook payload exactly as Stripe does: HMAC-SHA256 of "<t>.<payload>"
with the endpoint secret, header `t=<t>,v1=<hex>`.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from typing import Any
from urllib.parse import parse_qsl

import orjson
from aiohttp import web


class FakeStripeAPI:
    def __init__(self) -> None:
        self.sessions: dict[str, dict[str, Any]] = {}
        self.requests: list[dict[str, Any]] = []
        self.url = ""
        self._runner: web.AppRunner | None = None

    async def start(self) -> str:
        app = web.Application()
        app.router.add_post("/v1/checkout/sessions", self._create)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{port}"
        return self.url

    async def stop(self) -> None:
        if self._runner:
            await self._runner.cleanup()

    async def _create(self, request: web.Request) -> web.Response:
        form = dict(parse_qsl(await request.text(), keep_blank_values=True))
        self.requests.append({"auth": request.headers.get("Authorization"),
                              "idempotency_key": request.headers.get("Idempotency-Key"), "form": form})
        sid = "cs_test_" + secrets.token_hex(12)
        meta = {k[len("metadata["):-1]: v for k, v in form.items() if k.startswith("metadata[")}
        amount = int(form.get("line_items[0][price_data][unit_amount]", "0"))
        session = {
            "id": sid, "object": "checkout.session", "mode": form.get("mode"), "status": "open",
            "payment_status": "unpaid", "url": f"https://checkout.stripe.test/c/pay/{sid}",
            "client_reference_id": form.get("client_reference_id"), "metadata": meta,
            "amount_total": amount, "currency": form.get("line_items[0][price_data][currency]", "usd"),
            "success_url": form.get("success_url"), "cancel_url": form.get("cancel_url"), "payment_intent": None,
        }
        self.sessions[sid] = session
        return web.json_response(session)


def session_event(session: dict[str, Any], kind: str = "checkout.session.completed",
                  **changes: Any) -> dict[str, Any]:
    """A Stripe event about a checkout session (as the dashboard's webhook would send it)."""
    obj = {**session, **changes}
    return {"id": "evt_" + secrets.token_hex(12), "object": "event", "type": kind, "api_version": "2024-06-20",
            "created": int(time.time()), "livemode": False, "data": {"object": obj}}


def paid(session: dict[str, Any]) -> dict[str, Any]:
    return session_event(session, status="complete", payment_status="paid",
                         payment_intent="pi_" + secrets.token_hex(12))


def signed(event: dict[str, Any], secret: str, t: int | None = None) -> tuple[bytes, dict[str, str]]:
    payload = orjson.dumps(event)
    t = int(time.time()) if t is None else t
    sig = hmac.new(secret.encode(), f"{t}.".encode() + payload, hashlib.sha256).hexdigest()
    return payload, {"Stripe-Signature": f"t={t},v1={sig}", "Content-Type": "application/json"}
