"""The gateway application: routes, shared state and error rendering."""

from __future__ import annotations

import contextlib
import functools
import gc
import logging
import os
from collections.abc import AsyncIterator, Awaitable, Iterator
from typing import Any

from redis.exceptions import RedisClusterException, RedisError
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import BaseRoute, Match, Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from . import admin_reads  # GET /v1/admin/orgs, /v1/admin/worker
from . import account, admin, api, db, metrics, openapi, redis_policy, sidecar
from . import cluster, scripts  # a single Redis or a cluster; the scripts on every primary
from . import alerts_admin, purchases  # /v1/purchases, /v1/webhooks/stripe; the alerts' webhook
from . import activity, pages  # the dashboards (pages.py) and the ops page's per-minute activity
from .api import Context, json_response
from .auth import KeyStore
from .config import Config
from .decisions import Decider
from .layout import Layout
from .problems import Problem, problem_body, problem_response
from .store import record_low_balance_mark

log = logging.getLogger("quota_gw")


redis_client = cluster.node_client  # a single Redis; `cluster.connect` also detects a cluster


async def healthz(request: Request) -> Response:
    return PlainTextResponse("ok")


async def readyz(request: Request) -> Response:
    """Ready when Redis answers and its eviction policy is safe: decisions need nothing else.
    Postgres is reported but does not fail it (a load balancer would otherwise take every
    replica out during a ledger outage while decisions keep working)."""
    c: Context = request.app.state.ctx
    out: dict[str, Any] = {}
    ready = True
    try:
        await cluster.ping(c.decider.redis)
        out["redis"] = "ok"
    except Exception as e:  # noqa: BLE001 - any failure means not ready
        out["redis"] = f"down: {e}"
        ready = False
    if out["redis"] == "ok":
        policy = await redis_policy.read(c.decider.redis)
        out["redis_maxmemory_policy"] = policy
        if not redis_policy.safe(policy):
            if redis_policy.allowed(c.config):
                out["warning"] = f"maxmemory-policy {policy} may evict balances (allowed by allow_evicting_redis)"
            else:
                out["redis"] = f"unsafe: maxmemory-policy {policy} may evict balances (needs noeviction)"
                ready = False
    if c.db is not None:
        try:
            await c.db.ping()
            out["postgres"] = "ok"
        except Problem as e:
            out["postgres"] = f"down: {e.detail}"
    return json_response({"ready": ready, **out}, 200 if ready else 503)


async def on_problem(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, Problem)
    return problem_response(exc)


