"""Event and reservation ids (decisions.new_id): version 4 UUIDs as 32 hex digits, drawn from
batches of random bytes, never the same twice: across batches, and in a forked child, which
must not draw what its parent will."""

from __future__ import annotations

import os
import uuid

from quota_gw import decisions


def test_ids_are_distinct_version_4_uuids_across_batches() -> None:
    ids = [decisions.new_id() for _ in range(3 * decisions._ID_BATCH + 7)]
    assert len(set(ids)) == len(ids)
    for i in ids:
        u = uuid.UUID(hex=i)
        assert (u.version, u.variant, u.hex) == (4, uuid.RFC_4122, i)


def test_a_forked_child_draws_none_of_the_ids_its_parent_draws_next() -> None:
    decisions.new_id()  # the parent holds a batch, most of it not drawn yet
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its ids to the parent, then gone
        try:
            os.write(write, "".join(decisions.new_id() for _ in range(16)).encode())
        finally:
            os._exit(0)
    os.close(write)
    os.waitpid(pid, 0)
    with os.fdopen(read, "rb") as r:
        text = r.read().decode()
    child = {text[i:i + 32] for i in range(0, len(text), 32)}
    parent = {decisions.new_id() for _ in range(16)}
    assert len(child) == 16 and not child & parent
