"""Redis Cluster: one `REDIS_URL` for a single Redis or any node of a cluster.

`connect()` asks the node named in the URL whether it is a cluster node (`INFO cluster`) and
returns redis-py's cluster client if so, which routes every keyed command by slot, follows
MOVED/ASK and scans over every primary. The same config runs on both (a `redis+cluster://` URL
skips the question, for a proxy that hides `INFO`). If the node does not answer at start,
the gateway runs as on a single Redis; should it turn out to be a cluster node, `ping` (so
/readyz) fails from then on, saying to restart.

Decisions do not go through that client: `Lanes` keeps one coalescer (one ordered connection)
per primary and sends each script to the primary owning the org's slot (every key of a decision
carries the org's shard tag, layout.py). The never-resend rule holds across nodes: a MOVED, ASK,
TRYAGAIN or CLUSTERDOWN reply means the script did not run, so it is sent again (to the node the
reply names, after refreshing the slot map); a timeout or a lost connection fails the call, as on
a single Redis, and only schedules a slot-map refresh so the next call finds a promoted replica.
A refund's read of its org's stream (charges.py) takes the same path (`Lanes.command`), so it
waits out a migration or a failover for as long as the decision that follows it would.
"""

from __future__ import annotations

import asyncio
import logging
import time
import weakref
from collections.abc import Awaitable, Callable
from typing import Any, cast

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.crc import key_slot
from redis.exceptions import AskError, ClusterDownError, MovedError, RedisClusterException, RedisError, ResponseError
from redis.exceptions import SlotNotCoveredError, TryAgainError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from . import metrics
from .coalesce import Coalescer
from .scripts import not_loaded

log = logging.getLogger("quota_gw")

SCHEME = "redis+cluster://"
MAX_REDIRECTS = 8  # MOVED/ASK hops for one call before it fails (503)
SETTLE_S = 5.0  # how long one call waits out CLUSTERDOWN/TRYAGAIN (a failover, a slot migrating)

Client = aioredis.Redis | RedisCluster


def pool_kwargs() -> dict[str, Any]:
    """Timeouts shared by every client the gateway makes (one place)."""
    return {"decode_responses": True, "socket_connect_timeout": 2, "socket_timeout": 5, "health_check_interval": 30}


def node_client(url: str) -> aioredis.Redis:
    """A bounded pool that waits for a free connection rather than failing under bursts."""
    pool = aioredis.BlockingConnectionPool.from_url(url, max_connections=64, timeout=5, **pool_kwargs())
    return aioredis.Redis(connection_pool=pool)


def plain_url(url: str) -> str:
    """`url` as redis-py reads it (without the `redis+cluster` scheme)."""
    return "redis://" + url[len(SCHEME):] if url.startswith(SCHEME) else url


async def cluster_enabled(url: str) -> bool | None:
    """Whether the node `url` names is a cluster node; None if it does not answer."""
    if url.startswith(SCHEME):
        return True
    probe = aioredis.Redis.from_url(url, decode_responses=True, socket_connect_timeout=2, socket_timeout=5)
    try:
        return str((await probe.info("cluster")).get("cluster_enabled", 0)) == "1"
    except (RedisConnectionError, RedisTimeoutError) as e:
        log.warning("redis unreachable at start, assuming a single Redis: %s", e)
        return None
    finally:
        await probe.aclose()


async def is_cluster(url: str) -> bool:
    return bool(await cluster_enabled(url))


# Single-Redis clients made while Redis did not answer: `ping` asks once, when it does, whether
# that guess was wrong. Clients are not swapped under a running gateway (every component holds
# its own); a wrong guess keeps /readyz at 503, saying to restart, instead of serving a third.
_GUESSED: weakref.WeakSet[aioredis.Redis] = weakref.WeakSet()


async def connect(url: str) -> aioredis.Redis:
    """A client for `url`: redis-py's cluster client on a cluster node, a pooled client otherwise.
    Typed as the single-node client: the cluster client offers the same commands, and the few
    places that differ ask `isinstance(r, RedisCluster)`."""
    enabled = await cluster_enabled(url)
    if not enabled:
        client = node_client(url)
        if enabled is None:
            _GUESSED.add(client)
        return client
    rc = RedisCluster.from_url(plain_url(url), **pool_kwargs())
    try:
        await rc.initialize()
    except (RedisError, RedisClusterException) as e:  # slots not all served yet: 503 until they are
        log.warning("redis cluster not ready at start: %s", e)
    return cast(aioredis.Redis, rc)


async def on_each_primary(r: Client, command: str, *args: Any) -> list[Any]:
    """One command on every primary (SCRIPT LOAD, FUNCTION LOAD, ...); one reply per primary."""
    if isinstance(r, RedisCluster):
        return [await r.execute_command(command, *args, target_nodes=n) for n in r.get_primaries()]
    return [await r.execute_command(command, *args)]


async def ping(r: Client) -> None:
    """Raises unless Redis answers: on a cluster, every primary (a failed replica, or a failed
    primary whose replica took over, does not make decisions unavailable)."""
    if isinstance(r, RedisCluster):
        await r.ping(target_nodes=RedisCluster.PRIMARIES)
        return
    await r.ping()
    if r in _GUESSED:
        try:
            enabled = str((await r.info("cluster")).get("cluster_enabled", 0)) == "1"
        except ResponseError:  # INFO refused (a proxy): a single Redis as far as we can tell
            enabled = False
        if enabled:
            raise RedisClusterException(
                "REDIS_URL names a Redis Cluster node, which did not answer when this process started, "
                f"so it runs as on a single Redis: restart it (or use a {SCHEME} URL)")
        _GUESSED.discard(r)


