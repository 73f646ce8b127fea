"""The sidecar: configured routes forwarded to their upstream, charged and settled.

A proxied call is authenticated, decided in one Redis script, forwarded over a pooled
client of its own (pool.py, chosen by measurement, docs/benchmarks.md) and streamed back chunk by chunk;
each call then settles exactly once, by how it ended. One module per step:

| module          | what                                                                  |
|-----------------|-----------------------------------------------------------------------|
| `routing.py`    | which route a path belongs to (longest prefix, whole segments)        |
| `headers.py`    | which headers cross, in each direction                                |
| `admission.py`  | the charge before forwarding: a fixed cost, or an LLM hold            |
| `forwarding.py` | the request sent, the answer streamed back                            |
| `pool.py`       | the upstream connection pool, and the one case a request is resent    |
| `settling.py`   | commit, refund or release, once, by how the call ended                |
| `authorize.py`  | `/v1/authorize` for nginx auth_request and Envoy ext_authz            |
| `core.py`       | the Sidecar (shared state) and one call from request to settlement    |
| `listener.py`   | the optional second port for `/v1/authorize` alone (nginx), no uvicorn |

Shadow mode decides and records but never blocks (the answer says what would have happened
in `X-Quota-Shadow`). When Redis is down a `fail: closed` route answers 503 and forwards
nothing; a `fail: open` route forwards and writes the usage to the spool (spool.py).
LLM metering (what is held, where usage is read) is metering.py's, one class per API.
"""

from __future__ import annotations

from typing import Any

from starlette.routing import Route

from .. import config as config_mod
from .authorize import Authorize
from .core import Endpoint, Sidecar
from .listener import Listener
from .routing import PrefixRoute, longest_first

METHODS = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]

__all__ = ["Listener", "PrefixRoute", "Sidecar", "authorize_routes", "routes"]


# The decision-service route (nginx auth_request, Envoy ext_authz). Its paths are the API's
# own, so it goes with the API routes, not behind every one of them. A plain ASGI app, which
# app.Gateway answers before the router, as it does check and consume.
_authorize = Authorize()
authorize_routes = [Route("/v1/authorize", _authorize, methods=["GET", "POST", "HEAD"]),
                    Route("/v1/authorize/{rest:path}", _authorize, methods=METHODS)]


def routes(config: Any) -> list[PrefixRoute]:
    """One route per configured prefix (longest first), to go after the API so they never
    shadow it."""
    out = []
    # ${ENV} in route headers is read here, when the app is built: a missing variable is a
    # ConfigError and the gateway does not start.
    resolved = config_mod.resolve_route_headers(config)
    for i in longest_first(config.routes):
        r = config.routes[i]
        out.append(PrefixRoute(r.prefix, Endpoint(r, resolved[i]), methods=METHODS))
    return out
