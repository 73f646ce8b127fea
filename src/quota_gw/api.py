"""The decision and account routes (SPEC §4).

Request bodies are checked by hand: the hot path should not pay for a validation framework,
and each error names the field that is wrong. A field the contract marks required is refused
when missing (422), never given a default; names match NAME_RE in full (a trailing newline
is not a name); a body larger than `behaviour.max_body_bytes` is refused (413) before it is
read whole.

The two hottest routes, POST /v1/check and /v1/consume, are plain ASGI apps (DecisionRoute)
that app.Gateway answers before Starlette's router (their errors still go through the app's
handlers). They read the four headers they need from the scope in one pass and build their
answer themselves, without Starlette's Request, Headers and Response objects, which cost as
much CPU as the rest of the route's own Python (docs/benchmarks.md, "Gateway CPU per
decision"). Their answers are byte for byte what a Response would send.
"""

from __future__ import annotations

import re
import uuid
from datetime import datetime, timezone
from typing import Any, Literal, overload

import orjson
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from .config import MAX_AMOUNT, NAME_RE, Config, is_name
from . import display
from .decisions import Decider, Decision, Identity
from .auth import bearer_token
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
    return await receive_body(request.receive, request.headers.get("content-length"), limit)


async def receive_body(receive: Receive, length: str | None, limit: int) -> bytes:
    """bounded_body from the ASGI messages themselves (`length`: the Content-Length header)."""
    if length is not None:
        if not length.isdigit():
            raise invalid("Content-Length: not a number of bytes", status=400)
        if int(length) > limit:
            raise too_large(limit)
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.request":
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise too_large(limit)
            if not message.get("more_body", False):
                if not chunks:
                    return chunk  # the usual case: one message holds it all
                chunks.append(chunk)
                return b"".join(chunks)
            chunks.append(chunk)
        elif message["type"] == "http.disconnect":
            raise ClientDisconnect()


async def json_body(request: Request, required: bool = True) -> dict[str, Any]:
    return json_object(await bounded_body(request, ctx(request).config.behaviour.max_body_bytes), required)


def json_object(raw: bytes, required: bool = True) -> dict[str, Any]:
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


@overload
def name_field(data: dict[str, Any], name: str, required: Literal[True] = True) -> str: ...
@overload
def name_field(data: dict[str, Any], name: str, required: bool) -> str | None: ...
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
        self.user_header = config.behaviour.user_header.lower().encode("latin-1")  # as it arrives in a scope
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
        return self.user_of(ident, data, request.headers.get(self.config.behaviour.user_header))

    def user_of(self, ident: Identity, data: dict[str, Any], header: str | None) -> str:
        """`user` with the user header's value (None: absent)."""
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
        return self.idempotency_key_of(data, request.headers.get("idempotency-key"))

    def idempotency_key_of(self, data: dict[str, Any], header: str | None) -> str | None:
        """`idempotency_key` with the Idempotency-Key header's value (None: absent)."""
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


class Head:
    """The request headers a decision route reads, taken from the ASGI scope in one pass (the
    first of each, as Starlette's Headers.get; ASGI servers give names in lower case)."""

    __slots__ = ("authorization", "content_length", "idempotency_key", "user")

    def __init__(self, scope: Scope, user_header: bytes) -> None:
        self.authorization = self.content_length = self.idempotency_key = self.user = None
        for name, value in scope["headers"]:
            if name == b"authorization":
                if self.authorization is None:
                    self.authorization = value.decode("latin-1")
            elif name == b"content-length":
                if self.content_length is None:
                    self.content_length = value.decode("latin-1")
            elif name == b"idempotency-key":
                if self.idempotency_key is None:
                    self.idempotency_key = value.decode("latin-1")
            elif name == user_header and self.user is None:
                self.user = value.decode("latin-1")


