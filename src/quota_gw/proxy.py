"""The sidecar: configured routes forwarded to their upstream, charged and settled.

A proxied call is authenticated, decided in one Redis script, forwarded over a pooled
aiohttp client (chosen by measurement, docs/benchmarks.md) and streamed back chunk by
chunk. Each call then settles exactly once, by how it ended:

| ended by                        | fixed route           | openai route (a hold)          |
|---------------------------------|-----------------------|--------------------------------|
| upstream answered               | charged at admission  | commit usage.total_tokens (*)  |
| status in `refund_statuses`     | refund                | release                        |
| connect error, timeout, a cut   | refund                | release                        |
| the client went away            | stays charged         | commit what was produced       |

(*) All of it, beyond the hold too, as far as the balance and the user's and team's quotas
go (never below zero, other holds stay covered); what could not be charged is the commit
event's `overage` (its metadata) and `quota_gw_overage_tokens_total`. The hold itself covers
everything the upstream bills (metering.py), every budget field the caller sent
(`max_tokens`, `max_completion_tokens`, `max_output_tokens`; the route's `max_tokens_field`
when none) is set to it, and more than 128 completions (`n`) is refused.

Headers: a request header is compared as an upstream may read it (case-insensitive, `_` as
`-`: WSGI reads both as HTTP_X_QUOTA_ORG), and dropped when the gateway strips or sets that
name (hop-by-hop, Host, Authorization — the caller's quota-gw key —, X-Forwarded-*, the
identity headers, the route's own `headers`). The route's headers (upstream credentials,
${ENV} read at start) come last, so a caller cannot override them. Answers carry the
gateway's Date and Server, not the upstream's as well.

Shadow mode decides and records but never blocks (the answer says what would have happened
in `X-Quota-Shadow`). When Redis is down a `fail: closed` route answers 503 and forwards
nothing; a `fail: open` route forwards and writes the usage to the spool (spool.py).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
from collections.abc import Awaitable, Callable
from contextvars import ContextVar
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import orjson
from prometheus_client import Counter
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from . import config as config_mod
from . import metering, metrics
from .api import Context, json_response
from .config import Route as RouteConfig
from .decisions import Decision, Identity
from .problems import Problem, invalid
from .spool import Spool, entry, replay_forever

log = logging.getLogger("quota_gw.proxy")

REDIS_DOWN = (RedisConnectionError, RedisTimeoutError)
UPSTREAM_DOWN = (aiohttp.ClientError, asyncio.TimeoutError, OSError)
DEFAULT_KEEPALIVE_S = 4.0
MAX_BODY = 16 * 1024 * 1024  # request bodies are read whole (AI calls are small); larger is 413
MAX_JSON_RESPONSE = 8 * 1024 * 1024  # a JSON answer larger than this is forwarded and charged the whole hold
METHODS = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]

# Never forwarded in either direction (RFC 9110 §7.6.1), plus what the gateway owns.
HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te",
                        "trailer", "trailers", "transfer-encoding", "upgrade", "proxy-connection"})
REQUEST_DROP = HOP_BY_HOP | {"host", "content-length", "authorization", "x-forwarded-for",
                             "x-forwarded-proto", "x-forwarded-host"}
# The gateway's own server sets these on every answer; the upstream's copies would repeat them.
RESPONSE_DROP = HOP_BY_HOP | {"date", "server"}


def header_key(name: bytes | str) -> str:
    """How an upstream may read a header name: case-insensitively, and `_` as `-` (CGI/WSGI
    servers turn both into HTTP_X_QUOTA_ORG). Filtering compares these, so `X_Quota_Org`
    is the gateway's X-Quota-Org and is dropped with it."""
    if isinstance(name, bytes):
        name = name.decode("latin-1")
    return name.lower().replace("_", "-")


OVERAGE = Counter("quota_gw_overage_tokens_total", "Usage the upstream reported that the balance could not cover"
                  " (the commit event's metadata says `overage`)", ["route"], registry=metrics.REGISTRY)
PROXIED = Counter("quota_gw_proxied_total", "Proxied calls by route and how they settled",
                  ["route", "outcome"], registry=metrics.REGISTRY)
DROPPED_IDLE = Counter("quota_gw_upstream_idle_dropped_total", "Pooled upstream connections found closed by "
                       "the upstream just before reuse (the request went on another one)", registry=metrics.REGISTRY)
RESENT = Counter("quota_gw_upstream_resent_total", "Requests sent again on a new connection because their "
                 "pooled one was found closed before a byte was written", registry=metrics.REGISTRY)
SPOOLED = Counter("quota_gw_spooled_total", "Calls whose usage went to the fail-open spool", ["op"],
                  registry=metrics.REGISTRY)


