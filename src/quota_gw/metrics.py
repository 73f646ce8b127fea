"""Prometheus metrics of the gateway (GET /metrics)."""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, generate_latest
from starlette.requests import Request
from starlette.responses import Response

REGISTRY = CollectorRegistry(auto_describe=True)
DECISIONS = Counter("quota_gw_decisions_total", "Decisions by operation and outcome code",
                    ["op", "code"], registry=REGISTRY)
CHARGED = Counter("quota_gw_tokens_charged_total", "Tokens charged", ["meter"], registry=REGISTRY)
ROUND_TRIPS = Counter("quota_gw_redis_round_trips_total", "Round trips to Redis carrying decisions",
                      registry=REGISTRY)
SCRIPT_CALLS = Counter("quota_gw_redis_script_calls_total", "Decision scripts run", registry=REGISTRY)
REDIS_ERRORS = Counter("quota_gw_redis_errors_total", "Requests that failed on Redis", registry=REGISTRY)


async def endpoint(request: Request) -> Response:
    return Response(generate_latest(REGISTRY), media_type=CONTENT_TYPE_LATEST)
