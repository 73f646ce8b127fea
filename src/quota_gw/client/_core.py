"""What the sync and async clients share: the calls (route, body, how to read the answer) and
the retry rule. The two clients differ only in how they send and how they sleep.

The retry rule, and why it can never charge twice:
- a call is *safe* to send again when the gateway applies it at most once: reads, `check`,
  consume/reserve/grant (they carry an idempotency key made once per logical call and reused by
  every attempt), commit/release (a reservation is settled once; a repeat gets the first answer),
  refunds (once per event), PUTs and DELETEs. Safe calls are retried on a connection error, a
  timeout, or a 502/503/504;
- an *unsafe* call (creating an org, a key, a checkout) is retried only when the request certainly
  never left (connection refused, connect timeout, no pooled connection);
- 429 is retried only with `wait=True`, after `Retry-After`, within `max_rate_limit_wait`.
Attempts, each backoff (exponential, full jitter) and the whole call's time are bounded.
"""

from __future__ import annotations

import random
import time
import uuid
from dataclasses import dataclass, field
from typing import Any
from collections.abc import Callable

import httpx

from . import errors, models

RETRY_STATUSES = frozenset({502, 503, 504})
NOT_SENT = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)
USER_AGENT = "quota-gw-client/0.1"


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """attempts: sends per call at most (1 = no retries); backoff: the first delay's ceiling, doubled
    each retry up to max_backoff (the delay is uniform in [0, ceiling]: full jitter); deadline: no
    retry starts after this many seconds from the call's start; max_rate_limit_wait: with wait=True,
    the most a call sleeps on Retry-After in total."""

    attempts: int = 4
    backoff: float = 0.1
    max_backoff: float = 2.0
    deadline: float = 15.0
    max_rate_limit_wait: float = 30.0


NO_RETRY = RetryPolicy(attempts=1)


@dataclass(slots=True)
class Call:
    method: str
    path: str
    parse: Callable[[httpx.Response], Any]
    json: dict[str, Any] | None = None
    params: dict[str, Any] | None = None
    headers: dict[str, str] = field(default_factory=dict)
    safe: bool = True
    wait: bool = False


class Attempts:
    """The retry state of one logical call: says how long to sleep before the next attempt, or raises."""

    def __init__(self, policy: RetryPolicy, call: Call) -> None:
        self.policy, self.call = policy, call
        self.started = time.monotonic()
        self.failures = 0  # attempts that got no answer or a 502/503/504
        self.rate_limit_waited = 0.0

    def _delay(self, hint: float | None) -> float | None:
        p = self.policy
        self.failures += 1
        if self.failures >= p.attempts:
            return None
        delay = random.uniform(0, min(p.max_backoff, p.backoff * 2 ** (self.failures - 1)))
        if hint is not None:
            delay = max(delay, min(hint, p.max_backoff))
        if time.monotonic() + delay - self.started > p.deadline:
            return None
        return delay

    def after_error(self, exc: httpx.TransportError) -> float:
        """A send failed without an answer: the delay before the next attempt, or ConnectionFailed."""
        delay = self._delay(None) if self.call.safe or isinstance(exc, NOT_SENT) else None
        if delay is None:
            raise errors.ConnectionFailed(None, detail=f"{type(exc).__name__}: {exc} "
                                          f"(after {self.failures} failed attempt(s))") from exc
        return delay

    def after_response(self, r: httpx.Response) -> float | None:
        """None: this answer is final (parse it or raise it); else the delay before the next attempt."""
        if r.status_code < 400:
            return None
        if r.status_code in RETRY_STATUSES and self.call.safe:
            return self._delay(errors.retry_after_of(r.headers))
        if r.status_code == 429 and self.call.wait:
            after = errors.retry_after_of(r.headers) or 1.0
            if self.rate_limit_waited + after <= self.policy.max_rate_limit_wait:
                self.rate_limit_waited += after  # a wait, not a failure: attempts are not spent
                return after
        return None


def finish(call: Call, r: httpx.Response) -> Any:
    if r.status_code >= 400:
        raise errors.from_response(r)
    return call.parse(r)


