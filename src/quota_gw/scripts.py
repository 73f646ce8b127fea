"""The Lua operations, one file per operation under `lua/`, loaded into Redis once as a library of
Redis Functions (FUNCTION LOAD; Redis 7+, Valkey).

Why functions and not EVALSHA scripts: a script is the whole shared library (`_lib.lua`) plus
the operation, and Redis runs it top to bottom on every call, so every call re-created the
library's ~40 functions and its constant tables before doing any work; a function library runs
its top level once, at load, and each FCALL only runs the operation (docs/benchmarks.md,
`bench/redis_cost.py`). The library is `_lib.lua` followed by each operation wrapped as
`redis.register_function('qgw_<op>', function(KEYS, ARGV) <lua/<op>.lua> end)`, so an operation
file reads like a script and binds its KEYS/ARGV at its top.

The library is loaded here and only here (`load()`; run it on every primary of a cluster).
When Redis lost it (a restart without persistence, FUNCTION FLUSH), a call answers "Function not
found" without running, so it is loaded again and the call sent again (coalesce.py); a timeout
or a lost connection is never resent. The library's name carries a hash of its code, so
gateways of two versions side by side each call their own code.
"""

from __future__ import annotations

import hashlib
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import NoScriptError, ResponseError

OPERATIONS = ("consume", "check", "reserve", "commit", "release", "refund", "grant", "balance")
# Read-only operations: callable under maxmemory pressure and on replicas.
READ_ONLY = ("check", "balance")


def lua_dir() -> Path:
    """`lua/` ships inside the package (a link in the source tree, a copy in the wheel)."""
    return Path(str(resources.files("quota_gw") / "lua"))


def source(name: str) -> str:
    """One operation as a standalone script (the library, then the operation): for EVAL."""
    d = lua_dir()
    return (d / "_lib.lua").read_text() + "\ninit()\n" + (d / f"{name}.lua").read_text()


@cache
def library() -> tuple[str, str]:
    """(library name, FUNCTION LOAD source)."""
    d = lua_dir()
    body = [(d / "_lib.lua").read_text()]
    for op in OPERATIONS:
        flags = ", flags = {'no-writes'}" if op in READ_ONLY else ""
        body.append(f"redis.register_function{{function_name = '__QGW_LIB___{op}', callback = function(KEYS, ARGV) init(true)\n"
                    f"{(d / f'{op}.lua').read_text()}\nend{flags}}}")
    code = "\n".join(body)
    name = "qgw_" + hashlib.sha1(code.encode()).hexdigest()[:12]
    return name, f"#!lua name={name}\n" + code.replace("__QGW_LIB__", name)


async def load(redis: Any) -> None:
    """Loads the library (idempotent: REPLACE). On a cluster, run it on every primary."""
    await redis.function_load(library()[1], replace=True)


async def load_everywhere(redis: Any) -> None:
    """`load` at start, so the first decisions skip the reload round trip. A cluster client sends
    FUNCTION LOAD to every primary (each has its own library; a promoted replica may have none:
    its first call answers "function not found" and the coalescer loads it again). Redis down at
    start is not fatal: decisions answer 503 and load what they miss once it is back."""
    from redis.exceptions import ClusterDownError, RedisClusterException
    from redis.exceptions import ConnectionError as RedisConnectionError
    from redis.exceptions import TimeoutError as RedisTimeoutError

    try:
        await load(redis)
    except (RedisConnectionError, RedisTimeoutError, ClusterDownError, RedisClusterException):
        pass


def not_loaded(reply: Any) -> bool:
    """The call did not run because Redis does not have the library: load it and send again."""
    return isinstance(reply, NoScriptError) or (isinstance(reply, ResponseError) and "function not found" in str(reply).lower())


class Function:
    """One operation: what the coalescer sends (pack) and what it does when Redis lost the
    library (reload). Calling it runs it once on the client's connection pool (tests)."""

    def __init__(self, redis: Redis, op: str) -> None:
        self.redis = redis
        self.name = f"{library()[0]}_{op}"
        self._head = b"$5\r\nFCALL\r\n$%d\r\n%s\r\n" % (len(self.name), self.name.encode())
        self._heads: dict[tuple[int, int], bytes] = {}  # (keys, args) -> the call's first bytes

    def pack(self, keys: list[str], args: list[Any]) -> bytes:
        """RESP encoding of one FCALL, several times faster than redis-py's generic packer
        (which showed as a third of the CPU of a decision in the profile). Most arguments repeat
        from call to call (the org's keys, the plan's terms, small numbers), so each one's
        encoding is remembered (_BULK): formatting them took most of the packing time. The
        look-ups run in C (map over the dict's own item access); only a new value (the event
        id) reaches Python (_Encodings.__missing__)."""
        head = self._heads.get((len(keys), len(args)))
        if head is None:
            head = self._heads[len(keys), len(args)] = b"*%d\r\n%s%s" % (
                3 + len(keys) + len(args), self._head, _bulk(len(keys)))
        return b"".join([head, *map(_BULK.__getitem__, keys), *map(_BULK.__getitem__, args)])

    async def reload(self) -> None:
        await load(self.redis)

    async def __call__(self, keys: list[str], args: list[Any]) -> Any:
        try:
            return await self.redis.fcall(self.name, len(keys), *keys, *args)
        except ResponseError as e:
            if not not_loaded(e):
                raise
        await self.reload()
        return await self.redis.fcall(self.name, len(keys), *keys, *args)


def _bulk(a: Any) -> bytes:
    """RESP bulk string of a str, an int or bytes."""
    b = a.encode() if isinstance(a, str) else b"%d" % a if isinstance(a, int) else a
    return b"$%d\r\n%s\r\n" % (len(b), b)


class _Encodings(dict[Any, bytes]):
    """Bulk-string encodings by value, made on first use; emptied when full (ids seen once fill
    it, the rest come back)."""

    def __missing__(self, a: Any) -> bytes:
        if len(self) >= _BULK_MAX:
            self.clear()
        packed = self[a] = _bulk(a)
        return packed


_BULK = _Encodings()
_BULK_MAX = 4096


class Scripts:
    def __init__(self, redis: Redis) -> None:
        for name in OPERATIONS:
            setattr(self, name, Function(redis, name))

    consume: Function
    check: Function
    reserve: Function
    commit: Function
    release: Function
    refund: Function
    grant: Function
    balance: Function
