"""Operator routes under /v1/admin (bearer $QUOTA_GW_ADMIN_TOKEN).

Each route checks what it was sent and shapes its answer; the store (store.py) reads and writes,
Postgres first and Redis after (its docstring has the rule and what a failure in between leaves).

Every write checks what it was answered (a grant the script refused is that refusal, not a
201), a field the contract requires is required (422 when missing, never a default), and what
Postgres refuses (a check, a foreign key, a value it cannot store) is a 4xx naming the field,
never a 500: see `pg_errors`.
"""

from __future__ import annotations

import functools
import math
import re
import time
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Any

import asyncpg
import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from . import entitlements
from .api import Context, balance_of, ctx, int_field, json_body, json_response, name_field
from .auth import require_admin
from .config import MAX_AMOUNT, is_name
from .problems import Problem, invalid

SCOPES = {"consume", "read"}


async def _admin(request: Request) -> Context:
    require_admin(request)
    c = ctx(request)
    if c.db is None:
        raise Problem(503, "unavailable", "the admin API needs Postgres (DATABASE_URL)")
    return c


def pg_errors(route: Callable[[Request], Awaitable[Response]]) -> Callable[[Request], Awaitable[Response]]:
    """Turns what Postgres refuses into a 422 naming the column (a constraint or a value it
    cannot store: a NUL character, a number out of range). The checks in the routes come first;
    this is the net under them, so a client never sees a 500 for what it sent."""

    @functools.wraps(route)
    async def wrapped(request: Request) -> Response:
        try:
            return await route(request)
        except asyncpg.UniqueViolationError as e:
            raise Problem(409, "conflict", f"{_column(e)}: already exists", field=_column(e)) from None
        except (asyncpg.IntegrityConstraintViolationError, asyncpg.DataError) as e:
            field = _column(e)
            raise invalid(f"{field}: refused by the database ({e.__class__.__name__})", field=field) from None

    return wrapped


def _column(e: Exception) -> str:
    """The column a Postgres error is about: its column name, else the one its constraint
    names (`<table>_<column>_check`/`_fkey`/`_key`), else 'body'."""
    col = getattr(e, "column_name", None)
    if col:
        return col
    m = re.fullmatch(r"[a-z]+s_([a-z_]+?)_(check|fkey|key|pkey)", getattr(e, "constraint_name", None) or "")
    return m.group(1) if m else "body"


def _plan(c: Context, data: dict[str, Any], default: str | None = None) -> str:
    """The plan named in the body; `default` (org creation: the config's documented
    `default_plan`) when it is left out, else it is required."""
    plan = data.get("plan", default)
    if plan is None:
        raise invalid("plan: required", field="plan")
    if not isinstance(plan, str) or plan not in c.config.plans:
        raise invalid(f"plan: one of {', '.join(c.config.plans)}", field="plan")
    return plan


def _meter(c: Context, data: dict[str, Any]) -> str:
    meter = data.get("meter")
    if meter not in c.config.meter_names:
        raise invalid(f"meter: one of {', '.join(c.config.meter_names)}", field="meter")
    return meter


def _path_name(request: Request, param: str) -> str:
    """An org or key id from the path; one that is not a name cannot exist: 404."""
    v = request.path_params[param]
    if not is_name(v):
        raise Problem(404, "not_found", f"no {param.removesuffix('_id')} {v[:64]!r}")
    return v


async def create_org(request: Request) -> Response:
    c = await _admin(request)
    data = await json_body(request)
    org_id = name_field(data, "org_id")
    name = data.get("name")
    if name is not None and (not isinstance(name, str) or len(name) > 200 or not _storable(name)):
        raise invalid("name: a string of at most 200 characters, without NUL", field="name")
    plan = _plan(c, data, c.config.default_plan)
    await c.store.create_org(org_id, name, plan)
    return json_response({"org_id": org_id, "name": name, "plan": plan}, 201)


