"""The sync worker: drains the per-shard event streams into Postgres `usage_events`, exactly once.

One loop, top to bottom (`Worker.run`):

1. Connect: the ledger (ledger.py) and the streams (stream.py), which joins the consumer group
   on every shard stream. Once per start, before the first batch: move the users hashes of the
   old layout into the balance hashes (migrate_users.py).
2. Housekeeping, when due: make the month partitions ahead, claim entries idle too long from
   dead consumers, trim the streams below what every group has acked and report lag, forget
   long-dead consumers.
3. Read a batch (stream.py: this consumer's own pending entries first, then new ones) and
   encode it into COPY lines (encoding.py).
4. Write the batch in one Postgres transaction (ledger.py); an entry Postgres refuses is
   isolated and goes to the dead-letter stream `<stream>:dead` with the error; it never blocks
   the rest.
5. XACK only after COMMIT. A crash anywhere before the ack leaves the entries pending; they are
   read again and the primary key (event_id, ts) drops what had already been committed.

While Postgres writes one batch the next is read and encoded (Redis, Postgres and this process
then work at once). Postgres or Redis errors: back off and reconnect; nothing is acked, so
nothing is lost; the error is counted by the store that failed (health.py). SIGTERM/SIGINT: the
batch in hand is written and acked, then the worker exits.
"""

from __future__ import annotations

import asyncio
import logging
import random
import signal
import socket
import time

import asyncpg
from redis.exceptions import RedisError, ResponseError

from quota_gw.layout import Layout

from . import health
from .encoding import Batch, encode
from .faults import NO_FAULTS, Faults
from .ledger import Ledger, PostgresUnavailable
from .migrate_users import migrate_at_start
from .stream import GROUP, Streams

log = logging.getLogger("quota_gw.worker")

PARTITIONS_EVERY_S = 3600
FORGET_EVERY_S = 3600
FORGET_IDLE_MS = 86_400_000  # a consumer that has not read for a day and holds nothing is gone
MIGRATE_RETRY_S = 60.0  # the users migration refused by Redis (OOM, ...): tried again this much later


def failed_store(e: BaseException) -> str:
    """Which store a round failed on, by the error's type: redis-py raises a RedisError for
    every failure (a refused connection or a timeout included); asyncpg's own errors, and
    PostgresUnavailable, which the ledger raises for a plain OSError or timeout, are Postgres's."""
    if isinstance(e, RedisError):
        return "redis"
    if isinstance(e, (asyncpg.PostgresError, asyncpg.InterfaceError, PostgresUnavailable)):
        return "postgres"
    return "other"


