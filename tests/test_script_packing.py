"""Function.pack: an FCALL in RESP, byte for byte what redis-py's own packer sends, whether each
argument's encoding is new, remembered, or forgotten when the memory was emptied."""

from __future__ import annotations

from redis.connection import Connection

from quota_gw import scripts


class NoRedis:
    """Packing needs no connection."""


def reference(name: str, keys: list[str], args: list[object]) -> bytes:
    return b"".join(Connection().pack_command("FCALL", name, len(keys), *keys, *args))


def test_a_call_packs_as_redis_py_packs_it_new_remembered_and_after_the_memory_is_emptied() -> None:
    f = scripts.Function(NoRedis(), "consume")  # type: ignore[arg-type]
    calls = [(["q:{s01}:b:org", "q:{s01}:rl:org:k:key"], ["ev1", 3, "", 0, -7, "terms\tx", "é", 10**20]),
             ([], []), (["k"], ["ev2"]), (["k", "k"], [1, 1, "1"])]
    for _ in range(2):  # made, then remembered
        for keys, args in calls:
            assert f.pack(keys, args) == reference(f.name, keys, args)
    for i in range(scripts._BULK_MAX + 10):  # new ids fill the memory: emptied, then made again
        assert f.pack(["k"], [f"id{i}", 2]) == reference(f.name, ["k"], [f"id{i}", 2])
    assert len(scripts._BULK) <= scripts._BULK_MAX
    for keys, args in calls:
        assert f.pack(keys, args) == reference(f.name, keys, args)