class Lanes:
    """One coalescer per primary, chosen by the slot of a call's first key."""

    def __init__(self, rc: RedisCluster, wait_ms: int = 0) -> None:
        self.rc = rc
        self.wait_ms = wait_ms
        self._lanes: dict[str, Coalescer] = {}
        self._refreshing: asyncio.Task[None] | None = None
        self._refreshed_at = 0.0
        kw = rc.get_connection_kwargs()
        self._auth: dict[str, Any] = {k: kw[k] for k in ("username", "password") if kw.get(k)}

    def lane(self, name: str) -> Coalescer:
        """The coalescer of node `host:port`, made on first use."""
        c = self._lanes.get(name)
        if c is None:
            host, port = name.rsplit(":", 1)
            client = aioredis.Redis(connection_pool=aioredis.BlockingConnectionPool(
                host=host, port=int(port), max_connections=64, timeout=5, **self._auth, **pool_kwargs()))
            c = self._lanes[name] = Coalescer(client, self.wait_ms)
        return c

    def node_for(self, key: str) -> str:
        try:
            return self.rc.nodes_manager.get_node_from_slot(key_slot(key.encode())).name
        except (SlotNotCoveredError, KeyError) as e:  # no slot map yet, or this slot unserved
            raise ClusterDownError(f"slot {key_slot(key.encode())} is not served: {e}") from None

    async def run(self, script: Any, keys: list[str], args: list[Any]) -> Any:
        return await self._routed(keys[0], lambda lane, asking: self._asking(lane, script, keys, args)
                                  if asking else lane.run(script, keys, args))

    async def run_now(self, script: Any, keys: list[str], args: list[Any]) -> Any:
        return await self._routed(keys[0], lambda lane, asking: self._asking(lane, script, keys, args)
                                  if asking else lane.run_now(script, keys, args))

    async def command(self, key: str, *args: Any) -> Any:
        """One read-only command about `key` (a refund's XREVRANGE of its org's stream) on the
        primary owning its slot, redirected as decisions are: while the slot migrates it is
        answered, not given up on as redis-py's cluster client may ("TTL exhausted")."""
        return await self._routed(key, lambda lane, asking: self._command(lane, asking, args))

    async def _routed(self, key: str, send: Callable[[Coalescer, bool], Awaitable[Any]]) -> Any:
        """`send(lane, asking)` to the lane of `key`'s slot owner, again after a reply that says
        it did not run (MOVED, ASK, TRYAGAIN, CLUSTERDOWN), never after a timeout or lost connection."""
        asking = False
        deadline = 0.0
        target = ""
        hops = 0
        while hops <= MAX_REDIRECTS:
            try:
                target = target or self.node_for(key)
                return await send(self.lane(target), asking)
            except MovedError as e:  # not run: the slot lives elsewhere now
                metrics.REDIS_REDIRECTS.labels("moved").inc()
                self.refresh()
                target, asking, hops = f"{e.host}:{e.port}", False, hops + 1
            except AskError as e:  # (after MovedError, its subclass) slot migrating, key moved: ASKING there
                metrics.REDIS_REDIRECTS.labels("ask").inc()
                target, asking, hops = f"{e.host}:{e.port}", True, hops + 1
            except (ClusterDownError, TryAgainError) as e:  # not run: failover or migration under way
                metrics.REDIS_REDIRECTS.labels("tryagain" if isinstance(e, TryAgainError) else "clusterdown").inc()
                now = time.monotonic()
                deadline = deadline or now + SETTLE_S
                if now > deadline:
                    raise
                await asyncio.sleep(0.1)
                await self.refresh_now()
                target, asking, hops = "", False, 0  # ASK then TRYAGAIN is one migration: SETTLE_S bounds it
            except (RedisConnectionError, RedisTimeoutError):
                self.refresh()  # may have run: never resent; the next call finds the new primary
                raise
        raise ClusterDownError(f"more than {MAX_REDIRECTS} redirects for slot {key_slot(key.encode())}")

    @staticmethod
    async def _command(lane: Coalescer, asking: bool, args: tuple[Any, ...]) -> Any:
        """A command on the lane's pool; after ASK, ASKING and it back to back on one connection."""
        if not asking:
            return await lane.redis.execute_command(*args)
        async with lane.redis.pipeline(transaction=False) as pipe:
            pipe.execute_command("ASKING")
            pipe.execute_command(*args)
            return (await pipe.execute())[1]

    async def _asking(self, lane: Coalescer, script: Any, keys: list[str], args: list[Any]) -> Any:
        """ASKING and the script, back to back on one pooled connection of the importing node."""
        pool = lane.redis.connection_pool
        conn = await pool.get_connection()
        try:
            for attempt in (1, 2):
                await conn.send_packed_command(b"*1\r\n$6\r\nASKING\r\n" + script.pack(keys, args))
                await conn.read_response()
                try:
                    return await conn.read_response()
                except ResponseError as e:
                    if not not_loaded(e) or attempt == 2:
                        raise
                    await script.reload()  # not run: load (every primary), then once more
        except (RedisConnectionError, RedisTimeoutError, OSError):
            await conn.disconnect()
            raise
        finally:
            await pool.release(conn)

    def refresh(self) -> None:
        """A slot-map refresh in the background, at most one at a time and twice a second."""
        if (self._refreshing is None or self._refreshing.done()) and time.monotonic() - self._refreshed_at > 0.5:
            self._refreshing = asyncio.ensure_future(self.refresh_now())

    async def refresh_now(self) -> None:
        self._refreshed_at = time.monotonic()
        try:
            await self.rc.nodes_manager.initialize()
        except (RedisError, RedisClusterException) as e:
            log.warning("redis cluster: slot map refresh failed: %s", e)

    async def aclose(self) -> None:
        for c in self._lanes.values():
            await c.aclose()
            await c.redis.aclose()
        self._lanes.clear()
