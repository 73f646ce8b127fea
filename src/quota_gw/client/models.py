"""Typed results of the client's calls: the JSON bodies of SPEC §4 as dataclasses.

Fields the gateway adds later are ignored rather than refused, so an older client keeps working
against a newer gateway.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, TypeVar

import httpx

T = TypeVar("T")


def build(cls: type[T], data: dict[str, Any], **more: Any) -> T:
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    return cls(**{k: v for k, v in data.items() if k in names}, **more)


@dataclass(frozen=True, slots=True)
class RateLimitInfo:
    """The RateLimit-* and X-Quota-Remaining headers of a decision (None where absent)."""

    limit: int | None = None
    remaining: int | None = None
    reset: int | None = None
    quota_remaining: int | None = None

    @classmethod
    def from_headers(cls, h: httpx.Headers) -> RateLimitInfo:
        def num(name: str) -> int | None:
            v = h.get(name)
            return int(v) if v is not None and v.lstrip("-").isdigit() else None

        return cls(num("ratelimit-limit"), num("ratelimit-remaining"), num("ratelimit-reset"),
                   num("x-quota-remaining"))


@dataclass(frozen=True, slots=True)
class Consumed:
    """POST /v1/consume: charged `cost` tokens; `remaining` is the meter's balance after.
    `replayed`: the gateway answered from an earlier attempt with the same idempotency key."""

    event_id: str
    cost: int
    remaining: int
    idempotency_key: str = ""
    replayed: bool = False
    rate_limit: RateLimitInfo = field(default_factory=RateLimitInfo)


@dataclass(frozen=True, slots=True)
class CheckResult:
    """POST /v1/check: would the call be allowed now? Changes nothing. `code` says why not."""

    allowed: bool
    cost: int
    remaining: int
    code: str | None = None
    detail: str | None = None

    def __bool__(self) -> bool:
        return self.allowed


@dataclass(frozen=True, slots=True)
class Committed:
    """POST /v1/reservations/{id}/commit: charged `cost`, gave back `released`."""

    event_id: str
    cost: int
    released: int
    remaining: int


@dataclass(frozen=True, slots=True)
class Released:
    """DELETE /v1/reservations/{id}: gave back `released` (the whole hold)."""

    event_id: str
    released: int
    remaining: int


@dataclass(frozen=True, slots=True)
class Refunded:
    """POST /v1/refunds: put back `refunded` tokens of one consume or commit."""

    event_id: str
    refunded: int
    remaining: int


@dataclass(frozen=True, slots=True)
class MeterBalance:
    """One meter of GET /v1/balance. `balance` and `limit` are None when the meter is unlimited."""

    balance: int | None
    allocated: int
    purchased: int
    used: int
    limit: int | None
    period_end: str
    held: int = 0
    unlimited: bool = False
    available: bool = True
    low: bool = False


@dataclass(frozen=True, slots=True)
class Balance:
    org_id: str
    plan: str
    meters: dict[str, MeterBalance]

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Balance:
        return cls(data["org_id"], data["plan"],
                   {n: build(MeterBalance, m) for n, m in data.get("meters", {}).items()})


@dataclass(frozen=True, slots=True)
class UsageEvent:
    """One ledger event of GET /v1/usage (newest first). `delta` is signed; `cost` what was priced."""

    event_id: str
    ts: str
    kind: str
    delta: int
    user_id: str | None = None
    key_id: str | None = None
    meter: str | None = None
    feature: str | None = None
    delta_purchased: int | None = None
    cost: int | None = None
    balance_after: int | None = None
    metadata: dict[str, Any] | None = None


@dataclass(frozen=True, slots=True)
class Page:
    """One page of a paginated list; `next_cursor` is None on the last page."""

    items: list[Any]
    next_cursor: str | None


@dataclass(frozen=True, slots=True)
class Purchase:
    """POST/GET /v1/purchases: a checkout for a credit pack, or one of the history (status
    pending, paid, expired or refunded). Every field the gateway sends is also in `raw`."""

    raw: dict[str, Any]
    purchase_id: str | None = None
    pack: str | None = None
    status: str | None = None
    checkout_url: str | None = None

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Purchase:
        return cls(raw=data, purchase_id=data.get("purchase_id") or data.get("id"), pack=data.get("pack"),
                   status=data.get("status"), checkout_url=data.get("checkout_url") or data.get("url"))


# --- admin ---------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Org:
    org_id: str
    plan: str
    name: str | None = None
    low: bool | None = None


@dataclass(frozen=True, slots=True)
class User:
    org_id: str
    user_id: str
    team: str | None = None
    created: bool = True


@dataclass(frozen=True, slots=True)
class NewKey:
    """POST /v1/admin/orgs/{org}/keys: `key` is the secret, shown this once."""

    key_id: str
    key: str
    org_id: str
    scopes: list[str]
    user_id: str | None = None


@dataclass(frozen=True, slots=True)
class KeyInfo:
    """GET /v1/admin/orgs/{org}/keys: a key without its secret."""

    key_id: str
    prefix: str
    scopes: list[str]
    created_at: str
    user_id: str | None = None
    revoked_at: str | None = None


@dataclass(frozen=True, slots=True)
class Grant:
    event_id: str
    amount: int
    balance: int
    idempotency_key: str = ""
    replayed: bool = False


@dataclass(frozen=True, slots=True)
class SubQuota:
    org_id: str
    meter: str
    limit: int | None
    user_id: str | None = None
    team: str | None = None


@dataclass(frozen=True, slots=True)
class TopSpender:
    rank: int
    org_id: str
    tokens: int
    calls: int
    name: str | None = None
    plan: str | None = None
