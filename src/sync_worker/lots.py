"""Credit lots from the ledger: what `quota-gw rebuild` writes into a meter's `lots` field and
what `quota-gw reconcile` compares it with.

A lot (lua/_lib.lua decode_lots) is purchased credit that expires or that a refund must trace,
stored as JSON [{i = id, n = left, x = expiry (unix s) | 0}], oldest first. The ledger records
every change of one, so replaying a meter's credit events in the order the scripts wrote them
gives each lot as the scripts left it:
- a grant, purchase or adjustment adding credit opens a lot if it expires (metadata
  `expires_at`) or is a purchase (lua/grant.lua): id the `purchase_id`, else the event's id;
- a charge (consume, commit) takes what its `sources` say: `grant:<lot>:n` from that lot,
  `purchased:n` from the free pool (purchased credit outside any lot) first, then from the
  lots that never expire, oldest first (Meter:take);
- a refund gives back what its `sources` say: `grant:<lot>:n` to that lot, `purchased:n` to
  the free pool (refund.lua names a lot only if it put the share back there);
- an `expire` event ends its lot (what was left went out of `p` with it); a `revoke` of a
  refunded purchase (metadata `taken`) ends the purchase's lot;
- credit taken away otherwise (a negative grant or adjustment, or a charge written before
  charges recorded their sources) is drawn as Meter:draw_lots does: lots that expire,
  earliest first, then the free pool, then the lots that never expire, oldest first.
A lot that never expires is forgotten once spent; one that expires stays, spent or not, until
its expiry, so a refund of a charge it paid finds it.

Order: a stream entry's id (the `stream_id` column), the order the org's shard stream took the
events in, so the events one script wrote (a lapse, then the charge) replay in that order.

Which lots come out at a time `now`: every live one, and one past its expiry that still holds
credit with no `expire` event yet (no decision touched its meter since it lapsed): the scripts
still store it, every reader leaves it out, and the next decision on the meter expires it and
records the event, as it would have without the rebuild. A spent lot past its expiry is left
out (the next decision would drop it without an event).

Only meters that ever had a lot are replayed, from their first lot on (the purchased credit
before it is one sum): every event since that moved their purchased credit.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, NamedTuple, TypeVar

import orjson

GRANT_KINDS = ("grant", "purchase", "adjust")
# Kinds written by scripts that first expire the lots past their expiry (Meter:expire_lots):
# the gate's (consume; an `expire` event is its record) and grant.lua's. Those that held credit
# were recorded by `expire` events just before; the spent ones went without one.
_EXPIRING_FIRST = (*GRANT_KINDS, "revoke", "consume", "expire")
# Kinds whose metadata the replay reads (a lot's id and expiry, a revoked lot, an expired lot).
_META_KINDS = "('grant', 'purchase', 'adjust', 'revoke', 'expire')"


def lot_events_sql(one_org: bool) -> str:
    """The credit events of every (org, meter) that ever had a lot, from its first one, in
    stream order, after one row per such meter of kind '' whose dp is the purchased credit
    before it. Columns: org, meter, LotEvent's fields, the event's time (unix µs).
    $1/$2: (org, meter) pairs replayed from their first event (a lot opened by an event still in
    a stream). one_org: only the org $3. Every org's in one pass (reconcile keeps, per org, the
    events up to its snapshot time): no org_id = ANY(<every org>) test per ledger row."""
    scope = "AND {t}.org_id = $3" if one_org else ""
    return f"""
