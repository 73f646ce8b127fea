"""The sync worker: drains the per-shard event streams into Postgres `usage_events`, exactly once.

One loop, top to bottom:

1. Join the consumer group on every shard stream (created at id 0, so nothing written before
   the first worker started is missed) and make the month partitions ahead.
2. Read a batch: first this consumer's own pending entries (left by a crash, a failed write or
   claimed from a dead consumer), then new ones (XREADGROUP ... BLOCK over all streams).
3. Write the batch in one Postgres transaction (sql.py: COPY, falling back to an idempotent
   INSERT ... ON CONFLICT DO NOTHING when any row is already there).
4. XACK only after COMMIT. A crash anywhere before the ack leaves the entries pending; they are
   read again and the primary key (event_id, ts) drops what had already been committed.
5. Now and then: claim entries idle too long from dead consumers (XAUTOCLAIM), trim the streams
   below what every group has acked, report lag, make partitions.

An entry Postgres refuses (a poison entry) is isolated by splitting the batch, moved to the
dead-letter stream `<stream>:dead` with the error, and acked; it never blocks the rest.
Postgres or Redis errors: back off and reconnect; nothing is acked, so nothing is lost.
SIGTERM/SIGINT: the batch in hand is written and acked, then the worker exits.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import signal
import socket
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import orjson
import redis.asyncio as aioredis
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import CONTENT_TYPE_LATEST
from redis.exceptions import RedisError, ResponseError

from quota_gw import events
from quota_gw.layout import Layout

from . import sql

log = logging.getLogger("quota_gw.worker")

GROUP = "qgw-sync"

# The fields lua/_lib.lua Events:add writes, in its order (quota_gw/events.py), and the
# positions copy_line rewrites, by name.
FIELDS = [n.encode() for n in events.NAMES]
_ENTRY_LEN = 2 * len(FIELDS)  # field, value, field, value, ...
_TS = events.POSITION["ts"]
_META = events.POSITION["meta"]
# SQLSTATE classes that mean "this row is bad", not "the database is unwell": data exceptions,
# integrity violations (a unique violation is handled before), program limits (huge values).
POISON_CLASSES = ("22", "23", "54")

# --- metrics (served on --metrics-port) -------------------------------------------------------
REGISTRY = CollectorRegistry(auto_describe=True)
LAG_ENTRIES = Gauge("qgw_worker_stream_lag_entries", "Entries not yet acked by the group (undelivered + pending)",
                    ["stream"], registry=REGISTRY)
LAG_SECONDS = Gauge("qgw_worker_stream_lag_seconds", "Age of the oldest entry the group has not acked",
                    ["stream"], registry=REGISTRY)
BATCH_SIZE = Histogram("qgw_worker_batch_size", "Entries per batch", registry=REGISTRY,
                       buckets=(1, 10, 50, 100, 500, 1000, 5000, 10000, 50000))
BATCH_SECONDS = Histogram("qgw_worker_batch_seconds", "Time to write and ack one batch", registry=REGISTRY)
ROWS = Counter("qgw_worker_rows_total", "Stream entries handled, by outcome (inserted, duplicate, dead)",
               ["outcome"], registry=REGISTRY)
ROWS_PER_S = Gauge("qgw_worker_rows_per_second", "Rows written per second (last batch)", registry=REGISTRY)
DEAD = Gauge("qgw_worker_dead_letters", "Entries in the dead-letter streams", registry=REGISTRY)
ERRORS = Counter("qgw_worker_errors_total", "Rounds that failed, by the store that failed (redis, postgres, other); "
                 "retried", ["kind"], registry=REGISTRY)
REDELIVERED = Counter("qgw_worker_redelivered_total", "Entries read again from the pending list (after a crash, "
                      "a failed write or a claim from a dead consumer)", registry=REGISTRY)
TRIMMED = Counter("qgw_worker_trimmed_total", "Entries trimmed from the streams", registry=REGISTRY)

# Trims one stream below what every group still needs and reports this group's lag, atomically.
# A group with pending entries needs its lowest pending id; one without needs what comes after
# its last-delivered id. XTRIM MINID keeps ids >= the floor, so nothing unacked is ever trimmed.
# KEYS[1] stream; ARGV[1] group, ARGV[2] '1' to trim.
# Returns {trimmed, undelivered, pending, oldest unacked ms (-1 none), now ms}.
MAINTAIN_LUA = """
local function parse(id)
  local ms, seq = string.match(id, '^(%d+)-(%d+)$')
  return tonumber(ms), tonumber(seq)
