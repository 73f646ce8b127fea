"""Coalescing: the script calls made during one event-loop turn go to Redis as one pipeline.

Under load, many requests reach their decision in the same loop turn; sending them together
costs one network round trip and one syscall pair instead of one per request. Each call is
still its own atomic script: pipelining changes how calls travel, not what they do.

Scripts are never retried on a connection error or timeout: a script that may have run must
not run twice (that would charge twice). The caller gets the error; an idempotency key makes
its own retry safe.

`wait_ms` (behaviour.replica_wait_ms): each batch is followed by `WAIT 1 <ms>` on the same
connection, and its decisions are answered only once a replica has them (or the wait ran out,
counted in quota_gw_replica_wait_short_total), so a failover loses fewer acknowledged charges.
"""

from __future__ import annotations

import asyncio
import math
from collections import deque
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

try:  # what redis-py's hiredis reader returns for a partial reply
    from redis._parsers.hiredis import NOT_ENOUGH_DATA
except ImportError:  # pragma: no cover - another layout: _Replies then never takes over
    NOT_ENOUGH_DATA = None

from . import metrics
from .scripts import Function, not_loaded

Call = tuple[Function, list[str], list[Any], "asyncio.Future[Any]"]
REPLICATED: Any = (None, [], [], None)  # in flight after a batch when waiting for a replica: WAIT's reply


# What an operation answers (decisions.Decision.from_reply's text, decoded or not; the balance's
# rows): never an error or a "not loaded" reply, so handed to the caller first.
_ANSWERS = frozenset({str, bytes, list})