WITH opened AS (
    SELECT org_id, meter, min(since) AS since FROM (
        SELECT g.org_id, g.meter, g.ts AS since FROM usage_events g
         WHERE g.kind IN {GRANT_KINDS} AND g.delta_purchased > 0 AND g.meter IS NOT NULL
           AND (g.kind = 'purchase' OR g.metadata ? 'expires_at') {scope.format(t="g")}
        UNION ALL
        SELECT x.org_id, x.meter, '-infinity'::timestamptz FROM unnest($1::text[], $2::text[]) AS x(org_id, meter)
    ) s GROUP BY 1, 2
)
SELECT * FROM (
SELECT o.org_id, o.meter, -1::bigint AS ms, 0::bigint AS seq, 0::bigint AS ts_s, '' AS kind,
       (SELECT coalesce(sum(b.delta_purchased), 0) FROM usage_events b
         WHERE b.org_id = o.org_id AND b.meter = o.meter AND b.ts < o.since)::bigint AS dp,
       '' AS event_id, '' AS sources, '' AS purchase_id, 0::bigint AS expires_at, '' AS lot, false AS taken,
       0::bigint AS ts_us
  FROM opened o
UNION ALL
SELECT e.org_id, e.meter,
       coalesce(split_part(split_part(e.stream_id, '/', -1), '-', 1)::bigint, (extract(epoch FROM e.ts) * 1000)::bigint),
       coalesce(split_part(e.stream_id, '-', -1)::bigint, -1),
       floor(extract(epoch FROM e.ts))::bigint,
       e.kind, e.delta_purchased,
       CASE WHEN e.kind IN {GRANT_KINDS} THEN replace(e.event_id::text, '-', '') ELSE '' END,
       coalesce(e.sources, ''), coalesce(m.metadata ->> 'purchase_id', ''),
       CASE WHEN m.metadata ->> 'expires_at' ~ '^[0-9]{{1,15}}$' THEN (m.metadata ->> 'expires_at')::bigint ELSE 0 END,
       coalesce(m.metadata ->> 'lot', ''), coalesce(m.metadata ? 'taken', false),
       (extract(epoch FROM e.ts) * 1000000)::bigint
  FROM opened o
  JOIN usage_events e ON e.org_id = o.org_id AND e.meter = o.meter AND e.ts >= o.since
 CROSS JOIN LATERAL (SELECT CASE WHEN e.kind IN {_META_KINDS} THEN e.metadata END AS metadata) m
 WHERE e.delta_purchased <> 0 OR e.kind = 'revoke'
) u ORDER BY org_id COLLATE "C", meter COLLATE "C", ms, seq  -- (any order of the meters groups them)
"""


@dataclass
class Lot:
    i: str  # the lot's id: a purchase id, or the granting event's id
    n: int  # credit left
    x: int  # expiry, unix s; 0: never

    def shown(self) -> str:
        if not self.x:
            return f"{self.n} left, never expires"
        return f"{self.n} left, expires {datetime.fromtimestamp(self.x, timezone.utc):%Y-%m-%dT%H:%M:%SZ}"


class LotEvent(NamedTuple):
    """One credit event of a meter, as the replay needs it (lot_events_sql's columns between the
    org and meter and the time in µs)."""
    ms: int  # its stream entry id (ms, seq): the order the scripts wrote in
    seq: int
    ts_s: int  # when (unix s, the script's clock)
    kind: str
    dp: int  # the change of purchased credit
    event_id: str  # 32 hex digits (read only for a lot's id)
    sources: str
    purchase_id: str
    expires_at: int
    lot: str  # an expire event's lot
    taken: bool  # a revoke that took back its purchase's lot


def entry_order(entry_id: str | None, ts_us: int) -> tuple[int, int]:
    """A stream entry id ('<ms>-<seq>') as a sort key; from the event's time when there is none."""
    if entry_id:
        ms, sep, seq = entry_id.partition("-")
        if sep and ms.isdigit() and seq.isdigit():
            return int(ms), int(seq)
    return ts_us // 1000, -1


def _int(v: Any) -> int:
    try:
        return int(v or 0)
    except (TypeError, ValueError):
        return 0


def event_from_entry(entry_id: str, f: dict[str, str]) -> LotEvent | None:
    """A stream entry (events.py fields) that moved purchased credit or revoked a lot, else None."""
    try:
        dp, ts = int(f["dp"]), int(f["ts"])
    except (KeyError, ValueError):
        return None
    kind = f.get("kind", "")
    if dp == 0 and kind != "revoke":
        return None
    meta: dict[str, Any] = {}
    if kind in ("grant", "purchase", "adjust", "revoke", "expire") and f.get("meta"):
        try:
            loaded = orjson.loads(f["meta"])
            meta = loaded if isinstance(loaded, dict) else {}
        except orjson.JSONDecodeError:
            pass
    return LotEvent(*entry_order(entry_id, ts), ts // 1_000_000, kind, dp, f.get("id", ""), f.get("src", ""),
                    str(meta.get("purchase_id") or ""), _int(meta.get("expires_at")), str(meta.get("lot") or ""),
                    "taken" in meta)


def opens_lot(e: LotEvent) -> bool:
    return e.kind in GRANT_KINDS and e.dp > 0 and (e.kind == "purchase" or e.expires_at > 0)


