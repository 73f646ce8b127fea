"""The Lua scripts, one file per operation under `lua/`, registered once at start.

Each script is the shared prelude `_lib.lua` followed by the operation. They are loaded on
every primary at start (`load_everywhere`: on a cluster each primary has its own script cache),
and the coalescer reloads one on the node that answers NOSCRIPT (a restart, SCRIPT FLUSH, a
replica promoted after a failover: the script cache is not replicated).
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from redis.asyncio import Redis
from redis.commands.core import AsyncScript
from redis.exceptions import ClusterDownError, RedisClusterException
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from .cluster import Client, on_each_primary

OPERATIONS = ("consume", "check", "reserve", "commit", "release", "refund", "grant", "balance")


def lua_dir() -> Path:
    """`lua/` ships inside the package (a link in the source tree, a copy in the wheel)."""
    return Path(str(resources.files("quota_gw") / "lua"))


def source(name: str) -> str:
    d = lua_dir()
    return (d / "_lib.lua").read_text() + "\n" + (d / f"{name}.lua").read_text()


async def load_everywhere(redis: Client) -> None:
    """SCRIPT LOAD of every operation on every primary, so the first decisions after a start
    skip the NOSCRIPT round trip. Redis down at start is not fatal (decisions answer 503, and
    reload what they miss once it is back)."""
    try:
        for name in OPERATIONS:
            await on_each_primary(redis, "SCRIPT", "LOAD", source(name))
    except (RedisConnectionError, RedisTimeoutError, ClusterDownError, RedisClusterException):
        pass


class Scripts:
    def __init__(self, redis: Redis) -> None:
        for name in OPERATIONS:
            setattr(self, name, redis.register_script(source(name)))

    consume: AsyncScript
    check: AsyncScript
    reserve: AsyncScript
    commit: AsyncScript
    release: AsyncScript
    refund: AsyncScript
    grant: AsyncScript
    balance: AsyncScript
