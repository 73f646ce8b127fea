"""`/v1/authorize`: the decision for a proxy in front (nginx auth_request, Envoy ext_authz).

The route the original URI matches decides: a fixed route is charged here, an LLM route is
only checked (its usage needs the sidecar in the request path), a `none` route only
authenticated. Allowed: 200 with the quota headers and the org (and user) in the configured
headers, for the proxy to pass upstream. Refused: the problem with its status (Envoy forwards
it as is); nginx turns statuses other than 401/403 into 500, so the answer also carries
X-Quota-Status and X-Quota-Problem (the problem body as one line) for examples/nginx.conf to
rebuild the refusal.

Every proxied call in front of nginx pays for this route, so it is a plain ASGI app like
check and consume (api.DecisionRoute): app.Gateway answers it before Starlette's router and
middleware, it reads its headers from the scope in one pass and builds its answer itself,
byte for byte what a Response would send (tests/test_direct_routes.py).
"""

from __future__ import annotations

from collections.abc import Coroutine
from typing import Any
from urllib.parse import urlsplit

import orjson
from starlette.types import Receive, Scope, Send

from ..api import Context, json_messages
from ..auth import bearer_token
from ..problems import Problem, invalid, problem_line
from ..redis_errors import REDIS_DOWN
from .admission import store_down
from .core import Sidecar
from .settling import FixedCharge


class Authorize:
    """The ASGI app of both paths: `/v1/authorize` (X-Original-Method and X-Original-URI say
    what to decide for) and `/v1/authorize/{rest}` (Envoy's HTTP ext_authz, `path_prefix:
    /v1/authorize`: the original path, with the method it is called with)."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        start, body = await self.answer(scope, receive)
        await send(start)
        await send(body)

    @staticmethod
    def answer(scope: Scope, receive: Receive) -> Coroutine[Any, Any, tuple[dict[str, Any], dict[str, Any]]]:
        """The two ASGI messages of the answer (nothing is sent: an error raised here can still
        be answered by the app's handlers). authorize() itself, not awaited here: every await
        level is passed again each time the decision resumes."""
        return authorize(scope)


def uri_path(uri: str) -> str:
    """urlsplit(uri).path, without urlsplit for the usual origin-form URI (urlsplit's cache
    holds 128 URIs; query strings make most of them new)."""
    if uri[:1] == "/" and uri[1:2] != "/" and "\t" not in uri and "\r" not in uri and "\n" not in uri:
        return uri.split("#", 1)[0].split("?", 1)[0]
    return urlsplit(uri).path


def charge_metadata(prefix: str, method: str) -> bytes:
    """A fixed route's charge metadata: the same for every call of a (route, method), so made once."""
    meta = _METADATA.get((prefix, method))
    if meta is None:
        meta = orjson.dumps({"route": prefix, "method": method, "via": "authorize"})
        if len(_METADATA) >= 1024:  # the method is the caller's to choose: bounded
            _METADATA.clear()
        _METADATA[(prefix, method)] = meta
    return meta


_METADATA: dict[tuple[str, str], bytes] = {}


async def authorize(scope: Scope) -> tuple[dict[str, Any], dict[str, Any]]:
    """The ASGI messages of an allowed call; a refusal is raised (a Problem)."""
    sidecar: Sidecar = scope["app"].state.sidecar
    params = scope.get("path_params")
    rest: str | None = params.get("rest") if params else None
    c: Context = sidecar.ctx
    uri = method = authorization = user_header = None
    for name, value in scope["headers"]:  # the first of each, as Starlette's Headers.get
        if name == b"x-original-uri":
            if uri is None:
                uri = value.decode("latin-1")
        elif name == b"x-original-method":
            if method is None:
                method = value.decode("latin-1")
        elif name == b"authorization":
            if authorization is None:
                authorization = value.decode("latin-1")
        elif name == c.user_header and user_header is None:
            user_header = value.decode("latin-1")
    if not uri and rest is not None:  # Envoy ext_authz: path_prefix + the original path, same method
        uri = "/" + rest
    if not uri:
        raise invalid("X-Original-URI: required (the URI of the request being authorized)", status=400)
    method = (method if method is not None else scope["method"] if rest is not None else "GET").upper()
    path = uri_path(uri) or "/"
    route = sidecar.table.match(path)
    key = bearer_token(authorization)
    try:
        if route is None:  # only a caller with a key learns which routes exist
            await c.keys.authenticate_key(key, "consume")
            raise Problem(404, "not_found", f"no route for {path}")
        ident, redis_down = sidecar.known(key) or await sidecar.identify(key, route)
        user = c.user_of(ident, sidecar.headers.claimed(scope["headers"]), user_header)
        headers = sidecar.headers.who(ident, user)
        if route.metering == "none":
            return json_messages(200, {"allowed": True}, headers)
        assert route.feature is not None
        d = None
        if not redis_down:
            try:
                if route.metering == "fixed":
                    d = await c.decider.consume(ident, route.feature, 1, user, None, charge_metadata(route.prefix, method),
                                                sidecar.table.shadow(route))
                else:  # LLM usage cannot be measured from here: check that the org can pay at all
                    d = await c.decider.check(ident, route.feature, 1, user)
            except REDIS_DOWN:
                if not sidecar.table.fail_open(route):
                    raise store_down() from None
        if d is None:  # fail open: allow, and spool what a fixed route costs
            if route.metering == "fixed":
                charge = FixedCharge(sidecar, route, ident, user)
                charge.redis_down = True
                await charge.keep()
            headers["X-Quota-Degraded"] = "fail-open"
            return json_messages(200, {"allowed": True}, headers)
        if not d.ok:
            raise d.problem()
        headers.update(d.headers())
        if d.event_id and route.metering == "fixed" and not d.would:
            headers["X-Quota-Event"] = d.event_id
        return json_messages(200, {"allowed": True, "cost": d.cost, "remaining": d.remaining}, headers)
    except Problem as p:
        p.headers = {**p.headers, "X-Quota-Status": str(p.status), "X-Quota-Problem": problem_line(p)}
        raise
