"""The worker's side of the shard streams: one consumer of one group, reading every stream.

The interface the loop uses is small on purpose (a cluster-aware reader replaces this module):
`open`/`close`, `read` a batch, `ack` it, `dead_letter` what cannot be written, `reread` after
a failure, and the housekeeping: `claim`, `maintain` (trim and lag), `forget`, `write_report`.

Reading: this consumer's own pending entries first (left by a crash, a failed write or claimed
from a dead consumer), read from id 0 until none is left; then new ones (id >, BLOCK). The group
is created at id 0 on every stream, so nothing written before the first worker started is
missed. A deleted stream (FLUSHALL, a new Redis) takes its group with it: NOGROUP makes the
reader join again. The maintenance scripts are standalone files in lua/ (no _lib.lua prelude:
they touch streams only); redis-py reloads them on NOSCRIPT.

On a Redis Cluster (`REDIS_URL` naming any node; quota_gw/cluster.py) each shard stream is on
the primary owning its slot, and one XREADGROUP may not name streams of several slots: a read
is one XREADGROUP per stream, sent as one pipeline (the cluster client gives each node its
part), without BLOCK; an empty round waits `POLL_S`. Everything else already names one stream
(or one slot) per command. The client is made again from every node it knew, not only the
URL's, so a worker follows a failover of that node without a restart.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import orjson
import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.commands.core import AsyncScript
from redis.exceptions import ResponseError

from quota_gw import cluster
from quota_gw.layout import Layout
from quota_gw.scripts import lua_dir

from . import packing
from .encoding import Entry

if TYPE_CHECKING:
    from redis.typing import EncodableT, FieldT

log = logging.getLogger("quota_gw.worker")

GROUP = "qgw-sync"
MAINTAIN_LUA = (lua_dir() / "worker_maintain.lua").read_text()
FORGET_LUA = (lua_dir() / "worker_forget.lua").read_text()
DEAD_LETTERS_KEPT = 100_000  # per stream, approximately
POLL_S = 0.05  # a cluster has no multi-stream BLOCK: an empty read round waits this long


@dataclass(slots=True)
class Lag:
    """One stream after maintenance: what this group has not acked yet, and what was trimmed."""

    stream: str
    entries: int  # undelivered + pending
    seconds: float  # age of the oldest entry not acked (0: none)
    trimmed: int


class Streams:
    def __init__(self, redis_url: str, layout: Layout, consumer: str, group: str = GROUP, batch: int = 1000,
                 block_ms: int = 500, claim_idle_ms: int = 30_000) -> None:
        self.redis_url, self.layout, self.consumer, self.group = redis_url, layout, consumer, group
        self.batch, self.block_ms, self.claim_idle_ms = batch, block_ms, claim_idle_ms
        self.names = [s.encode() for s in layout.streams()]
        self.redis: aioredis.Redis | RedisCluster | None = None
        self.cluster_nodes: list[tuple[str, int]] | None = None  # a cluster's nodes, last seen; None: one Redis
        self.backlog = True  # own pending entries may exist: read those before new ones
        self._joined = False
        self._maintain: AsyncScript | None = None
        self._forget: AsyncScript | None = None

    # --- connection ----------------------------------------------------------------------------
    async def open(self) -> None:
        """Connects (once) and joins the group on every stream (again after NOGROUP)."""
        if self.redis is None:
            self.redis = await self._connect()
            raw = lambda response, **kw: response  # noqa: E731 - keep replies as nested lists of bytes
            self.redis.set_response_callback("XREADGROUP", raw)
            self.redis.set_response_callback("XAUTOCLAIM", raw)
            self._maintain = self.redis.register_script(MAINTAIN_LUA)
            self._forget = self.redis.register_script(FORGET_LUA)
            self._joined = False
        if not self._joined:
            for s in self.names:
                try:
                    await self.redis.xgroup_create(s, self.group, id="0", mkstream=True)
                except ResponseError as e:
                    if "BUSYGROUP" not in str(e):
                        raise
            self._joined = True

    async def _connect(self) -> aioredis.Redis | RedisCluster:
        kw: dict[str, Any] = {"decode_responses": False, "protocol": 2, "socket_connect_timeout": 5,
                              "socket_timeout": self.block_ms / 1000 + 10}
        if self.cluster_nodes is None and not await cluster.is_cluster(self.redis_url):
            return aioredis.from_url(self.redis_url, **kw, **packing.client_options(self.redis_url))
        # the cluster client makes its own connections (redis-py's packer: no hiredis packing)
        if self.cluster_nodes:  # every node seen so far: the URL's may be the one that failed
            rc = RedisCluster(startup_nodes=[ClusterNode(h, p) for h, p in self.cluster_nodes], **kw)
        else:
            rc = RedisCluster.from_url(cluster.plain_url(self.redis_url), **kw)
        await rc.initialize()
        self.cluster_nodes = [(n.host, int(n.port)) for n in rc.get_nodes()]
        return rc

    async def close(self) -> None:
        if isinstance(self.redis, RedisCluster):
            self.cluster_nodes = [(n.host, int(n.port)) for n in self.redis.get_nodes()] or self.cluster_nodes
        if self.redis is not None:
            try:
                await self.redis.aclose()
            except Exception:  # noqa: BLE001 - already broken
                pass
            self.redis = None

    def reread(self) -> None:
        """After a failure: whatever was read and not acked is pending; read it again first."""
        self.backlog = True

    def _client(self) -> aioredis.Redis:
        """The client; a cluster's offers the same commands (each names one stream or slot)."""
        assert self.redis is not None, "open() first"
        return cast(aioredis.Redis, self.redis)

    # --- the batch -----------------------------------------------------------------------------
    async def read(self, block: bool = True) -> tuple[bool, Any]:
        """(redelivered, XREADGROUP reply): own pending entries first (id 0), else new ones (id >),
        across every stream, up to `batch` per stream. The reply is [[stream, [[id, fields]]]],
        fields None for an entry deleted while pending."""
        pending = self.backlog
        args: list[Any] = ["XREADGROUP", "GROUP", self.group, self.consumer, "COUNT", self.batch]
        try:
            if isinstance(self.redis, RedisCluster):
                reply = await self._read_each(args, pending, block)
            else:
                if not pending and block:
                    args += ["BLOCK", self.block_ms]
                args += ["STREAMS", *self.names, *([b"0" if pending else b">"] * len(self.names))]
                reply = await self._client().execute_command(*args)
        except ResponseError as e:
            if "NOGROUP" in str(e) or "UNBLOCKED" in str(e):  # streams deleted (flush, new Redis): join again
                self._joined = False
                self.backlog = True
                return False, None
            raise
        if pending and not any(items for _, items in reply or ()):
            self.backlog = False
        return pending, reply

    async def _read_each(self, args: list[Any], pending: bool, block: bool) -> list[Any]:
        """One XREADGROUP per stream (a cluster: one slot per command), in one pipeline; the
        replies joined as one multi-stream reply. Nothing new: wait POLL_S, then answer empty."""
        async with self._client().pipeline(transaction=False) as p:
            for s in self.names:
                p.execute_command(*args, "STREAMS", s, b"0" if pending else b">")
            replies = await p.execute()
        reply = [x for r in replies for x in (r or ()) if x[1]]
        if not reply and block and not pending:
            await asyncio.sleep(POLL_S)
        return reply

    async def ack(self, ids: dict[bytes, list[bytes]]) -> None:
        """Acks entries, per stream (only after their rows are committed)."""
        async with self._client().pipeline(transaction=False) as p:
            for s, batch in ids.items():
                p.xack(s, self.group, *batch)
            await p.execute()

    async def dead_letter(self, dead: list[Entry]) -> None:
        """Moves entries the ledger refuses to `<stream>:dead`, with the error, and acks them."""
        for e in dead:
            # The dead letter and its ack in one MULTI (same hash tag): never one without the other.
            fields: dict[FieldT, EncodableT] = {b"stream": e.stream, b"entry_id": e.id, b"error": e.error.encode()[:2000],
                      b"consumer": self.consumer.encode(),
                      b"fields": orjson.dumps([x.decode("utf-8", "replace") for x in (e.fields or [])])}
            async with self._client().pipeline(transaction=True) as p:
                p.xadd(e.stream + b":dead", fields, maxlen=DEAD_LETTERS_KEPT, approximate=True)
                p.xack(e.stream, self.group, e.id)
                await p.execute()
            log.error("worker %s: dead letter %s %s: %s", self.consumer, e.stream.decode(), e.id.decode(), e.error)

    # --- housekeeping --------------------------------------------------------------------------
    async def claim(self) -> int:
        """Takes over entries idle longer than claim_idle from any consumer (a dead one, most
        likely); they join this consumer's pending entries and are read again from there."""
        claimed = 0
        for s in self.names:
            start = b"0-0"
            while True:
                try:
                    nxt, ids, *_ = await self._client().execute_command(
                        "XAUTOCLAIM", s, self.group, self.consumer, self.claim_idle_ms, start, "COUNT", 1000, "JUSTID")
                except ResponseError as e:
                    if "NOGROUP" in str(e):
                        self._joined = False
                        return claimed
                    raise
                claimed += len(ids)
                if nxt in (b"0-0", "0-0"):
                    break
                start = nxt
        if claimed:
            log.info("worker %s: claimed %d idle entries", self.consumer, claimed)
            self.backlog = True
        return claimed

    async def maintain(self, trim: bool) -> tuple[list[Lag], int, int]:
        """Trims every stream below what every group has acked (lua/worker_maintain.lua) and
        measures this group's lag. Returns (lag per stream, entries in dead-letter streams,
        Redis time in ms; 0 without streams)."""
        assert self._maintain is not None
        lags, now_ms = [], 0
        for s in self.names:
            trimmed, undelivered, pending, oldest, now_ms = (
                int(x) for x in await self._maintain(keys=[s], args=[self.group, int(trim)]))
            lags.append(Lag(s.decode(), undelivered + pending, max(0, now_ms - oldest) / 1000 if oldest >= 0 else 0,
                            trimmed))
        async with self._client().pipeline(transaction=False) as p:
            for s in self.names:
                p.xlen(s + b":dead")
            dead = sum(await p.execute())
        return lags, dead, now_ms

    async def forget(self, idle_ms: int) -> None:
        """Deletes consumers idle longer than idle_ms that hold nothing (lua/worker_forget.lua)."""
        assert self._forget is not None
        for s in self.names:
            await self._forget(keys=[s], args=[self.group, idle_ms, self.consumer])

    async def write_report(self, report: bytes) -> None:
        """This consumer's report for GET /v1/admin/worker, kept a day."""
        await self._client().set(self.layout.worker(self.consumer), report, ex=86_400)
