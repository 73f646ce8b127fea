"""What a proxied call is charged before it is forwarded.

fixed: the feature's cost, consumed on admission. LLM (a Metering): a hold of everything
the upstream may bill — the prompt estimate plus the completion budget for each completion
the call asks for — with the budget lowered to what the org can afford (never below
`min_completion_tokens`: 402), and every budget field the caller sent (the route's
`max_tokens_field` when none) set to it, so the call cannot overspend. When Redis is down a
`fail: closed` route answers 503; a `fail: open` one goes through, to be spooled.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import orjson

from .. import config as config_mod
from .. import metering, metrics
from ..config import Route as RouteConfig
from ..decisions import Decision, Identity
from ..problems import Problem, invalid, unavailable
from ..redis_errors import REDIS_DOWN
from .settling import Charge, FixedCharge, LLMCharge

if TYPE_CHECKING:
    from .core import Sidecar


def store_down() -> Problem:
    """503 for a fail-closed route whose decision could not be made (counted)."""
    metrics.REDIS_ERRORS.inc()
    return unavailable()


async def admit(sidecar: Sidecar, route: RouteConfig, ident: Identity, user: str, method: str,
                redis_down: bool) -> FixedCharge:
    """Fixed cost: charge on admission."""
    assert route.feature is not None
    charge = FixedCharge(sidecar, route, ident, user)
    if not redis_down:
        meta = orjson.dumps({"route": route.prefix, "method": method})
        d: Decision | None
        try:
            d = await sidecar.ctx.decider.consume(ident, route.feature, 1, user, None, meta, sidecar.table.shadow(route))
        except REDIS_DOWN:
            _down(sidecar, route)
            d = None
        else:
            _decided(charge, d)
        redis_down = d is None
    charge.redis_down = redis_down
    return charge


# The admission decision is awaited where it is asked for (a coroutine around it was a level
# passed again when Redis answers), then: a refusal is raised as its problem (_decided); with
# Redis down, a route that fails open goes on, its charge to the spool, and one that fails
# closed answers 503 (_down).
def _decided(charge: Charge, d: Decision) -> None:
    if not d.ok:
        raise d.problem()
    charge.decided(d)


def _down(sidecar: Sidecar, route: RouteConfig) -> None:
    if not sidecar.table.fail_open(route):
        raise store_down() from None


async def hold(sidecar: Sidecar, route: RouteConfig, ident: Identity, user: str, api: metering.Metering,
               endpoint: str, raw: bytes, redis_down: bool) -> LLMCharge:
    """LLM usage: hold the prompt estimate plus the completion budget, lowering the budget to
    what the org can afford, so the call can never overspend. The rewritten body is charge.body."""
    assert route.feature is not None
    config = sidecar.config
    try:
        body = orjson.loads(raw) if raw else None
    except orjson.JSONDecodeError as e:
        raise invalid(f"malformed JSON: {e}", status=400) from None
    if not isinstance(body, dict):
        raise invalid("the body must be a JSON object", status=400)
    try:
        per = api.completions(endpoint, body)
    except metering.Refused as e:
        raise invalid(str(e), status=400, field=e.field) from None
    charge = LLMCharge(sidecar, route, ident, user, api)
    unit = config.features[route.feature].cost
    prompt = api.prompt_tokens(endpoint, body, route.image_tokens)
    budgeted = api.budgeted(endpoint)
    budget = (api.requested_budget(body) or route.default_max_tokens) if budgeted else 0
    if budget and unit > 0:  # a hold is at most MAX_AMOUNT: exact in Lua doubles and Redis integers
        most = max(0, (config_mod.MAX_AMOUNT // unit - prompt) // per)
        if budget > most:
            budget = charge.lowered = most
    charge.prompt = prompt
    shadow = sidecar.table.shadow(route)
    if not redis_down:
        floor = prompt + min(route.min_completion_tokens, budget) * per
        ttl = config.behaviour.reservation_ttl_s
        d: Decision | None
        try:
            d = await sidecar.ctx.decider.reserve(
                ident, route.feature, 1, user, ttl, None, shadow, cost=(prompt + budget * per) * unit,
                min_cost=0 if shadow or unit == 0 else floor * unit)
        except REDIS_DOWN:
            _down(sidecar, route)
            d = None
        else:
            _decided(charge, d)
        if d is None:
            redis_down = True
        elif charge.rid is not None and unit > 0:
            affordable = (d.cost // unit - prompt) // per
            if budgeted and affordable < budget:
                budget = max(affordable, 0)
                charge.lowered = budget
    charge.redis_down = redis_down
    charge.most = prompt + budget * per
    if budgeted:
        api.set_budget(body, budget, route.max_tokens_field)
    charge.drop_usage_only = api.ask_for_usage(body)
    try:
        charge.body = orjson.dumps(body)
    except TypeError:  # orjson's nesting limit (255) is below its parser's (1,024)
        if charge.rid is not None:
            await charge.failed("bad request")
        raise invalid("the body nests deeper than 255 levels", status=400) from None
    return charge
