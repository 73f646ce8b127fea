"""Ledger reads for the ops page (admin token):

GET /v1/admin/activity?minutes=60: decisions and tokens per minute by outcome.
GET /v1/admin/burn?days=7&limit=20: the orgs burning the most tokens a day, per meter, with the
live balance (Redis, as GET /v1/balance) and the instant it runs out at that rate.

Outcomes: `ok` (consume and reserve events: decisions that passed; tokens are what consume and
commit charged), and the refusals by their HTTP status (`402`, `403`, `429`, from the `denied`
event's metadata; tokens are what the refused call would have cost). Refunds are counted apart.

Read from the ledger, so they trail live traffic by the worker's lag. The burn table reads the
rollups (`qgw_usage_since`, from the hour), whatever the ledger's size; the activity chart reads
the raw events of its last minutes (an index range on `ts`, bounded by `minutes`).
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from .account import _db, _int, _iso
from .admin import _admin
from .api import balance_of, json_response
from .problems import Problem
from .queries import Q

OUTCOMES = ("ok", "402", "403", "429")
MAX_MINUTES = 24 * 60


async def minute_rows(db: Any, minutes: int) -> tuple[datetime, list[Any]]:
    """(the current minute, rows of (minute, outcome, decisions, tokens, refunded)) for the last
    `minutes` whole minutes, the current one included. Time is Postgres' clock, like the ledger's
    retention; the events' own ts come from Redis."""
    # Two queries on one clock, Postgres' (db.Database answers 503 while it is down).
    now = await db.fetchval("SELECT date_trunc('minute', now())")
    since = now - timedelta(minutes=minutes - 1)
    rows = await db.fetch(
        """SELECT date_trunc('minute', ts) AS minute,
                  CASE WHEN kind = 'denied' THEN coalesce(metadata ->> 'status', 'denied')
                       WHEN kind = 'refund' THEN 'refund' ELSE 'ok' END AS outcome,
                  count(*) FILTER (WHERE kind IN ('consume', 'reserve', 'denied')) AS decisions,
                  coalesce(sum(CASE WHEN kind IN ('consume', 'commit') THEN cost
                                    WHEN kind = 'denied' AND metadata ->> 'cost' ~ '^[0-9]{1,18}$'
                                        THEN (metadata ->> 'cost')::bigint
                                    ELSE 0 END), 0)::bigint AS tokens,
                  coalesce(-sum(cost) FILTER (WHERE kind = 'refund'), 0)::bigint AS refunded
           FROM usage_events
           WHERE ts >= $1 AND kind IN ('consume', 'reserve', 'commit', 'refund', 'denied')
           GROUP BY 1, 2""", since)
    return now, rows


async def activity(request: Request) -> Response:
    c = await _admin(request)
    minutes = _int(request.query_params, "minutes", 60, 1, MAX_MINUTES)
    now, rows = await minute_rows(_db(c), minutes)
    start = now - timedelta(minutes=minutes - 1)

    def empty() -> dict[str, Any]:
        return {"decisions": {o: 0 for o in OUTCOMES}, "tokens": {o: 0 for o in OUTCOMES}, "refunded": 0}

    buckets: dict[datetime, dict[str, Any]] = {}
    totals = empty()
    for r in rows:
        b = buckets.setdefault(r["minute"], empty())
        for target in (b, totals):
            if r["outcome"] == "refund":
                target["refunded"] += r["refunded"]
                continue
            o = r["outcome"]  # a status we do not chart (none today) still counts in the totals
            target["decisions"][o] = target["decisions"].get(o, 0) + r["decisions"]
            target["tokens"][o] = target["tokens"].get(o, 0) + r["tokens"]
    by_minute = []
    for i in range(minutes):  # every minute of the window, oldest first, zeros included
        m = start + timedelta(minutes=i)
        by_minute.append({"minute": _iso(m.astimezone(timezone.utc)), **buckets.get(m, empty())})
    return json_response({"minutes": minutes, "since": _iso(start), "until": _iso(now + timedelta(minutes=1)),
                          "outcomes": list(OUTCOMES), "source": "usage_events", "totals": totals,
                          "by_minute": by_minute})


async def burn_rows(db: Any, days: int, limit: int) -> list[Any]:
    """(org_id, name, plan, meter, tokens) over the last `days` days (from the hour), the largest
    first: from the rollups (usage as `qgw_usage_since` defines it), not a scan of the raw events
    that grows with the ledger."""
    return await db.fetch(Q.burn_by_org_meter, days, limit)


async def burn(request: Request) -> Response:
    c = await _admin(request)
    q = request.query_params
    days, limit = _int(q, "days", 7, 1, 90), _int(q, "limit", 20, 1, 200)
    now = datetime.now(timezone.utc)
    out = []
    balances: dict[str, Any] = {}
    for r in await burn_rows(_db(c), days, limit):
        if r["org_id"] not in balances:
            try:
                balances[r["org_id"]] = (await balance_of(c, r["org_id"], r["plan"]))["meters"]
            except Problem:  # a plan the config no longer has: listed without a balance
                balances[r["org_id"]] = {}
        m = balances[r["org_id"]].get(r["meter"]) or {}
        rate = r["tokens"] / days
        bal = m.get("balance")
        runs_out = now + timedelta(days=max(0, bal) / rate) if bal is not None and rate > 0 else None
        out.append({"org_id": r["org_id"], "name": r["name"], "plan": r["plan"], "meter": r["meter"],
                    "tokens": r["tokens"], "burn_per_day": round(rate, 2), "balance": bal,
                    "unlimited": bool(m.get("unlimited")), "period_end": m.get("period_end"),
                    "projected_exhaustion": _iso(runs_out) if runs_out else None,
                    "exhausts_before_reset": bool(runs_out and m.get("period_end")
                                                  and runs_out < datetime.fromisoformat(m["period_end"]))})
    return json_response({"days": days, "orgs": out})


routes = [
    Route("/v1/admin/activity", activity, methods=["GET"]),
    Route("/v1/admin/burn", burn, methods=["GET"]),
]
