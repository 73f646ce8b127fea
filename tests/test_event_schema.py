"""The event schema (quota_gw/events.py) pinned against what the scripts really write and what
the ledger really has: every script runs on the real Redis and each entry it XADDs is one field
whose text splits into the schema's values, each of its type (a swapped pair of values shows);
the schema's columns are usage_events' columns, with matching types, in the migrated database."""

from __future__ import annotations

import ast
import re
import time
import uuid
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from quota_gw import events
from quota_gw.decisions import Decider, Identity
from quota_gw.layout import Layout
from quota_gw.scripts import lua_dir

SRC = Path(__file__).resolve().parent.parent / "src"

# What each EventField.type is stored as in the ledger (information_schema data_type).
SQL_TYPE = {"text": "text", "int": "bigint", "uuid": "uuid", "us": "timestamp with time zone", "json": "jsonb"}


# What a value of each EventField.type looks like as the Lua writes it ('' none where allowed).
VALUE = {"text": r"[A-Za-z0-9_.:,-]*", "int": r"-?\d+", "uuid": r"[0-9a-f]{32}", "us": r"\d{16}", "json": r"(\{.*\})?"}


async def entries(redis: Any, stream: str, after: str) -> list[tuple[str, list[str], dict[str, str]]]:
    """(entry id, field names in order, values by name) of the stream's entries after `after`."""
    raw = await redis.execute_command("XRANGE", stream, f"({after}", "+")
    out = []
    for eid, f in raw:
        names = list(f[0::2]) if isinstance(f, list) else list(f)
        fields = dict(zip(f[0::2], f[1::2])) if isinstance(f, list) else dict(f)
        out.append((eid, names, events.decode(fields)))
    return out


def typed(values: dict[str, str], org: str, now_us: int) -> None:
    """Each value has its field's type; the org and the time are this call's."""
    for f in events.FIELDS:
        assert re.fullmatch(VALUE[f.type], values[f.name], re.S), (f.name, values[f.name])
    assert values["org"] == org and values["key"] in ("k1", "admin")  # a grant is the admin's
    assert abs(int(values["ts"]) - now_us) < 60_000_000
    assert values["meter"] == "general" and int(values["bal"]) >= 0


async def test_every_script_xadds_the_schema_fields_in_order(redis: Any, config: Any, prefix: str) -> None:
    layout = Layout(f"{prefix}:schema", 16)
    decider = Decider(redis, config, layout)
    org = f"org-{uuid.uuid4().hex[:8]}"
    ident = Identity("k1", org, None, frozenset({"consume"}), "pro")
    stream = layout.stream(org)
    last = "0"
    kinds_by_script: dict[str, set[str]] = {}

    async def run(script: str, call: Any) -> Any:
        nonlocal last
        result = await call
        got = await entries(redis, stream, last)
        if got:
            last = got[-1][0]
        for _, names, values in got:
            assert names == [events.ENTRY_FIELD], (script, names)
            typed(values, org, int(time.time() * 1_000_000))
        kinds_by_script.setdefault(script, set()).update(f["kind"] for _, _, f in got)
        return result

    await run("grant", decider.grant(org, "general", 200))
    await run("grant", decider.grant(org, "general", 5, lot="p1", expires=str(int(time.time()) - 10)))
    d = await run("consume", decider.consume(ident, "generate_insight", 1, "alice"))  # reset, expire
    assert d.status == 200
    assert (await run("consume", decider.consume(ident, "generate_insight", 200, "bob"))).status == 200  # alert
    await run("check", decider.check(ident, "generate_insight", 1, "alice"))
    r = await run("reserve", decider.reserve(ident, "generate_insight", 2, "alice", ttl_s=60))
    await run("commit", decider.commit(ident, r.event_id, 1))
    r2 = await run("reserve", decider.reserve(ident, "generate_insight", 1, "alice", ttl_s=60))
    await run("release", decider.release(ident, r2.event_id))
    await run("refund", decider.refund(ident, d.event_id))
    await run("consume", decider.consume(ident, "generate_insight", 10_000, "alice"))  # refused: denied
    await run("balance", decider.balances(org, config.plans["pro"]))
    await decider.aclose()
    assert kinds_by_script["check"] == set() and kinds_by_script["balance"] == set()  # read only
    assert kinds_by_script["grant"] == {"grant"}
    assert kinds_by_script["consume"] == {"reset", "expire", "consume", "alert", "denied"}
    for script in ("reserve", "commit", "release", "refund"):
        assert script in kinds_by_script[script], kinds_by_script
    assert set().union(*kinds_by_script.values()) <= set(events.KINDS)


