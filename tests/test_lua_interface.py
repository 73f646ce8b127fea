"""The Lua interface read from the Lua source and held against its Python owners: each script's
named ARGV (bind(ARGV, ...)) against the typed object decisions.py builds it from, field for
field and in order; the reply layout against Decision; the hash field spellings against
layout.py; and the rule that no library function reads KEYS or ARGV. Lua cannot import Python,
so these are the checks that keep the two sides in step."""

from __future__ import annotations

import dataclasses
import re
from typing import Any

from quota_gw import config as config_mod
from quota_gw import decisions, layout, scripts
from quota_gw.scripts import OPERATIONS, lua_dir

from conftest import test_config_data

LIB = (lua_dir() / "_lib.lua").read_text()


def code(lua: str) -> str:
    """The source without comments."""
    return re.sub(r"--[^\n]*", "", lua)


def lua_list(body: str) -> list[str]:
    return re.findall(r"'([^']*)'", body)


def lua_table(name: str) -> dict[str, str]:
    body = re.search(r"local %s = \{(.*?)\}" % name, code(LIB), re.S)
    assert body, name
    return {k: v.strip("'") for k, v in re.findall(r"(\w+) = ('[^']*'|-?\d+)", body.group(1))}


def named_list(name: str) -> list[str]:
    body = re.search(r"local %s = \{(.*?)\}" % name, code(LIB), re.S)
    assert body, name
    return lua_list(body.group(1))


def bound(script: str, what: str) -> list[str]:
    """The names a script binds KEYS or ARGV to: a list inline or one declared in _lib.lua."""
    src = code((lua_dir() / f"{script}.lua").read_text())
    # balance.lua binds ARGV one group per meter: bind({unpack(ARGV, i, j)}, BALANCE_ARGV).
    m = re.search(r"bind\((?:%s|\{unpack\(%s[^}]*\}), (\{.*?\}|\w+)\)" % (what, what), src, re.S)
    assert m, f"{script}.lua binds no {what}"
    return lua_list(m.group(1)) if m.group(1).startswith("{") else named_list(m.group(1))


def test_each_script_binds_its_argv_by_the_names_of_its_python_object_in_order() -> None:
    assert set(decisions.SCRIPT_ARGS) == set(OPERATIONS)
    for script, cls in decisions.SCRIPT_ARGS.items():
        assert bound(script, "ARGV") == [f.name for f in dataclasses.fields(cls)], script


def test_argv_lists_the_fields_in_order() -> None:
    args = decisions.SettleArgs(reservation_id="r", event_id="e", org="o", key_id="k", units=3, answer_ttl_s="60",
                                metadata="", fingerprint="fp", beyond_hold="1", alert_thresholds="25,10,0")
    assert decisions.argv(args) == ["r", "e", "o", "k", 3, "60", "", "fp", "1", "25,10,0"]


def test_a_commit_carries_the_alert_thresholds_the_gate_does_and_a_release_none(config) -> None:
    """commit judges low-balance alerts as consume does, from the same text (GateTerms.alert_thresholds)."""
    from redis.asyncio import Redis

    d = decisions.Decider(Redis(), config, layout.Layout("t", 16))
    ident = decisions.Identity("key1", "org1", None, frozenset(), "pro")
    _, terms, _, _ = d._priced(ident, "generate_insight")
    assert terms["alert_thresholds"] == "25,10,0"
    at = [f.name for f in dataclasses.fields(decisions.SettleArgs)].index("alert_thresholds")
    _, commit = d._settle_call(ident, "r1", 3, None, "commit")
    _, release = d._settle_call(ident, "r1", 0, None, "release")
    assert commit[at] == terms["alert_thresholds"] and release[at] == ""


def test_the_gates_fast_argv_is_argv_of_gate_args(config) -> None:
    """The hot path copies a per-plan template and sets the per-call fields by position: the
    list must be what the typed object gives."""
    from redis.asyncio import Redis

    d = decisions.Decider(Redis(), config, layout.Layout("t", 16))
    ident = decisions.Identity("key1", "org1", None, frozenset(), "enterprise")
    _, args = d._gate_call(ident, "generate_insight", 3, "u1", "idem1", "fp1", b'{"a":1}', True, event_id="e1")
    _, terms, _, _ = d._priced(ident, "generate_insight")
    assert args == decisions.argv(decisions.GateArgs(
        event_id="e1", org="org1", user="u1", key_id="key1", cost=3, fingerprint="fp1", metadata='{"a":1}',
        shadow=1, terms=decisions.terms_text(decisions.GateTerms(**terms))))
    sent = dict(zip([f.name for f in dataclasses.fields(decisions.GateTerms)],
                    args[decisions.GATE["terms"]].split("\t")))
    assert terms["rl_user_interval_us"] > 0 and sent["rl_user_burst"] == "20" and sent["feature"] == "generate_insight"