class Sidecar:
    """What every proxied call shares: the routes, the upstream client and the spool."""

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.config = ctx.config
        b = ctx.config.behaviour
        self.routes = sorted(ctx.config.routes, key=lambda r: len(r.prefix), reverse=True)
        self._drop = REQUEST_DROP | {header_key(b.org_header), header_key(b.user_header)}  # never forwarded
        self._user_key = header_key(b.user_header)
        # One folder per key prefix: a replayer must only replay into the Redis it was spooled for.
        spool_dir = os.environ.get("QUOTA_GW_SPOOL_DIR") or b.spool_dir
        self.spool = Spool(os.path.join(spool_dir, ctx.decider.layout.prefix))
        # One pooled client per upstream keep-alive setting (aiohttp sets it per connector).
        self.sessions: dict[float, aiohttp.ClientSession] = {}
        self._replayer: asyncio.Task[None] | None = None

    async def start(self) -> None:
        for keepalive in {r.upstream_keepalive_s for r in self.routes} or {DEFAULT_KEEPALIVE_S}:
            conn = LiveConnector(limit=0, limit_per_host=0, ttl_dns_cache=300, keepalive_timeout=keepalive,
                                 enable_cleanup_closed=False)
            self.sessions[keepalive] = aiohttp.ClientSession(
                connector=conn, request_class=LiveRequest, auto_decompress=False, trust_env=False,
                skip_auto_headers=("User-Agent", "Accept-Encoding", "Content-Type"),
                timeout=aiohttp.ClientTimeout(total=None))
        self._replayer = asyncio.create_task(replay_forever(self.spool, self.ctx.decider), name="spool-replay")

    async def stop(self) -> None:
        if self._replayer is not None:
            self._replayer.cancel()
            try:
                await self._replayer
            except asyncio.CancelledError:
                pass
        self.spool.rotate()
        for session in self.sessions.values():
            await session.close()

    # -- routing

    def match(self, path: str) -> RouteConfig | None:
        """The longest configured prefix that covers `path` on a segment boundary."""
        for r in self.routes:
            p = r.prefix
            if path == p or path.startswith(p if p.endswith("/") else p + "/"):
                return r
        return None

    def shadow(self, route: RouteConfig) -> bool:
        return self.config.behaviour.shadow if route.shadow is None else route.shadow

    def fail_open(self, route: RouteConfig) -> bool:
        return (route.fail or self.config.behaviour.fail) == "open"

    # -- identity

    async def authenticate(self, request: Request, route: RouteConfig) -> tuple[Identity, bool]:
        """(identity, redis_down). With Redis down, a fail-open route reads the key from Postgres."""
        try:
            return await self.ctx.keys.authenticate(request, "consume"), False
        except REDIS_DOWN:
            if not self.fail_open(route):
                raise unavailable() from None
            metrics.REDIS_ERRORS.inc()
        return await self._authenticate_from_postgres(request), True

    async def _authenticate_from_postgres(self, request: Request) -> Identity:
        from .auth import KEY_PREFIX, bearer, hash_key

        db = self.ctx.db
        key = bearer(request)
        if key is None:
            raise Problem(401, "unauthorized", "missing bearer API key (Authorization: Bearer qgw_...)",
                          headers={"WWW-Authenticate": "Bearer"})
        if db is None:
            raise unavailable("the quota store is unavailable and there is no Postgres to check the key")
        row = None
        if key.startswith(KEY_PREFIX) and len(key) <= 200:
            row = await db.fetchrow(
                "SELECT k.key_id, k.org_id, k.user_id, k.scopes, o.plan FROM api_keys k JOIN orgs o USING (org_id)"
                " WHERE k.key_hash = $1 AND k.revoked_at IS NULL", hash_key(key))
        if row is None:
            raise Problem(401, "unauthorized", "unknown or revoked API key", headers={"WWW-Authenticate": "Bearer"})
        ident = Identity(row["key_id"], row["org_id"], row["user_id"], frozenset(row["scopes"]), row["plan"])
        if "consume" not in ident.scopes:
            raise Problem(403, "forbidden", "this key lacks the 'consume' scope")
        return ident

    def who(self, ident: Identity, user: str) -> list[tuple[bytes, bytes]]:
        b = self.config.behaviour
        h = [(b.org_header.lower().encode(), ident.org_id.encode())]
        if user:
            h.append((b.user_header.lower().encode(), user.encode()))
        return h

    # -- the call

    def claimed_user(self, request: Request) -> dict[str, str]:
        """The user the caller names in the user header, however spelled (`X_Quota_User` is
        X-Quota-User to a CGI upstream, so it is to the gateway too: a user-bound key naming
        another user is 403 either way). Two spellings that disagree are refused."""
        values = {v.decode("latin-1") for k, v in request.scope["headers"] if header_key(k) == self._user_key}
        if len(values) > 1:
            name = self.config.behaviour.user_header
            raise invalid(f"{name}: sent more than once with different values", status=400, field=name)
        return {"user_id": values.pop()} if values else {}

    async def handle(self, route: RouteConfig, request: Request, send: Send,
                     route_headers: list[tuple[str, str]] | None = None) -> None:
        scope = request.scope
        path = scope["path"]
        rest = path[len(route.prefix.rstrip("/")):]
        if rest and not rest.startswith("/") and not route.prefix.endswith("/"):
            raise Problem(404, "not_found", f"no route for {path}")
        ident, redis_down = await self.authenticate(request, route)
        user = self.ctx.user(ident, self.claimed_user(request), request)
        body = await read_body(request)
        target = route.upstream + ((rest or "/") if route.strip_prefix else path)
        if scope.get("query_string"):
            target += "?" + scope["query_string"].decode("latin-1")
        kind = metering.kind_of(path) if route.metering == "openai" and request.method == "POST" else None
        headers = self.upstream_headers(request, ident, user, route_headers or [], metered=kind is not None)
        if route.metering == "none":
            charge: Charge = Charge(self, route, ident, user)
        elif kind is not None:
            charge = await self.hold(route, ident, user, kind, body, redis_down)
            body = charge.body
        elif route.metering == "openai":  # GET /v1/models and the like on an LLM route: not metered
            if request.method in ("POST", "PUT", "PATCH"):
                # work the gateway cannot meter (/v1/responses, audio, images...) is not forwarded free
                raise Problem(404, "not_found", f"{request.method} {path}: an openai route meters "
                              f"{', '.join(metering.KINDS)} only; give this path its own route (metering: fixed or none)")
            charge = Charge(self, route, ident, user)
        else:
            charge = await self.admit(route, ident, user, request, redis_down)
        await self.forward(route, request, send, target, headers, body, charge)

    def upstream_headers(self, request: Request, ident: Identity, user: str,
                         route_headers: list[tuple[str, str]], metered: bool = False) -> list[tuple[str, str]]:
        """The caller's headers, less every one the gateway strips or sets (compared as
        header_key: case and `_`/`-` do not matter), then the gateway's: forwarding, identity,
        and the route's own (its upstream credentials), so a caller can override none of them."""
        # From the raw ASGI headers (lowercase names; the first of a repeated one counts, as
        # Starlette's request.headers would say): building request.headers and request.url
        # for three values cost more than the rest of this function.
        b = self.config.behaviour
        scope = request.scope
        raw = scope["headers"]
        conn = prior = host = None
        for k, v in raw:
            if k == b"connection" and conn is None:
                conn = v.decode("latin-1")
            elif k == b"x-forwarded-for" and prior is None:
                prior = v.decode("latin-1")
            elif k == b"host" and host is None:
                host = v.decode("latin-1")
        drop = self._drop
        if route_headers:
            drop = drop | {header_key(k) for k, _ in route_headers}
        if metered:  # the gateway reads usage from the answer: it asks for it uncompressed
            drop = drop | {"accept-encoding"}
        if conn:
            drop = drop | {header_key(t.strip()) for t in conn.split(",")}
        out = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in raw if header_key(k) not in drop]
        client = scope["client"][0] if scope.get("client") else ""
        if prior and prior.rsplit(",", 1)[-1].strip() == client:
            # uvicorn trusted a local proxy's header and made its last hop the client already
            out.append(("X-Forwarded-For", prior))
        else:
            out.append(("X-Forwarded-For", f"{prior}, {client}" if prior else client))
        out.append(("X-Forwarded-Proto", scope.get("scheme", "http")))
        out.append(("X-Forwarded-Host", host or ""))
        out.append((b.org_header, ident.org_id))
        if user:
            out.append((b.user_header, user))
        if metered:
            out.append(("Accept-Encoding", "identity"))
        out.extend(route_headers)
        return out

    async def admit(self, route: RouteConfig, ident: Identity, user: str, request: Request,
                    redis_down: bool) -> Charge:
        """Fixed cost: charge on admission."""
        assert route.feature is not None
        charge = FixedCharge(self, route, ident, user)
        if not redis_down:
            meta = orjson.dumps({"route": route.prefix, "method": request.method})
            try:
                d = await self.ctx.decider.consume(ident, route.feature, 1, user, None, meta, self.shadow(route))
            except REDIS_DOWN:
                if not self.fail_open(route):
                    raise unavailable() from None
                redis_down = True
            else:
                if not d.ok:
                    raise d.problem()
                charge.decided(d)
        charge.redis_down = redis_down
        return charge

    async def hold(self, route: RouteConfig, ident: Identity, user: str, kind: str, raw: bytes,
                   redis_down: bool) -> LLMCharge:
        """LLM usage: hold the prompt estimate plus the completion budget, lowering the budget to
        what the org can afford, so the call can never overspend."""
        assert route.feature is not None
        try:
            body = orjson.loads(raw) if raw else None
        except orjson.JSONDecodeError as e:
            raise invalid(f"malformed JSON: {e}", status=400) from None
        if not isinstance(body, dict):
            raise invalid("the body must be a JSON object", status=400)
        per = metering.choices(body)  # n completions may each spend the whole budget
        if per > metering.MAX_CHOICES:
            raise invalid(f"n: at most {metering.MAX_CHOICES} completions per call", status=400, field="n")
        per *= metering.prompts(kind, body)  # a batch of prompts: n completions each
        charge = LLMCharge(self, route, ident, user, kind, body)
        unit = self.config.features[route.feature].cost
        prompt = metering.prompt_tokens(kind, body, route.image_tokens)
        # Every budget field the caller sent is set to the hold (an upstream may read any one of
        # them); with none sent, the route's field. The least one sent is what is asked for.
        fields = metering.budget_fields(body) or [route.max_tokens_field]
        asked = metering.requested_max_tokens(body)
        budget = 0 if kind == "embeddings" else (asked or route.default_max_tokens)
        if budget and unit > 0:  # a hold is at most MAX_AMOUNT: exact in Lua doubles and Redis integers
            most = max(0, (config_mod.MAX_AMOUNT // unit - prompt) // per)
            if budget > most:
                budget = charge.lowered = most
        charge.prompt = prompt
        shadow = self.shadow(route)
        if not redis_down:
            floor = prompt + min(route.min_completion_tokens, budget) * per
            ttl = self.config.behaviour.reservation_ttl_s
            try:
                d = await self.ctx.decider.reserve(ident, route.feature, 1, user, ttl, None, shadow,
                                                   cost=(prompt + budget * per) * unit,
                                                   min_cost=0 if shadow or unit == 0 else floor * unit)
            except REDIS_DOWN:
                if not self.fail_open(route):
                    raise unavailable() from None
                redis_down = True
            else:
                if not d.ok:
                    raise d.problem()
                charge.decided(d)
                if charge.rid is not None and unit > 0:
                    affordable = (d.cost // unit - prompt) // per
                    if kind != "embeddings" and affordable < budget:
                        budget = max(affordable, 0)
                        charge.lowered = budget
        charge.redis_down = redis_down
        charge.most = prompt + budget * per
        if kind != "embeddings":
            for f in fields:  # always explicit: the upstream's own default could exceed the hold
                body[f] = budget
        if body.get("stream"):
            opts = body.get("stream_options")
            opts = dict(opts) if isinstance(opts, dict) else {}
            charge.drop_usage_only = not opts.get("include_usage")
            opts["include_usage"] = True
            body["stream_options"] = opts
        try:
            charge.body = orjson.dumps(body)
        except TypeError:  # orjson's nesting limit (255) is below its parser's (1,024)
            if charge.rid is not None:
                await charge.failed("bad request")
            raise invalid("the body nests deeper than 255 levels", status=400) from None
        return charge

    async def forward(self, route: RouteConfig, request: Request, send: Send, url: str,
                      headers: list[tuple[str, str]], body: bytes, charge: Charge) -> None:
        session = self.sessions[route.upstream_keepalive_s]
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=route.connect_timeout_s, sock_read=route.timeout_s)
        answered = False
        try:
            try:
                resp = await self.upstream_request(session, request.method, url, headers, body, timeout)
            except asyncio.TimeoutError:
                await charge.failed("timeout")
                raise Problem(504, "upstream_timeout", f"the upstream did not answer within {route.timeout_s:g} s; "
                              "nothing was charged", headers=charge.headers()) from None
            except UPSTREAM_DOWN as e:
                await charge.failed("connect")
                raise Problem(502, "upstream_error", f"the upstream is unreachable ({type(e).__name__}); "
                              "nothing was charged", headers=charge.headers()) from None
            answered = True
            async with resp:
                await self.relay(request, send, resp, charge)
        finally:
            if not charge.settled:  # cancelled (shutdown) or a bug: settle by how far it got
                await asyncio.shield(charge.abandoned() if answered else charge.failed("error"))

    async def upstream_request(self, session: aiohttp.ClientSession, method: str, url: str, headers: list[tuple[str, str]],
                   body: bytes, timeout: aiohttp.ClientTimeout) -> aiohttp.ClientResponse:
        """Sends the request; once more on a new connection only if the first attempt found its
        pooled connection closed before writing a byte (see LiveConnector for why no other)."""
        attempt: dict[str, bool] = {}
        token = _ATTEMPT.set(attempt)
        try:
            return await session.request(method, url, headers=headers, data=body or None,
                                          allow_redirects=False, timeout=timeout)
        except aiohttp.ClientConnectionError:
            if not attempt.get("unsent"):
                raise
        finally:
            _ATTEMPT.reset(token)
        RESENT.inc()
        fresh = _FRESH.set(True)
        try:
            return await session.request(method, url, headers=headers, data=body or None,
                                          allow_redirects=False, timeout=timeout)
        finally:
            _FRESH.reset(fresh)

    async def relay(self, request: Request, send: Send, resp: aiohttp.ClientResponse, charge: Charge) -> None:
        charge.status = resp.status
        sse = resp.headers.get("content-type", "").startswith("text/event-stream")
        charge.start(sse)
        if resp.status in charge.route.refund_statuses:
            # Known failure before a byte is sent: settle first, so the quota headers are true.
            await charge.failed(f"status {resp.status}")
        elif charge.redis_down:
            charge.rewrites = True  # the spool entry is written before the client sees the end
        ours = [(k.lower().encode(), v.encode()) for k, v in charge.headers().items()]
        # the upstream cannot speak for the gateway (X-Quota-*) in any spelling either
        drop = RESPONSE_DROP | {header_key(k) for k, _ in ours} | ({"content-length"} if charge.rewrites else set())
        out = [(k.lower(), v) for k, v in resp.raw_headers if header_key(k) not in drop]
        out += ours
        await send({"type": "http.response.start", "status": resp.status, "headers": out})
        if resp.content.is_eof():
            # The whole body came with the head (most small answers): nothing left to stream,
            # so no copy and watch tasks; the same sends in the same order as pump's.
            ended = await send_whole(resp.content.read_nowait(), send, charge.feed)
        else:
            ended = await pump(resp, request.receive, send, charge.feed)
        if ended == "done":
            tail = charge.flush()
            await charge.succeeded()
            await send({"type": "http.response.body", "body": tail, "more_body": False})
        elif ended == "disconnect":
            await charge.abandoned()
        else:  # the upstream broke mid-answer: refund, and cut the client's response too
            await charge.failed("cut mid-response")


async def send_whole(body: bytes, send: Send, feed: Callable[[bytes], bytes]) -> str:
    """pump() for a body that has fully arrived: 'done', or 'disconnect' if the client left."""
    out = feed(body) if body else b""
    if out:
        try:
            await send({"type": "http.response.body", "body": out, "more_body": True})
        except OSError:  # ASGI 2.4 servers raise when the client has gone
            return "disconnect"
    return "done"


async def pump(resp: aiohttp.ClientResponse, receive: Receive, send: Send,
               feed: Callable[[bytes], bytes]) -> str:
    """Copies the upstream body to the client as it arrives. Returns 'done', 'disconnect'
    (the client went away: stop reading, the upstream is closed) or 'upstream' (it broke)."""

    async def copy() -> None:
        async for chunk in resp.content.iter_any():
            out = feed(chunk)
            if out:
                try:
                    await send({"type": "http.response.body", "body": out, "more_body": True})
                except OSError as e:  # ASGI 2.4 servers raise when the client has gone
                    raise _ClientGone() from e

    async def watch() -> None:
        while (await receive())["type"] != "http.disconnect":
            pass

    copier = asyncio.ensure_future(copy())
    watcher = asyncio.ensure_future(watch())
    try:
        done, _ = await asyncio.wait({copier, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t in (copier, watcher):
            if not t.done():
                t.cancel()
        await asyncio.gather(copier, watcher, return_exceptions=True)
    if copier in done and not copier.cancelled():
        exc = copier.exception()
        if exc is None:
            return "done"
        if isinstance(exc, _ClientGone):
            return "disconnect"
        if isinstance(exc, UPSTREAM_DOWN):
            log.warning("upstream cut mid-response: %r", exc)
            return "upstream"
        raise exc
    return "disconnect"


class LiveConnector(aiohttp.TCPConnector):
    """The upstream pool, with a look at a pooled connection before it is reused.

    The race: the upstream closes an idle keep-alive connection (uvicorn after 5 s) just as the
    gateway picks it for a request; the request meets a closed socket, reaches no one, and the
    caller got a 502. The defences, in order:

    1. `upstream_keepalive_s` (per route, default 4 s) below the upstream's own idle timeout:
       the pool gives a connection up before the upstream does (aiohttp checks on every reuse).
    2. Here, when a pooled connection is picked: a look at its socket (a non-blocking MSG_PEEK).
       End of stream, an error or bytes nobody asked for mean the upstream closed it; it is
       dropped and the request takes another one, or a new one.
    3. LiveRequest, just before the first byte is written: the same look. A connection closed
       in between (the body is written by a task of its own, a loop turn later) is closed
       unwritten, and `Sidecar.forward` sends the request once more, on a new connection.

    A request of which anything was written is never sent again, whatever the error
    (ServerDisconnectedError, ClientOSError): on the wire, an upstream that read the request
    and then died looks exactly like one that closed the idle connection as the request
    crossed, and the upstream may have started, and billed, the work. That is a 502 and the
    charge is refunded."""

    async def _get(self, key: Any, traces: Any) -> Any:
        if _FRESH.get():
            return None  # a resend: never a pooled connection
        conns = self._conns.get(key)  # aiohttp's idle pool for this host (a deque of (proto, t))
        if conns:
            for proto, _ in conns:
                if proto.is_connected() and closed_by_peer(proto.transport):
                    proto.close()  # not connected any more: aiohttp's _get discards it
                    DROPPED_IDLE.inc()
        return await super()._get(key, traces)


class LiveRequest(aiohttp.ClientRequest):
    """Looks at the connection again right before the request is written (LiveConnector, 3):
    when sending starts (the head of a request without a body is written in that same step)
    and when the body-writing task starts (a loop turn later; it writes head and body at once)."""

    async def send(self, conn: Any) -> aiohttp.ClientResponse:
        if _closed(conn):
            raise Unsent(WRITE_REFUSED)
        return await super().send(conn)

    async def write_bytes(self, writer: Any, conn: Any, content_length: int | None = None) -> None:
        if _closed(conn):
            conn.close()  # nothing written: the response read fails, and forward() sends it again
            return
        await super().write_bytes(writer, conn, content_length)


class Unsent(aiohttp.ClientConnectionError):
    """The connection was found closed before a byte of the request was written."""


def _closed(conn: Any) -> bool:
    proto = conn.protocol
    if proto is not None and proto.is_connected() and not closed_by_peer(proto.transport):
        return False
    attempt = _ATTEMPT.get()
    if attempt is not None:
        attempt["unsent"] = True
    return True


# Per forwarded call (context variables reach the connector and the body-writing task):
_ATTEMPT: ContextVar[dict[str, bool] | None] = ContextVar("qgw_upstream_attempt", default=None)
_FRESH: ContextVar[bool] = ContextVar("qgw_upstream_fresh", default=False)
WRITE_REFUSED = "the upstream closed the pooled connection before the request was written"


def closed_by_peer(transport: Any) -> bool:
    """True when the socket under `transport` has an end of stream, an error or unread bytes
    waiting (an idle HTTP/1.1 connection has none of those). Costs one recv syscall."""
    sock = transport.get_extra_info("socket") if transport is not None else None
    if sock is None:
        return False
    peek = socket.socket(fileno=sock.fileno())  # a view of the same fd (uvloop's wrapper has no recv)
    try:
        peek.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        return True  # b"" (the peer closed) or unsolicited bytes (say, a 408 before closing)
    except BlockingIOError:
        return False
    except OSError:
        return True
    finally:
        peek.detach()


class _ClientGone(Exception):
    """Sending to the client failed: it went away (not the upstream's fault)."""


async def read_body(request: Request) -> bytes:
    if request.method in ("GET", "HEAD") and "content-length" not in request.headers \
            and "transfer-encoding" not in request.headers:
        return b""
    parts, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY:
            raise Problem(413, "invalid_request", f"request body larger than {MAX_BODY} bytes")
        parts.append(chunk)
    return b"".join(parts)


def unavailable(detail: str = "the quota store is unavailable; nothing was forwarded or charged") -> Problem:
    metrics.REDIS_ERRORS.inc()
    return Problem(503, "unavailable", detail, headers={"Retry-After": "1"})


class Charge:
    """One proxied call's settlement; every path through `forward` ends in exactly one of
    succeeded / failed / abandoned. This base class charges nothing (metering: none).

    `rewrites`: the body may change, or the call settles after the last upstream byte; either
    way Content-Length is dropped (chunked), so the client sees the end only once settled."""

    rewrites = False

    def __init__(self, sidecar: Sidecar, route: RouteConfig, ident: Identity, user: str) -> None:
        self.sidecar, self.route, self.ident, self.user = sidecar, route, ident, user
        self.decision: Decision | None = None
        self.redis_down = False
        self.settled = False
        self.status = 0
        self.outcome = ""

    def decided(self, d: Decision) -> None:
        self.decision = d

    def headers(self) -> dict[str, str]:
        h = self.decision.headers() if self.decision is not None else {}
        if self.redis_down:
            h["X-Quota-Degraded"] = "fail-open"
        return h

    def start(self, sse: bool) -> None:
        pass

    def feed(self, chunk: bytes) -> bytes:
        return chunk

    def flush(self) -> bytes:
        return b""

    async def _settle(self, outcome: str, fn: Callable[[], Awaitable[None]]) -> None:
        if self.settled:
            return
        self.settled = True
        self.outcome = outcome
        PROXIED.labels(self.route.prefix, outcome).inc()
        try:
            await fn()
        except Exception:  # noqa: BLE001 - the client's answer must not fail because settling did
            log.exception("settling a %s call on %s failed", outcome, self.route.prefix)

    async def succeeded(self) -> None:
        await self._settle("ok", self._nothing)

    async def failed(self, reason: str) -> None:
        await self._settle("upstream_failed", self._nothing)

    async def abandoned(self) -> None:
        await self._settle("client_gone", self._nothing)

    async def _nothing(self) -> None:
        return None

    async def spool(self, op: str, **fields: Any) -> None:
        SPOOLED.labels(op).inc()
        await self.sidecar.spool.append(entry(op, self.ident, user=self.user, feature=self.route.feature,
                                              metadata={"route": self.route.prefix}, **fields))


class FixedCharge(Charge):
    """Charged on admission; refunded once if the upstream fails."""

    @property
    def event_id(self) -> str | None:
        d = self.decision
        return d.event_id if d is not None and d.ok and not d.would else None

    async def succeeded(self) -> None:
        if self.status in self.route.refund_statuses:
            await self.failed(f"status {self.status}")
        else:
            await self._settle("ok", self._keep)

    async def abandoned(self) -> None:
        await self._settle("client_gone", self._keep)

    async def _keep(self) -> None:
        if self.redis_down:
            await self.spool("consume", units=1)

    async def failed(self, reason: str) -> None:
        async def refund() -> None:
            eid = self.event_id
            if eid is None:
                return
            meta = orjson.dumps({"reason": reason, "route": self.route.prefix})
            try:
                d = await self.sidecar.ctx.decider.refund(self.ident, eid, meta)
            except REDIS_DOWN:
                await self.spool("refund", event_id=eid)
                return
            except Problem as e:  # 503: the ledger is down and the charge already drained (charges.py)
                if e.status != 503:
                    raise
                await self.spool("refund", event_id=eid)
                return
            if d.ok:
                self.decision.remaining = d.remaining  # type: ignore[union-attr]

        await self._settle("refunded", refund)


class LLMCharge(Charge):
    """A hold of prompt + max_tokens, committed from the usage the upstream reports."""

    def __init__(self, sidecar: Sidecar, route: RouteConfig, ident: Identity, user: str, kind: str,
                 body: dict[str, Any]) -> None:
        super().__init__(sidecar, route, ident, user)
        self.kind = kind
        self.prompt = 0
        self.most = 0  # tokens the call may use at most (the hold, in tokens)
        self.lowered: int | None = None
        self.drop_usage_only = False
        self.body = b""
        self.sse: metering.SSEMeter | None = None
        self._json = bytearray()
        self._json_over = False
        self.charged_tokens: int | None = None
        self.source = ""

    @property
    def rid(self) -> str | None:
        d = self.decision
        return d.event_id if d is not None and d.ok and not d.would else None

    @property
    def unit(self) -> int:
        assert self.route.feature is not None
        return self.sidecar.config.features[self.route.feature].cost

    def headers(self) -> dict[str, str]:
        h = super().headers()
        if self.lowered is not None:
            h["X-Quota-Max-Tokens"] = str(self.lowered)
        return h

    def start(self, sse: bool) -> None:
        self.rewrites = True  # the commit lands before the client sees the end of the answer
        if sse:
            self.sse = metering.SSEMeter(drop_usage_only=self.drop_usage_only)

    def feed(self, chunk: bytes) -> bytes:
        if self.sse is not None:
            return self.sse.feed(chunk)
        if not self._json_over:
            if len(self._json) + len(chunk) > MAX_JSON_RESPONSE:
                self._json_over = True
                self._json.clear()
            else:
                self._json += chunk
        return chunk

    def flush(self) -> bytes:
        return self.sse.flush() if self.sse is not None else b""

    def _produced(self) -> int:
        """Tokens the call used: the upstream's usage, else an estimate from what was relayed."""
        if self.sse is not None:
            total = metering.usage_total(self.sse.usage)
            if total is not None:
                self.source = "usage"
                return total
            self.source = "streamed_chunks"
            return self.prompt + self.sse.completion_chunks
        if self._json_over:  # too large to read the usage in it: as much as it was allowed
            self.source = "over_limit"
            return self.most
        try:
            obj = orjson.loads(self._json) if self._json else None
        except orjson.JSONDecodeError:
            obj = None
        total = metering.usage_total(obj.get("usage")) if isinstance(obj, dict) else None
        if total is not None:
            self.source = "usage"
            return total
        self.source = "estimate"
        text = ""
        if isinstance(obj, dict):
            for ch in obj.get("choices") or []:
                if isinstance(ch, dict):
                    msg = ch.get("message")
                    text += (msg.get("content") or "") if isinstance(msg, dict) else (ch.get("text") or "")
        return self.prompt + metering.text_tokens(text)

    async def _commit(self) -> None:
        tokens = self._produced()
        self.charged_tokens = tokens
        if self.redis_down:
            await self.spool("consume", units=tokens)
            return
        rid = self.rid
        if rid is None:  # shadow let a refused call through: nothing was held
            return
        meta = orjson.dumps({"route": self.route.prefix, "tokens": tokens, "source": self.source,
                             "status": self.status, "prompt_estimate": self.prompt})
        try:
            # beyond the hold: the upstream did the work, whatever the estimate said
            d = await self.sidecar.ctx.decider.commit(self.ident, rid, tokens * self.unit, meta, beyond_hold=True)
        except REDIS_DOWN:
            await self.spool("commit", rid=rid, units=tokens * self.unit)
            return
        overage = d.extra.get("overage", 0) if d.ok else 0
        if overage:
            OVERAGE.labels(self.route.prefix).inc(overage)
            log.warning("%s: usage %d beyond what org %s could pay; %d uncharged (commit %s)",
                        self.route.prefix, tokens * self.unit, self.ident.org_id, overage, d.event_id)
        if d.status == 404:  # the hold expired before the answer ended: charge it plainly
            await self._consume_after_expiry(rid, tokens, meta)

    async def _consume_after_expiry(self, rid: str, tokens: int, meta: bytes) -> None:
        """The usage of a call whose hold expired, as a consume; when the balance no longer
        covers all of it, what is left is charged and the rest recorded as overage (as commit does)."""
        from .spool import consume_unlimited

        decider, feature = self.sidecar.ctx.decider, self.route.feature or ""
        d = await consume_unlimited(decider, self.ident, feature, tokens, self.user, f"commit:{rid}", meta)
        if d.status != 402 or self.unit <= 0 or d.remaining <= 0:
            return
        part = min(tokens - 1, d.remaining // self.unit)
        if part <= 0:
            return
        overage = (tokens - part) * self.unit
        meta = orjson.dumps({**orjson.loads(meta), "requested": tokens * self.unit, "overage": overage})
        d = await consume_unlimited(decider, self.ident, feature, part, self.user, f"commit:{rid}:part", meta)
        if d.ok:
            OVERAGE.labels(self.route.prefix).inc(overage)

    async def _release(self) -> None:
        rid = self.rid
        if rid is None or self.redis_down:
            return
        try:
            d = await self.sidecar.ctx.decider.release(self.ident, rid)
        except REDIS_DOWN:
            return  # the hold expires by itself after reservation_ttl_s
        if d.ok and self.decision is not None:
            self.decision.remaining = d.remaining

    async def succeeded(self) -> None:
        if self.status >= 400:
            self._produced()
            if self.status in self.route.refund_statuses or self.source != "usage":
                await self._settle("released", self._release)
                return
        await self._settle("ok", self._commit)

    async def failed(self, reason: str) -> None:
        await self._settle("released", self._release)

    async def abandoned(self) -> None:
        await self._settle("client_gone", self._commit)


class Endpoint:
    """The ASGI endpoint of one configured route (raw ASGI: the proxy streams and watches
    for the client going away itself)."""

    def __init__(self, route: RouteConfig, headers: list[tuple[str, str]]) -> None:
        self.route = route
        self.headers = headers  # the route's own, resolved (credentials: never logged)

    def __repr__(self) -> str:
        return f"Endpoint({self.route.prefix!r})"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        request = Request(scope, receive)
        await request.app.state.sidecar.handle(self.route, request, send, self.headers)


async def authorize(request: Request) -> Response:
    """nginx auth_request / Envoy ext_authz: decide for X-Original-Method X-Original-URI, or
    (Envoy's HTTP ext_authz, `path_prefix: /v1/authorize`) for the method and path it is called with.

    Allowed: 200 with the quota headers and the org (and user) in the configured headers, for
    nginx to pass upstream. Refused: the problem with its status (Envoy forwards it as is);
    nginx turns statuses other than 401/403 into 500, so the answer also carries
    X-Quota-Status and X-Quota-Problem for examples/nginx.conf to rebuild the refusal.
    """
    sidecar: Sidecar = request.app.state.sidecar
    c = sidecar.ctx
    uri = request.headers.get("x-original-uri")
    rest = request.path_params.get("rest")
    if not uri and rest is not None:  # Envoy ext_authz: path_prefix + the original path, same method
        uri = "/" + rest
    if not uri:
        raise invalid("X-Original-URI: required (the URI of the request being authorized)", status=400)
    method = request.headers.get("x-original-method", request.method if rest is not None else "GET").upper()
    path = urlsplit(uri).path or "/"
    route = sidecar.match(path)
    try:
        if route is None:  # only a caller with a key learns which routes exist
            await c.keys.authenticate(request, "consume")
            raise Problem(404, "not_found", f"no route for {path}")
        ident, redis_down = await sidecar.authenticate(request, route)
        user = c.user(ident, sidecar.claimed_user(request), request)
        headers = {k.decode(): v.decode() for k, v in sidecar.who(ident, user)}
        if route.metering == "none":
            return json_response({"allowed": True}, headers=headers)
        assert route.feature is not None
        d = None
        if not redis_down:
            try:
                if route.metering == "fixed":
                    meta = orjson.dumps({"route": route.prefix, "method": method, "via": "authorize"})
                    d = await c.decider.consume(ident, route.feature, 1, user, None, meta, sidecar.shadow(route))
                else:  # LLM usage cannot be measured from here: check that the org can pay at all
                    d = await c.decider.check(ident, route.feature, 1, user)
            except REDIS_DOWN:
                if not sidecar.fail_open(route):
                    raise unavailable() from None
        if d is None:  # fail open: allow, and spool what a fixed route costs
            if route.metering == "fixed":
                charge = FixedCharge(sidecar, route, ident, user)
                charge.redis_down = True
                await charge._keep()
            headers["X-Quota-Degraded"] = "fail-open"
            return json_response({"allowed": True}, headers=headers)
        if not d.ok:
            raise d.problem()
        headers.update(d.headers())
        if d.event_id and route.metering == "fixed" and not d.would:
            headers["X-Quota-Event"] = d.event_id
        return json_response({"allowed": True, "cost": d.cost, "remaining": d.remaining}, headers=headers)
    except Problem as p:
        body = {"type": f"https://quota-gw.dev/problems/{p.code}", "status": p.status, "code": p.code,
                "detail": p.detail}
        p.headers = {**p.headers, "X-Quota-Status": str(p.status),
                     "X-Quota-Problem": json.dumps(body, ensure_ascii=True, separators=(",", ":"))}
        raise


def routes(config: Any) -> list[Route]:
    """The decision-service authorize route, then one route per configured prefix (longest
    first), after the API so they never shadow it."""
    out = [Route("/v1/authorize", authorize, methods=["GET", "POST", "HEAD"]),
           Route("/v1/authorize/{rest:path}", authorize, methods=METHODS)]
    # ${ENV} in route headers is read here, when the app is built: a missing variable is a
    # ConfigError and the gateway does not start.
    resolved = config_mod.resolve_route_headers(config)
    order = sorted(range(len(config.routes)), key=lambda i: len(config.routes[i].prefix), reverse=True)
    for i in order:
        r = config.routes[i]
        out.append(Route(r.prefix.rstrip("/") + "{rest:path}", Endpoint(r, resolved[i]), methods=METHODS))
    return out