def lua_kinds() -> dict[str, set[str]]:
    """{script: the kinds it writes as literals}, and every other `kind =` it assigns under '?'."""
    out: dict[str, set[str]] = {}
    for path in sorted(lua_dir().glob("*.lua")):
        src = re.sub(r"--[^\n]*", "", path.read_text())
        for value in re.findall(r"\bkind = ([^,}]+)", src):
            literal = re.fullmatch(r"'(\w+)'", value.strip())
            out.setdefault(path.stem, set()).add(literal.group(1) if literal else "?" + value.strip())
    return out


def python_grant_kinds() -> set[str]:
    """The kinds the Python code asks grant.lua to write: each Decider.grant call's `kind`
    (its 4th argument), where it is a literal."""
    found = set()
    for path in SRC.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "grant" \
                    and isinstance(node.func.value, ast.Attribute) and node.func.value.attr == "decider":
                kind = next((k.value for k in node.keywords if k.arg == "kind"), None)
                kind = kind or (node.args[3] if len(node.args) > 3 else ast.Constant("grant"))
                assert isinstance(kind, ast.Constant), f"{path}: a grant kind that is not a literal"
                found.add(kind.value)
    return found


def test_the_event_kinds_are_exactly_the_kinds_the_scripts_and_the_code_write() -> None:
    """events.KINDS (GET /v1/usage's `kind`, the OpenAPI EventKind) can neither miss a kind a
    script writes nor list one nothing writes. grant.lua alone writes the kind it is given."""
    by_script = lua_kinds()
    named = {k for kinds in by_script.values() for k in kinds if k.startswith("?")}
    assert named == {"?a.kind"} and "?a.kind" in by_script["grant"], by_script
    written = {k for kinds in by_script.values() for k in kinds if not k.startswith("?")}
    assert {"consume", "commit", "alert", "expire", "denied"} <= written  # the scan sees the scripts
    assert python_grant_kinds() == {"grant", "purchase", "revoke"}
    assert python_grant_kinds() <= set(events.CREDIT_KINDS)
    assert sorted(written | set(events.CREDIT_KINDS)) == sorted(events.KINDS)
    assert len(set(events.KINDS)) == len(events.KINDS)


async def test_a_grant_of_a_kind_the_ledger_does_not_list_is_refused_before_redis(config: Any) -> None:
    from redis.asyncio import Redis

    decider = Decider(Redis(port=1), config, Layout("t", 16))  # nothing listens: it must not be asked
    try:
        with pytest.raises(ValueError, match="CREDIT_KINDS"):
            await decider.grant("org", "general", 5, kind="bonus")
    finally:
        await decider.aclose()


async def test_the_schema_columns_are_the_ledger_columns(database_url: str) -> None:
    conn = await asyncpg.connect(database_url)
    try:
        rows = await conn.fetch("SELECT column_name, data_type FROM information_schema.columns "
                                "WHERE table_name = 'usage_events' AND table_schema = 'public'")
    finally:
        await conn.close()
    ledger = {r["column_name"]: r["data_type"] for r in rows}
    assert set(ledger) == {*events.COLUMNS, events.STREAM_ID_COLUMN}
    for f in events.FIELDS:
        assert ledger[f.column] == SQL_TYPE[f.type], f


def test_the_worker_and_its_sql_take_their_order_from_the_schema() -> None:
    from sync_worker import encoding, sql

    assert sql.COLUMNS == (*events.COLUMNS, events.STREAM_ID_COLUMN)
    assert encoding.FIELDS == [n.encode() for n in events.NAMES]
    fields: list[bytes] = []
    for f in events.FIELDS:
        value = {"int": b"7", "us": b"1700000000123456", "json": b"{}", "uuid": b"ab" * 16}.get(f.type, b"x")
        fields += [f.name.encode(), value]
    packed = [events.ENTRY_FIELD.encode(), b"\t".join(fields[1::2])]
    # An entry as the scripts write it, and one written before packing (a field per value): one line.
    assert encoding.copy_line(b"s/", b"1-0", packed) == encoding.copy_line(b"s/", b"1-0", fields)
    line = encoding.copy_line(b"s/", b"1-0", packed).rstrip(b"\n").split(b"\t")
    assert len(line) == len(sql.COLUMNS)
    row = dict(zip(sql.COLUMNS, line))
    assert row["ts"] == b"2023-11-14 22:13:20.123456+00" and row["metadata"] == b"{}" and row["stream_id"] == b"s/1-0"
    # The metadata is last: whatever it holds stays in it, escaped for COPY.
    odd = [packed[0], packed[1][:-2] + b'{"a":"\t\\"}']
    assert encoding.event_values(odd)[events.POSITION["meta"]] == b'{"a":"\t\\"}'
    assert encoding.copy_line(b"s/", b"1-0", odd).count(b"\t") == len(sql.COLUMNS) - 1