class Worker:
    def __init__(self, redis_url: str, database_url: str, layout: Layout, consumer: str | None = None,
                 group: str = GROUP, batch: int = 1000, block_ms: int = 500, claim_idle_s: float = 30.0,
                 maintain_every_s: float = 2.0, trim: bool = True, partitions_ahead: int = 4,
                 faults: Faults = NO_FAULTS) -> None:
        self.database_url = database_url
        self.consumer = consumer or socket.gethostname()
        self.streams = Streams(redis_url, layout, self.consumer, group, batch, block_ms, int(claim_idle_s * 1000))
        self.ledger: Ledger | None = None
        self.faults = faults
        self.claim_every_s = max(1.0, claim_idle_s / 2)
        self.maintain_every_s, self.trim, self.partitions_ahead = maintain_every_s, trim, partitions_ahead
        self.stats = health.Stats()
        self.stopping = asyncio.Event()
        self.ready = False  # both stores connected (/readyz)
        self._due: dict[str, float] = {}
        self._next: Batch | None = None  # read ahead while the previous batch was written
        self.users_migrated = False  # the old users hashes were moved (migrate_users.py), this start

    def stop(self) -> None:
        """Finish the batch in hand, then return from run()."""
        self.stopping.set()

    async def run(self) -> health.Stats:
        log.info("worker %s: group %s on %d streams", self.consumer, self.streams.group, len(self.streams.names))
        delay = 0.1
        while not self.stopping.is_set() or self._next is not None:
            try:
                await self._connect()
                await self._round()
                delay = 0.1
            except Exception as e:
                store = failed_store(e)
                self.stats.failed(store)
                log.warning("worker %s: %s error, retrying in %.1fs: %s: %s", self.consumer, store, delay,
                            type(e).__name__, e, exc_info=log.isEnabledFor(logging.DEBUG))
                self.ready = False
                self.streams.reread()  # whatever was read stays pending: read it again
                self._next = None
                await self._disconnect()
                try:
                    await asyncio.wait_for(self.stopping.wait(), delay)
                except TimeoutError:
                    pass
                delay = min(delay * 2, 5.0) * random.uniform(0.8, 1.2)
        await self._disconnect()
        s = self.stats
        log.info("worker %s: stopped: %d inserted, %d duplicates skipped, %d dead letters, %d batches, "
                 "%d errors", self.consumer, s.inserted, s.duplicates, s.dead, s.batches, s.errors)
        return s

    async def _connect(self) -> None:
        if self.ledger is None:
            self.ledger = await Ledger.connect(self.database_url, self.consumer, self.faults)
        await self.streams.open()
        self.ready = True

    async def _disconnect(self) -> None:
        if self.ledger is not None:
            self.ledger.close()
            self.ledger = None
        await self.streams.close()

    async def _round(self) -> None:
        await self._housekeeping()
        batch, self._next = self._next or await self._read(), None
        if not batch.size:
            return
        # Read the next batch while Postgres writes this one. Only new entries: pending ones are
        # re-read in order after an error.
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
        redelivered, reply = await self.streams.read(block)
        batch = encode(reply, redelivered)
        if redelivered:
            health.REDELIVERED.inc(batch.size)
        return batch

    async def _handle(self, batch: Batch) -> None:
        assert self.ledger is not None
        t0 = time.perf_counter()
        inserted, dups = await self.ledger.write(batch.rows, batch.dead, batch.redelivered)
        self.faults.reached("commit")
        await self.streams.dead_letter(batch.dead)
        await self.streams.ack(batch.ids)
        self.stats.batch_done(batch.size, inserted, dups, len(batch.dead), time.perf_counter() - t0)
        if dups:
            log.info("worker %s: skipped %d events already in Postgres (redelivered)", self.consumer, dups)
        if batch.gone:
            log.warning("worker %s: %d pending entries were deleted from their stream before being written",
                        self.consumer, batch.gone)

    async def _housekeeping(self) -> None:
        assert self.ledger is not None
        if not self.users_migrated:
            await self._migrate_users()
        if self._due_now("partitions", PARTITIONS_EVERY_S):
            await self.ledger.ensure_partitions(self.partitions_ahead)
        if self._due_now("claim", self.claim_every_s):
            await self.streams.claim()
        if self._due_now("maintain", self.maintain_every_s):
            await self.maintain()
        if self._due_now("forget", FORGET_EVERY_S):
            await self.streams.forget(FORGET_IDLE_MS)

    async def _migrate_users(self) -> None:
        """Moves the old users hashes (migrate_users.py), once per start, before the first batch.
        Redis unreachable: raised, so the loop backs off and tries again when it answers, as for
        any round. Refused by Redis (a script error, OOM): logged and tried again MIGRATE_RETRY_S
        later; draining goes on meanwhile, as a worker that cannot drain only makes it worse."""
        if not self._due_now("migrate_users", MIGRATE_RETRY_S):
            return
        try:
            await migrate_at_start(self.streams._client(), self.streams.layout, self.consumer)
        except ResponseError as e:
            log.warning("worker %s: moving the old users hashes failed, trying again in %.0fs: %s",
                        self.consumer, MIGRATE_RETRY_S, e)
            return
        except BaseException:
            self._due.pop("migrate_users", None)  # again as soon as Redis answers
            raise
        self.users_migrated = True

    def _due_now(self, what: str, every: float) -> bool:
        now = time.monotonic()
        if self._due.get(what, 0) <= now:
            self._due[what] = now + every
            return True
        return False

    async def maintain(self) -> None:
        """Trims what every group has acked; reports lag, dead letters and this consumer's report."""
        lags, dead_letters, now_ms = await self.streams.maintain(self.trim)
        health.record_lag(lags, dead_letters)
        await self.streams.write_report(self.stats.report(self.consumer, now_ms))


async def main(redis_url: str, database_url: str, layout: Layout, consumer: str | None, batch: int,
               block_ms: int, claim_idle_s: float, metrics_port: int | None, metrics_host: str = "127.0.0.1",
               faults: Faults = NO_FAULTS) -> int:
    worker = Worker(redis_url, database_url, layout, consumer, batch=batch, block_ms=block_ms,
                    claim_idle_s=claim_idle_s, faults=faults)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, worker.stop)
    server = (await health.serve(lambda: worker.ready, worker.consumer, metrics_host, metrics_port)
              if metrics_port else None)
    try:
        await worker.run()
    finally:
        if server is not None:
            server.close()
    return 0
