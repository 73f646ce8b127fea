"""The gateway application: routes, shared state and error rendering."""

from __future__ import annotations

import contextlib
import functools
import logging
import os
from collections.abc import AsyncIterator
from typing import Any

from redis.exceptions import RedisClusterException, RedisError
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Match, Route

from . import admin_reads  # GET /v1/admin/orgs, /v1/admin/worker
from . import account, admin, api, db, metrics, openapi, proxy, redis_policy
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


async def on_error(request: Request, exc: Exception) -> Response:
    log.exception("unhandled error on %s %s", request.method, request.url.path)
    return Response(problem_body(500, "internal", "internal error"), status_code=500,
                    media_type="application/problem+json")


def create_app(config: Config, redis_url: str | None = None, database_url: str | None = None,
               prefix: str | None = None, extra_routes: list[Any] | None = None) -> Starlette:
    redis_url = redis_url or os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
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
        decider = Decider(r, config, layout)
        keys = KeyStore(r, layout, pool, config.behaviour.key_cache_s)
        app.state.ctx = Context(config, decider, keys, pool)
        app.state.sidecar = proxy.Sidecar(app.state.ctx)  # proxy routes, /v1/authorize, the spool
        await app.state.sidecar.start()
        try:
            yield
        finally:
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
        *admin.routes,
        *purchases.routes, *alerts_admin.routes,
        *admin_reads.routes,
        *account.routes,  # usage, analytics, admin top: from the Postgres ledger
        *pages.routes, *activity.routes,  # GET /dashboard, /ops, dashboard links; GET /v1/admin/activity
        *(extra_routes or []),
        *proxy.routes(config),  # last: a configured prefix never shadows the API
    ]
    return Starlette(routes=routes, lifespan=lifespan, exception_handlers={
        Problem: on_problem,
        HTTPException: on_http,
        RedisError: on_redis_down,
        RedisClusterException: on_redis_down,
        Exception: on_error,
    })
