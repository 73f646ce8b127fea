"""Account routes served from the Postgres ledger (SPEC §4): usage, analytics, admin top spenders.

They read what the sync worker has drained, so they trail the live balance (GET /v1/balance,
from Redis) by the worker's lag, typically well under a second. Through the store: the events
themselves, and the aggregates from the documented views and rollups (migrations 002/003), where
"usage" is defined once.
"""

from __future__ import annotations

import base64
import re
from datetime import date, datetime, timedelta, timezone
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from .admin import _admin, pg_errors
from .api import Context, balance_of, ctx, json_response
from .config import NAME_RE, is_name
from .events import KINDS
from .problems import Problem, invalid
from .store import Store

BURN_WINDOW_DAYS = 7
EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
MIN_TIME = datetime(1, 1, 2, tzinfo=timezone.utc)  # since/until bounds: a day inside Python's range
MAX_TIME = datetime(9999, 12, 30, tzinfo=timezone.utc)


def _db(c: Context) -> Any:
    if c.db is None:
        raise Problem(503, "unavailable", "usage and analytics need Postgres (DATABASE_URL)")
    return c.db


def _store(c: Context) -> Store:
    _db(c)
    return c.store


def _time(q: Any, name: str) -> datetime | None:
    """An instant: ISO 8601 ('2026-05-01T12:00:00Z', naive means UTC), a date, or unix seconds."""
    v = q.get(name)
    if v is None or v == "":
        return None
    try:
        if re.fullmatch(r"-?\d+(\.\d+)?", v):
            return datetime.fromtimestamp(float(v), timezone.utc)
        if re.fullmatch(r"\d{4}-\d{2}-\d{2}", v):
            return datetime.combine(date.fromisoformat(v), datetime.min.time(), timezone.utc)
        t = datetime.fromisoformat(v)
        t = t if t.tzinfo else t.replace(tzinfo=timezone.utc)
        # In UTC, and inside what Python and the driver can carry: 0001-01-01T00:00:00+14:00 is
        # year 0 in UTC (OverflowError), and so is 9999-12-31T23:59:59-14:00 the other way.
        t = t.astimezone(timezone.utc)
        if not MIN_TIME <= t <= MAX_TIME:
            raise ValueError
        return t
    except (ValueError, OverflowError, OSError):
        raise invalid(f"{name}: an ISO 8601 time (2026-05-01T12:00:00Z), a date or unix seconds, "
                      f"from {MIN_TIME.date()} to {MAX_TIME.date()}", field=name) from None


def _int(q: Any, name: str, default: int, lo: int, hi: int) -> int:
    v = q.get(name)
    if v is None or v == "":
        return default
    if not re.fullmatch(r"\d{1,9}", v) or not lo <= int(v) <= hi:
        raise invalid(f"{name}: an integer from {lo} to {hi}", field=name)
    return int(v)


def _choice(q: Any, name: str, allowed: Any) -> str | None:
    v = q.get(name)
    if v is None or v == "":
        return None
    if v not in allowed:
        raise invalid(f"{name}: unknown {name} {v[:64]!r}", field=name)
    return v


def _iso(t: datetime) -> str:
    return t.astimezone(timezone.utc).isoformat().replace("+00:00", "Z")


# Keyset cursor: the (ts, event_id) of the last row returned, opaque to clients.
def _cursor(ts: datetime, event_hex: str) -> str:
    us = (ts - EPOCH) // timedelta(microseconds=1)
    return base64.urlsafe_b64encode(f"{us}:{event_hex}".encode()).decode().rstrip("=")


def _uncursor(v: str) -> tuple[datetime, str]:
    try:
        raw = base64.urlsafe_b64decode(v + "=" * (-len(v) % 4)).decode()
        us, event_hex = raw.split(":")
        if not re.fullmatch(r"[0-9a-f]{32}", event_hex):
            raise ValueError
        return EPOCH + timedelta(microseconds=int(us)), event_hex
    except (ValueError, UnicodeDecodeError, OverflowError):
        raise invalid("cursor: not a cursor this API returned", field="cursor") from None


async def usage(request: Request) -> Response:
    """GET /v1/usage: the org's events, newest first, `limit` a page, `next_cursor` for the next.
    A key bound to a user sees that user's events only."""
    c = ctx(request)
    ident = await c.keys.authenticate(request, "read")
    q = request.query_params
    since, until = _time(q, "since"), _time(q, "until")
    if since and until and since >= until:
        raise invalid("since: must be before until", field="since")
    limit = _int(q, "limit", 100, 1, 1000)
    feature = _choice(q, "feature", c.config.features)
    meter = _choice(q, "meter", c.config.meter_names)
    kind = _choice(q, "kind", KINDS)
    user = ident.user_id or q.get("user_id") or None
    if user is not None and not is_name(user):
        raise invalid(f"user_id: must match {NAME_RE}", field="user_id")
    cur = _uncursor(q["cursor"]) if q.get("cursor") else None
    rows = await _store(c).usage_events(ident.org_id, feature=feature, meter=meter, kind=kind, user_id=user,
                                        since=since, until=until, before=cur, limit=limit + 1)
    more = len(rows) > limit
    rows = rows[:limit]
    events = [{
        "event_id": r["event_id"].hex, "ts": _iso(r["ts"]), "kind": r["kind"], "user_id": r["user_id"],
        "key_id": r["key_id"], "meter": r["meter"], "feature": r["feature"], "delta": r["delta"],
        "delta_purchased": r["delta_purchased"], "cost": r["cost"], "balance_after": r["balance_after"],
        "metadata": orjson.Fragment(r["metadata"]) if r["metadata"] else None,
        "sources": sources(r["sources"], r["delta"]),
    } for r in rows]
    nxt = _cursor(rows[-1]["ts"], rows[-1]["event_id"].hex) if more else None
    return json_response({"org_id": ident.org_id, "events": events, "next_cursor": nxt})


