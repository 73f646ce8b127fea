"""The Sidecar: what every proxied call shares, and one call from request to settlement.

A call is matched to its route (routing.py), authenticated, charged or held (admission.py),
forwarded over the pool and streamed back (forwarding.py, pool.py), and settled once
(settling.py). With Redis down, a fail-open route reads the key from Postgres
(KeyStore.authenticate_from_postgres) and its usage goes to the spool (spool.py), which a
task of the Sidecar replays when Redis answers again.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable

from starlette.types import Receive, Scope, Send

from .. import metering, metrics
from ..api import Context
from ..auth import bearer_token
from ..config import Route as RouteConfig
from ..decisions import Identity
from ..problems import Problem
from ..redis_errors import REDIS_DOWN
from ..spool import Spool, replay_forever
from . import pool
from .admission import admit, hold, store_down
from .forwarding import forward, read_body
from .headers import Headers, route_keys
from .routing import RouteTable, target
from .settling import Charge

DEFAULT_KEEPALIVE_S = 4.0


class Sidecar:
    """What every proxied call shares: the routes, the upstream pool and the spool."""

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.config = ctx.config
        self.table = RouteTable(ctx.config)
        self.headers = Headers(ctx.config.behaviour)
        # One folder per key prefix: a replayer must only replay into the Redis it was spooled for.
        spool_dir = os.environ.get("QUOTA_GW_SPOOL_DIR") or ctx.config.behaviour.spool_dir
        self.spool = Spool(os.path.join(spool_dir, ctx.decider.layout.prefix))
        # One connection pool per upstream keep-alive setting.
        self.pools: dict[float, pool.Pool] = {}
        self._replayer: asyncio.Task[None] | None = None

    @property
    def routes(self) -> list[RouteConfig]:
        return self.table.routes

    async def start(self) -> None:
        for keepalive in {r.upstream_keepalive_s for r in self.routes} or {DEFAULT_KEEPALIVE_S}:
            self.pools[keepalive] = pool.Pool(keepalive)
        self._replayer = asyncio.create_task(replay_forever(self.spool, self.ctx.decider), name="spool-replay")

    async def stop(self) -> None:
        if self._replayer is not None:
            self._replayer.cancel()
            try:
                await self._replayer
            except asyncio.CancelledError:
                pass
        self.spool.rotate()
        for p in self.pools.values():
            await p.close()

    def known(self, key: str | None) -> tuple[Identity, bool] | None:
        """identify()'s answer when the key cache holds the key, without a coroutine (most calls:
        three awaits cost as much as the lookup); None: await identify()."""
        ident = self.ctx.keys.cached(key, "consume")
        return None if ident is None else (ident, False)

    async def identify(self, key: str | None, route: RouteConfig) -> tuple[Identity, bool]:
        """(identity, redis_down) of a bearer key. With Redis down, a fail-open route reads the
        key from Postgres."""
        keys = self.ctx.keys
        try:
            return await keys.authenticate_key(key, "consume"), False
        except REDIS_DOWN:
            if not self.table.fail_open(route):
                raise store_down() from None
            metrics.REDIS_ERRORS.inc()
        return await keys.authenticate_key_from_postgres(key, "consume"), True

    async def handle(self, route: RouteConfig, scope: Scope, receive: Receive, send: Send,
                     route_headers: list[tuple[str, str]], route_keys: frozenset[str]) -> None:
        """One proxied call, from the raw ASGI scope (a Starlette Request is not built: the
        headers are read once, by Incoming)."""
        path, method = scope["path"], scope["method"]
        url = target(route, path, scope.get("query_string") or b"")
        seen = self.headers.incoming(scope)
        key = bearer_token(seen.authorization)
        ident, redis_down = self.known(key) or await self.identify(key, route)
        user = self.ctx.user_of(ident, self.headers.claimed_of(seen.claimed), seen.user)
        body = await read_body(receive, method, seen.framed)
        api = metering.METERINGS.get(route.metering)
        endpoint = api.endpoint(path) if api is not None and method == "POST" else None
        headers = self.headers.upstream(scope, seen, ident, user, route_headers, route_keys,
                                        metered=endpoint is not None)
        charge: Charge
        if route.metering == "none":
            charge = Charge(self, route, ident, user)
        elif api is not None and endpoint is not None:
            llm = await hold(self, route, ident, user, api, endpoint, body, redis_down)
            charge, body = llm, llm.body
        elif api is not None:  # GET /v1/models and the like on an LLM route: not metered
            if method in ("POST", "PUT", "PATCH"):
                # work the gateway cannot meter (/v1/responses, audio, images...) is not forwarded free
                raise Problem(404, "not_found", f"{method} {path}: an {api.name} route meters "
                              f"{', '.join(api.endpoints)} only; give this path its own route "
                              "(metering: fixed or none)")
            charge = Charge(self, route, ident, user)
        else:
            charge = await admit(self, route, ident, user, method, redis_down)
        await forward(self.pools[route.upstream_keepalive_s], route, method, receive, send, url, headers, body,
                      charge)


class Endpoint:
    """The ASGI endpoint of one configured route (raw ASGI: the proxy streams and watches
    for the client going away itself)."""

    def __init__(self, route: RouteConfig, headers: list[tuple[str, str]]) -> None:
        self.route = route
        self.headers = headers  # the route's own, resolved (credentials: never logged)
        self.keys = route_keys(headers)

    def __repr__(self) -> str:
        return f"Endpoint({self.route.prefix!r})"

    def __call__(self, scope: Scope, receive: Receive, send: Send) -> Awaitable[None]:
        # the handler's coroutine itself, not one around it: each level is passed again on every resume
        return scope["app"].state.sidecar.handle(self.route, scope, receive, send, self.headers, self.keys)