async def on_http(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    code = {401: "unauthorized", 403: "forbidden", 404: "not_found"}.get(exc.status_code, "invalid_request")
    headers = exc.headers
    if exc.status_code == 405:  # Starlette names the first route's methods; a path can have several routes
        headers = {**(headers or {}), "Allow": ", ".join(allowed_methods(request))}
    return Response(problem_body(exc.status_code, code, str(exc.detail)), status_code=exc.status_code,
                    media_type="application/problem+json", headers=headers)


def allowed_methods(request: Request) -> list[str]:
    methods: set[str] = set()
    for route in request.app.routes:
        if isinstance(route, Route) and route.matches(request.scope)[0] != Match.NONE:
            methods |= route.methods or set()
    return sorted(methods)


async def on_redis_down(request: Request, exc: Exception) -> Response:
    """Any Redis error (down, timeout, a cluster mid-failover, a redirect that could not be
    followed) is 503 with Retry-After, never 500: nothing was charged that the caller sees."""
    metrics.REDIS_ERRORS.inc()
    log.warning("redis unavailable: %s: %s", type(exc).__name__, exc)
    return Response(problem_body(503, "unavailable", "the quota store is unavailable; nothing was charged"),
                    status_code=503, media_type="application/problem+json", headers={"Retry-After": "1"})


async def on_client_gone(request: Request, exc: Exception) -> Response:
    """The client hung up before its body arrived: nothing was decided or charged, and nobody is
    left to read the answer. A 400 for the access log, not a 500 with a traceback."""
    return Response(problem_body(400, "invalid_request", "the client closed the connection before its body arrived"),
                    status_code=400, media_type="application/problem+json")


async def on_error(request: Request, exc: Exception) -> Response:
    log.exception("unhandled error on %s %s", request.method, request.url.path)
    return Response(problem_body(500, "internal", "internal error"), status_code=500,
                    media_type="application/problem+json")


class Gateway(Starlette):
    """Starlette, with two shortcuts past its router, which tries every route's pattern in
    order (~40 before a proxy route) and wraps each request in per-request closures:

    - The routes that are plain ASGI apps with an `answer` (api.DecisionRoute: POST /v1/check
      and /v1/consume; sidecar.Authorize: /v1/authorize) are answered before the router and the
      middleware: that work cost as much CPU as a third of a decision route's own. An error
      they raise is rendered by the app's own middleware stack (its innermost app re-raises
      it), so a Problem, a Redis error or a crash is answered and logged exactly as on any
      other route.
    - A path under a prefix route (a configured proxy prefix, sidecar.PrefixRoute; authorize's
      path form) goes to that route without the walk, unless a route listed before it matches
      too (found once, here: only the routes whose pattern could fall under the prefix are
      asked; a prefix route whose literal start the path lacks is not asked at all). Its app
      is called directly (in `__call__`; not Route.handle, whose method check a full match has
      passed already): the middleware's two layers of wrappers, around
      the call and around each message sent, cost ~15 µs a proxied call; an error goes through
      the middleware as it would have. (With a middleware added to the app, the call goes
      through the stack.)

    Anything else (another method, a root_path, a path no shortcut knows) goes through
    Starlette as usual; every shortcut picks the route Starlette would."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        routes = self.router.routes
        # exact path -> {method: endpoint}, for methods no earlier route takes
        self.direct: dict[str, dict[str, Any]] = {}
        # (prefix route, the earlier routes that may match a path under it, the literal start of
        # every path it matches: a path without it is not asked), in route order
        self.prefixed: list[tuple[Route, list[BaseRoute], str]] = []
        for i, r in enumerate(routes):
            if not isinstance(r, Route):
                continue
            if isinstance(r, sidecar.PrefixRoute) or (hasattr(r.endpoint, "answer") and r.path.endswith("{rest:path}")):
                self.prefixed.append((r, [g for g in routes[:i] if not _is_prefixed(g) and _may_match_under(g, r)],
                                      r.path.split("{", 1)[0]))
            elif hasattr(r.endpoint, "answer") and not r.param_convertors:
                for method in r.methods or ():
                    probe = {"type": "http", "path": r.path, "method": method, "root_path": ""}
                    if not any(g.matches(probe)[0] == Match.FULL for g in routes[:i]):
                        self.direct.setdefault(r.path, {})[method] = r.endpoint
        self._stack: ASGIApp | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("root_path"):
            await super().__call__(scope, receive, send)
            return
        path = scope["path"]
        endpoint = self.direct.get(path)
        if endpoint is not None:
            endpoint = endpoint.get(scope["method"])
        if endpoint is not None:  # (answered here, not a level below: each level is passed again on every resume)
            scope["app"] = self
            try:
                start, body = await endpoint.answer(scope, receive)
            except Exception as e:  # noqa: BLE001 - rendered (or re-raised) as Starlette would
                scope[_DIRECT] = functools.partial(_reraise, e)
                await self._middleware()(scope, receive, send)
                return
            await send(start)
            await send(body)
            return
        for route, guards, literal in self.prefixed:
            if not path.startswith(literal):
                continue
            match, child = route.matches(scope)
            if match is Match.NONE:
                continue
            if match is Match.FULL and not (guards and any(g.matches(scope)[0] is Match.FULL for g in guards)):
                scope["app"] = self
                scope.setdefault("router", self.router)
                scope["route"] = route
                scope.update(child)
                # The route's app (Route.handle would first check the method, which FULL means is
                # allowed), called as the router would call it, without the middleware's wrappers
                # around it and around each message it sends; an error it raises goes through the
                # middleware stack as it would have (before the answer started: rendered; after:
                # re-raised). Here, not in a method: each level is passed again on every resume.
                if self.user_middleware:
                    scope[_DIRECT] = route.app
                    await self._middleware()(scope, receive, send)
                    return
                started = False

                def sending(message: Message) -> Awaitable[None]:  # send's own coroutine: no level around it
                    nonlocal started
                    started = True
                    return send(message)

                try:
                    await route.app(scope, receive, sending)
                except Exception as e:  # rendered (or re-raised) as Starlette would
                    if started:
                        raise
                    scope[_DIRECT] = functools.partial(_reraise, e)
                    await self._middleware()(scope, receive, send)
                return
            break  # a 405, or an earlier route's path: the router says which
        await super().__call__(scope, receive, send)

    def _middleware(self) -> ASGIApp:
        """The app's middleware stack as Starlette builds it, its innermost app (the router)
        replaced by one that calls the app the shortcut put in the scope."""
        if self._stack is None:
            stack = self.build_middleware_stack()
            outer = stack
            while outer.app is not self.router:  # type: ignore[attr-defined]
                outer = outer.app  # type: ignore[attr-defined]
            outer.app = _call_direct  # type: ignore[attr-defined]
            self._stack = stack
        return self._stack


_DIRECT = "quota_gw.direct"


async def _call_direct(scope: Scope, receive: Receive, send: Send) -> None:
    await scope.pop(_DIRECT)(scope, receive, send)


async def _reraise(error: Exception, scope: Scope, receive: Receive, send: Send) -> None:
    raise error


def _is_prefixed(route: BaseRoute) -> bool:
    return isinstance(route, sidecar.PrefixRoute) or (
        isinstance(route, Route) and hasattr(route.endpoint, "answer") and route.path.endswith("{rest:path}"))


def _may_match_under(route: BaseRoute, prefixed: Route) -> bool:
    """Whether `route` may match a path `prefixed` matches (erring towards yes)."""
    fmt = getattr(route, "path_format", None)
    if not isinstance(fmt, str):  # a Host, say: anything
        return True
    if "{" not in fmt:  # one exact path
        return prefixed.matches({"type": "http", "path": fmt, "method": "GET", "root_path": ""})[0] != Match.NONE
    head = fmt.split("{", 1)[0]
    under = prefixed.prefix if isinstance(prefixed, sidecar.PrefixRoute) else prefixed.path.split("{", 1)[0]
    return head.startswith(under) or under.startswith(head)


AUTHORIZE_LISTEN_ENV = "QUOTA_GW_AUTHORIZE_LISTEN"  # HOST:PORT; `quota-gw serve --authorize-port` sets it


def listen_address(value: str) -> tuple[str, int]:
    """(host, port) of 'HOST:PORT' ('[::1]:8081' for IPv6); ValueError says what is wrong."""
    host, sep, port = value.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host or not (port.isascii() and port.isdigit()) or not 1 <= int(port) <= 65535:
        raise ValueError(f"{AUTHORIZE_LISTEN_ENV}={value!r}: not HOST:PORT (e.g. 127.0.0.1:8081; port 1..65535)")
    return host, int(port)


# A young collection after this many new container objects, not CPython's 700: a proxied call
# makes a few hundred (coroutines, frames, futures, headers), nearly all freed by their last
# reference within the call, so at 700 the collector ran every few calls and walked the calls
# in flight each time (~10% of a call's CPU, docs/benchmarks.md "Sidecar, round 5").
GC_YOUNG_THRESHOLD = 7000


@contextlib.contextmanager
def steady_gc() -> Iterator[None]:
    """While the app serves: what start-up built (modules, config, routes, the scripts) is
    frozen out of the collector's walks (gc.freeze: a full collection no longer visits it), and
    young collections wait for GC_YOUNG_THRESHOLD new objects. Both undone at shutdown, so an
    app stopped in a longer-lived process (tests, embedding) leaves the collector as it was and
    its own objects collectable."""
    old = gc.get_threshold()
    gc.collect()  # garbage made at start-up is collected first, not frozen
    gc.freeze()
    gc.set_threshold(max(old[0], GC_YOUNG_THRESHOLD), *old[1:])
    try:
        yield
    finally:
        gc.set_threshold(*old)
        gc.unfreeze()


def keep_alive_s() -> float:
    """How long idle client connections stay open: `quota-gw serve --timeout-keep-alive`, which
    it passes to its worker processes as $QUOTA_GW_TIMEOUT_KEEP_ALIVE (uvicorn's 75 s default
    otherwise, longer than nginx keeps idle upstream connections)."""
    try:
        return float(os.environ.get("QUOTA_GW_TIMEOUT_KEEP_ALIVE") or 75)
    except ValueError:
        return 75.0


def create_app(config: Config, redis_url: str | None = None, database_url: str | None = None,
               prefix: str | None = None, extra_routes: list[Any] | None = None,
               authorize_listen: str | None = None) -> Starlette:
    """`authorize_listen` (default $QUOTA_GW_AUTHORIZE_LISTEN): HOST:PORT of a second listener for
    /v1/authorize alone (sidecar/listener.py), started and stopped with the app."""
    redis_url = redis_url or os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
    authorize_listen = authorize_listen or os.environ.get(AUTHORIZE_LISTEN_ENV) or None
    # A bad value fails here, not when the app starts.
    listen = listen_address(authorize_listen) if authorize_listen else None
    database_url = database_url if database_url is not None else os.environ.get("DATABASE_URL")
    prefix = prefix or os.environ.get("QUOTA_GW_PREFIX", "qgw")

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        r = await cluster.connect(redis_url)
        await redis_policy.check_at_start(r, config)
        await scripts.load_everywhere(r)
        # Connects on first use; then records the config's low-balance mark for the views (store.py).
        pool = db.Database(database_url, on_connect=functools.partial(
            record_low_balance_mark, percent=config.low_balance_mark)) if database_url else None
        layout = Layout(prefix, config.shards)
        decider = Decider(r, config, layout, ledger=pool)
        keys = KeyStore(r, layout, pool, config.behaviour.key_cache_s)
        app.state.ctx = Context(config, decider, keys, pool)
        app.state.sidecar = sidecar.Sidecar(app.state.ctx)  # proxy routes, /v1/authorize, the spool
        await app.state.sidecar.start()
        listener = None
        try:
            if listen:  # /v1/authorize alone, for nginx (sidecar/listener.py)
                b = config.behaviour
                listener = sidecar.Listener(app, max_head_bytes=b.max_header_bytes, max_headers=b.max_headers,
                                            max_body_bytes=b.max_body_bytes, keepalive_s=keep_alive_s())
                await listener.start(*listen, shared=int(os.environ.get("QUOTA_GW_WORKERS") or 1) > 1)
                app.state.authorize_listener = listener
            with steady_gc():
                yield
        finally:
            if listener is not None:
                await listener.close()
            await app.state.sidecar.stop()
            await decider.aclose()
            await r.aclose()
            if pool is not None:
                await pool.close()

    routes = [
        Route("/healthz", healthz),
        Route("/readyz", readyz),
        Route("/metrics", metrics.endpoint),
        Route("/openapi.json", openapi.endpoint),
        *api.routes,
        *sidecar.authorize_routes,  # GET /v1/authorize (nginx auth_request, Envoy ext_authz)
        *admin.routes,
        *purchases.routes, *alerts_admin.routes,
        *admin_reads.routes,
        *account.routes,  # usage, analytics, admin top: from the Postgres ledger
        *pages.routes, *activity.routes,  # GET /dashboard, /ops, dashboard links; GET /v1/admin/activity
        *(extra_routes or []),
        *sidecar.routes(config),  # last: a configured prefix never shadows the API
    ]
    return Gateway(routes=routes, lifespan=lifespan, exception_handlers={
        Problem: on_problem,
        HTTPException: on_http,
        ClientDisconnect: on_client_gone,
        RedisError: on_redis_down,
        RedisClusterException: on_redis_down,
        Exception: on_error,
    })
