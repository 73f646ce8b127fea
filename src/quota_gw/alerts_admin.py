"""Operator routes of the low-balance webhook: PUT /v1/admin/orgs/{org_id}/webhook sets an org's
URL and answers a new signing secret (shown this once: the receiver keeps it to verify
`X-Quota-Signature`); GET .../webhook/deliveries lists every delivery attempt, newest first.
Delivery itself is `quota-gw notifier` (notifier.py)."""

from __future__ import annotations

import re
import secrets

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from .admin import _admin, _path_name, _storable, pg_errors
from .api import json_body, json_response
from .problems import invalid

# No whitespace or control characters: httpx refuses ASCII controls at delivery (every retry would
# fail); C1 controls and a BOM are refused with them, as the document's pattern states.
_URL = re.compile(r"https?://[^/\s\x00-\x1f\x7f-\x9f\ufeff]+(/[^\s\x00-\x1f\x7f-\x9f\ufeff]*)?")


async def set_webhook(request: Request) -> Response:
    c = await _admin(request)
    org_id = _path_name(request, "org_id")
    data = await json_body(request)
    url = data.get("url")
    if not isinstance(url, str) or len(url) > 2000 or not _URL.fullmatch(url) or not _storable(url):
        raise invalid("url: required, an http(s) URL of at most 2000 characters", field="url")
    secret = "whsec_" + secrets.token_hex(24)
    await c.store.set_webhook(org_id, url, secret)
    return json_response({"org_id": org_id, "url": url, "secret": secret})


async def list_deliveries(request: Request) -> Response:
    c = await _admin(request)
    org_id = _path_name(request, "org_id")
    limit = _limit(request.query_params.get("limit", "100"))
    rows = await c.store.webhook_deliveries(org_id, limit)
    return json_response({"deliveries": [
        {"event_id": r["event_id"].hex, "url": r["url"], "attempt": r["attempt"], "status": r["status"],
         "error": r["error"], "duration_ms": r["duration_ms"],
         "at": r["created_at"].isoformat().replace("+00:00", "Z"),
         "delivered": r["delivered_at"] is not None} for r in rows]})


def _limit(raw: str) -> int:
    if not raw.isdigit() or not 1 <= int(raw) <= 1000:
        raise invalid("limit: an integer 1..1000", field="limit")
    return int(raw)


routes = [
    Route("/v1/admin/orgs/{org_id}/webhook", pg_errors(set_webhook), methods=["PUT"]),
    Route("/v1/admin/orgs/{org_id}/webhook/deliveries", pg_errors(list_deliveries), methods=["GET"]),
]
