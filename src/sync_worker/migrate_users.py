"""The upgrade of the users: old users hashes move into their org's balance hash, at worker start.

An org's users used to live in a hash of their own, `<prefix>:{sNN}:users:<org>` (fields `<user>`
= the user's team, '' none; `<user>:rl` = its rate window). They now live in the org's balance
hash: `@<user>` registers the user and holds its rate window ('' none yet), `@<user>:t` its team
(layout.py, USER_PREFIX), and nothing reads the old hashes: left there, every user of an upgraded
deployment would look unregistered (its team lost, a 403 with `auto_register_users: false`) and
every rate window would restart. So the sync worker, when it starts (worker.py, before its first
round), moves every old users hash it finds, what the balance hash already has (written since the
upgrade, so newer) winning:

- `<user>` = team T: `@<user>` registered if absent (HSETNX ''), and T, if not '', set as
  `@<user>:t` if absent (HSETNX). A decision registering the user since the upgrade wrote only
  `@<user>` (decisions never write a team), so the old team still comes over; a team an admin set
  since (store.put_user) wins.
- `<user>:rl` = window W: `@<user>` set to W if absent or '' (registered, no window yet); a
  window a decision wrote since the upgrade (not '') wins.
- One script per chunk of at most `chunk` fields (HSCAN from the cursor, the writes above, HDEL
  of each field from the old hash; the old key is gone with its last field): atomic, on one slot
  (the old key and the balance key carry the same `{sNN}` tag), and bounded, so a huge users hash
  never holds Redis for the time an HGETALL of it would.

One case the balance hash cannot tell: an admin who removed a user's team since the upgrade
(store.put_user deletes `@<user>:t`) sees the old team come back; reconcile reports it (config
drift, `team <user>`) and `rebuild --org` sets it from Postgres.

It is idempotent and safe beside running gateways and other workers starting at once: a field is
written only where the balance hash has nothing newer and removed from the old hash in the same
script, so whichever worker runs a chunk first moves it and the others find it gone. The keys are
found by SCAN (MATCH on the prefix, hashes only), which on a Redis Cluster runs on every primary
(redis-py's cluster client). An old key whose tag is not its org's tag under the current shard
count (the shard count changed, which no layout survives) is left alone and counted. A gateway of
the old version still running during a rolling upgrade may write an old hash again; the next
worker start moves it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis

from quota_gw.layout import USER_FIELDS, USER_PREFIX, Layout

log = logging.getLogger("quota_gw.worker")

OLD_KIND = "users"  # the old key: f"{layout.tag(org)}:users:{org}"
CHUNK = 1000  # fields moved per script

OLD_WINDOW = "rl"  # the old rate window's suffix: `<user>:rl`

# KEYS[1] the old users hash, KEYS[2] the org's balance hash; ARGV[1] the HSCAN cursor, ARGV[2]
# the chunk, ARGV[3] USER_PREFIX, ARGV[4] the team's suffix (USER_FIELDS), ARGV[5] OLD_WINDOW.
# Each old field is either moved (its value is in the balance hash now) or kept (dropped: the
# balance hash had a newer one). Returns {next cursor ('0': done), old fields moved, old fields
# kept, users registered, whether the old key is left}.
MOVE_LUA = """
local scanned = redis.call('HSCAN', KEYS[1], ARGV[1], 'COUNT', tonumber(ARGV[2]))
local kv = scanned[2]
local prefix, team_suffix, window_suffix = ARGV[3], ':' .. ARGV[4], ':' .. ARGV[5]
local set, kept, users = 0, 0, 0
for i = 1, #kv, 2 do
  local f, v = kv[i], kv[i + 1]
  local colon = string.find(f, ':', 1, true)
  local moved
  if not colon then  -- a user, v its team
    local user = prefix .. f
    users = users + redis.call('HSETNX', KEYS[2], user, '')
    if v ~= '' then
      moved = redis.call('HSETNX', KEYS[2], user .. team_suffix, v) == 1
    else
      moved = (redis.call('HGET', KEYS[2], user .. team_suffix) or '') == ''
    end
  elseif string.sub(f, colon) == window_suffix then  -- a user's rate window
    local user = prefix .. string.sub(f, 1, colon - 1)
    local have = redis.call('HGET', KEYS[2], user)
    moved = not have or have == ''
    if moved then
      if not have then users = users + 1 end
      redis.call('HSET', KEYS[2], user, v)
    end
  else  -- no such field in the old layout: as it was
    moved = redis.call('HSETNX', KEYS[2], prefix .. f, v) == 1
  end
  if moved then set = set + 1 else kept = kept + 1 end
  redis.call('HDEL', KEYS[1], f)
