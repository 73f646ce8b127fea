"""The Lua scripts, one file per operation under `lua/`, registered once at start.

Each script is the shared prelude `_lib.lua` followed by the operation. redis-py's Script
object runs EVALSHA and reloads on NOSCRIPT (after a restart or SCRIPT FLUSH) by itself.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from redis.asyncio import Redis
from redis.commands.core import AsyncScript

OPERATIONS = ("consume", "check", "reserve", "commit", "release", "refund", "grant", "balance")


def lua_dir() -> Path:
    """`lua/` ships inside the package (a link in the source tree, a copy in the wheel)."""
    return Path(str(resources.files("quota_gw") / "lua"))


def source(name: str) -> str:
    d = lua_dir()
    return (d / "_lib.lua").read_text() + "\n" + (d / f"{name}.lua").read_text()


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
