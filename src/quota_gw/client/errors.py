"""One exception per problem code of the contract (SPEC §4), all subclasses of `QuotaError`.

The gateway answers every error as application/problem+json with a stable `code`; the class is
chosen by that code, and by the HTTP status only when a body is not a problem (a load balancer's
502 page, say), so `except InsufficientBalance` means the same thing whoever produced the answer.
"""

from __future__ import annotations

from typing import Any

import httpx


class QuotaError(Exception):
    """A call to quota-gw failed. Carries the problem's fields as the gateway sent them."""

    code = "error"

    def __init__(self, status: int | None, code: str | None = None, title: str = "", detail: str = "",
                 field: str | None = None, extra: dict[str, Any] | None = None,
                 headers: httpx.Headers | None = None) -> None:
        self.status = status
        self.code = code or type(self).code
        self.title = title
        self.detail = detail
        self.field = field
        self.extra = extra or {}
        self.headers = headers if headers is not None else httpx.Headers()
        super().__init__(f"{status or '-'} {self.code}: {detail or title}")


class InvalidRequest(QuotaError):
    """400/422 `invalid_request` (and 405/413): the request is wrong; `field` names what."""
    code = "invalid_request"


class Unauthorized(QuotaError):
    """401: no key, an unknown or revoked key, or a bad admin token."""
    code = "unauthorized"


class Forbidden(QuotaError):
    """403 `forbidden`: the key lacks the scope, or names another user or org."""
    code = "forbidden"


class PlanForbids(Forbidden):
    """403 `plan_forbids`: the org's plan does not include this meter (not the same as exhausted)."""
    code = "plan_forbids"


class InsufficientBalance(QuotaError):
    """402: the balance (or a team/user quota) cannot cover the cost; nothing was charged."""
    code = "insufficient_balance"

    @property
    def cost(self) -> int | None:
        return self.extra.get("cost")

    @property
    def remaining(self) -> int | None:
        return self.extra.get("remaining")


class NotFound(QuotaError):
    """404: no such route, reservation (or it expired), refundable event, org or key."""
    code = "not_found"


class Conflict(QuotaError):
    """409: e.g. the org exists, or the reservation was settled the other way."""
    code = "conflict"


class _WithRetryAfter(QuotaError):
    @property
    def retry_after(self) -> float | None:
        """Seconds from the `Retry-After` header (None when absent or not a number)."""
        return retry_after_of(self.headers)


class RateLimited(_WithRetryAfter):
    """429: a rate limit refused the call; nothing was charged. `retry_after` is in seconds."""
    code = "rate_limited"


class Unavailable(_WithRetryAfter):
    """503 (or a 502/504 from in between): a store is down; nothing was charged. Retried by the client."""
    code = "unavailable"


class ServerError(QuotaError):
    """Any other 5xx (a bug in the gateway: report it)."""
    code = "internal"


class ConnectionFailed(QuotaError):
    """No answer: connection refused or cut, or a timeout, on every attempt. `__cause__` is httpx's error.
    For a mutating call the effect is unknown; retrying with the same idempotency key is safe."""
    code = "connection_failed"


BY_CODE: dict[str, type[QuotaError]] = {c.code: c for c in (
    InvalidRequest, Unauthorized, Forbidden, PlanForbids, InsufficientBalance, NotFound, Conflict, RateLimited,
    Unavailable, ServerError)}
BY_STATUS: dict[int, type[QuotaError]] = {
    400: InvalidRequest, 401: Unauthorized, 402: InsufficientBalance, 403: Forbidden, 404: NotFound,
    405: InvalidRequest, 409: Conflict, 413: InvalidRequest, 422: InvalidRequest, 429: RateLimited,
    502: Unavailable, 503: Unavailable, 504: Unavailable}
_FIELDS = ("type", "title", "status", "detail", "code", "field")


def retry_after_of(headers: httpx.Headers) -> float | None:
    v = headers.get("retry-after")
    try:
        return max(0.0, float(v)) if v is not None else None
    except ValueError:
        return None  # an HTTP date: the gateway never sends one


def from_response(r: httpx.Response) -> QuotaError:
    """The exception for an error response, with the problem's fields."""
    body: dict[str, Any] = {}
    try:
        data = r.json()
        if isinstance(data, dict):
            body = data
    except ValueError:
        pass
    code = body.get("code") if isinstance(body.get("code"), str) else None
    cls = BY_CODE.get(code or "") or BY_STATUS.get(r.status_code) or (
        ServerError if r.status_code >= 500 else QuotaError)
    if code is None:
        code = cls.code if cls is not QuotaError else f"http_{r.status_code}"
    return cls(r.status_code, code, title=str(body.get("title") or r.reason_phrase),
               detail=str(body.get("detail") or r.text[:200]),
               field=body.get("field"), extra={k: v for k, v in body.items() if k not in _FIELDS},
               headers=r.headers)
