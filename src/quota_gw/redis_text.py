"""Replies of a client made with decode_responses=True, typed as the str they are.

redis-py types every reply as ``bytes | str`` (whether the client decodes is not in its types).
These helpers say "str" once, where a decoding client's reply is read, instead of a cast at each
use; they convert nothing at run time. A client that may not decode (the worker's, charges.py's
callers) decodes explicitly instead.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, cast

if TYPE_CHECKING:
    from redis.typing import StreamRangeResponse


def text(reply: bytes | str | None) -> str | None:
    """A string reply (GET, HGET): str or None."""
    return cast("str | None", reply)


def text_hash(reply: dict[bytes | str, bytes | str]) -> dict[str, str]:
    """HGETALL's field -> value."""
    return cast("dict[str, str]", reply)


def text_entries(reply: StreamRangeResponse | None) -> list[tuple[str, dict[str, str]]]:
    """XRANGE/XREVRANGE's (id, fields) pairs; a missing reply (never sent for these) reads as none."""
    return cast("list[tuple[str, dict[str, str]]]", reply or [])