def sources(text: str | None, delta: int) -> list[dict[str, Any]]:
    """An event's split over the layers ('allocated:2,grant:<lot>:2,purchased:1'), each amount
    with the event's sign (a charge takes, a refund gives back): [{layer, amount}], in order."""
    if not text:
        return []
    sign = -1 if delta < 0 else 1
    out = []
    for part in text.split(","):
        layer, _, n = part.rpartition(":")
        out.append({"layer": layer, "amount": sign * int(n)})
    return out


async def analytics(request: Request) -> Response:
    """GET /v1/analytics?days=30: usage by feature and by day over the window (whole UTC days, from
    the view `usage_by_feature_day`), and per meter the burn rate (tokens a day over the last 7
    days, or the window if shorter; the rollups', so from the hour that began then) and the date
    the balance runs out at that rate."""
    c = ctx(request)
    ident = await c.keys.authenticate(request, "read")
    days = _int(request.query_params, "days", 30, 1, 366)
    store = _store(c)
    now = datetime.now(timezone.utc)
    start = datetime.combine((now - timedelta(days=days - 1)).date(), datetime.min.time(), timezone.utc)
    burn_days = min(days, BURN_WINDOW_DAYS)
    rows = await store.usage_by_day(ident.org_id, start.date())
    burn = await store.usage_by_meter_since(ident.org_id, now - timedelta(days=burn_days))
    by_layer = [{"meter": r["meter"], "layer": r["layer"], "tokens": r["tokens"]}
                for r in await store.spend_by_layer(ident.org_id, start)]
    features: dict[str, dict[str, Any]] = {}
    day_rows: dict[date, dict[str, Any]] = {}
    for r in rows:
        key = r["feature"] or "-"
        f = features.setdefault(key, {"feature": r["feature"], "meter": r["meter"], "calls": 0, "tokens": 0,
                                      "refunded": 0, "denied": 0})
        for k in ("calls", "tokens", "refunded", "denied"):
            f[k] += r[k]
        d = day_rows.setdefault(r["day"], {"calls": 0, "tokens": 0, "meters": {}, "features": {}})
        d["calls"] += r["calls"]
        d["tokens"] += r["tokens"]
        d["features"][key] = d["features"].get(key, 0) + r["tokens"]  # the pages chart a day by feature
        if r["meter"]:
            d["meters"][r["meter"]] = d["meters"].get(r["meter"], 0) + r["tokens"]
    by_day = []
    for i in range(days):  # every day of the window, zeros included, oldest first
        day = start.date() + timedelta(days=i)
        empty = {"calls": 0, "tokens": 0, "meters": {}, "features": {}}
        by_day.append({"date": day.isoformat(), **day_rows.get(day, empty)})
    live = await balance_of(c, ident.org_id, ident.plan)
    meters = {}
    for name, m in live["meters"].items():
        rate = burn.get(name, 0) / burn_days
        runs_out = None
        if m["balance"] is not None and rate > 0:
            runs_out = now + timedelta(days=max(0, m["balance"]) / rate)
        meters[name] = {
            "balance": m["balance"], "unlimited": m["unlimited"], "period_end": m["period_end"],
            "burn_per_day": round(rate, 2),
            "projected_exhaustion": _iso(runs_out) if runs_out else None,
            "exhausts_before_reset": bool(runs_out and runs_out < datetime.fromisoformat(m["period_end"])),
        }
    totals = {"calls": sum(f["calls"] for f in features.values()), "tokens": sum(f["tokens"] for f in features.values())}
    return json_response({
        "org_id": ident.org_id, "days": days, "since": _iso(start), "totals": totals,
        "by_feature": sorted(features.values(), key=lambda f: -f["tokens"]), "by_day": by_day,
        "burn_window_days": burn_days, "meters": meters, "by_layer": by_layer,
    })


async def top(request: Request) -> Response:
    """GET /v1/admin/top?days=30&limit=20[&meter=]: orgs by tokens used in the window (rollups)."""
    c = await _admin(request)
    q = request.query_params
    days = _int(q, "days", 30, 1, 366)
    limit = _int(q, "limit", 20, 1, 1000)
    meter = _choice(q, "meter", c.config.meter_names)
    # The window starts on the hour. All meters: one probe per org in the running and cumulative
    # totals (migration 005); one meter: 003's hour and day sums. A scan of the raw events grows
    # with the ledger (seconds at a few million events).
    rows = await _store(c).top_orgs(days, limit, meter)
    return json_response({"days": days, "meter": meter, "orgs": [
        {"rank": i + 1, "org_id": r["org_id"], "name": r["name"], "plan": r["plan"], "tokens": r["tokens"],
         "calls": r["calls"]} for i, r in enumerate(rows)]})


routes = [
    Route("/v1/usage", pg_errors(usage), methods=["GET"]),
    Route("/v1/analytics", pg_errors(analytics), methods=["GET"]),
    Route("/v1/admin/top", pg_errors(top), methods=["GET"]),
]