def new_key() -> str:
    return uuid.uuid4().hex


def _drop_none(d: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in d.items() if v is not None}


def _json(r: httpx.Response) -> dict[str, Any]:
    return r.json()


# --- decisions ----------------------------------------------------------------------------

def consume(feature: str, units: int, user_id: str | None, metadata: dict[str, Any] | None,
            idempotency_key: str | None, wait: bool) -> Call:
    key = idempotency_key or new_key()

    def parse(r: httpx.Response) -> models.Consumed:
        d = r.json()
        return models.Consumed(d["event_id"], d["cost"], d["remaining"], key,
                               r.headers.get("idempotent-replayed") == "true",
                               models.RateLimitInfo.from_headers(r.headers))

    return Call("POST", "/v1/consume", parse, json=_drop_none(
        {"feature": feature, "units": units, "user_id": user_id, "metadata": metadata}),
        headers={"Idempotency-Key": key}, wait=wait)


def check(feature: str, units: int, user_id: str | None) -> Call:
    return Call("POST", "/v1/check", lambda r: models.build(models.CheckResult, r.json()),
                json=_drop_none({"feature": feature, "units": units, "user_id": user_id}))


@dataclass(frozen=True, slots=True)
class Hold:
    """POST /v1/reservations: what the reservation objects are made from."""

    reservation_id: str
    held: int
    remaining: int
    expires_at: str


def reserve(feature: str, units: int, user_id: str | None, ttl_s: int | None, idempotency_key: str | None,
            wait: bool) -> Call:
    return Call("POST", "/v1/reservations", lambda r: models.build(Hold, r.json()), json=_drop_none(
        {"feature": feature, "units": units, "user_id": user_id, "ttl_s": ttl_s}),
        headers={"Idempotency-Key": idempotency_key or new_key()}, wait=wait)


def commit(reservation_id: str, units: int, metadata: dict[str, Any] | None) -> Call:
    return Call("POST", f"/v1/reservations/{reservation_id}/commit",
                lambda r: models.build(models.Committed, r.json()),
                json=_drop_none({"units": units, "metadata": metadata}))


def release(reservation_id: str) -> Call:
    return Call("DELETE", f"/v1/reservations/{reservation_id}", lambda r: models.build(models.Released, r.json()))


def refund(event_id: str, metadata: dict[str, Any] | None) -> Call:
    return Call("POST", "/v1/refunds", lambda r: models.build(models.Refunded, r.json()),
                json=_drop_none({"event_id": event_id, "metadata": metadata}))


# --- account --------------------------------------------------------------------------------

def balance() -> Call:
    return Call("GET", "/v1/balance", lambda r: models.Balance.from_json(r.json()))


def usage_page(cursor: str | None, limit: int, **filters: Any) -> Call:
    def parse(r: httpx.Response) -> models.Page:
        d = r.json()
        return models.Page([models.build(models.UsageEvent, e) for e in d.get("events", [])], d.get("next_cursor"))

    return Call("GET", "/v1/usage", parse, params=_drop_none({**filters, "limit": limit, "cursor": cursor}))


def pricing() -> Call:
    return Call("GET", "/v1/pricing", _json)


def analytics(days: int) -> Call:
    return Call("GET", "/v1/analytics", _json, params={"days": days})


def purchases() -> Call:
    def parse(r: httpx.Response) -> list[models.Purchase]:
        d = r.json()
        rows = d.get("purchases", []) if isinstance(d, dict) else d
        return [models.Purchase.from_json(p) for p in rows]

    return Call("GET", "/v1/purchases", parse)


def purchase(pack: str) -> Call:
    # A second checkout is harmless (only a paid one credits) but untidy: sent again only if never sent.
    return Call("POST", "/v1/purchases", lambda r: models.Purchase.from_json(r.json()), json={"pack": pack},
                safe=False)


# --- admin ----------------------------------------------------------------------------------

