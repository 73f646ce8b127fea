"""The decision and account routes (SPEC §4).

Request bodies are checked by hand: the hot path should not pay for a validation framework,
and each error names the field that is wrong. A field the contract marks required is refused
when missing (422), never given a default; names match NAME_RE in full (a trailing newline
is not a name); a body larger than `behaviour.max_body_bytes` is refused (413) before it is
read whole.
"""

from __future__ import annotations

import re
import uuid
from datetime import datetime, timezone
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from .config import MAX_AMOUNT, NAME_RE, Config, is_name
from . import display
from .decisions import Decider, Decision, Identity
from .problems import Problem, invalid
from .store import Store

_IDEM = re.compile(r"[^\x00-\x1f\x7f-\x9f]{1,200}")  # the pattern openapi.json states
_EVENT_ID = re.compile(r"[0-9a-fA-F]{32}|[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")
MAX_METADATA = 4096
MAX_METADATA_DEPTH = 32  # nesting of objects and arrays; far below any encoder's recursion limit


def json_response(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(data), status_code=status, headers=headers, media_type="application/json")


def too_large(limit: int) -> Problem:
    return invalid(f"request body larger than {limit} bytes", status=413)


async def bounded_body(request: Request, limit: int) -> bytes:
    """The body, refused (413) as soon as it is known to exceed `limit`: from Content-Length
    before reading anything, or while counting a chunked body, so it is never held whole."""
    length = request.headers.get("content-length")
    if length is not None:
        if not length.isdigit():
            raise invalid("Content-Length: not a number of bytes", status=400)
        if int(length) > limit:
            raise too_large(limit)
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large(limit)
        chunks.append(chunk)
    return b"".join(chunks)


async def json_body(request: Request, required: bool = True) -> dict[str, Any]:
    raw = await bounded_body(request, ctx(request).config.behaviour.max_body_bytes)
    if not raw:
        if required:
            raise invalid("a JSON object body is required", status=400)
        return {}
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError as e:
        raise invalid(f"malformed JSON: {e}", status=400) from None
    if not isinstance(data, dict):
        raise invalid("the body must be a JSON object", status=400)
    return data


def int_field(data: dict[str, Any], name: str, default: int | None = None, lo: int = 1,
              hi: int = MAX_AMOUNT) -> int:
    v = data.get(name, default)
    if v is None:
        raise invalid(f"{name}: required", field=name)
    if isinstance(v, float) and v.is_integer() and abs(v) <= MAX_AMOUNT:
        v = int(v)  # JSON has one number type: 72.0 is the integer 72 (JSON Schema agrees)
    if not isinstance(v, int) or isinstance(v, bool):
        raise invalid(f"{name}: must be an integer", field=name)
    if not lo <= v <= hi:
        raise invalid(f"{name}: must be between {lo} and {hi}", field=name)
    return v


def name_field(data: dict[str, Any], name: str, required: bool = True) -> str | None:
    v = data.get(name)
    if v is None:
        if required:
            raise invalid(f"{name}: required", field=name)
        return None
    if not is_name(v):
        raise invalid(f"{name}: must match {NAME_RE}", field=name)
    return v


