"""The event schema: the one owner of what a stream entry carries and where it lands.

Every balance change (and every refusal) is one XADD by a Lua script (lua/_lib.lua
`pack_event`) and later one row of the ledger `usage_events`, written by the sync worker with
COPY. An entry has one field, `e` (ENTRY_FIELD): the event's values in FIELDS order, joined by
tabs. One field and not fourteen because each field is an argument Redis turns into an object and
a stream entry it encodes, ~6 % of a decision's time (docs/benchmarks.md), and because the ledger
wants the values in that order anyway: the worker's COPY line is the entry's text with the time
rewritten. `meta` (JSON, free text) is last, so even a tab in it could not shift a value; the other
values are names (config.NAME_RE), ids and integers. Entries written before packing carried one
field per value, by name (`decode`, the worker's `event_values` read both).

This module states the order once: the Lua packer (EVENT_FIELDS), the worker's encoding
(src/sync_worker/encoding.py) and SQL (src/sync_worker/sql.py) take it from here by name;
tests/test_lua_interface.py pins the Lua list, tests/test_event_schema.py runs each script on a
real Redis and reads every value back by its type, and checks `COLUMNS` against the ledger's
columns (the migrations). Adding a field: README "Adding an event field".

It also owns the event kinds: every `kind` an entry can carry, which GET /v1/usage filters by and
the OpenAPI `EventKind` lists. The scripts write each kind as a literal, except lua/grant.lua,
which writes the one its Python caller names (CREDIT_KINDS; Decider.grant refuses any other);
tests/test_event_schema.py holds KINDS to exactly what the scripts and those callers write.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class EventField:
    name: str  # the stream entry's field name, as the Lua writes it
    column: str  # the usage_events column it is copied into
    type: str  # what the Lua writes: text, int (decimal), uuid (32 hex), us (unix microseconds), json ('' none)


FIELDS: tuple[EventField, ...] = (
    EventField("id", "event_id", "uuid"),
    EventField("kind", "kind", "text"),
    EventField("org", "org_id", "text"),
    EventField("user", "user_id", "text"),
    EventField("key", "key_id", "text"),
    EventField("meter", "meter", "text"),
    EventField("feature", "feature", "text"),
    EventField("delta", "delta", "int"),
    EventField("dp", "delta_purchased", "int"),
    EventField("cost", "cost", "int"),
    EventField("bal", "balance_after", "int"),
    EventField("ts", "ts", "us"),
    # Where a charge's tokens came from (a refund's went back to): 'allocated:2,grant:<lot>:2,purchased:1'.
    EventField("src", "sources", "text"),
    EventField("meta", "metadata", "json"),  # last: free text
)

NAMES: tuple[str, ...] = tuple(f.name for f in FIELDS)
COLUMNS: tuple[str, ...] = tuple(f.column for f in FIELDS)
POSITION: dict[str, int] = {f.name: i for i, f in enumerate(FIELDS)}
# The ledger column the worker adds to every row: where the entry came from ('<stream>/<id>').
STREAM_ID_COLUMN = "stream_id"
# The kinds lua/grant.lua writes as its caller names them (the credit an operator, a purchase or
# its refund changes).
CREDIT_KINDS: tuple[str, ...] = ("grant", "purchase", "adjust", "revoke")
# Every kind of event, in the order the API documents them: the SPEC's, then those added since
# (low-balance `alert`, credit lots' `expire`, a refunded purchase's `revoke`).
KINDS: tuple[str, ...] = ("consume", "refund", "reserve", "commit", "release", "grant", "purchase", "reset",
                          "adjust", "denied", "alert", "expire", "revoke")

# The stream entry's one field: the values, in FIELDS order, joined by tabs.
ENTRY_FIELD = "e"


def decode(fields: Mapping[str, str]) -> dict[str, str]:
    """An event entry's values by name, from an XRANGE of a decoding client. An entry written
    before packing has them as its fields (without `src` if older still: '')."""
    packed = fields.get(ENTRY_FIELD)
    if packed is None:
        return {"src": "", **fields}
    return dict(zip(NAMES, packed.split("\t", len(NAMES) - 1)))


def entries(reply: Iterable[tuple[str, Mapping[str, str]]] | None) -> list[dict[str, str]]:
    """The events of an XRANGE/XREVRANGE reply of a decoding client, values by name."""
    return [decode(fields) for _, fields in reply or ()]
