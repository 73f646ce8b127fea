"""What a refund puts back: the charged event itself, read from the stream or the ledger.

A consume or commit keeps nothing in Redis for its refund. A record per decision, kept for the
whole refund window, was most of what Redis held (~216 bytes a decision for 7 days, issue 11),
for a rare operation whose facts are in the event anyway: meter, the allocated and purchased
parts (`delta`, `dp`), cost, user, feature and time. The event is in the shard's stream until
the worker has written it to Postgres, and in the ledger from then on; the worker trims only
entries it has acked, and acks only what it has committed. So the lookup reads the stream
first, then the ledger: an event missing from the stream, which held it when the refund was
asked for (the charge had answered), was trimmed, so it is committed by then; a page-by-page
stream read that a trim overtakes misses it the same way and finds it in the ledger. The stream
is short while the worker keeps up, and holds every recent event while it does not; either way
a refund right after its charge (the sidecar's) needs no Postgres. With the ledger down and the
event already drained, the refund is 503 with Retry-After (`db.unavailable`): nothing changed,
the caller retries (the sidecar spools it).

On a Redis Cluster the stream is read on its slot's primary through the decision lanes
(cluster.Lanes.command), which follow MOVED/ASK and wait out TRYAGAIN as decisions do: a refund
while its org's slot migrates is answered, where redis-py's cluster client may give up.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any

from redis.asyncio import Redis

from . import events
from .cluster import Lanes
from .db import Database
from .layout import Layout

REFUNDABLE = ("consume", "commit")
STREAM_PAGE = 500  # entries a stream read returns; newest first (refunds are mostly of recent charges)
_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
_US = timedelta(microseconds=1)


@dataclass(frozen=True, slots=True)
class Charge:
    kind: str
    org: str
    meter: str
    allocated: int  # the part taken from the period's allocation
    purchased: int  # the part taken from purchased credit
    cost: int
    user: str
    feature: str
    ts_us: int  # Redis time of the charge (the event's ts)
    sources: str = ""  # its split over the layers ('' before sources were recorded)

    def refundable_by(self, org: str) -> bool:
        return self.org == org and self.kind in REFUNDABLE


def _text(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else v


def from_stream(fields: dict[str, str]) -> Charge:
    """The charge of an event's values by name (events.decode)."""
    delta, dp = int(fields["delta"]), int(fields["dp"])
    return Charge(fields["kind"], fields["org"], fields["meter"], dp - delta, -dp, int(fields["cost"]),
                  fields["user"], fields["feature"], int(fields["ts"]), fields["src"])


async def newest_first(redis: Redis | Lanes, stream: str, end: str) -> list[Any]:
    """One page of the stream, from `end` back (XREVRANGE): on a cluster, on its slot's primary."""
    if isinstance(redis, Lanes):
        return await redis.command(stream, "XREVRANGE", stream, end, "-", "COUNT", STREAM_PAGE) or []
    return await redis.xrevrange(stream, end, "-", count=STREAM_PAGE) or []  # never None here


async def in_stream(redis: Redis | Lanes, stream: str, event_id: str) -> Charge | None:
    """The event, if the stream still holds it (what the worker has not drained and trimmed)."""
    end = "+"
    while True:
        page = await newest_first(redis, stream, end)
        for _entry_id, raw in page:
            e = events.decode({_text(k): _text(v) for k, v in (raw or {}).items()})
            if e.get("id") == event_id:
                return from_stream(e)
        if len(page) < STREAM_PAGE:
            return None
        end = "(" + _text(page[-1][0])


LEDGER_EVENT = """
SELECT kind, org_id, coalesce(meter, '') AS meter, delta, delta_purchased, cost,
       coalesce(user_id, '') AS user_id, coalesce(feature, '') AS feature, ts, coalesce(sources, '') AS sources
  FROM usage_events WHERE event_id = $1 AND ts > $2"""


async def in_ledger(ledger: Database, event_id: str, window_s: int) -> Charge | None:
    """The event, if the worker has written it. Only partitions the window can reach are read
    (a day of slack for clocks: the window itself is checked in refund.lua on Redis time)."""
    since = datetime.now(timezone.utc) - timedelta(seconds=window_s + 86400)
    r = await ledger.fetchrow(LEDGER_EVENT, event_id, since)
    if r is None:
        return None
    return Charge(r["kind"], r["org_id"], r["meter"], r["delta_purchased"] - r["delta"], -r["delta_purchased"],
                  r["cost"], r["user_id"], r["feature"], (r["ts"] - _EPOCH) // _US, r["sources"])


async def find(redis: Redis | Lanes, ledger: Database | None, layout: Layout, org: str, event_id: str,
               window_s: int) -> Charge | None:
    """The charged event (any org's: the caller checks it is its own), or None when neither the
    ledger nor the stream has it. Raises 503 `unavailable` when the ledger is down and the
    stream does not hold the event."""
    if (c := await in_stream(redis, layout.stream(org), event_id)) is not None:
        return c
    if ledger is None:
        return None
    return await in_ledger(ledger, event_id, window_s)
