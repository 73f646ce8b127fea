"""Signed read-only dashboard links: a bearer credential for one org's read routes, for a while.

An admin mints one (POST /v1/admin/orgs/{org_id}/dashboard-links); the page takes the token from
the URL's fragment (`/dashboard#t=...`, which browsers never send, so it stays out of server and
proxy logs) and sends it as `Authorization: Bearer`. KeyStore.authenticate turns a valid one into
an identity with the `read` scope only, for that org only: it can never consume (403) nor pass
require_admin (it is not the admin token).

The token is `qgwl_<payload>.<mac>`: payload the base64url of `{"o": org, "e": expiry}` and mac
the base64url HMAC-SHA256 of the payload. The key is $QUOTA_GW_DASHBOARD_SECRET when set, else
derived from $QUOTA_GW_ADMIN_TOKEN, so rotating the admin token revokes every link it signed.
Expiry is wall-clock seconds: a link lives minutes to days, so replicas' clock skew does not
matter the way it would for decisions (which take time from Redis).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import time

import orjson

PREFIX = "qgwl_"
MAX_TOKEN = 600  # far above any org id we accept; longer is not ours


def _key() -> bytes | None:
    configured = os.environ.get("QUOTA_GW_DASHBOARD_SECRET")
    if configured:
        return configured.encode()
    admin = os.environ.get("QUOTA_GW_ADMIN_TOKEN")
    if not admin:
        return None
    return hmac.new(admin.encode(), b"quota-gw dashboard links v1", hashlib.sha256).digest()


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def can_mint() -> bool:
    return _key() is not None


def mint(org_id: str, expires_at: int) -> str:
    key = _key()
    if key is None:
        raise RuntimeError("no signing secret: set QUOTA_GW_DASHBOARD_SECRET or QUOTA_GW_ADMIN_TOKEN")
    payload = _b64(orjson.dumps({"o": org_id, "e": int(expires_at)}))
    mac = _b64(hmac.new(key, payload.encode(), hashlib.sha256).digest())
    return f"{PREFIX}{payload}.{mac}"


def verify(token: str, now: float | None = None) -> str | None:
    """The org a valid, unexpired link names; None for anything else (tampered, expired, foreign)."""
    key = _key()
    if key is None or not token.startswith(PREFIX) or len(token) > MAX_TOKEN:
        return None
    payload, dot, mac = token[len(PREFIX):].partition(".")
    if not dot:
        return None
    want = _b64(hmac.new(key, payload.encode(), hashlib.sha256).digest())
    if not hmac.compare_digest(want.encode(), mac.encode()):
        return None
    try:
        claims = orjson.loads(_unb64(payload))
    except (binascii.Error, ValueError, orjson.JSONDecodeError):
        return None
    if not isinstance(claims, dict):
        return None
    org, expires = claims.get("o"), claims.get("e")
    if not isinstance(org, str) or not isinstance(expires, int) or isinstance(expires, bool):
        return None
    if (time.time() if now is None else now) >= expires:
        return None
    return org
