"""What "Redis is down" means, in one place: the errors after which fail-open routes serve
and spool, fail-closed ones answer 503, and the spool replayer waits.

redis-py raises its own ConnectionError and TimeoutError; an OSError-level ConnectionError
(refused, reset) can surface unwrapped from a socket the client had not yet wrapped, so it
counts too. Anything else (a script error, a bug) is not an outage and is not caught by these.

On a Redis Cluster, the errors that say the command did not run because its slot has no
serving primary right now count too, so a fail-open route spools through an outage longer
than the decision lanes wait one out (cluster.SETTLE_S):
- ClusterError: CLUSTERDOWN and MASTERDOWN replies (its subclasses), redis-py's cluster client
  giving up after its redirects ("TTL exhausted"), and the lanes' own "slot not served";
- TryAgainError: TRYAGAIN past the lanes' wait (a migration that does not finish);
- RedisClusterException (SlotNotCoveredError included): the cluster client could not build a
  slot map (no node reachable, slots not covered). It raises the same class for a command it
  cannot route (no key, keys in two slots); those are caught before sending, so nothing ran,
  and the gateway sends none (tests on a cluster cover every route).
MOVED and ASK are not here: both are followed.
"""

from __future__ import annotations

from redis.exceptions import ClusterError, RedisClusterException, TryAgainError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

REDIS_DOWN: tuple[type[Exception], ...] = (RedisConnectionError, RedisTimeoutError, ConnectionError,
                                           ClusterError, TryAgainError, RedisClusterException)
