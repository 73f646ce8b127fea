"""Stream entries to COPY text lines: what the worker writes to the ledger, and what it cannot.

An entry's one field holds the event's values joined by tabs in the order of sql.COLUMNS (both
are quota_gw/events.py's, by name), so a line is that text with the time rewritten, plus the
stream id. `event_values` is the one place that knows an entry's layout; everything else asks it.

This is the worker's hottest code (its CPU is the drain's limit, docs/benchmarks.md): rows are
tuples, a line is one split and one join, and escaping runs only when a value needs it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from quota_gw import events

FIELDS = [n.encode() for n in events.NAMES]
ENTRY_FIELD = events.ENTRY_FIELD.encode()
_FIELD_SET = set(FIELDS)
_SPLITS = len(FIELDS) - 1  # `meta`, last, keeps whatever it holds
TS, META = events.POSITION["ts"], events.POSITION["meta"]  # the timestamp (µs) and the metadata


class BadEntry(ValueError):
    """A stream entry that is not an event the worker can write."""


def event_values(f: list[bytes] | None) -> list[bytes]:
    """The values of an event entry (raw [name, value, ...]) in FIELDS order, a new list;
    BadEntry if the entry is not an event. Entries written before packing (one field per value,
    by name; the oldest without `src`) are read by name."""
    if f is not None and len(f) == 2 and f[0] == ENTRY_FIELD:
        v = f[1].split(b"\t", _SPLITS)
        if len(v) == len(FIELDS):
            return v
    elif f is not None and len(f) % 2 == 0:
        names = f[0::2]
        named = dict(zip(names, f[1::2]))
        named.setdefault(b"src", b"")
        if len(names) == len(set(names)) and named.keys() == _FIELD_SET:
            return [named[n] for n in FIELDS]
    raise BadEntry("not an event entry: unexpected fields")


@lru_cache(maxsize=8)
def _second(sec: int) -> bytes:
    """'YYYY-MM-DD HH:MM:SS' of a unix second; a batch's events share a few seconds."""
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(sec)).encode()


def escape(v: bytes) -> bytes:
    """COPY text escaping of one value."""
    return v.replace(b"\\", b"\\\\").replace(b"\t", b"\\t").replace(b"\n", b"\\n").replace(b"\r", b"\\r")


def stream_ref(stream: bytes) -> bytes:
    """The stream part of stream_id ('<stream>/<entry id>')."""
    return escape(stream) + b"/"


def copy_line(ref: bytes, entry_id: bytes, f: list[bytes] | None, meta: bytes | None = None) -> bytes:
    """One COPY text line (sql.COLUMNS) from a raw entry; `meta` overrides the metadata."""
    v = event_values(f)
    if meta is not None:
        v[META] = meta
    try:
        us = int(v[TS])
        sec = us // 1_000_000
        v[TS] = b"%b.%06d+00" % (_second(sec), us - sec * 1_000_000)
    except (ValueError, OverflowError, OSError) as e:
        raise BadEntry(f"bad ts {v[TS][:40]!r}: {e}") from None
    line = b"\t".join(v)
    if b"\\" in line or b"\n" in line or b"\r" in line or line.count(b"\t") != len(v) - 1:
        line = b"\t".join([escape(x) for x in v])  # JSON metadata with escapes, mostly
    return line + b"\t" + ref + entry_id + b"\n"


# A stream entry to write: (stream, entry id, raw fields, COPY line). Tuples, not objects: a
# batch holds thousands.
Row = tuple[bytes, bytes, list[bytes], bytes]


@dataclass(slots=True)
class Entry:
    """An entry that goes to the dead-letter stream, and why."""

    stream: bytes
    id: bytes
    fields: list[bytes] | None
    error: str = ""


@dataclass(slots=True)
class Batch:
    """What one read returned, encoded."""

    redelivered: bool  # read from this consumer's pending entries: likely written already
    rows: list[Row] = field(default_factory=list)
    dead: list[Entry] = field(default_factory=list)
    ids: dict[bytes, list[bytes]] = field(default_factory=dict)  # everything to ack, per stream
    gone: int = 0  # pending entries deleted from the stream before they were written
    size: int = 0


def encode(reply: Any, redelivered: bool) -> Batch:
    """A batch from an XREADGROUP reply ([[stream, [[id, fields], ...]], ...], bytes)."""
    batch = Batch(redelivered)
    rows, ids_of = batch.rows, batch.ids
    for stream, items in reply or ():
        if not items:
            continue
        ref = stream_ref(stream)
        ids = ids_of[stream] = []
        for eid, f in items:
            ids.append(eid)
            if f is None:
                batch.gone += 1  # deleted while pending (trimmed by someone else): nothing to write
                continue
            try:
                rows.append((stream, eid, f, copy_line(ref, eid, f)))
            except BadEntry as err:
                batch.dead.append(Entry(stream, eid, f, str(err)))
        batch.size += len(items)
    return batch