class DecisionRoute:
    """A decision route as a plain ASGI app (Starlette calls a Route's endpoint as one when it
    is not a function; app.Gateway calls `answer` before the router). `decide(c, head,
    receive)` returns (status, body, headers); a Problem it raises is rendered by the app's
    handlers, as for any route. The answer is what `json_response(body, status, headers)`
    sends: the same headers, in the same order."""

    def __init__(self, decide: Any) -> None:
        self.decide = decide

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        start, body = await self.answer(scope, receive)
        await send(start)
        await send(body)

    async def answer(self, scope: Scope, receive: Receive) -> tuple[dict[str, Any], dict[str, Any]]:
        """The two ASGI messages of the answer (nothing is sent: an error raised here can still
        be answered)."""
        c: Context = scope["app"].state.ctx
        return json_messages(*await self.decide(c, Head(scope, c.user_header), receive))


def _name(header: str) -> bytes:
    """A header name as an ASGI message carries it (lowercase bytes), remembered: a decision's
    answer carries the same few names every time."""
    if len(_NAMES) >= 1024:  # (names come from the code and the config: never reached)
        _NAMES.clear()
    name = _NAMES[header] = header.lower().encode("latin-1")
    return name


_NAMES: dict[str, bytes] = {}


def json_messages(status: int, data: Any, headers: dict[str, str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The two ASGI messages `json_response(data, status, headers)` sends (`headers` without
    Content-Length or Content-Type; a status that has a body)."""
    body = orjson.dumps(data)
    names = _NAMES
    raw = [(names.get(k) or _name(k), v.encode("latin-1")) for k, v in headers.items()]
    raw.append((b"content-length", b"%d" % len(body)))
    raw.append((b"content-type", b"application/json"))
    return ({"type": "http.response.start", "status": status, "headers": raw},
            {"type": "http.response.body", "body": body})


async def _decision_body(c: Context, head: Head, receive: Receive) -> tuple[Identity, dict[str, Any]]:
    """Who is asking (scope `consume`), then the JSON body: the order every decision route checks in."""
    ident = await c.keys.authenticate_key(bearer_token(head.authorization), "consume")
    return ident, json_object(await receive_body(receive, head.content_length, c.config.behaviour.max_body_bytes))


async def check(c: Context, head: Head, receive: Receive) -> tuple[int, dict[str, Any], dict[str, str]]:
    ident, data = await _decision_body(c, head, receive)
    feature = c.feature(data)
    explain = data.get("explain", False)
    if not isinstance(explain, bool):
        raise invalid("explain: true or false", field="explain")
    d = await c.decider.check(ident, feature, c.units(data, feature), c.user_of(ident, data, head.user), explain)
    body: dict[str, Any] = {"allowed": d.ok, "cost": d.cost, "remaining": d.remaining}
    if not d.ok:
        body["code"] = d.code
        body["detail"] = d.detail
    if explain:  # the layers as evaluated, and the first that refused (lua explained())
        body["waterfall"] = {**d.extra, "layers": d.extra.get("layers") or []}  # Lua's {} is an empty list
    return 200, body, d.headers()


async def consume(c: Context, head: Head, receive: Receive) -> tuple[int, dict[str, Any], dict[str, str]]:
    ident, data = await _decision_body(c, head, receive)
    feature = c.feature(data)
    d = await c.decider.consume(ident, feature, c.units(data, feature), c.user_of(ident, data, head.user),
                                c.idempotency_key_of(data, head.idempotency_key), c.metadata(data),
                                c.config.behaviour.shadow)
    if not d.ok:
        raise d.problem()
    return 200, {"event_id": d.event_id, "cost": d.cost, "remaining": d.remaining}, d.headers()


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
    Route("/v1/check", DecisionRoute(check), methods=["POST"]),
    Route("/v1/consume", DecisionRoute(consume), methods=["POST"]),
    Route("/v1/reservations", reserve, methods=["POST"]),
    Route("/v1/reservations/{rid}/commit", commit, methods=["POST"]),
    Route("/v1/reservations/{rid}", release, methods=["DELETE"]),
    Route("/v1/refunds", refund, methods=["POST"]),
    Route("/v1/balance", balance, methods=["GET"]),
    Route("/v1/pricing", pricing, methods=["GET"]),
]
