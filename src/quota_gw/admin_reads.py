"""Operator reads under /v1/admin (bearer $QUOTA_GW_ADMIN_TOKEN): the orgs with their live
balances, and the sync worker's progress. `quota-gw orgs list` and `quota-gw worker-status`
are these routes, run in process.

GET /v1/admin/orgs: orgs by id from Postgres, each with its meters' balances from Redis (the
balance script, as GET /v1/balance: live, not the ledger). `low=true` keeps the orgs with a
meter under `behaviour.low_balance_percent` of its allocation; that filter needs Redis, so one
page reads at most SCAN_BUDGET orgs and may hold fewer than `limit` while `next_cursor` is set.

GET /v1/admin/worker: per shard stream, what the worker's consumer group has not acked yet
(not delivered + delivered but pending), the age of the oldest such entry, the dead letters and
the consumers, straight from Redis (XINFO/XPENDING): it answers even when the worker is down.
Each running worker also reports its counters and last batch every few seconds (`workers`).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
from datetime import datetime, timezone
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from .admin import _admin
from .api import balance_of, ctx, json_response
from .auth import require_admin
from .problems import Problem, invalid

DEFAULT_LIMIT, MAX_LIMIT = 100, 1000
SCAN_BUDGET = 1000  # orgs read per `low=true` page at most


def _limit(q: Any) -> int:
    v = q.get("limit")
    if v is None or v == "":
        return DEFAULT_LIMIT
    if not (v.isascii() and v.isdigit() and len(v) <= 6) or not 1 <= int(v) <= MAX_LIMIT:
        raise invalid(f"limit: an integer from 1 to {MAX_LIMIT}", field="limit")
    return int(v)


def _bool(q: Any, name: str) -> bool:
    v = q.get(name)
    if v is None or v == "":
        return False
    if v.lower() in ("true", "1", "yes"):
        return True
    if v.lower() in ("false", "0", "no"):
        return False
    raise invalid(f"{name}: true or false", field=name)


# The cursor is the last org id of the page, encoded so clients treat it as opaque.
def _cursor(org_id: str) -> str:
    return base64.urlsafe_b64encode(b"o:" + org_id.encode()).decode().rstrip("=")


def _uncursor(q: Any) -> str | None:
    v = q.get("cursor")
    if v is None or v == "":
        return None
    try:
        raw = base64.urlsafe_b64decode(v + "=" * (-len(v) % 4)).decode()
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raw = ""
    if not raw.startswith("o:") or len(raw) < 3:
        raise invalid("cursor: not a cursor this API returned", field="cursor")
    return raw[2:]


def _iso(t: datetime) -> str:
    return t.astimezone(timezone.utc).isoformat().replace("+00:00", "Z")


async def _org_view(c: Any, row: Any) -> dict[str, Any]:
    org: dict[str, Any] = {"org_id": row["org_id"], "name": row["name"], "plan": row["plan"],
                           "created_at": _iso(row["created_at"])}
    try:
        meters = (await balance_of(c, row["org_id"], row["plan"]))["meters"]
    except Problem as p:  # a plan the config no longer defines: listed, not fatal to the page
        return {**org, "low": False, "meters": None, "error": p.detail}
    return {**org, "low": any(m["low"] for m in meters.values()), "meters": meters}


async def list_orgs(request: Request) -> Response:
    c = await _admin(request)
    q = request.query_params
    limit, low, after = _limit(q), _bool(q, "low"), _uncursor(q)
    page: list[dict[str, Any]] = []
    scanned, more = 0, False
    while True:
        chunk = limit + 1 if not low else min(limit, SCAN_BUDGET - scanned) + 1
        rows = await c.store.list_orgs(after, chunk)
        more = len(rows) == chunk
        rows = rows[:chunk - 1]
        views = await asyncio.gather(*(_org_view(c, r) for r in rows))
        scanned += len(rows)
        if rows:
            after = rows[-1]["org_id"]
        for v in views:
            if not low or v["low"]:
                page.append(v)
        if not low or not more or len(page) >= limit or scanned >= SCAN_BUDGET:
            break
    if low and len(page) > limit:  # the last chunk matched more than the page holds
        page = page[:limit]
        after, more = page[-1]["org_id"], True
    return json_response({"orgs": page, "next_cursor": _cursor(after) if more and after else None})


def _id_ms(entry_id: str | None) -> int | None:
    if not entry_id or entry_id == "0-0":
        return None
    return int(entry_id.split("-", 1)[0])


def _ms_iso(ms: int) -> str:
    return _iso(datetime.fromtimestamp(ms / 1000, timezone.utc))


async def _stream_status(r: Any, stream: str, group: str, now_ms: int) -> dict[str, Any]:
    from redis.exceptions import ResponseError

    async with r.pipeline(transaction=False) as p:
        p.xlen(stream)
        p.xlen(stream + ":dead")
        length, dead = await p.execute()
    out: dict[str, Any] = {"stream": stream, "length": length, "dead_letters": dead, "group_exists": False,
                           "undelivered": length, "pending": 0, "unacked": length, "oldest_unacked_age_s": None,
                           "last_delivered_id": None, "last_delivered_at": None, "consumers": []}
    info = None
    if length or await r.exists(stream):
        try:
            info = next((g for g in await r.xinfo_groups(stream) if g["name"] == group), None)
        except ResponseError:  # the key went away between the two calls
            info = None
    if info is None:  # no worker has joined yet: everything in the stream is waiting
        first = await r.xrange(stream, "-", "+", count=1) if length else []
        oldest = _id_ms(first[0][0]) if first else None
    else:
        last = info["last-delivered-id"]
        pending = int(info["pending"])
        lag = info.get("lag")
        if lag is None:  # Redis cannot tell (entries deleted); count what follows the last delivered id
            lag = len(await r.xrange(stream, f"({last}", "+", count=100_000))
        oldest_id = None
        if pending:
            oldest_id = (await r.xpending(stream, group))["min"]
        else:
            nxt = await r.xrange(stream, f"({last}", "+", count=1)
            oldest_id = nxt[0][0] if nxt else None
        oldest = _id_ms(oldest_id)
        consumers = await r.xinfo_consumers(stream, group)
        out.update({
            "group_exists": True, "undelivered": int(lag), "pending": pending, "unacked": int(lag) + pending,
            "last_delivered_id": last if last != "0-0" else None,
            "last_delivered_at": _ms_iso(ms) if (ms := _id_ms(last)) else None,
            "consumers": [{"name": x["name"], "pending": int(x["pending"]), "idle_s": round(int(x["idle"]) / 1000, 3)}
                          for x in consumers],
        })
    if oldest is not None:
        out["oldest_unacked_age_s"] = round(max(0, now_ms - oldest) / 1000, 3)
    return out


async def worker_status(request: Request) -> Response:
    require_admin(request)
    from sync_worker.worker import GROUP  # here, so `serve` does not load the worker at start

    c = ctx(request)
    r = c.decider.redis
    sec, us = await r.time()
    now_ms = int(sec) * 1000 + int(us) // 1000
    streams = [await _stream_status(r, s, GROUP, now_ms) for s in c.decider.layout.streams()]
    ages = [s["oldest_unacked_age_s"] for s in streams if s["oldest_unacked_age_s"] is not None]
    consumers = sorted({x["name"] for s in streams for x in s["consumers"]})
    workers = []
    for name in consumers:  # each worker's own report: counters and its last batch (sync_worker/worker.py)
        raw = await r.get(c.decider.layout.worker(name))
        rep = orjson.loads(raw) if raw else None
        if rep is None:
            continue
        last = rep.get("last_batch")
        workers.append({
            "consumer": name, "reported_at": _ms_iso(rep["reported_at_ms"]),
            **{k: rep[k] for k in ("batches", "inserted", "duplicates", "dead_letters", "errors")},
            "last_batch": None if last is None else {
                "at": _ms_iso(last["at_ms"]), "age_s": round(max(0, now_ms - last["at_ms"]) / 1000, 3),
                "entries": last["entries"], "seconds": last["seconds"]}})
    return json_response({
        "group": GROUP, "prefix": c.decider.layout.prefix, "shards": len(streams), "now": _ms_iso(now_ms),
        "totals": {"unacked": sum(s["unacked"] for s in streams), "undelivered": sum(s["undelivered"] for s in streams),
                   "pending": sum(s["pending"] for s in streams),
                   "dead_letters": sum(s["dead_letters"] for s in streams),
                   "oldest_unacked_age_s": max(ages) if ages else None, "consumers": consumers},
        "streams": streams, "workers": workers,
    })


routes = [
    Route("/v1/admin/orgs", list_orgs, methods=["GET"]),
    Route("/v1/admin/worker", worker_status, methods=["GET"]),
]