def test_the_gates_argv_is_sent_up_to_its_last_field_not_at_its_default(config) -> None:
    """Every field after `terms` has a default, which lua reads for one left off (nil): a call
    sends its ARGV up to its last field that differs, so the usual consume sends six, and a
    field set anywhere keeps every one before it in its place."""
    from redis.asyncio import Redis

    d = decisions.Decider(Redis(), config, layout.Layout("t", 16))
    ident = decisions.Identity("key1", "org1", None, frozenset(), "enterprise")
    fields = dataclasses.fields(decisions.GateArgs)
    terms_at = decisions.GATE["terms"]
    assert all(f.default == dataclasses.MISSING for f in fields[:terms_at + 1])
    assert all(f.default != dataclasses.MISSING for f in fields[terms_at + 1:])

    def sent(idem: str | None = None, metadata: bytes | None = None, shadow: bool = False, **more: Any) -> list[Any]:
        _, args = d._gate_call(ident, "generate_insight", 3, "u1", idem, "fp1" if idem else "", metadata, shadow)
        for name, value in more.items():
            args[decisions.GATE[name]] = value
        whole = list(args)
        out = decisions.sent_argv(args)
        assert out == whole[:len(out)] and all(  # only defaults left off
            v == fields[i].default for i, v in enumerate(whole[len(out):], start=len(out)))
        return out

    assert len(sent()) == terms_at + 1
    assert sent(metadata=b'{"a":1}')[-1] == '{"a":1}' and len(sent(metadata=b'{"a":1}')) == terms_at + 2
    reserve = sent(reservation_ttl_s="600", unit_cost=1, min_cost=40)
    assert reserve[decisions.GATE["metadata"]] == "" and reserve[-1] == 40
    assert len(sent(reservation_ttl_s="600", unit_cost=1)) == decisions.GATE["unit_cost"] + 1
    assert sent(idem="i1")[decisions.GATE["fingerprint"]] == "fp1"
    assert sent(shadow=True)[-1] == 1 and sent(explain=1)[-1] == 1 and len(sent(explain=1)) == len(fields)
    # A consume's own list (not `whole`) is what the whole one sends.
    for idem, metadata, shadow in [(None, None, False), (None, b'{"a":1}', False), ("i1", None, False),
                                   ("i1", b'{"a":1}', False), (None, None, True), (None, b'{"a":1}', True)]:
        for whole in (True, False):
            _, args = d._gate_call(ident, "generate_insight", 3, "u1", idem, "fp1" if idem else "", metadata, shadow,
                                   event_id="e1", whole=whole)
            if whole:
                want = decisions.sent_argv(args)
            else:
                assert decisions.sent_argv(args) == want, (idem, metadata, shadow)


def test_the_gates_keys_are_named_in_gate_keys_order_and_an_idempotency_key_stays_with_its_call(config) -> None:
    """The gate's KEYS are kept per (org, key): a call's idempotency key goes in its own copy,
    at the place GATE_KEYS names `idem`, and never into the next call's. The rate windows' keys
    and the idempotency key are last: a call without them (its plan has no key or org window,
    it has no idempotency key) leaves them off."""
    from redis.asyncio import Redis

    L = layout.Layout("t", 16)
    d = decisions.Decider(Redis(), config, L)
    ident = decisions.Identity("key1", "org1", None, frozenset(), "enterprise")
    named = {"bal": L.balances("org1"), "quotas": L.quotas("org1"),
             "stream": L.stream("org1"), "reservations": L.reservations("org1"), "expiries": L.expiries("org1"),
             "rl_key": L.rate("org1", "k", "key1"), "rl_org": L.rate("org1", "o", "-")}
    _, terms, _, _ = d._priced(ident, "generate_insight")
    assert terms["rl_key_interval_us"] == terms["rl_org_interval_us"] == 0  # the example's enterprise plan
    plain, _ = d._gate_call(ident, "generate_insight", 3, "u1", None, "", None, False)
    with_idem, _ = d._gate_call(ident, "generate_insight", 3, "u1", "idem1", "fp1", None, False)
    again, _ = d._gate_call(ident, "generate_insight", 3, "u1", None, "", None, False)
    names = named_list("GATE_KEYS")
    assert dict(zip(names, plain)) == {n: named[n] for n in names[:5]} and len(plain) == 5
    assert dict(zip(names, with_idem, strict=True)) == {**named, "idem": L.idem("org1", "d", "idem1")}
    assert again == plain
    # A plan with a key's rate window sends its key; with the org's, both.
    data = test_config_data()
    data["plans"]["keyed"] = {"allocations": {"general": 100}, "rate_limits": {"key": {"limit": 5, "window": "1m"}}}
    data["plans"]["org_wide"] = {"allocations": {"general": 100}, "rate_limits": {"org": {"limit": 5, "window": "1m"}}}
    d = decisions.Decider(Redis(), config_mod.parse(data, "test"), L)
    for plan, sent in (("keyed", 6), ("org_wide", 7)):
        keys, _ = d._gate_call(decisions.Identity("key1", "org1", None, frozenset(), plan), "generate_insight", 3, "u1",
                               None, "", None, False)
        assert keys == [named[n] for n in names[:sent]], plan


