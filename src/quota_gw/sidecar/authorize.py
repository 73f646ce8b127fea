"""`/v1/authorize`: the decision for a proxy in front (nginx auth_request, Envoy ext_authz).

The route the original URI matches decides: a fixed route is charged here, an LLM route is
only checked (its usage needs the sidecar in the request path), a `none` route only
authenticated. Allowed: 200 with the quota headers and the org (and user) in the configured
headers, for the proxy to pass upstream. Refused: the problem with its status (Envoy forwards
it as is); nginx turns statuses other than 401/403 into 500, so the answer also carries
X-Quota-Status and X-Quota-Problem (the problem body as one line) for examples/nginx.conf to
rebuild the refusal.
"""

from __future__ import annotations

from urllib.parse import urlsplit

import orjson
from starlette.requests import Request
from starlette.responses import Response

from ..api import json_response
from ..problems import Problem, invalid, problem_line
from ..redis_errors import REDIS_DOWN
from .admission import store_down
from .core import Sidecar
from .settling import FixedCharge


async def authorize(request: Request) -> Response:
    """nginx auth_request / Envoy ext_authz: decide for X-Original-Method X-Original-URI, or
    (Envoy's HTTP ext_authz, `path_prefix: /v1/authorize`) for the method and path it is called with."""
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
    route = sidecar.table.match(path)
    try:
        if route is None:  # only a caller with a key learns which routes exist
            await c.keys.authenticate(request, "consume")
            raise Problem(404, "not_found", f"no route for {path}")
        ident, redis_down = await sidecar.authenticate(request, route)
        user = c.user(ident, sidecar.headers.claimed_user(request), request)
        headers = sidecar.headers.who(ident, user)
        if route.metering == "none":
            return json_response({"allowed": True}, headers=headers)
        assert route.feature is not None
        d = None
        if not redis_down:
            try:
                if route.metering == "fixed":
                    meta = orjson.dumps({"route": route.prefix, "method": method, "via": "authorize"})
                    d = await c.decider.consume(ident, route.feature, 1, user, None, meta,
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
            return json_response({"allowed": True}, headers=headers)
        if not d.ok:
            raise d.problem()
        headers.update(d.headers())
        if d.event_id and route.metering == "fixed" and not d.would:
            headers["X-Quota-Event"] = d.event_id
        return json_response({"allowed": True, "cost": d.cost, "remaining": d.remaining}, headers=headers)
    except Problem as p:
        p.headers = {**p.headers, "X-Quota-Status": str(p.status), "X-Quota-Problem": problem_line(p)}
        raise