class Context:
    """What the routes share; one per app (see app.py)."""

    def __init__(self, config: Config, decider: Decider, keys: Any, db: Any) -> None:
        self.config, self.decider, self.keys, self.db = config, decider, keys, db
        self._store: Store | None = None

    @property
    def store(self) -> Store:
        """The store (store.py) over this app's Postgres and Redis; 503 without Postgres."""
        if self.db is None:
            raise Problem(503, "unavailable", "this route needs Postgres (DATABASE_URL)")
        if self._store is None:
            self._store = Store(self.db, self.decider)
        return self._store

    def feature(self, data: dict[str, Any]) -> str:
        f = data.get("feature")
        if not isinstance(f, str) or not f:
            raise invalid("feature: required", field="feature")
        if f not in self.config.features:
            raise invalid(f"feature: unknown feature {f!r}", field="feature")
        return f

    def units(self, data: dict[str, Any], feature: str, default: int | None = 1) -> int:
        units = int_field(data, "units", default, 1, self.config.behaviour.max_units)
        if self.config.features[feature].cost * units > MAX_AMOUNT:
            raise invalid("units: the call would cost more than the largest balance", field="units")
        return units

    def user(self, ident: Identity, data: dict[str, Any], request: Request) -> str:
        """A user key names its user; an org key may name one (body or header)."""
        header = request.headers.get(self.config.behaviour.user_header)
        if header is not None and not is_name(header):  # never silently ignored
            raise invalid(f"{self.config.behaviour.user_header}: must match {NAME_RE}", field="user_id")
        u = data.get("user_id")
        if u is None:
            u = header
        if ident.user_id:
            if u is not None and u != ident.user_id:
                raise Problem(403, "forbidden", f"this key belongs to user {ident.user_id}")
            return ident.user_id
        if u is None:
            return ""
        if not is_name(u):
            raise invalid(f"user_id: must match {NAME_RE}", field="user_id")
        return u

    def metadata(self, data: dict[str, Any]) -> bytes | None:
        m = data.get("metadata")
        if m is None:
            return None
        if not isinstance(m, dict):
            raise invalid("metadata: must be an object", field="metadata")
        if _depth(m) > MAX_METADATA_DEPTH:
            raise invalid(f"metadata: nested deeper than {MAX_METADATA_DEPTH} levels", field="metadata")
        try:  # sorted keys: the same metadata is the same request for idempotency
            raw = orjson.dumps(m, option=orjson.OPT_SORT_KEYS)
        except orjson.JSONEncodeError as e:
            raise invalid(f"metadata: cannot be stored as JSON ({e})", field="metadata") from None
        if b"\\u0000" in raw and _has_nul(m):
            raise invalid("metadata: NUL characters are not allowed (Postgres jsonb refuses them)", field="metadata")
        if len(raw) > MAX_METADATA:
            raise invalid(f"metadata: at most {MAX_METADATA} bytes of JSON", field="metadata")
        return raw

    def idempotency_key(self, data: dict[str, Any], request: Request) -> str | None:
        header = request.headers.get("idempotency-key")
        if header is not None and not _IDEM.fullmatch(header):  # checked even when the body has one
            raise invalid("Idempotency-Key: 1..200 characters, no control characters", field="idempotency_key")
        k = data.get("idempotency_key")
        if k is None:  # only an absent (or null) body key falls back to the header; "" or 0 is an error
            return header
        if not isinstance(k, str) or not _IDEM.fullmatch(k):
            raise invalid("idempotency_key: 1..200 characters, no control characters", field="idempotency_key")
        return k


def _depth(v: Any) -> int:
    """How deeply objects and arrays nest in `v` (a scalar is 0), without recursion."""
    deepest, stack = 0, [(v, 1)]
    while stack:
        x, d = stack.pop()
        if isinstance(x, dict):
            x = list(x.values())
        elif not isinstance(x, list):
            continue
        deepest = max(deepest, d)
        if d <= MAX_METADATA_DEPTH:  # deeper is refused anyway: stop counting there
            stack.extend((y, d + 1) for y in x)
    return deepest


def _has_nul(v: Any) -> bool:
    if isinstance(v, str):
        return "\x00" in v
    if isinstance(v, dict):
        return any(_has_nul(k) or _has_nul(x) for k, x in v.items())
    if isinstance(v, list):
        return any(_has_nul(x) for x in v)
    return False


def ctx(request: Request) -> Context:
    return request.app.state.ctx


def decided(d: Decision, op: str, body: dict[str, Any], status: int = 200) -> Response:
    if not d.ok:
        raise d.problem()
    return json_response(body, status, d.headers())


def iso(ts: int) -> str:
    return datetime.fromtimestamp(ts, timezone.utc).isoformat().replace("+00:00", "Z")


async def check(request: Request) -> Response:
    c = ctx(request)
    ident = await c.keys.authenticate(request, "consume")
    data = await json_body(request)
    feature = c.feature(data)
    d = await c.decider.check(ident, feature, c.units(data, feature), c.user(ident, data, request))
    body: dict[str, Any] = {"allowed": d.ok, "cost": d.cost, "remaining": d.remaining}
    if not d.ok:
        body["code"] = d.code
        body["detail"] = d.detail
    return json_response(body, headers=d.headers())


async def consume(request: Request) -> Response:
    c = ctx(request)
    ident = await c.keys.authenticate(request, "consume")
    data = await json_body(request)
    feature = c.feature(data)
    d = await c.decider.consume(ident, feature, c.units(data, feature), c.user(ident, data, request),
                                c.idempotency_key(data, request), c.metadata(data),
                                c.config.behaviour.shadow)
    return decided(d, "consume", {"event_id": d.event_id, "cost": d.cost, "remaining": d.remaining})


async def reserve(request: Request) -> Response:
    c = ctx(request)
    ident = await c.keys.authenticate(request, "consume")
    data = await json_body(request)
    feature = c.feature(data)
    b = c.config.behaviour
    ttl = int_field(data, "ttl_s", b.reservation_ttl_s, 1, b.max_reservation_ttl_s)
    d = await c.decider.reserve(ident, feature, c.units(data, feature, None), c.user(ident, data, request), ttl,
                                c.idempotency_key(data, request), b.shadow)
    return decided(d, "reserve", {"reservation_id": d.event_id, "held": d.cost, "remaining": d.remaining,
                       "expires_at": iso(d.extra.get("expires_at", 0))}, 201)


