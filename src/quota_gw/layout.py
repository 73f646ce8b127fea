"""Redis key layout.

Every key one decision touches carries the org's shard hash tag (`{s07}`), so a decision is
one script on one slot: the same layout runs on a single Redis or a Redis Cluster. The shard
is a stable hash of the org id (CRC32, not Python's salted `hash`), so every replica and the
worker agree on it.
"""

from __future__ import annotations

import zlib

# Fields of the per-org hashes, by what they hold. The Lua scripts spell the same suffixes
# (lua/_lib.lua METER_FIELDS, QUOTA_FIELDS; Lua cannot import this, tests/test_lua_interface.py
# pins that they agree). Admin routes, recovery and tests name fields through these.
#
# Balance hash (Layout.balances), one group per meter, '<meter>:<suffix>':
METER_FIELDS = {
    "allocated": "a",  # allocation left this period
    "purchased": "p",  # purchased credit left
    "held": "h",  # held by live reservations
    "used": "u",  # used this period
    "period_end": "pe",  # unix s
    "limit": "lim",  # the allocation the period was granted (-1 unlimited)
    "purchased_total": "pt",  # purchased credit ever granted
    "purchased_at_start": "ps",  # purchased credit when the period started (base of the alerts)
    "lots": "lots",  # JSON credit lots (expiring or traced purchased credit)
    "alert_period": "alpe",  # the period the low-balance alerts below were sent in
    "alert_threshold": "alt",  # the lowest threshold alerted in it
}
# Quota hash (Layout.quotas), one group per subject and meter, '<u|t>:<subject>:<meter>:<suffix>':
QUOTA_FIELDS = {"limit": "lim", "used": "used", "held": "h", "period_end": "pe"}
# The balance hash's two org fields. When the earliest live hold expires (unix s, 0 none; absent:
# not known): decisions look for expired holds only once it has come (lua/_lib.lua HOLDS_DUE).
HOLDS_DUE = "holds_due"
# Whether the org's quota hash may hold a sub-quota: '0' it is empty (a consume reads none), '1'
# it may; absent: not known, the next consume looks (lua/_lib.lua SUB_QUOTAS). Every write of a
# sub-quota limit removes it in the same atomic step (store.set_sub_quota, the configuration
# repair; rebuild, gateways stopped, after its writes), so a '0' is never stale.
SUB_QUOTAS = "sub_quotas"
# The org's users live in the balance hash too, so that a decision reads its user with its meter
# (one HMGET) and writes them together (one HSET): two Redis commands a call fewer than a users
# hash of their own (docs/benchmarks.md, "Redis time per decision, round 8"). A user's fields
# start with USER_PREFIX, which no meter name and no org field can (config.NAME_RE):
# '@<user>' = the user is registered, and its rate window: '' (none yet) or the GCRA theoretical
# arrival time (µs) — the one field a decision reads and writes of its user; '@<user>:<suffix>' =
# what else is known of the user (USER_FIELDS): its team (absent or '': none), read only where a
# team matters (sub-quotas, refunds, the gate). A user id has no ':'.
USER_PREFIX = "@"
USER_FIELDS = {"team": "t"}
# How a user is written outside a decision (store.put_user, the configuration repair): registered
# without touching its rate window (HSETNX: the field holds the window once a decision wrote one),
# its team set, or removed when it has none. A script's body (one owner for both): KEYS[1] the
# balance hash; ARGV[1] '@<user>', ARGV[2] '@<user>:t', ARGV[3] the team ('' none).
USER_WRITE_LUA = """
redis.call('HSETNX', KEYS[1], ARGV[1], '')
if ARGV[3] == '' then
  redis.call('HDEL', KEYS[1], ARGV[2])
else
  redis.call('HSET', KEYS[1], ARGV[2], ARGV[3])
end
"""


def meter_field(meter: str, name: str) -> str:
    """A field of the balance hash: meter_field('general', 'purchased') == 'general:p'."""
    return f"{meter}:{METER_FIELDS[name]}"