def create_org(org_id: str, plan: str | None, name: str | None) -> Call:
    return Call("POST", "/v1/admin/orgs", lambda r: models.build(models.Org, r.json()),
                  json=_drop_none({"org_id": org_id, "plan": plan, "name": name}), safe=False)


def orgs_page(cursor: str | None, limit: int, low: bool) -> Call:
    def parse(r: httpx.Response) -> models.Page:
        d = r.json()
        return models.Page([models.build(models.Org, o) for o in d.get("orgs", [])], d.get("next_cursor"))

    return Call("GET", "/v1/admin/orgs", parse,
                  params=_drop_none({"limit": limit, "cursor": cursor, "low": "true" if low else None}))


def set_plan(org_id: str, plan: str) -> Call:
    return Call("PUT", f"/v1/admin/orgs/{org_id}/plan", lambda r: models.build(models.Org, r.json()),
                  json={"plan": plan})


def entitlements(org_id: str) -> Call:
    return Call("GET", f"/v1/admin/orgs/{org_id}/entitlements", _json)


def set_entitlements(org_id: str, override: dict[str, Any]) -> Call:
    """Replaces the org's override of its plan's layers ({} removes it)."""
    return Call("PUT", f"/v1/admin/orgs/{org_id}/entitlements", _json, json=override)


def add_user(org_id: str, user_id: str, team: str | None) -> Call:
    # An upsert: sending it again changes nothing more.
    return Call("POST", f"/v1/admin/orgs/{org_id}/users",
                  lambda r: models.build(models.User, r.json(), created=r.status_code == 201),
                  json=_drop_none({"user_id": user_id, "team": team}))


def create_key(org_id: str, scopes: list[str] | None, user_id: str | None) -> Call:
    return Call("POST", f"/v1/admin/orgs/{org_id}/keys", lambda r: models.build(models.NewKey, r.json()),
                  json=_drop_none({"scopes": scopes, "user_id": user_id}), safe=False)


def list_keys(org_id: str) -> Call:
    return Call("GET", f"/v1/admin/orgs/{org_id}/keys",
                  lambda r: [models.build(models.KeyInfo, k) for k in r.json()["keys"]])


def revoke_key(key_id: str) -> Call:
    return Call("DELETE", f"/v1/admin/keys/{key_id}", _json)


def grant(org_id: str, meter: str, amount: int, reason: str, idempotency_key: str | None) -> Call:
    key = idempotency_key or new_key()

    def parse(r: httpx.Response) -> models.Grant:
        d = r.json()
        return models.Grant(d["event_id"], d["amount"], d["balance"], key,
                            r.headers.get("idempotent-replayed") == "true")

    return Call("POST", f"/v1/admin/orgs/{org_id}/grants", parse,
                  json={"meter": meter, "amount": amount, "reason": reason, "idempotency_key": key})


def set_quota(org_id: str, meter: str, limit: int | None, user_id: str | None, team: str | None) -> Call:
    return Call("PUT", f"/v1/admin/orgs/{org_id}/quotas",
                  lambda r: models.build(models.SubQuota, r.json()),
                  json={"meter": meter, "limit": limit, **_drop_none({"user_id": user_id, "team": team})})


def org_balance(org_id: str) -> Call:
    return Call("GET", f"/v1/admin/orgs/{org_id}/balance", lambda r: models.Balance.from_json(r.json()))


def top(days: int, limit: int, meter: str | None) -> Call:
    return Call("GET", "/v1/admin/top", lambda r: [models.build(models.TopSpender, o) for o in r.json()["orgs"]],
                  params=_drop_none({"days": days, "limit": limit, "meter": meter}))


def worker() -> Call:
    return Call("GET", "/v1/admin/worker", _json)


# --- the decorator's arguments ---------------------------------------------------------------

def resolve(v: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """A decorator argument: a value, or a callable given the decorated function's arguments."""
    return v(*args, **kwargs) if callable(v) else v


def refund_on(refund_on_error: bool | tuple[type[BaseException], ...]) -> tuple[type[BaseException], ...]:
    if refund_on_error is True:
        return (Exception,)
    if refund_on_error is False:
        return ()
    return tuple(refund_on_error)