async def set_plan(request: Request) -> Response:
    c = await _admin(request)
    org_id = _path_name(request, "org_id")
    plan = _plan(c, await json_body(request))
    await c.store.set_plan(org_id, plan)
    return json_response({"org_id": org_id, "plan": plan})


def _entitlements_answer(c: Context, org_id: str, plan: str, text: str) -> Response:
    """The org's override as stored (`{}`: none) and the layers its decisions use with it."""
    p = c.config.plans.get(plan)
    return json_response({"org_id": org_id, "plan": plan, "entitlements": orjson.loads(text) if text else {},
                          "effective": entitlements.effective(p, text) if p else None})


async def get_entitlements(request: Request) -> Response:
    c = await _admin(request)
    org_id = _path_name(request, "org_id")
    plan, text = await c.store.entitlements(org_id)
    return _entitlements_answer(c, org_id, plan, text)


async def put_entitlements(request: Request) -> Response:
    """Replaces the org's override of its plan's layers (`{}` removes it)."""
    c = await _admin(request)
    org_id = _path_name(request, "org_id")
    text = entitlements.parse(await json_body(request)).text()
    plan = await c.store.set_entitlements(org_id, text)
    c.keys.forget_org(org_id)
    return _entitlements_answer(c, org_id, plan, text)


async def delete_entitlements(request: Request) -> Response:
    c = await _admin(request)
    org_id = _path_name(request, "org_id")
    plan = await c.store.set_entitlements(org_id, "")
    c.keys.forget_org(org_id)
    return _entitlements_answer(c, org_id, plan, "")


async def create_user(request: Request) -> Response:
    c = await _admin(request)
    org_id = _path_name(request, "org_id")
    data = await json_body(request)
    user_id = name_field(data, "user_id")
    team = name_field(data, "team", required=False)
    existed = await c.store.put_user(org_id, user_id, team)
    return json_response({"org_id": org_id, "user_id": user_id, "team": team}, 200 if existed else 201)


async def create_key(request: Request) -> Response:
    c = await _admin(request)
    org_id = _path_name(request, "org_id")
    data = await json_body(request)
    user_id = name_field(data, "user_id", required=False)
    scopes = data.get("scopes", ["consume", "read"])  # the documented default
    if (not isinstance(scopes, list) or not scopes or not all(isinstance(s, str) for s in scopes)
            or not set(scopes) <= SCOPES):
        raise invalid(f"scopes: a non-empty list of {sorted(SCOPES)}", field="scopes")
    key_id, key = await c.store.create_key(org_id, user_id, sorted(set(scopes)))
    return json_response({"key_id": key_id, "key": key, "org_id": org_id, "user_id": user_id,
                          "scopes": sorted(set(scopes))}, 201)


async def list_keys(request: Request) -> Response:
    c = await _admin(request)
    org_id = _path_name(request, "org_id")
    rows = await c.store.list_keys(org_id)
    return json_response({"keys": [
        {"key_id": r["key_id"], "user_id": r["user_id"], "prefix": r["key_prefix"], "scopes": r["scopes"],
         "created_at": r["created_at"].isoformat(),
         "revoked_at": r["revoked_at"].isoformat() if r["revoked_at"] else None} for r in rows]})


async def revoke_key(request: Request) -> Response:
    c = await _admin(request)
    key_id = _path_name(request, "key_id")
    await c.store.revoke_key(key_id)
    return json_response({"key_id": key_id, "revoked": True})


async def grant(request: Request) -> Response:
    c = await _admin(request)
    org_id = _path_name(request, "org_id")
    data = await json_body(request)
    meter = _meter(c, data)
    amount = int_field(data, "amount", None, 1, MAX_AMOUNT)
    reason = data.get("reason")
    if not isinstance(reason, str) or not 1 <= len(reason) <= 500 or not _storable(reason):
        raise invalid("reason: required, at most 500 characters, without NUL", field="reason")
    idem = c.idempotency_key(data, request)
    expires = _expires_at(data.get("expires_at"))
    d = await c.store.grant(org_id, meter, amount, reason, idem, expires)
    if not d.ok:  # e.g. the idempotency key was used for a different grant: 422, nothing granted
        raise d.problem()
    return json_response({"event_id": d.event_id, "amount": d.cost, "balance": d.remaining}, 201, d.headers())