@dataclass
class MeterLots:
    """One meter's purchased credit `p` and its lots, event by event (see the module doc)."""
    p: int
    lots: list[Lot] = field(default_factory=list)

    def free(self) -> int:
        return max(0, self.p - sum(lot.n for lot in self.lots))

    def apply(self, e: LotEvent) -> None:
        if e.kind in _EXPIRING_FIRST:  # the script dropped every lot past its expiry first
            self.lots = [lot for lot in self.lots if not 0 < lot.x <= e.ts_s]
        if opens_lot(e):
            lot_id = e.purchase_id if e.kind == "purchase" and e.purchase_id else e.event_id
            self.lots.append(Lot(lot_id, e.dp, e.expires_at))
        elif e.kind == "revoke" and e.taken:
            self.lots = [lot for lot in self.lots if lot.i != e.purchase_id]
        elif e.kind == "expire":
            self.lots = [lot for lot in self.lots if lot.i != e.lot]
        elif e.kind in ("consume", "commit") and e.dp < 0 and e.sources:
            self._take(e.sources)
        elif e.kind == "refund" and e.sources:
            for layer, n in _parts(e.sources):
                if layer.startswith("grant:"):
                    for lot in self.lots:
                        if lot.i == layer[6:]:
                            lot.n += n
        elif e.dp < 0:
            self._draw(-e.dp)
        self.p += e.dp

    def _take(self, sources: str) -> None:
        """Meter:take: each grant layer from its lot; `purchased` from the free pool, then the
        lots that never expire, oldest first."""
        free = self.free()
        for layer, n in _parts(sources):
            if layer.startswith("grant:"):
                for lot in self.lots:
                    if lot.i == layer[6:]:
                        lot.n -= n
            elif layer == "purchased":
                self._from_never_expiring(n - min(free, n))
        self._drop_spent()

    def _draw(self, amount: int) -> None:
        """Meter:draw_lots: lots that expire, earliest first, the free pool, then the rest. Lots
        that expire at the same second are drawn in the order Lua's table.sort leaves them."""
        free = self.free()
        left = amount
        for lot in lua_sort([lot for lot in self.lots if lot.x > 0], lambda a, b: a.x < b.x):
            d = min(lot.n, left)
            lot.n, left = lot.n - d, left - d
        left -= min(free, left)
        self._from_never_expiring(left)
        self._drop_spent()

    def _from_never_expiring(self, left: int) -> None:
        for lot in self.lots:
            if left > 0 and lot.x == 0:
                d = min(lot.n, left)
                lot.n, left = lot.n - d, left - d

    def _drop_spent(self) -> None:
        self.lots = [lot for lot in self.lots if lot.n > 0 or lot.x > 0]

    def stored(self, now_s: int) -> list[Lot]:
        """The lots as the scripts store them at `now_s` (see the module doc)."""
        return [lot for lot in self.lots if lot.x == 0 or lot.x > now_s or lot.n > 0]


T = TypeVar("T")


def lua_sort(items: list[T], less: Callable[[T, T], bool]) -> list[T]:
    """`items` as Lua 5.1's table.sort (the scripts' Lua, ltablib.c auxsort) orders them: not a
    stable sort, so equal items end up where its quicksort puts them, which this follows step
    by step."""
    a: list[Any] = [None, *items]  # 1-based, as in Lua

    def aux(lo: int, up: int) -> None:
        while lo < up:
            if less(a[up], a[lo]):
                a[lo], a[up] = a[up], a[lo]
            if up - lo == 1:
                break
            i = (lo + up) // 2
            if less(a[i], a[lo]):
                a[i], a[lo] = a[lo], a[i]
            elif less(a[up], a[i]):
                a[i], a[up] = a[up], a[i]
            if up - lo == 2:
                break
            pivot = a[i]
            a[i], a[up - 1] = a[up - 1], a[i]
            i, j = lo, up - 1
            while True:
                i += 1
                while less(a[i], pivot):
                    i += 1
                j -= 1
                while less(pivot, a[j]):
                    j -= 1
                if j < i:
                    break
                a[i], a[j] = a[j], a[i]
            a[up - 1], a[i] = a[i], a[up - 1]
            if i - lo < up - i:
                j, i, lo = lo, i - 1, i + 1
            else:
                j, i, up = i + 1, up, i - 1
            aux(j, i)

    aux(1, len(items))
    return a[1:]


def _parts(sources: str) -> list[tuple[str, int]]:
    """'allocated:2,grant:<lot>:2,purchased:1' -> [('allocated', 2), ('grant:<lot>', 2), ...]."""
    out = []
    for part in sources.split(","):
        layer, _, n = part.rpartition(":")
        if layer and n.isdigit():
            out.append((layer, int(n)))
    return out


def replay(rows: list[Any], pending_of: dict[tuple[str, str], list[LotEvent]] | None = None
           ) -> dict[tuple[str, str], MeterLots]:
    """Per (org, meter): its lots after the rows of lot_events_sql (in its order) and the events
    in `pending_of` (not in the ledger yet), in stream order."""
    out: dict[tuple[str, str], MeterLots] = {}
    key: tuple[str, str] | None = None
    events: list[LotEvent] = []

    def done() -> None:
        if key is None:
            return
        meter = out[key]
        more = (pending_of or {}).get(key)
        for e in sorted(events + more) if more else events:
            meter.apply(e)

    for x in rows:
        if x[5] == "":  # the meter's first row: the purchased credit before its first lot
            done()
            key, events = (x[0], x[1]), []
            out[key] = MeterLots(x[6])
        else:
            events.append(LotEvent._make(x[2:13]))
    done()
    return out


def encode(lots: list[Lot]) -> str:
    """The `lots` field as lua/_lib.lua reads it."""
    return orjson.dumps([{"i": lot.i, "n": lot.n, "x": lot.x} for lot in lots]).decode()


def decode(raw: str | None) -> list[Lot]:
    """The `lots` field as Redis holds it; unreadable is none, as for decode_lots."""
    if not raw:
        return []
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return []
    if not isinstance(value, list):
        return []
    return [Lot(str(v.get("i", "")), _int(v.get("n")), _int(v.get("x"))) for v in value if isinstance(v, dict)]