end
return {scanned[1], set, kept, users, redis.call('EXISTS', KEYS[1])}
"""


@dataclass
class Moved:
    keys: int = 0  # old users hashes this call emptied (and so deleted)
    users: int = 0  # users registered ('@<user>' set) from an old hash
    fields: int = 0  # old fields moved (a user, its team, its rate window)
    kept: int = 0  # old fields dropped because the balance hash already had a newer one
    skipped: int = 0  # old keys left alone: not under their org's tag


def _text(k: Any) -> str:
    return k.decode() if isinstance(k, bytes) else str(k)


def _glob(s: str) -> str:
    """Escapes a key prefix for SCAN MATCH."""
    return "".join("\\" + c if c in "*?[]\\" else c for c in s)


async def old_keys(r: aioredis.Redis, layout: Layout) -> list[tuple[str, str]]:
    """(old users key, the org's balance key) for every old users hash under the prefix."""
    tags = set(layout.shard_tags())
    out = []
    async for k in r.scan_iter(match=f"{_glob(layout.prefix)}:{{s*}}:{OLD_KIND}:*", count=5000, _type="hash"):
        key = _text(k)
        tag, sep, rest = key.partition("}:")
        kind, _, org = rest.partition(":")
        if sep and kind == OLD_KIND and org and tag + "}" in tags:
            out.append((key, layout.balances(org)))
    return out


async def migrate_users(r: aioredis.Redis, layout: Layout, chunk: int = CHUNK) -> Moved:
    """Moves every old users hash under the prefix into its org's balance hash (module docstring).
    `r` is a single Redis or a cluster client, decoding or not."""
    script = r.register_script(MOVE_LUA)
    moved = Moved()
    for old, balances in await old_keys(r, layout):
        if old.partition("}:")[0] != balances.partition("}:")[0]:
            moved.skipped += 1
            log.warning("users hash %s is not under its org's shard tag (%s): left as it is", old, balances)
            continue
        cursor: Any = "0"
        handled = 0
        while True:
            args = [cursor, chunk, USER_PREFIX, USER_FIELDS["team"], OLD_WINDOW]
            nxt, n_set, n_kept, n_users, left = await script(keys=[old, balances], args=args)
            moved.fields, moved.kept, moved.users = moved.fields + n_set, moved.kept + n_kept, moved.users + n_users
            handled += n_set + n_kept
            cursor = _text(nxt)
            if not left:
                moved.keys += handled > 0  # not one another worker emptied first
                break
            # a full pass that left fields means some were written during it (an old gateway):
            # scan again from the start until the key is gone
    return moved


async def migrate_at_start(r: aioredis.Redis, layout: Layout, consumer: str, chunk: int = CHUNK) -> Moved:
    """migrate_users, with its one log line when it moved anything."""
    moved = await migrate_users(r, layout, chunk)
    if moved.keys or moved.fields or moved.kept:
        log.info("worker %s: moved %d old users hashes into the balance hashes: %d users registered, %d fields moved, "
                 "%d older fields dropped (the balance hash had newer ones)", consumer, moved.keys, moved.users,
                 moved.fields, moved.kept)
    return moved
