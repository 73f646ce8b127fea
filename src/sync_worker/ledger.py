"""Writes batches into Postgres `usage_events`, exactly once, isolating the rows it refuses.

One transaction per batch (sql.py: COPY, falling back to an idempotent INSERT ... ON CONFLICT DO
NOTHING when any row is already there). An entry Postgres refuses (a poison entry: bad data,
not a database in trouble) is isolated by splitting the batch down to single rows; a row whose
only fault is its metadata is kept with the metadata replaced, any other goes to the dead
letters. Any other error propagates: the batch stays unacked and is read again.

A refused connection or a timeout is a plain OSError/TimeoutError, which names no store: the
ledger raises it as PostgresUnavailable, so the worker tells which store failed by type.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager

import asyncpg
import orjson

from . import sql
from .encoding import META, BadEntry, Entry, Row, copy_line, event_values, stream_ref
from .faults import NO_FAULTS, Faults

log = logging.getLogger("quota_gw.worker")

# SQLSTATE classes that mean "this row is bad", not "the database is unwell": data exceptions,
# integrity violations (a unique violation is handled before), program limits (huge values).
POISON_CLASSES = ("22", "23", "54")


class PostgresUnavailable(ConnectionError):
    """Postgres could not be reached, or did not answer in time."""


@contextmanager
def _unavailable() -> Iterator[None]:
    try:
        yield
    except (OSError, TimeoutError) as e:  # asyncpg's timeouts are asyncio's, an alias of TimeoutError
        raise PostgresUnavailable(f"{type(e).__name__}: {e}") from e


def is_poison(e: BaseException) -> bool:
    state = getattr(e, "sqlstate", None) or ""
    return isinstance(e, asyncpg.PostgresError) and state[:2] in POISON_CLASSES and state != "23505"


class Ledger:
    def __init__(self, conn: asyncpg.Connection, consumer: str = "", faults: Faults = NO_FAULTS) -> None:
        self.conn, self.consumer, self.faults = conn, consumer, faults

    @classmethod
    async def connect(cls, database_url: str, consumer: str, faults: Faults = NO_FAULTS) -> Ledger:
        with _unavailable():
            conn = await asyncpg.connect(database_url, timeout=10, command_timeout=60,
                                         server_settings={"application_name": f"qgw-sync:{consumer}"[:63]})
            await conn.execute(sql.CREATE_STAGE)
        return cls(conn, consumer, faults)

    def close(self) -> None:
        self.conn.terminate()

    async def write(self, rows: list[Row], dead: list[Entry], redelivered: bool) -> tuple[int, int]:
        """Writes `rows`, moving rows Postgres refuses to `dead`. Returns (inserted, duplicates).
        A redelivered batch goes straight to the idempotent path: its rows are likely there."""
        if not rows:
            return 0, 0
        try:
            n = await self.transaction([r[3] for r in rows], fast=not redelivered)
            return n, len(rows) - n
        except asyncpg.PostgresError as e:
            if not is_poison(e):
                raise
            if len(rows) == 1:
                return await self._write_one(rows[0], dead, e)
        # Isolate the poison: each half in its own transaction, down to single rows.
        mid = len(rows) // 2
        a = await self.write(rows[:mid], dead, redelivered)
        b = await self.write(rows[mid:], dead, redelivered)
        return a[0] + b[0], a[1] + b[1]

    async def _write_one(self, row: Row, dead: list[Entry], err: BaseException) -> tuple[int, int]:
        """A single refused row. If only its metadata is bad (say, JSON with \\u0000, which jsonb
        refuses) the event is still a balance change: keep it, with the metadata replaced."""
        stream, eid, fields, _ = row
        meta = event_values(fields)[META]
        if meta:
            note = orjson.dumps({"_invalid_metadata": str(err)[:200],
                                 "raw": meta.decode("utf-8", "replace").replace("\x00", "")})
            try:
                line = copy_line(stream_ref(stream), eid, fields, meta=note)
                n = await self.transaction([line], fast=False)
                log.warning("worker %s: kept %s with its metadata replaced: %s", self.consumer, eid.decode(), err)
                return n, 1 - n
            except (BadEntry, asyncpg.PostgresError) as e2:
                if isinstance(e2, asyncpg.PostgresError) and not is_poison(e2):
                    raise
        dead.append(Entry(stream, eid, fields, f"{type(err).__name__}: {err}"))
        return 0, 0

    async def transaction(self, lines: list[bytes], fast: bool) -> int:
        """One transaction; returns the rows inserted (rows already there are skipped)."""
        pg = self.conn
        with _unavailable():
            if fast:
                try:
                    async with pg.transaction():
                        await pg.copy_to_table("usage_events", source=self._chunks(lines), columns=sql.COLUMNS,
                                               **sql.COPY_OPTIONS)
                    return len(lines)
                except asyncpg.UniqueViolationError:
                    pass  # some row was written before (a redelivery): take the idempotent path
            async with pg.transaction():
                await pg.copy_to_table(sql.STAGE, source=self._chunks(lines), columns=sql.COLUMNS,
                                       **sql.COPY_OPTIONS)
                status = await pg.execute(sql.INSERT_STAGED)
        return int(status.rsplit(" ", 1)[1])

    async def _chunks(self, lines: list[bytes], size: int = 1 << 16) -> AsyncIterator[bytes]:
        """The COPY payload in ~64 KiB pieces (the "copy" crash point sits after the first)."""
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
                    self.faults.reached("copy")
                    first = False
        if buf:
            yield b"".join(buf)
            if first:
                self.faults.reached("copy")

    async def ensure_partitions(self, ahead: int) -> None:
        """Makes the month partitions ahead (one worker at a time: an advisory lock)."""
        try:
            with _unavailable():
                async with self.conn.transaction():
                    await self.conn.execute("SELECT pg_advisory_xact_lock($1)", sql.PARTITIONS_LOCK)
                    await self.conn.execute(sql.ENSURE_PARTITIONS, ahead)
        except asyncpg.CheckViolationError as e:
            log.warning("worker %s: cannot make a partition ahead: %s", self.consumer, e)
