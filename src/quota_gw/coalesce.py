"""Coalescing: the script calls made during one event-loop turn go to Redis as one pipeline.

Under load, many requests reach their decision in the same loop turn; sending them together
costs one network round trip and one syscall pair instead of one per request. Each call is
still its own atomic script: pipelining changes how calls travel, not what they do.

Scripts are never retried on a connection error or timeout: a script that may have run must
not run twice (that would charge twice). The caller gets the error; an idempotency key makes
its own retry safe.
"""

from __future__ import annotations

import asyncio
from typing import Any

from redis.asyncio import Redis
from redis.commands.core import AsyncScript
from redis.exceptions import NoScriptError, ResponseError

from . import metrics

Call = tuple[AsyncScript, list[str], list[Any], "asyncio.Future[Any]"]


class Coalescer:
    def __init__(self, redis: Redis, max_batch: int = 512) -> None:
        self.redis = redis
        self.max_batch = max_batch
        self._pending: list[Call] = []
        self._scheduled = False

    async def run(self, script: AsyncScript, keys: list[str], args: list[Any]) -> Any:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Any] = loop.create_future()
        self._pending.append((script, keys, args, fut))
        if not self._scheduled:
            self._scheduled = True
            loop.call_soon(self._flush)
        return await fut

    async def run_now(self, script: AsyncScript, keys: list[str], args: list[Any]) -> Any:
        """One call, sent at once (coalescing off)."""
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        await self._send([(script, keys, args, fut)])
        return await fut

    def _flush(self) -> None:
        self._scheduled = False
        pending, self._pending = self._pending, []
        for i in range(0, len(pending), self.max_batch):
            asyncio.ensure_future(self._send(pending[i:i + self.max_batch]))

    async def _send(self, batch: list[Call], retried: bool = False) -> None:
        metrics.ROUND_TRIPS.inc()
        metrics.SCRIPT_CALLS.inc(len(batch))
        pool = self.redis.connection_pool
        results: list[Any] = []
        try:
            conn = await pool.get_connection()
            try:
                await conn.send_packed_command([pack_evalsha(s.sha, k, a) for s, k, a, _ in batch])
                for _ in batch:
                    try:
                        results.append(await conn.read_response())
                    except ResponseError as e:  # an error reply; the stream stays in step
                        results.append(e)
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
            if isinstance(r, NoScriptError) and not retried:
                missing.append(call)  # Redis restarted or SCRIPT FLUSH: load, then send again
            elif isinstance(r, Exception):
                fut.set_exception(r)
            else:
                fut.set_result(r)
        if missing:
            for script in {c[0] for c in missing}:
                script.sha = await self.redis.script_load(script.script)
            await self._send(missing, retried=True)


def pack_evalsha(sha: str, keys: list[str], args: list[Any]) -> bytes:
    """RESP encoding of one EVALSHA, several times faster than redis-py's generic packer
    (which showed as a third of the CPU of a decision in the profile)."""
    parts = [b"*%d\r\n$7\r\nEVALSHA\r\n$40\r\n%s\r\n$%d\r\n%d\r\n"
             % (3 + len(keys) + len(args), sha.encode(), len(str(len(keys))), len(keys))]
    for a in (*keys, *args):
        b = a.encode() if isinstance(a, str) else b"%d" % a if isinstance(a, int) else a
        parts.append(b"$%d\r\n%s\r\n" % (len(b), b))
    return b"".join(parts)