def test_the_plan_terms_are_named_in_lua_as_in_python_in_order() -> None:
    """GateArgs.terms is positional text: GATE_TERMS (lua) binds it by the GateTerms field names."""
    assert named_list("GATE_TERMS") == [f.name for f in dataclasses.fields(decisions.GateTerms)]
    assert re.search(r"bind\(values, GATE_TERMS\)", code(LIB))


def test_each_script_binds_its_keys_at_the_top() -> None:
    for script in OPERATIONS:
        src = code((lua_dir() / f"{script}.lua").read_text())
        first = [line for line in src.splitlines() if line.strip()][0]
        # consume, reserve, commit, release: the usual case names them itself (usual_<op>, held
        # below), then binds.
        usual = re.match(r"local usual(, now(, meter_read)?)? = usual_%s\(KEYS, ARGV\)$" % script, first.strip())
        assert first.startswith("local k = bind(KEYS,") or usual, script
        assert len(bound(script, "KEYS")) == len(set(bound(script, "KEYS")))
        # A script reads names, never positions.
        assert not re.search(r"(KEYS|ARGV)\[", src), script


def test_no_library_function_reads_keys_or_argv() -> None:
    assert not re.search(r"\b(KEYS|ARGV)\b", code(LIB))


def test_the_reply_layout_is_decision() -> None:
    assert named_list("REPLY") == [f.name for f in dataclasses.fields(decisions.Decision)]
    assert set(lua_table("REPLY_DEFAULTS")) == set(named_list("REPLY"))  # reply{} fills every field


def test_the_lua_spells_the_hash_fields_as_layout_does() -> None:
    assert lua_table("METER_FIELDS") == layout.METER_FIELDS
    assert lua_table("QUOTA_FIELDS") == layout.QUOTA_FIELDS
    assert lua_table("USER_FIELDS") == layout.USER_FIELDS
    assert re.search(r"local USER_PREFIX = '(\S+)'", code(LIB)).group(1) == layout.USER_PREFIX
    assert layout.user_key_field("u1") == "@u1" and layout.user_field("u1", "team") == "@u1:t"
    assert [layout.user_of_field(f) for f in ("@u1", "@u1:t", "general:p", "holds_due")] == ["u1", None, None, None]
    assert re.search(r"local HOLDS_DUE = '(\w+)'", code(LIB)).group(1) == layout.HOLDS_DUE
    assert re.search(r"local SUB_QUOTAS = '(\w+)'", code(LIB)).group(1) == layout.SUB_QUOTAS
    assert layout.meter_field("general", "purchased") == "general:p"
    assert layout.quota_field(layout.quota_subject("team", "red"), "general", "limit") == "t:red:general:lim"


def test_the_usual_cases_name_keys_and_argv_as_the_scripts_bind_them() -> None:
    """usual_consume and usual_reserve unpack KEYS and ARGV (as `keys`, `argv`) into locals (no
    bound table), usual_commit and usual_release theirs (as `settle_keys`, `settle_argv`): each
    name is the GATE_* / SETTLE_* name at its position, `_` for one it does not read."""
    lists = (("keys", "GATE_KEYS", 2), ("argv", "GATE_ARGV", 2), ("settle_keys", "SETTLE_KEYS", 2),
             ("settle_argv", "SETTLE_ARGV", 2))
    for what, list_name, count in lists:
        names = named_list(list_name)
        lines = re.findall(r"local ([\w, \n]+) = unpack\(%s\)" % what, code(LIB))
        assert len(lines) == count, what
        for line in lines:
            unpacked = [n.strip() for n in line.split(",")]
            assert all(n == "_" or n == names[i] or n == names[i] + "_key" for i, n in enumerate(unpacked)), unpacked
            assert [n for n in unpacked if n != "_"]  # it reads some