end
local function less(a, b)
  local am, as = parse(a)
  local bm, bs = parse(b)
  return am < bm or (am == bm and as < bs)
end
local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if redis.call('EXISTS', KEYS[1]) == 0 then return {0, 0, 0, -1, now_ms} end
local floor = nil
local undelivered, pending, oldest = 0, 0, -1
for _, g in ipairs(redis.call('XINFO', 'GROUPS', KEYS[1])) do
  local info = {}
  for i = 1, #g, 2 do info[g[i]] = g[i + 1] end
  local need = info['last-delivered-id']
  local low = nil
  if info['pending'] > 0 then
    low = redis.call('XPENDING', KEYS[1], info['name'])[2]
    need = low
  end
  if floor == nil or less(need, floor) then floor = need end
  if info['name'] == ARGV[1] then
    pending = info['pending']
    if info['lag'] then undelivered = info['lag'] end
    local first = low
    if first == nil then
      local nxt = redis.call('XRANGE', KEYS[1], '(' .. info['last-delivered-id'], '+', 'COUNT', 1)
      if #nxt > 0 then first = nxt[1][1] end
    end
    if first ~= nil then oldest = parse(first) end
  end
end
local trimmed = 0
if floor ~= nil and ARGV[2] == '1' then
  trimmed = redis.call('XTRIM', KEYS[1], 'MINID', floor)
end
return {trimmed, undelivered, pending, oldest, now_ms}
"""

# Forgets consumers that hold nothing and have not read for a long time (dead pods), so the
# group does not grow without bound. Only with 0 pending: deleting a consumer drops its PEL.
# KEYS[1] stream; ARGV[1] group, ARGV[2] idle ms, ARGV[3] own name (kept).
FORGET_LUA = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
local n = 0
for _, c in ipairs(redis.call('XINFO', 'CONSUMERS', KEYS[1], ARGV[1])) do
  local info = {}
  for i = 1, #c, 2 do info[c[i]] = c[i + 1] end
  if info['pending'] == 0 and info['idle'] > tonumber(ARGV[2]) and info['name'] ~= ARGV[3] then
    n = n + redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], info['name'])
  end
end
return n
"""


try:
    from redis.connection import HiredisRespSerializer

    import hiredis

    class _HiredisPacking(aioredis.Connection):
        """redis-py's asyncio client packs commands in pure Python, which costs more than the
        whole COPY for an XACK of thousands of ids; hiredis packs them in C."""

        _packer = HiredisRespSerializer()

        def pack_command(self, *args: Any) -> list[bytes]:
            if isinstance(args[0], str) and " " not in args[0]:
                return [hiredis.pack_command(args)]  # XACK, XREADGROUP: bytes, str and ints only
            return self._packer.pack(*args)
except ImportError:  # no hiredis: the slower packer still works
    _HiredisPacking = None  # type: ignore[assignment,misc]


class BadEntry(ValueError):
    """A stream entry that is not an event the worker can write."""


_sec_cache: list[Any] = [None, b""]  # the last second seen and its "YYYY-MM-DD HH:MM:SS"


def _escape(v: bytes) -> bytes:
    return v.replace(b"\\", b"\\\\").replace(b"\t", b"\\t").replace(b"\n", b"\\n").replace(b"\r", b"\\r")


