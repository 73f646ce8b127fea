"""quota_gw.client: how an application calls quota-gw (docs/client.md).

    from quota_gw.client import QuotaClient, InsufficientBalance

    quota = QuotaClient("http://127.0.0.1:8080", api_key)
    quota.consume("generate_goal", user_id="u-1")

Every mutating call carries an idempotency key made once per logical call and reused by its
retries, so a retried call never charges twice; errors are one exception class per problem code.
"""

from ._core import NO_RETRY, RetryPolicy
from .aio import AsyncAdminClient, AsyncQuotaClient, AsyncReservation
from .errors import (Conflict, ConnectionFailed, Forbidden, InsufficientBalance, InvalidRequest, NotFound,
                     PlanForbids, QuotaError, RateLimited, ServerError, Unauthorized, Unavailable)
from .models import (Balance, CheckResult, Committed, Consumed, Grant, KeyInfo, MeterBalance, NewKey, Org, Page,
                     Purchase, RateLimitInfo, Refunded, Released, SubQuota, TopSpender, UsageEvent, User)
from .sync import AdminClient, QuotaClient, Reservation

__all__ = [
    "QuotaClient", "AsyncQuotaClient", "AdminClient", "AsyncAdminClient", "Reservation", "AsyncReservation",
    "RetryPolicy", "NO_RETRY",
    "QuotaError", "InvalidRequest", "Unauthorized", "Forbidden", "PlanForbids", "InsufficientBalance", "NotFound",
    "Conflict", "RateLimited", "Unavailable", "ServerError", "ConnectionFailed",
    "Balance", "CheckResult", "Committed", "Consumed", "Grant", "KeyInfo", "MeterBalance", "NewKey", "Org", "Page",
    "Purchase", "RateLimitInfo", "Refunded", "Released", "SubQuota", "TopSpender", "UsageEvent", "User",
]