def user_key_field(user: str) -> str:
    """A user's registration and rate window in the balance hash: user_key_field('u1') == '@u1'."""
    return USER_PREFIX + user


def user_field(user: str, name: str) -> str:
    """What else the balance hash knows of a user: user_field('u1', 'team') == '@u1:t'."""
    return f"{USER_PREFIX}{user}:{USER_FIELDS[name]}"


def user_of_field(field: str) -> str | None:
    """The user a balance hash field registers ('@u1' -> 'u1'); None for any other field (a
    meter's, an org's, a user's team)."""
    if not field.startswith(USER_PREFIX) or ":" in field:
        return None
    return field[len(USER_PREFIX):]


def quota_subject(scope: str, subject: str) -> str:
    """'u:<user>' or 't:<team>' (scope 'user' or 'team')."""
    return f"{scope[0]}:{subject}"


def quota_field(subject: str, meter: str, name: str) -> str:
    """A field of the quota hash; `subject` as quota_subject() makes it."""
    return f"{subject}:{meter}:{QUOTA_FIELDS[name]}"


class Layout:
    def __init__(self, prefix: str, shards: int) -> None:
        if "{" in prefix or "}" in prefix:
            raise ValueError("the key prefix must not contain braces (they are the hash tag)")
        self.prefix = prefix
        self.shards = shards
        self._tags: dict[str, str] = {}

    def tag(self, org_id: str) -> str:
        t = self._tags.get(org_id)
        if t is None:
            t = "%s:{s%02d}" % (self.prefix, zlib.crc32(org_id.encode()) % self.shards)
            if len(self._tags) < 100_000:
                self._tags[org_id] = t
        return t

    def shard_tags(self) -> list[str]:
        return ["%s:{s%02d}" % (self.prefix, s) for s in range(self.shards)]

    # Per shard
    def stream(self, org_id: str) -> str:
        return f"{self.tag(org_id)}:events"

    def streams(self) -> list[str]:
        return [f"{t}:events" for t in self.shard_tags()]

    # Per org
    def balances(self, org_id: str) -> str:
        return f"{self.tag(org_id)}:b:{org_id}"

    def quotas(self, org_id: str) -> str:
        return f"{self.tag(org_id)}:q:{org_id}"

    def reservations(self, org_id: str) -> str:
        return f"{self.tag(org_id)}:rv:{org_id}"

    def expiries(self, org_id: str) -> str:
        return f"{self.tag(org_id)}:rx:{org_id}"

    def rate(self, org_id: str, kind: str, subject: str) -> str:
        return f"{self.tag(org_id)}:rl:{org_id}:{kind}:{subject}"

    def idem(self, org_id: str, scope: str, key: str) -> str:
        return f"{self.tag(org_id)}:idem:{org_id}:{scope}:{key}"

    def event_record(self, org_id: str, event_id: str) -> str:
        """Once a refund record per charge; no script writes it now (see refund_guard). refund.lua
        still reads it: one refunded before the upgrade is the guard until it expires."""
        return f"{self.tag(org_id)}:ev:{org_id}:{event_id}"

    def refund_guard(self, org_id: str, event_id: str) -> str:
        """Written by a refund (lua/refund.lua), kept until the refund window of the event closes."""
        return f"{self.tag(org_id)}:rf:{org_id}:{event_id}"

    def settled(self, org_id: str, reservation_id: str) -> str:
        return f"{self.tag(org_id)}:done:{org_id}:{reservation_id}"

    # Global (read by the gateway outside scripts; cached in process)
    def api_key(self, key_hash: str) -> str:
        return f"{self.prefix}:key:{key_hash}"

    def org(self, org_id: str) -> str:
        return f"{self.prefix}:org:{org_id}"

    def worker(self, consumer: str) -> str:
        """A sync worker's last report (GET /v1/admin/worker)."""
        return f"{self.prefix}:worker:{consumer}"