def copy_line(stream_ref: bytes, entry_id: bytes, f: list[bytes] | None, meta: bytes | None = None) -> bytes:
    """One COPY text line (sql.COLUMNS) from a raw entry; `meta` overrides the metadata.
    The hottest function of the worker: one slice, one join, a few C-level scans."""
    if f is None or len(f) != _ENTRY_LEN or f[0::2] != FIELDS:
        raise BadEntry("not an event entry: unexpected fields")
    v = f[1::2]
    if meta is not None:
        v[_META] = meta
    try:
        us = int(v[_TS])
        sec = us // 1_000_000
        if sec != _sec_cache[0]:
            _sec_cache[1] = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(sec)).encode()
            _sec_cache[0] = sec
        v[_TS] = b"%b.%06d+00" % (_sec_cache[1], us - sec * 1_000_000)
    except (ValueError, OverflowError, OSError) as e:
        raise BadEntry(f"bad ts {v[_TS][:40]!r}: {e}") from None
    line = b"\t".join(v)
    if b"\\" in line or b"\n" in line or b"\r" in line or line.count(b"\t") != len(FIELDS) - 1:
        line = b"\t".join([_escape(x) for x in v])  # JSON metadata with escapes, mostly
    return line + b"\t" + stream_ref + entry_id + b"\n"


# A stream entry to write: (stream, entry id, raw fields, COPY line). Tuples, not objects: a
# batch holds thousands and the worker's CPU is the drain's limit (docs/benchmarks.md).
Row = tuple[bytes, bytes, list[bytes], bytes]


@dataclass(slots=True)
class Entry:
    """An entry that goes to the dead-letter stream, and why."""

    stream: bytes
    id: bytes
    fields: list[bytes] | None
    error: str = ""


@dataclass(slots=True)
class Batch:
    """What one XREADGROUP returned, parsed."""

    redelivered: bool  # read from this consumer's pending entries: likely written already
    rows: list[Row] = field(default_factory=list)
    dead: list[Entry] = field(default_factory=list)
    ids: dict[bytes, list[bytes]] = field(default_factory=dict)  # everything to ack, per stream
    gone: int = 0  # pending entries deleted from the stream before they were written
    size: int = 0


@dataclass
class Stats:
    batches: int = 0
    inserted: int = 0
    duplicates: int = 0
    dead: int = 0
    errors: int = 0
    started: float = field(default_factory=time.monotonic)
    last_batch: tuple[float, int, float] | None = None  # (monotonic time, entries, seconds)


def _fault(point: str) -> None:
    """Test-only crash injection: QUOTA_GW_WORKER_FAULTS='copy:0.05,commit:0.05' SIGKILLs the
    worker at that point with that probability (mid-COPY, between COMMIT and XACK)."""
    spec = os.environ.get("QUOTA_GW_WORKER_FAULTS")
    if not spec:
        return
    for part in spec.split(","):
        name, _, p = part.partition(":")
        if name == point and random.random() < float(p or 1):
            os.kill(os.getpid(), signal.SIGKILL)


def failed_store(e: BaseException) -> str:
    """Which store a round failed on. A refused connection or a timeout is a plain OSError or
    TimeoutError whichever client raised it: the deepest client frame in its traceback says."""
    if isinstance(e, RedisError):
        return "redis"
    if isinstance(e, (asyncpg.PostgresError, asyncpg.InterfaceError)):
        return "postgres"
    store = "other"
    tb = e.__traceback__
    while tb is not None:
        mod = tb.tb_frame.f_globals.get("__name__", "")
        if mod.startswith("asyncpg"):
            store = "postgres"
        elif mod.startswith("redis"):
            store = "redis"
        tb = tb.tb_next
    return store


def _poison(e: BaseException) -> bool:
    state = getattr(e, "sqlstate", None) or ""
    return isinstance(e, asyncpg.PostgresError) and state[:2] in POISON_CLASSES and state != "23505"