def test_the_event_packer_writes_the_schema_fields_in_order() -> None:
    """pack_event joins EVENT_FIELDS in events.NAMES order, formats the integer ones, and every
    XADD of an event (Events:add, usual_consume's own) writes its text as ENTRY_FIELD."""
    from quota_gw import events

    assert tuple(named_list("EVENT_FIELDS")) == events.NAMES
    numbers = re.search(r"local EVENT_NUMBERS = \{(.*?)\}", code(LIB)).group(1)
    # The balance and the time (µs) come as text: fmt() of the number (Events:add), the balance's
    # text the answer reuses, TIME's own texts (time_text).
    assert set(re.findall(r"(\w+) = true", numbers)) == {f.name for f in events.FIELDS if f.type == "int"} - {"bal"}
    assert [f.name for f in events.FIELDS if f.type == "us"] == ["ts"]
    assert re.search(r"local ENTRY_FIELD = '(\w+)'", code(LIB)).group(1) == events.ENTRY_FIELD
    xadds = re.findall(r"call\('XADD', ([\w.]+), '\*', ([^,]+), (\w+)\(", code(LIB))
    # Events:add's, and the usual consume's, reserve's, commit's and release's own
    assert [(field, packer) for _, field, packer in xadds] == [("ENTRY_FIELD", "pack_event")] * 5


async def test_the_functions_vm_collects_at_stepmul_100_and_an_eval_scripts_vm_is_left_alone(redis, config, prefix):
    """The library's first call (init(true), scripts.library) sets the garbage collector of the
    Functions VM, which every library on the server shares; the library run as an EVAL script
    (init(), scripts.source) leaves the scripts' VM at Lua's default. Lua's setstepmul answers the
    value it replaces."""
    probe = ("#!lua name=qgwt_gc_probe\nredis.register_function('qgwt_gc_probe', "
             "function(_, argv) return collectgarbage('setstepmul', tonumber(argv[1])) end)")
    await redis.function_load(probe, replace=True)
    try:
        await redis.fcall("qgwt_gc_probe", 0, 200)  # Lua's default, whatever a library set before
        await scripts.load(redis)  # loaded again: its first call runs init(true)
        d = decisions.Decider(redis, config, layout.Layout(prefix, config.shards))
        await d.balances("gc-probe-org", config.plans["pro"])
        assert await redis.fcall("qgwt_gc_probe", 0, 100) == 100
    finally:
        await redis.function_delete("qgwt_gc_probe")
    as_script = (lua_dir() / "_lib.lua").read_text() + "\ninit()\nreturn collectgarbage('setstepmul', 200)"
    assert await redis.eval(as_script, 0) == 200
    await d.aclose()


async def test_the_time_as_text_is_the_number_of_microseconds(redis) -> None:
    """time_text joins TIME's seconds and µs (not zero-padded by Redis) into the digits fmt()
    writes for the number: the events' `ts` from the straight paths and from the gate agree."""
    probe = LIB + """
init()
local out = {}
for _, us in ipairs({'0', '5', '42', '999', '1000', '65536', '999999'}) do
  local x = {ARGV[1], us}
  out[#out + 1] = time_text(x) == fmt(tonumber(ARGV[1]) * 1000000 + tonumber(us)) and 1 or 0
  out[#out + 1] = time_text(x)
end
return out
"""
    got = await redis.eval(probe, 0, "1796070308")
    assert got[0::2] == [1] * 7
    assert got[1::2] == ["1796070308000000", "1796070308000005", "1796070308000042", "1796070308000999",
                         "1796070308001000", "1796070308065536", "1796070308999999"]


async def test_numbers_go_to_redis_as_text_only_where_the_server_formats_them_slowly(redis, prefix) -> None:
    """big_arg: Redis 7.2+ and Valkey write a Lua number argument as its digits (ll2string), so it
    is sent as it is; Redis 7.0/7.1 through snprintf('%.17g'), so fmt_large makes the text. Either
    way the hash holds the same digits."""
    probe = LIB + """
init()
redis.call('HSET', KEYS[1], 'a', SMALL_NUMBERS[123456789012] or big_arg(123456789012), 'b', big_arg(4503599627370495))
return {big_arg == as_is and 'as_is' or 'text', redis.REDIS_VERSION_NUM}
"""
    key = f"{prefix}:big-arg-probe"
    try:
        chosen, version = await redis.eval(probe, 1, key)
        assert chosen == ("as_is" if version >= 0x070200 else "text")
        assert await redis.hmget(key, "a", "b") == ["123456789012", "4503599627370495"]
    finally:
        await redis.delete(key)