class Coalescer:
    """Coalesced calls travel on one dedicated connection, written in order and answered in
    order (Redis answers a connection's commands in the order it sent them), so there is no
    pool to take from and give back per batch. A reader task matches replies to callers.
    If no reply comes within the client's socket timeout, the connection is dropped and every
    call in flight fails: they may have run, so none is sent again."""

    def __init__(self, redis: Redis, wait_ms: int = 0) -> None:
        self.redis = redis
        self.wait_ms = wait_ms
        self._held: list[tuple[asyncio.Future[Any], Any]] = []  # run, answered once WAIT replies
        self.timeout = float(redis.connection_pool.connection_kwargs.get("socket_timeout") or 5.0)
        self._pending: list[Call] = []
        self._loop: asyncio.AbstractEventLoop | None = None  # the loop of the last run()
        self._scheduled = False
        self._conn: Any = None
        self._connecting: asyncio.Lock | None = None
        self._inflight: deque[tuple[Call, float]] = deque()
        self._watching = False
        self.client_id: int | None = None

    def _running_loop(self) -> asyncio.AbstractEventLoop:
        """The running loop, kept: asking asyncio each call is a getpid(2) on Python 3.11."""
        loop = self._loop
        if loop is None or not loop.is_running():
            loop = self._loop = asyncio.get_running_loop()
        return loop

    def run(self, script: Function, keys: list[str], args: list[Any]) -> asyncio.Future[Any]:
        """The call's reply, to await: a future, not a coroutine (an await level of its own is
        passed again when the reply comes)."""
        loop = self._running_loop()
        fut: asyncio.Future[Any] = loop.create_future()
        self._pending.append((script, keys, args, fut))
        if not self._scheduled:
            self._scheduled = True
            loop.call_soon(self._flush)
        return fut

    async def run_now(self, script: Function, keys: list[str], args: list[Any]) -> Any:
        """One call, sent at once on a pooled connection (coalescing off)."""
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        await self._send([(script, keys, args, fut)])
        return await fut

    async def aclose(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            self._fail_inflight(ConnectionError("the gateway is shutting down"))
            await conn.disconnect()

    def _flush(self) -> None:
        self._scheduled = False
        batch, self._pending = self._pending, []
        if self._conn is not None and self._conn.is_connected:
            self._write(self._conn, batch)
        else:
            asyncio.ensure_future(self._connect_then_write(batch))

    async def _connect_then_write(self, batch: list[Call]) -> None:
        if self._connecting is None:
            self._connecting = asyncio.Lock()
        try:
            async with self._connecting:
                if self._conn is None or not self._conn.is_connected:
                    conn = self.redis.connection_pool.make_connection()
                    await conn.connect()
                    await conn.send_command("CLIENT", "ID")
                    self.client_id = int(await conn.read_response())  # for operators (CLIENT LIST) and tests
                    self._conn = conn
                    if not _Replies.take_over(self, conn):
                        asyncio.ensure_future(self._read(conn))
            self._write(self._conn, batch)
        except Exception as e:  # noqa: BLE001 - every caller gets the error
            for *_, fut in batch:
                if not fut.done():
                    fut.set_exception(e)

    def _write(self, conn: Any, batch: list[Call]) -> None:
        metrics.count(metrics.ROUND_TRIPS)
        metrics.count(metrics.SCRIPT_CALLS, len(batch))
        now = self._running_loop().time()
        data = b"".join([s.pack(k, a) for s, k, a, _ in batch])
        for call in batch:
            self._inflight.append((call, now))
        if self.wait_ms:
            data += pack_wait(self.wait_ms)
            self._inflight.append((REPLICATED, now))
        conn._writer.write(data)  # buffered by the transport, in order; the reader awaits replies
        if not self._watching:
            self._watching = True
            asyncio.get_running_loop().call_later(self.timeout / 2, self._watch)

    async def _read(self, conn: Any) -> None:
        """The replies through redis-py's reader (without hiredis; _Replies otherwise)."""
        try:
            while True:
                try:
                    reply = await conn.read_response(timeout=math.inf)
                except ResponseError as e:  # an error reply; the stream stays in step
                    reply = e
                self._answer(reply)
        except Exception as e:  # noqa: BLE001 - connection lost: fail what is in flight
            self._drop(conn, e)

    def _answer(self, reply: Any) -> None:
        """The next reply, to the oldest call in flight."""
        call, _ = self._inflight.popleft()
        if type(reply) in _ANSWERS and not self.wait_ms:  # the usual reply: a decision, to its caller
            if not call[3].done():
                call[3].set_result(reply)
            return
        if call is REPLICATED:
            self._release(reply)
            return
        fut = call[3]
        if fut.done():
            return
        if not_loaded(reply):
            asyncio.ensure_future(self._reload_then_send(call))  # not run: safe to send again
        elif isinstance(reply, Exception):
            fut.set_exception(reply)
        elif self.wait_ms:
            self._held.append((fut, reply))
        else:
            fut.set_result(reply)

    async def _reload_then_send(self, call: Call) -> None:
        try:
            await call[0].reload()
        except Exception as e:  # noqa: BLE001
            call[3].set_exception(e)
            return
        await self._send([call], retried=True)

    def _watch(self) -> None:
        self._watching = False
        if not self._inflight:
            return
        waited = asyncio.get_running_loop().time() - self._inflight[0][1]
        if waited > self.timeout and self._conn is not None:
            self._drop(self._conn, RedisTimeoutError(f"Timeout reading from Redis ({waited:.2f} s)"))
        elif self._inflight:
            self._watching = True
            asyncio.get_running_loop().call_later(self.timeout / 2, self._watch)

    def _drop(self, conn: Any, error: Exception) -> None:
        if self._conn is conn:
            self._conn = None
            self._fail_inflight(error if isinstance(error, RedisError) else RedisConnectionError(str(error)))
        asyncio.ensure_future(conn.disconnect())

    def _release(self, replicas: Any) -> None:
        """WAIT answered: the held decisions are on a replica (or the wait ran out)."""
        if not isinstance(replicas, int) or replicas < 1:
            metrics.REPLICA_WAIT_SHORT.inc()
        held, self._held = self._held, []
        for fut, reply in held:
            if not fut.done():
                fut.set_result(reply)

    def _fail_inflight(self, error: Exception) -> None:
        if self._held:
            self._release(0)  # these ran: their answers stand, replicated or not
        inflight, self._inflight = self._inflight, deque()
        for (*_, fut), _ in inflight:
            if not fut.done():
                fut.set_exception(error)

    async def _send(self, batch: list[Call], retried: bool = False) -> None:
        metrics.ROUND_TRIPS.inc()
        metrics.SCRIPT_CALLS.inc(len(batch))
        pool = self.redis.connection_pool
        results: list[Any] = []
        try:
            conn = await pool.get_connection()
            try:
                await conn.send_packed_command([s.pack(k, a) for s, k, a, _ in batch]
                                               + ([pack_wait(self.wait_ms)] if self.wait_ms else []))
                for _ in batch:
                    try:
                        results.append(await conn.read_response())
                    except ResponseError as e:  # an error reply; the stream stays in step
                        results.append(e)
                if self.wait_ms:
                    replicas = await conn.read_response()
                    if not isinstance(replicas, int) or replicas < 1:
                        metrics.REPLICA_WAIT_SHORT.inc()
            except BaseException:
                await conn.disconnect()
                raise
            finally:
                await pool.release(conn)
        except Exception as e:  # noqa: BLE001 - every caller gets the error
            for *_, fut in batch:
                if not fut.done():
                    fut.set_exception(e)
            return
        missing = []
        for call, r in zip(batch, results):
            fut = call[3]
            if fut.done():
                continue
            if not_loaded(r) and not retried:
                missing.append(call)  # Redis restarted or FUNCTION FLUSH: load, then send again
            elif isinstance(r, Exception):
                fut.set_exception(r)
            else:
                fut.set_result(r)
        if missing:
            try:
                await missing[0][0].reload()  # one library holds every operation
            except Exception as e:  # noqa: BLE001 - every caller gets the error
                for *_, fut in missing:
                    fut.set_exception(e)
                return
            await self._send(missing, retried=True)


class _Replies(asyncio.Protocol):
    """The coalesced connection's replies, parsed as they arrive. redis-py reads them through
    a StreamReader in a reader task: per round trip that task wakes, then the caller; here the
    transport hands the bytes to the connection's own hiredis reader (set up by redis-py: same
    decoding, same error classes) and each reply goes to its caller at once. A sequential
    decision's round trip cost ~42 µs of gateway CPU that way (docs/benchmarks.md)."""

    def __init__(self, coalescer: Coalescer, conn: Any, reader: Any, stream: asyncio.BaseProtocol) -> None:
        self.coalescer, self.conn, self.reader = coalescer, conn, reader
        self.stream = stream  # redis-py's protocol: told of the close, so its disconnect() returns

    @classmethod
    def take_over(cls, coalescer: Coalescer, conn: Any) -> bool:
        """Reads `conn`'s replies from now on; False when it has no hiredis reader to do so."""
        reader = getattr(getattr(conn, "_parser", None), "_reader", None)
        if NOT_ENOUGH_DATA is None:
            return False
        writer = getattr(conn, "_writer", None)
        if reader is None or not hasattr(reader, "gets") or writer is None or reader.has_data():
            return False
        transport = writer.transport
        transport.set_protocol(cls(coalescer, conn, reader, transport.get_protocol()))
        return True

    def data_received(self, data: bytes) -> None:
        self.reader.feed(data)
        try:
            while (reply := self.reader.gets()) is not NOT_ENOUGH_DATA:
                # as redis-py's read_response: a connection error (LOADING...) is not a reply
                if isinstance(reply, ConnectionError) or (
                        isinstance(reply, list) and reply and isinstance(reply[0], ConnectionError)):
                    raise reply if isinstance(reply, ConnectionError) else reply[0]
                self.coalescer._answer(reply)
        except Exception as e:  # noqa: BLE001 - a protocol error, or a reply nobody asked for: drop
            self._lost(e)

    def eof_received(self) -> bool | None:
        self._lost(RedisConnectionError("Connection closed by server."))
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost(exc or RedisConnectionError("Connection closed by server."))
        self.stream.connection_lost(exc)

    def _lost(self, error: BaseException) -> None:
        if self.coalescer._conn is self.conn:
            self.coalescer._drop(self.conn, error if isinstance(error, Exception) else RedisConnectionError(str(error)))


def pack_wait(ms: int) -> bytes:
    """RESP encoding of `WAIT 1 <ms>`."""
    return b"*3\r\n$4\r\nWAIT\r\n$1\r\n1\r\n$%d\r\n%d\r\n" % (len(str(ms)), ms)