class Worker:
    def __init__(self, redis_url: str, database_url: str, layout: Layout, consumer: str | None = None,
                 group: str = GROUP, batch: int = 1000, block_ms: int = 500, claim_idle_s: float = 30.0,
                 maintain_every_s: float = 2.0, trim: bool = True, partitions_ahead: int = 4) -> None:
        self.redis_url, self.database_url, self.layout = redis_url, database_url, layout
        self.consumer = consumer or socket.gethostname()
        self.group, self.batch, self.block_ms = group, batch, block_ms
        self.claim_idle_ms = int(claim_idle_s * 1000)
        self.maintain_every_s, self.trim, self.partitions_ahead = maintain_every_s, trim, partitions_ahead
        self.streams = [s.encode() for s in layout.streams()]
        self.stats = Stats()
        self.stopping = asyncio.Event()
        self.redis: aioredis.Redis | None = None
        self.pg: asyncpg.Connection | None = None
        self.backlog = True  # own pending entries may exist: read those before new ones
        self.ready = False
        self._setup_done = False
        self._due: dict[str, float] = {}
        self._next: Batch | None = None  # read ahead while the previous batch was written

    # --- lifecycle ---------------------------------------------------------------------------
    def stop(self) -> None:
        """Finish the batch in hand, then return from run()."""
        self.stopping.set()

    async def run(self) -> Stats:
        log.info("worker %s: group %s on %d streams", self.consumer, self.group, len(self.streams))
        delay = 0.1
        while not self.stopping.is_set() or self._next is not None:
            try:
                await self._connect()
                await self._round()
                delay = 0.1
            except Exception as e:  # noqa: BLE001 - a daemon: log, back off, reconnect, retry
                kind = failed_store(e)
                ERRORS.labels(kind).inc()
                self.stats.errors += 1
                log.warning("worker %s: %s error, retrying in %.1fs: %s: %s", self.consumer, kind, delay,
                            type(e).__name__, e, exc_info=log.isEnabledFor(logging.DEBUG))
                self.ready = False
                self.backlog = True  # whatever was read stays pending: read it again
                self._next = None
                await self._disconnect(pg=True, redis=True)
                try:
                    await asyncio.wait_for(self.stopping.wait(), delay)
                except asyncio.TimeoutError:
                    pass
                delay = min(delay * 2, 5.0) * random.uniform(0.8, 1.2)
        await self._disconnect(pg=True, redis=True)
        s = self.stats
        log.info("worker %s: stopped: %d inserted, %d duplicates skipped, %d dead letters, %d batches, "
                 "%d errors", self.consumer, s.inserted, s.duplicates, s.dead, s.batches, s.errors)
        return s

    async def _connect(self) -> None:
        if self.redis is None:
            kw: dict[str, Any] = {}
            if _HiredisPacking is not None and self.redis_url.startswith("redis://"):
                kw["connection_class"] = _HiredisPacking
            self.redis = aioredis.from_url(self.redis_url, decode_responses=False, protocol=2,
                                           socket_connect_timeout=5, socket_timeout=self.block_ms / 1000 + 10, **kw)
            raw = lambda r, **kw: r  # noqa: E731 - keep replies as nested lists of bytes
            self.redis.set_response_callback("XREADGROUP", raw)
            self.redis.set_response_callback("XAUTOCLAIM", raw)
            self._maintain = self.redis.register_script(MAINTAIN_LUA)
            self._forget = self.redis.register_script(FORGET_LUA)
            self._setup_done = False
        if self.pg is None:
            self.pg = await asyncpg.connect(self.database_url, timeout=10, command_timeout=60,
                                            server_settings={"application_name": f"qgw-sync:{self.consumer}"[:63]})
            await self.pg.execute(sql.CREATE_STAGE)
        if not self._setup_done:
            await self._join_groups()
            self._setup_done = True
        self.ready = True

    async def _disconnect(self, pg: bool, redis: bool) -> None:
        if pg and self.pg is not None:
            self.pg.terminate()
            self.pg = None
        if redis and self.redis is not None:
            try:
                await self.redis.aclose()
            except Exception:  # noqa: BLE001 - already broken
                pass
            self.redis = None

    async def _join_groups(self) -> None:
        assert self.redis is not None
        for s in self.streams:
            try:
                await self.redis.xgroup_create(s, self.group, id="0", mkstream=True)
            except ResponseError as e:
                if "BUSYGROUP" not in str(e):
                    raise

    # --- one round ---------------------------------------------------------------------------
    async def _round(self) -> None:
        await self._housekeeping()
        batch, self._next = self._next or await self._read(), None
        if not batch.size:
            return
        # Read (and parse) the next batch while Postgres writes this one: the two then run on
        # two cores. Only new entries: pending ones are re-read in order after an error.
        nxt = None
        if not batch.redelivered and not self.stopping.is_set():
            nxt = asyncio.create_task(self._read(block=False))
        try:
            await self._handle(batch)
        except BaseException:
            if nxt is not None:  # what it read stays pending; it is read again from there
                nxt.add_done_callback(lambda t: t.cancelled() or t.exception())
                nxt.cancel()
            raise
        if nxt is not None:
            self._next = await nxt

    async def _read(self, block: bool = True) -> Batch:
        """Own pending entries first (id 0), else new ones (id >), across every stream."""
        assert self.redis is not None
        pending = self.backlog
        args: list[Any] = ["XREADGROUP", "GROUP", self.group, self.consumer, "COUNT", self.batch]
        if not pending and block:
            args += ["BLOCK", self.block_ms]
        args += ["STREAMS", *self.streams, *([b"0" if pending else b">"] * len(self.streams))]
        try:
            reply = await self.redis.execute_command(*args)
        except ResponseError as e:
            if "NOGROUP" in str(e) or "UNBLOCKED" in str(e):  # streams deleted (flush, new Redis): join again
                self._setup_done = False
                self.backlog = True
                return Batch(False)
            raise
        batch = Batch(pending)
        rows, ids_of = batch.rows, batch.ids
        for stream, items in reply or ():
            if not items:
                continue
            ref = _escape(stream) + b"/"
            ids = ids_of[stream] = []
            for eid, f in items:
                ids.append(eid)
                if f is None:
                    batch.gone += 1  # deleted while pending (trimmed by someone else): nothing to write
                    continue
                try:
                    rows.append((stream, eid, f, copy_line(ref, eid, f)))
                except BadEntry as err:
                    batch.dead.append(Entry(stream, eid, f, str(err)))
            batch.size += len(items)
        if pending and not batch.size:
            self.backlog = False
        if pending:
            REDELIVERED.inc(batch.size)
        return batch

    async def _handle(self, batch: Batch) -> None:
        t0 = time.perf_counter()
        inserted, dups = await self._write(batch.rows, batch.dead, batch.redelivered)
        _fault("commit")
        await self._dead_letter(batch.dead)
        await self._ack(batch.ids)
        n_dead = len(batch.dead)
        self.stats.batches += 1
        self.stats.inserted += inserted
        self.stats.duplicates += dups
        self.stats.dead += n_dead
        ROWS.labels("inserted").inc(inserted)
        ROWS.labels("duplicate").inc(dups)
        ROWS.labels("dead").inc(n_dead)
        BATCH_SIZE.observe(batch.size)
        dt = time.perf_counter() - t0
        self.stats.last_batch = (time.monotonic(), batch.size, dt)
        BATCH_SECONDS.observe(dt)
        ROWS_PER_S.set(batch.size / dt if dt > 0 else 0)
        if dups:
            log.info("worker %s: skipped %d events already in Postgres (redelivered)", self.consumer, dups)
        if batch.gone:
            log.warning("worker %s: %d pending entries were deleted from their stream before being written",
                        self.consumer, batch.gone)

    # --- Postgres ----------------------------------------------------------------------------
    async def _write(self, rows: list[Row], dead: list[Entry], redelivered: bool) -> tuple[int, int]:
        """Writes `rows`, moving rows Postgres refuses to `dead`. Returns (inserted, duplicates)."""
        if not rows:
            return 0, 0
        try:
            n = await self._transaction([r[3] for r in rows], fast=not redelivered)
            return n, len(rows) - n
        except asyncpg.PostgresError as e:
            if not _poison(e):
                raise
            if len(rows) == 1:
                return await self._write_one(rows[0], dead, e)
        # Isolate the poison: each half in its own transaction, down to single rows.
        mid = len(rows) // 2
        a = await self._write(rows[:mid], dead, redelivered)
        b = await self._write(rows[mid:], dead, redelivered)
        return a[0] + b[0], a[1] + b[1]

    async def _write_one(self, row: Row, dead: list[Entry], err: BaseException) -> tuple[int, int]:
        """A single refused row. If only its metadata is bad (say, JSON with \\u0000, which jsonb
        refuses) the event is still a balance change: keep it, with the metadata replaced."""
        stream, eid, fields, _ = row
        meta = fields[2 * _META + 1]
        if meta:
            note = orjson.dumps({"_invalid_metadata": str(err)[:200],
                                 "raw": meta.decode("utf-8", "replace").replace("\x00", "")})
            try:
                line = copy_line(_escape(stream) + b"/", eid, fields, meta=note)
                n = await self._transaction([line], fast=False)
                log.warning("worker %s: kept %s with its metadata replaced: %s", self.consumer, eid.decode(), err)
                return n, 1 - n
            except (BadEntry, asyncpg.PostgresError) as e2:
                if isinstance(e2, asyncpg.PostgresError) and not _poison(e2):
                    raise
        dead.append(Entry(stream, eid, fields, f"{type(err).__name__}: {err}"))
        return 0, 0

    async def _transaction(self, lines: list[bytes], fast: bool) -> int:
        """One transaction; returns the rows inserted (rows already there are skipped)."""
        pg = self.pg
        assert pg is not None
        if fast:
            try:
                async with pg.transaction():
                    await pg.copy_to_table("usage_events", source=_chunks(lines), columns=sql.COLUMNS,
                                           **sql.COPY_OPTIONS)
                return len(lines)
            except asyncpg.UniqueViolationError:
                pass  # some row was written before (a redelivery): take the idempotent path
        async with pg.transaction():
            await pg.copy_to_table(sql.STAGE, source=_chunks(lines), columns=sql.COLUMNS, **sql.COPY_OPTIONS)
            status = await pg.execute(sql.INSERT_STAGED)
        return int(status.rsplit(" ", 1)[1])

    # --- Redis -------------------------------------------------------------------------------
    async def _dead_letter(self, dead: list[Entry]) -> None:
        assert self.redis is not None
        for e in dead:
            # The dead letter and its ack in one MULTI (same hash tag): never one without the other.
            fields = {b"stream": e.stream, b"entry_id": e.id, b"error": e.error.encode()[:2000],
                      b"consumer": self.consumer.encode(),
                      b"fields": orjson.dumps([x.decode("utf-8", "replace") for x in (e.fields or [])])}
            async with self.redis.pipeline(transaction=True) as p:
                p.xadd(e.stream + b":dead", fields, maxlen=100_000, approximate=True)
                p.xack(e.stream, self.group, e.id)
                await p.execute()
            log.error("worker %s: dead letter %s %s: %s", self.consumer, e.stream.decode(), e.id.decode(), e.error)

    async def _ack(self, ids: dict[bytes, list[bytes]]) -> None:
        assert self.redis is not None
        async with self.redis.pipeline(transaction=False) as p:
            for s, batch in ids.items():
                p.xack(s, self.group, *batch)
            await p.execute()

    def _due_now(self, what: str, every: float) -> bool:
        now = time.monotonic()
        if self._due.get(what, 0) <= now:
            self._due[what] = now + every
            return True
        return False

    async def _housekeeping(self) -> None:
        assert self.redis is not None and self.pg is not None
        if self._due_now("partitions", 3600):
            await self.ensure_partitions()
        if self._due_now("claim", max(1.0, self.claim_idle_ms / 2000)):
            await self.claim()
        if self._due_now("maintain", self.maintain_every_s):
            await self.maintain()
        if self._due_now("forget", 3600):
            for s in self.streams:
                await self._forget(keys=[s], args=[self.group, 86_400_000, self.consumer])

    async def ensure_partitions(self) -> None:
        assert self.pg is not None
        try:
            async with self.pg.transaction():
                await self.pg.execute("SELECT pg_advisory_xact_lock($1)", sql.PARTITIONS_LOCK)
                await self.pg.execute(sql.ENSURE_PARTITIONS, self.partitions_ahead)
        except asyncpg.CheckViolationError as e:
            log.warning("worker %s: cannot make a partition ahead: %s", self.consumer, e)

    async def claim(self) -> int:
        """Takes over entries idle longer than claim_idle from any consumer (a dead one, most
        likely); they join this consumer's pending entries and are read again from there."""
        assert self.redis is not None
        claimed = 0
        for s in self.streams:
            start = b"0-0"
            while True:
                try:
                    nxt, ids, *_ = await self.redis.execute_command(
                        "XAUTOCLAIM", s, self.group, self.consumer, self.claim_idle_ms, start, "COUNT", 1000, "JUSTID")
                except ResponseError as e:
                    if "NOGROUP" in str(e):
                        self._setup_done = False
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

    async def maintain(self) -> None:
        """Trims what every group has acked; reports lag and dead letters."""
        assert self.redis is not None
        dead = 0
        for s in self.streams:
            trimmed, undelivered, pending, oldest, now_ms = await self._maintain(
                keys=[s], args=[self.group, int(self.trim)])
            name = s.decode()
            LAG_ENTRIES.labels(name).set(int(undelivered) + int(pending))
            LAG_SECONDS.labels(name).set(max(0, int(now_ms) - int(oldest)) / 1000 if int(oldest) >= 0 else 0)
            TRIMMED.inc(int(trimmed))
        async with self.redis.pipeline(transaction=False) as p:
            for s in self.streams:
                p.xlen(s + b":dead")
            dead = sum(await p.execute())
        DEAD.set(dead)
        await self._report(int(now_ms) if self.streams else 0)

    async def _report(self, now_ms: int) -> None:
        """This consumer's counters and last batch, for GET /v1/admin/worker: times on Redis's
        clock (ms), written with the maintenance (every few seconds), kept a day."""
        assert self.redis is not None
        s, last = self.stats, self.stats.last_batch
        report = {"consumer": self.consumer, "reported_at_ms": now_ms, "batches": s.batches, "inserted": s.inserted,
                  "duplicates": s.duplicates, "dead_letters": s.dead, "errors": s.errors,
                  "last_batch": None if last is None else {
                      "at_ms": now_ms - int((time.monotonic() - last[0]) * 1000), "entries": last[1],
                      "seconds": round(last[2], 4)}}
        await self.redis.set(self.layout.worker(self.consumer), orjson.dumps(report), ex=86_400)


