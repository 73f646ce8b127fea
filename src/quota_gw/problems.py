"""Errors as RFC 9457 problem+json, with the stable codes of the contract."""

from __future__ import annotations

import json
from typing import Any

import orjson
from starlette.responses import Response

TITLES = {
    "unauthorized": "Unauthorized",
    "forbidden": "Forbidden",
    "plan_forbids": "Not available on your plan",
    "insufficient_balance": "Insufficient balance",
    "rate_limited": "Too many requests",
    "not_found": "Not found",
    "invalid_request": "Invalid request",
    "conflict": "Conflict",
    "unavailable": "Service unavailable",
    "internal": "Internal error",
}


class Problem(Exception):
    """Raised anywhere in a request; rendered by the app's exception handler."""

    def __init__(self, status: int, code: str, detail: str, headers: dict[str, str] | None = None,
                 **extra: Any) -> None:
        super().__init__(detail)
        self.status, self.code, self.detail = status, code, detail
        self.headers = headers or {}
        self.extra = extra


def problem_fields(status: int, code: str, detail: str, **extra: Any) -> dict[str, Any]:
    return {"type": f"https://quota-gw.dev/problems/{code}", "title": TITLES.get(code, code),
            "status": status, "detail": detail, "code": code, **extra}


def problem_body(status: int, code: str, detail: str, **extra: Any) -> bytes:
    return orjson.dumps(problem_fields(status, code, detail, **extra))


def problem_line(p: Problem) -> str:
    """The problem body as one ASCII line, for a header (X-Quota-Problem): header values are
    Latin-1 on the wire, so anything else is escaped the JSON way."""
    return json.dumps(problem_fields(p.status, p.code, p.detail, **p.extra), ensure_ascii=True,
                      separators=(",", ":"))


def problem_response(p: Problem) -> Response:
    return Response(problem_body(p.status, p.code, p.detail, **p.extra), status_code=p.status,
                    headers=p.headers, media_type="application/problem+json")


def invalid(detail: str, status: int = 422, **extra: Any) -> Problem:
    return Problem(status, "invalid_request", detail, **extra)


def unavailable(detail: str = "the quota store is unavailable; nothing was forwarded or charged") -> Problem:
    """503 with Retry-After: a store the decision needs did not answer (counted by the caller)."""
    return Problem(503, "unavailable", detail, headers={"Retry-After": "1"})
