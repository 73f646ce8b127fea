"""What "Redis is down" means, in one place: the errors after which fail-open routes serve
and spool, fail-closed ones answer 503, and the spool replayer waits.

redis-py raises its own ConnectionError and TimeoutError; an OSError-level ConnectionError
(refused, reset) can surface unwrapped from a socket the client had not yet wrapped, so it
counts too. Anything else (a script error, a bug) is not an outage and is not caught by these.
"""

from __future__ import annotations

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

REDIS_DOWN: tuple[type[Exception], ...] = (RedisConnectionError, RedisTimeoutError, ConnectionError)