def reservation_id(request: Request) -> str:
    rid = request.path_params["rid"]
    try:
        return uuid.UUID(rid).hex
    except ValueError:
        raise Problem(404, "not_found", f"reservation {rid} not found") from None


async def commit(request: Request) -> Response:
    c = ctx(request)
    ident = await c.keys.authenticate(request, "consume")
    data = await json_body(request)
    units = int_field(data, "units", None, 0, c.config.behaviour.max_units * 1000)
    d = await c.decider.commit(ident, reservation_id(request), units, c.metadata(data))
    return decided(d, "commit", {"event_id": d.event_id, "cost": d.cost, "released": d.extra.get("released", 0),
                       "remaining": d.remaining})


async def release(request: Request) -> Response:
    c = ctx(request)
    ident = await c.keys.authenticate(request, "consume")
    d = await c.decider.release(ident, reservation_id(request))
    return decided(d, "release", {"event_id": d.event_id, "released": d.extra.get("released", 0), "remaining": d.remaining})


async def refund(request: Request) -> Response:
    c = ctx(request)
    ident = await c.keys.authenticate(request, "consume")
    data = await json_body(request)
    eid = data.get("event_id")
    # The two spellings the API answers with (uuid.UUID alone also takes braces, "urn:uuid:", ...).
    eid = uuid.UUID(eid).hex if isinstance(eid, str) and _EVENT_ID.fullmatch(eid) else None
    if eid is None:
        raise invalid("event_id: the id of a consume or commit event", field="event_id")
    d = await c.decider.refund(ident, eid, c.metadata(data))
    return decided(d, "refund", {"event_id": d.event_id, "refunded": d.cost, "remaining": d.remaining})


async def balance(request: Request) -> Response:
    c = ctx(request)
    ident = await c.keys.authenticate(request, "read")
    return json_response(await balance_of(c, ident.org_id, ident.plan))


async def balance_of(c: Context, org_id: str, plan_name: str) -> dict[str, Any]:
    plan = c.config.plans.get(plan_name)
    if plan is None:
        raise Problem(503, "unavailable", f"plan {plan_name!r} is not in the config")
    # `low`: below the highest alert threshold, of the same base the alerts use (allocation plus
    # the purchased credit the period started with).
    low_pct = c.config.low_balance_mark
    meters = {}
    for name, m in (await c.decider.balances(org_id, plan)).items():
        unlimited = m["limit"] < 0
        avail = m["allocated"] + m["purchased"] - m["held"]
        meters[name] = {
            "balance": None if unlimited else avail,
            "allocated": m["allocated"], "purchased": m["purchased"], "held": m["held"], "used": m["used"],
            "limit": None if unlimited else m["limit"], "unlimited": unlimited,
            "period_end": iso(m["period_end"]),
            "available": not (m["limit"] == 0 and m["purchased_total"] <= 0),
            "next_expiry": ({"at": iso(m["next_expiry"]), "amount": m["next_expiry_amount"]}
                            if m["next_expiry"] else None),
            "low": (not unlimited) and m["limit"] + m["purchased_at_start"] > 0
                   and avail * 100 < (m["limit"] + m["purchased_at_start"]) * low_pct,
        }
    return {"org_id": org_id, "plan": plan_name, "meters": meters}


async def pricing(request: Request) -> Response:
    c = ctx(request)
    await c.keys.authenticate(request, "read")
    return json_response(pricing_of(c.config))


def pricing_of(cfg: Config) -> dict[str, Any]:
    return {
        "meters": cfg.meter_names,
        "features": {n: {"meter": f.meter, "cost": f.cost} for n, f in cfg.features.items()},
        "plans": {n: {"period": p.period, "rollover": p.rollover,
                      "allocations": {m: ("unlimited" if p.allocation(m) < 0 else p.allocation(m))
                                      for m in cfg.meter_names},
                      "rate_limits": p.rate_limits.model_dump(exclude_none=True)}
                  for n, p in cfg.plans.items()},
        "packs": {n: pk.model_dump(exclude_none=True) for n, pk in cfg.packs.items()},
        "purchases_available": display.purchases_available(cfg),  # the pages show buy buttons only then
        "balance_thresholds": display.thresholds(cfg),
    }


routes = [
    Route("/v1/check", check, methods=["POST"]),
    Route("/v1/consume", consume, methods=["POST"]),
    Route("/v1/reservations", reserve, methods=["POST"]),
    Route("/v1/reservations/{rid}/commit", commit, methods=["POST"]),
    Route("/v1/reservations/{rid}", release, methods=["DELETE"]),
    Route("/v1/refunds", refund, methods=["POST"]),
    Route("/v1/balance", balance, methods=["GET"]),
    Route("/v1/pricing", pricing, methods=["GET"]),
]
