"""A Redis connection that packs commands with hiredis, for the worker's client.

redis-py's asyncio client packs commands in pure Python, which costs more than the whole COPY
for an XACK of thousands of ids; hiredis packs them in C. Without hiredis `CONNECTION_CLASS` is
None and the client keeps redis-py's own (slower) packer.
"""

from __future__ import annotations

from typing import Any

import redis.asyncio as aioredis

CONNECTION_CLASS: type[aioredis.Connection] | None
try:
    import hiredis
    from redis.connection import HiredisRespSerializer

    class HiredisPacking(aioredis.Connection):
        _packer = HiredisRespSerializer()

        def pack_command(self, *args: Any) -> list[bytes]:
            if isinstance(args[0], str) and " " not in args[0]:
                return [hiredis.pack_command(args)]  # XACK, XREADGROUP: bytes, str and ints only
            return self._packer.pack(*args)

    CONNECTION_CLASS = HiredisPacking
except ImportError:  # no hiredis: the slower packer still works
    CONNECTION_CLASS = None


def client_options(redis_url: str) -> dict[str, Any]:
    """Keyword arguments for redis.asyncio.from_url: the hiredis packer where it applies (plain
    TCP URLs; rediss:// and unix sockets need their own connection classes)."""
    if CONNECTION_CLASS is not None and redis_url.startswith("redis://"):
        return {"connection_class": CONNECTION_CLASS}
    return {}
