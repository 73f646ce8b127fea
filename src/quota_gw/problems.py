"""Errors as RFC 9457 problem+json, with the stable codes of the contract."""

from __future__ import annotations

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


def problem_body(status: int, code: str, detail: str, **extra: Any) -> bytes:
    return orjson.dumps({"type": f"https://quota-gw.dev/problems/{code}", "title": TITLES.get(code, code),
                         "status": status, "detail": detail, "code": code, **extra})


def problem_response(p: Problem) -> Response:
    return Response(problem_body(p.status, p.code, p.detail, **p.extra), status_code=p.status,
                    headers=p.headers, media_type="application/problem+json")


def invalid(detail: str, status: int = 422, **extra: Any) -> Problem:
    return Problem(status, "invalid_request", detail, **extra)