async def _chunks(lines: list[bytes], size: int = 1 << 16) -> AsyncIterator[bytes]:
    """The COPY payload in ~64 KiB pieces (the fault point sits between two pieces)."""
    buf: list[bytes] = []
    n = 0
    first = True
    for line in lines:
        buf.append(line)
        n += len(line)
        if n >= size:
            yield b"".join(buf)
            buf, n = [], 0
            if first:
                _fault("copy")
                first = False
    if buf:
        yield b"".join(buf)
        if first:
            _fault("copy")


# --- the small HTTP endpoint: /metrics, /healthz, /readyz -----------------------------------------
async def serve_metrics(worker: Worker, host: str, port: int) -> asyncio.AbstractServer:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = await asyncio.wait_for(reader.readline(), 5)
            while (await asyncio.wait_for(reader.readline(), 5)) not in (b"\r\n", b"\n", b""):
                pass
            path = line.split(b" ")[1] if line.count(b" ") >= 2 else b"/"
            if path.startswith(b"/metrics"):
                status, ctype, body = b"200 OK", CONTENT_TYPE_LATEST.encode(), generate_latest(REGISTRY)
            elif path.startswith(b"/healthz"):
                status, ctype, body = b"200 OK", b"text/plain", b"ok"
            elif path.startswith(b"/readyz"):
                ok = worker.ready
                status = b"200 OK" if ok else b"503 Service Unavailable"
                ctype, body = b"application/json", orjson.dumps({"ready": ok, "consumer": worker.consumer})
            else:
                status, ctype, body = b"404 Not Found", b"text/plain", b"not found"
            writer.write(b"HTTP/1.1 " + status + b"\r\nContent-Type: " + ctype + b"\r\nContent-Length: "
                         + str(len(body)).encode() + b"\r\nConnection: close\r\n\r\n" + body)
            await writer.drain()
        except (asyncio.TimeoutError, ConnectionError, IndexError):
            pass
        finally:
            writer.close()

    return await asyncio.start_server(handle, host, port)


async def main(redis_url: str, database_url: str, layout: Layout, consumer: str | None, batch: int,
               block_ms: int, claim_idle_s: float, metrics_port: int | None, metrics_host: str = "127.0.0.1") -> int:
    worker = Worker(redis_url, database_url, layout, consumer, batch=batch, block_ms=block_ms,
                    claim_idle_s=claim_idle_s)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, worker.stop)
    server = await serve_metrics(worker, metrics_host, metrics_port) if metrics_port else None
    try:
        await worker.run()
    finally:
        if server is not None:
            server.close()
    return 0
