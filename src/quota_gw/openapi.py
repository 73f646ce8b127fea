"""GET /openapi.json: the OpenAPI 3.1 document of the HTTP API (SPEC §4).

The document is kept in the repo as openapi.json, written for any deployment; this module
serves it with the running config's names and bounds filled in (features, meters, plans as
enums; the unit and TTL limits of `behaviour`), so a client or a fuzzer sees exactly what
this gateway accepts. tests/test_openapi.py checks that it lists every route the app has.
"""

from __future__ import annotations

import copy
import json
from functools import cache
from importlib import resources
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response

from .config import Config


@cache
def document() -> dict[str, Any]:
    """The document as kept in the repo (generic: names are patterns, bounds the defaults)."""
    return json.loads(resources.files(__package__).joinpath("openapi.json").read_text(encoding="utf-8"))


def for_config(config: Config) -> dict[str, Any]:
    doc = copy.deepcopy(document())
    s = doc["components"]["schemas"]
    s["FeatureName"]["enum"] = sorted(config.features)
    s["MeterName"]["enum"] = list(config.meter_names)
    s["PlanName"]["enum"] = sorted(config.plans)
    s["CreateOrg"]["properties"]["plan"]["default"] = config.default_plan
    b = config.behaviour
    units = {"maximum": b.max_units}
    for name in ("CheckRequest", "ConsumeRequest", "ReserveRequest"):
        s[name]["properties"]["units"].update(units)
    s["CommitRequest"]["properties"]["units"]["maximum"] = b.max_units * 1000
    s["ReserveRequest"]["properties"]["ttl_s"].update(maximum=b.max_reservation_ttl_s, default=b.reservation_ttl_s)
    p = doc["components"]["parameters"]
    p["UserHeader"]["name"] = b.user_header
    h = doc["components"]["headers"]
    h[b.org_header], h[b.user_header] = h.pop("X-Quota-Org"), h.pop("X-Quota-User")
    for path in doc["paths"].values():  # the identity headers authorize answers with
        for op in path.values():
            hs = op["responses"].get("200", {}).get("headers", {})
            if "X-Quota-Org" in hs:
                hs.pop("X-Quota-Org"), hs.pop("X-Quota-User")
                hs[b.org_header] = {"$ref": f"#/components/headers/{b.org_header}"}
                hs[b.user_header] = {"$ref": f"#/components/headers/{b.user_header}"}
    return doc


async def endpoint(request: Request) -> Response:
    state = request.app.state
    body = getattr(state, "openapi", None)
    if body is None:
        body = state.openapi = orjson.dumps(for_config(state.ctx.config))
    return Response(body, media_type="application/json")
