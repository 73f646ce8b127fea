"""Redis' `maxmemory-policy` must be `noeviction`.

Under any evicting policy Redis may drop a key to make room: a balance hash evicted comes back
as a fresh, full allocation; an evicted idempotency key lets a retry charge twice; an evicted
hold frees money that was promised. With `noeviction` a full Redis refuses writes instead
(decisions answer 503), which loses no money. So the gateway refuses to start on an evicting
policy unless the operator says, explicitly, that they accept it (`behaviour.allow_evicting_redis:
true` or QUOTA_GW_ALLOW_EVICTING_REDIS=1), and then it warns at start and on /readyz.

A managed Redis may forbid CONFIG: the policy is then `unknown`, reported and warned about,
never refused (the operator is the only one who can know).
"""

from __future__ import annotations

import logging
import os

from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ClusterDownError, RedisClusterException, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from .config import Config

SAFE = "noeviction"
UNKNOWN = "unknown"
ENV_OVERRIDE = "QUOTA_GW_ALLOW_EVICTING_REDIS"
log = logging.getLogger("quota_gw")


class UnsafeRedis(RuntimeError):
    """Redis may evict keys and nobody said that is acceptable."""


async def read(redis: Redis) -> str:
    """The policy, or `unknown` when CONFIG is refused (renamed, ACL, managed service)."""
    try:
        reply = await redis.config_get("maxmemory-policy")
    except ResponseError:
        return UNKNOWN
    return str(reply.get("maxmemory-policy") or UNKNOWN)


def safe(policy: str) -> bool:
    return policy in (SAFE, UNKNOWN)


def allowed(config: Config) -> bool:
    return config.behaviour.allow_evicting_redis or os.environ.get(ENV_OVERRIDE, "") in ("1", "true", "yes")


async def check_at_start(redis: Redis, config: Config) -> str:
    """Raises UnsafeRedis on an evicting policy without the override; warns otherwise.
    Redis down at start is not this check's business (decisions answer 503 until it is back,
    and /readyz reads the policy again)."""
    try:
        policy = await read(redis)
    except (RedisConnectionError, RedisTimeoutError, ClusterDownError, RedisClusterException) as e:
        log.warning("redis unreachable at start, maxmemory-policy not checked yet: %s", e)
        return UNKNOWN
    if policy == UNKNOWN:
        log.warning("cannot read redis maxmemory-policy (CONFIG refused): make sure it is %r, "
                    "or balances may be evicted and come back full", SAFE)
    elif policy != SAFE:
        what = (f"redis maxmemory-policy is {policy!r}: under memory pressure Redis may evict a balance "
                f"(it comes back full), a hold or an idempotency key (a retry charges twice)")
        if not allowed(config):
            raise UnsafeRedis(f"{what}. Set `maxmemory-policy {SAFE}`, or accept the risk with "
                              f"behaviour.allow_evicting_redis: true (or {ENV_OVERRIDE}=1)")
        log.error("!!! %s. Starting anyway: allow_evicting_redis is set. !!!", what)
    return policy