async def set_quota(request: Request) -> Response:
    c = await _admin(request)
    org_id = _path_name(request, "org_id")
    data = await json_body(request)
    meter = _meter(c, data)
    user_id = name_field(data, "user_id", required=False)
    team = name_field(data, "team", required=False)
    if (user_id is None) == (team is None):
        raise invalid("give exactly one of user_id or team", field="user_id")
    if "limit" not in data:  # null removes the sub-quota; leaving it out is not the same thing
        raise invalid("limit: required (a number of tokens per period, or null to remove the sub-quota)",
                      field="limit")
    limit = data["limit"]
    if limit is not None:
        limit = int_field(data, "limit", None, 0, MAX_AMOUNT)
    scope, subject = ("user", user_id) if user_id else ("team", team)
    assert subject is not None  # exactly one of the two was given (checked above)
    await c.store.set_sub_quota(org_id, meter, scope, subject, limit)
    return json_response({"org_id": org_id, "meter": meter, scope: subject, "limit": limit})


async def org_balance(request: Request) -> Response:
    c = await _admin(request)
    org_id = _path_name(request, "org_id")
    plan = await c.store.org_plan(org_id)
    if plan is None:
        raise Problem(404, "not_found", f"no org {org_id}")
    return json_response(await balance_of(c, org_id, plan))


def _expires_at(v: Any) -> int | None:
    """`expires_at`: an RFC 3339 time with its offset, in the future; unix seconds, or None."""
    if v is None:
        return None
    when = None
    if isinstance(v, str) and re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?(Z|[+-]\d\d:\d\d)", v):
        try:
            when = datetime.fromisoformat(v.replace("Z", "+00:00"))
        except ValueError:
            when = None
    if when is None:
        raise invalid("expires_at: an RFC 3339 time with an offset, e.g. 2027-01-31T00:00:00Z", field="expires_at")
    ts = math.ceil(when.timestamp())
    if ts <= time.time():
        raise invalid("expires_at: must be in the future", field="expires_at")
    return ts


def _storable(text: str) -> bool:
    """Postgres text and jsonb refuse NUL; Python strings that are not UTF-8 (lone surrogates) too."""
    if "\x00" in text:
        return False
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


routes = [
    Route("/v1/admin/orgs", pg_errors(create_org), methods=["POST"]),
    Route("/v1/admin/orgs/{org_id}/plan", pg_errors(set_plan), methods=["PUT"]),
    Route("/v1/admin/orgs/{org_id}/entitlements", pg_errors(get_entitlements), methods=["GET"]),
    Route("/v1/admin/orgs/{org_id}/entitlements", pg_errors(put_entitlements), methods=["PUT"]),
    Route("/v1/admin/orgs/{org_id}/entitlements", pg_errors(delete_entitlements), methods=["DELETE"]),
    Route("/v1/admin/orgs/{org_id}/users", pg_errors(create_user), methods=["POST"]),
    Route("/v1/admin/orgs/{org_id}/keys", pg_errors(create_key), methods=["POST"]),
    Route("/v1/admin/orgs/{org_id}/keys", pg_errors(list_keys), methods=["GET"]),
    Route("/v1/admin/keys/{key_id}", pg_errors(revoke_key), methods=["DELETE"]),
    Route("/v1/admin/orgs/{org_id}/grants", pg_errors(grant), methods=["POST"]),
    Route("/v1/admin/orgs/{org_id}/quotas", pg_errors(set_quota), methods=["PUT"]),
    Route("/v1/admin/orgs/{org_id}/balance", pg_errors(org_balance), methods=["GET"]),
]
