"""Decisions: each operation is one Lua script call, so one Redis round trip.

Python only prices the call, names the keys and translates the script's reply; every read
and write of a balance happens inside the script, atomically, on the Redis server clock. A
refund first reads the charged event (charges.py) and hands its facts to the script.
Every decision is counted here (metrics.observe), whichever route asked for it: API or proxy.
"""

from __future__ import annotations

import dataclasses
import hashlib
import operator
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import orjson
from redis.asyncio import Redis

from . import charges, entitlements, events, metrics
from .cluster import Lanes, RedisCluster
from .coalesce import Coalescer
from .config import Config, Plan
from .db import Database
from .layout import Layout
from .problems import Problem
from .scripts import Scripts


@dataclass(frozen=True, slots=True)
class Identity:
    """Who is calling: resolved from an API key (see auth.py)."""

    key_id: str
    org_id: str
    user_id: str | None
    scopes: frozenset[str]
    plan: str
    entitlements: str = ""  # the org's override of the plan's layers, canonical text (entitlements.py)


@dataclass(slots=True)
class Decision:
    """A script's answer. On the wire it is one text, these fields in this order joined by tabs
    (lua/_lib.lua REPLY, reply()): Redis replies with one string for a fraction of what an
    array of 14 costs it. `detail`, free text, is last: a tab in it stays in it."""

    status: int
    code: str
    cost: int
    remaining: int
    event_id: str
    retry_after_ms: int
    rl_limit: int
    rl_remaining: int
    rl_reset: int
    replay: bool
    would: str
    extra: dict[str, Any]
    sources: str  # the layers that paid: 'allocated:2,grant:<lot>:2,purchased:1' (lua Meter:waterfall)
    detail: str

    @classmethod
    def from_reply(cls, reply: str | bytes) -> Decision:
        r = (reply if isinstance(reply, str) else reply.decode()).split("\t", 13)
        return cls(int(r[0]), r[1], int(r[2]), int(r[3]), r[4], int(r[5]), int(r[6]), int(r[7]), int(r[8]),
                   r[9] == "1", r[10], orjson.loads(r[11]) if r[11] else {}, r[12], r[13])

    @property
    def ok(self) -> bool:
        return self.status < 300

    def headers(self) -> dict[str, str]:
        h: dict[str, str] = {}
        if self.remaining >= 0:
            h["X-Quota-Remaining"] = str(self.remaining)
        if self.rl_limit >= 0:
            h["RateLimit-Limit"] = str(self.rl_limit)
            h["RateLimit-Remaining"] = str(max(self.rl_remaining, 0))
            h["RateLimit-Reset"] = str(self.rl_reset)
        if self.status == 429:
            h["Retry-After"] = str(max(1, -(-self.retry_after_ms // 1000)))
        if self.would:
            h["X-Quota-Shadow"] = self.would
        if self.replay:
            h["Idempotent-Replayed"] = "true"
        if self.sources:
            h["X-Quota-Source"] = _SOURCE_LAYERS.get(self.sources) or source_layers(self.sources)
        return h

    def raw_headers(self) -> list[tuple[bytes, bytes]]:
        """headers() as an ASGI answer carries them (names in lower case, bytes), made directly:
        the proxy's answer, where the dict and its conversion were a tenth of the call's
        header work. tests/test_proxy.py holds the two together."""
        h = []
        if self.remaining >= 0:
            h.append((b"x-quota-remaining", b"%d" % self.remaining))
        if self.rl_limit >= 0:
            h.append((b"ratelimit-limit", b"%d" % self.rl_limit))
            h.append((b"ratelimit-remaining", b"%d" % max(self.rl_remaining, 0)))
            h.append((b"ratelimit-reset", b"%d" % self.rl_reset))
        if self.status == 429:
            h.append((b"retry-after", b"%d" % max(1, -(-self.retry_after_ms // 1000))))
        if self.would:
            h.append((b"x-quota-shadow", self.would.encode()))
        if self.replay:
            h.append((b"idempotent-replayed", b"true"))
        if self.sources:
            h.append((b"x-quota-source", (_SOURCE_LAYERS.get(self.sources) or source_layers(self.sources)).encode()))
        return h

    def problem(self) -> Problem:
        return Problem(self.status, self.code, self.detail, headers=self.headers(), cost=self.cost,
                       remaining=self.remaining)


def source_layers(sources: str) -> str:
    """X-Quota-Source: the layers that paid, without their amounts ('allocated:2,purchased:1' ->
    'allocated,purchased'); remembered, as most calls of a route are paid the same way."""
    layers = ",".join(p.rsplit(":", 1)[0] for p in sources.split(","))
    if len(_SOURCE_LAYERS) >= 4096:  # lot ids and amounts vary: bounded
        _SOURCE_LAYERS.clear()
    _SOURCE_LAYERS[sources] = layers
    return layers


_SOURCE_LAYERS: dict[str, str] = {}


# --- The scripts' arguments -------------------------------------------------------------------
# One typed object per script interface; its fields are the script's ARGV, in order: the Lua
# binds the same names (lua/_lib.lua *_ARGV, or the list at the top of the script), and
# tests/test_lua_interface.py checks the two agree. A positional list built by hand once sent
# a fingerprint where a flag was read (settle ARGV 9 vs commit ARGV 10).


@dataclass(slots=True)
class GateTerms:
    """What a plan says for one feature (lua/_lib.lua GATE_TERMS): the same for every call of a
    (plan, the org's entitlements, feature), so it travels as one argument (GateArgs.terms,
    the fields joined by tabs) that the library parses once and keeps (lua plan_terms): a
    decision carries 13 arguments instead of 31. Rate limits: GCRA interval (µs) and burst of
    the user, key and org limit; interval 0 = none."""

    feature: str
    meter: str
    allocation: int  # -1 unlimited
    period: str
    rollover: int
    rl_user_interval_us: int
    rl_user_burst: int
    rl_key_interval_us: int
    rl_key_burst: int
    rl_org_interval_us: int
    rl_org_burst: int
    auto_register: int
    idem_ttl_s: str
    alert_thresholds: str = ""  # '25,10,0' (lua Meter:alerts)
    # The waterfall (config Plan.overflow*): a rate window's overflow multiple (0: refuse past it),
    # the allocation's (0: no credit past it), the credit layers' order ('gp' grants first, 'pg').
    rl_user_overflow: int = 0
    rl_key_overflow: int = 0
    rl_org_overflow: int = 0
    alloc_overflow: int = 1
    credit_order: str = "gp"


def terms_text(terms: GateTerms) -> str:
    """GateArgs.terms: the fields in order, joined by tabs (no field holds a tab: names match
    NAME_RE, the rest are numbers and short codes)."""
    return "\t".join(str(v) for v in argv(terms))


@dataclass(slots=True)
class GateArgs:
    """check, consume, reserve (lua/_lib.lua GATE_ARGV): the call, then its plan's terms."""

    event_id: str
    org: str
    user: str
    key_id: str
    cost: int
    terms: str  # terms_text(GateTerms)
    # A call's ARGV ends at its last field not at its default (Decider._gate_call): the usual
    # ones are first, the rare ones last.
    metadata: str = ""
    reservation_ttl_s: str = ""  # reserve
    unit_cost: int | str = ""  # reserve: what one unit commits at
    min_cost: int = 0  # reserve: hold less than asked, down to this, when that is all there is
    fingerprint: str = ""  # '' = no idempotency key
    shadow: int = 0
    explain: int = 0  # check: answer the waterfall as evaluated (Decision.extra)


@dataclass(slots=True)
class SettleArgs:
    """commit, release (lua/_lib.lua SETTLE_ARGV)."""

    reservation_id: str
    event_id: str
    org: str
    key_id: str
    units: int
    answer_ttl_s: str
    metadata: str
    fingerprint: str  # a retry with a different body is 409, not the first answer
    beyond_hold: str = ""  # commit: '1' charges usage beyond the hold (the sidecar)
    # commit: the low-balance thresholds, '25,10,0' (as GateTerms.alert_thresholds; lua Meter:alerts):
    # a commit judges the crossing, as a consume does. '' none (release).
    alert_thresholds: str = ""


@dataclass(slots=True)
class RefundArgs:
    """refund (lua/refund.lua): the request, then the charge's facts (charges.find)."""

    refunded_event_id: str
    event_id: str
    org: str
    key_id: str
    metadata: str
    fingerprint: str
    meter: str
    allocated: int  # the charge's allocated part
    purchased: int  # and purchased part
    cost: int
    user: str
    feature: str
    charged_at_us: int
    period: str  # the plan's period spec (the charge's period end is derived from it)
    refund_window_s: int
    sources: str = ""  # the charge's split; each layer gets its share back


@dataclass(slots=True)
class GrantArgs:
    """grant / purchase / adjust / revoke (lua/grant.lua)."""

    event_id: str
    org: str
    meter: str
    amount: int
    kind: str
    metadata: str
    idem_ttl_s: str
    fingerprint: str
    actor_key_id: str
    user: str
    lot_id: str
    lot_expiry: str
    take_lot: str


@dataclass(slots=True)
class BalanceArgs:
    """balance (lua/_lib.lua BALANCE_ARGV): one group per meter."""

    meter: str
    allocation: int
    period: str
    rollover: int


# Which object each script reads (lua/<name>.lua).
SCRIPT_ARGS: dict[str, type] = {"check": GateArgs, "consume": GateArgs, "reserve": GateArgs, "commit": SettleArgs,
                                "release": SettleArgs, "refund": RefundArgs, "grant": GrantArgs,
                                "balance": BalanceArgs}
_GETTERS = {cls: operator.attrgetter(*[f.name for f in dataclasses.fields(cls)])
            for cls in {*SCRIPT_ARGS.values(), GateTerms}}


def argv(args: Any) -> list[Any]:
    """A script's ARGV: the object's fields, in order."""
    return list(_GETTERS[type(args)](args))


# The gate's ARGV position of each GateArgs field. A decision's ARGV is a copy of its plan's
# template (argv of a GateArgs with the per-call fields blank, made once per plan and feature)
# with the per-call fields set by these positions: the same list as argv(GateArgs(...)) gives
# (tests/test_lua_interface.py), at a tenth of the cost on the hot path.
GATE = {f.name: i for i, f in enumerate(dataclasses.fields(GateArgs))}
_G_EVENT, _G_ORG, _G_USER, _G_KEY, _G_COST, _G_FP, _G_META, _G_SHADOW, _G_TERMS = (
    GATE[n] for n in ("event_id", "org", "user", "key_id", "cost", "fingerprint", "metadata", "shadow", "terms"))
_GATE_DEFAULTS = [f.default for f in dataclasses.fields(GateArgs)]  # MISSING: a field always sent
assert _G_META == _G_TERMS + 1  # a consume's ARGV: `terms`, then its metadata (Decider._gate_call)
# The gate's KEYS (lua/_lib.lua GATE_KEYS): the five every call sends, then the key's and the
# org's rate window and the idempotency key, each sent only with what follows it or when read.
# (The org's users are fields of its balance hash: layout.py.)
_K_RL_KEY, _K_RL_ORG, _K_IDEM = 5, 6, 7


def sent_argv(args: list[Any]) -> list[Any]:
    """The gate's ARGV without the fields at the end that hold their default (lua reads one left
    off as nil, its default): each argument costs Redis ~900 instructions to receive."""
    n = len(args)
    while args[n - 1] == _GATE_DEFAULTS[n - 1]:  # (stops at `terms`: no default)
        n -= 1
    del args[n:]
    return args


def new_id() -> str:
    """A random (version 4) UUID as 32 hex digits, as uuid.uuid4().hex writes it, without
    building a UUID object; drawn from a batch (_new_ids): an os.urandom call per id was a
    system call on every decision, and most of the id's cost."""
    drawn = next(_ids, None)
    if drawn is None:
        _new_ids()
        drawn = next(_ids)
    return drawn


_ID_BATCH = 256  # ids per os.urandom call
_VERSION_4 = bytes((b & 0x0F) | 0x40 for b in range(256))  # an id's 7th byte: version 4
_RFC_4122 = bytes((b & 0x3F) | 0x80 for b in range(256))  # its 9th: the RFC 4122 variant
_ids: Iterator[str] = iter(())


def _new_ids() -> None:
    """The next batch of ids, from one os.urandom call. `next` on the batch's iterator is one
    step in C, so two threads never draw the same id; a forked child drops its parent's batch
    (os.register_at_fork below), so two processes never do."""
    global _ids
    raw = bytearray(os.urandom(16 * _ID_BATCH))
    raw[6::16] = raw[6::16].translate(_VERSION_4)
    raw[8::16] = raw[8::16].translate(_RFC_4122)
    text = raw.hex()
    _ids = iter([text[i:i + 32] for i in range(0, len(text), 32)])


def _forget_ids() -> None:
    global _ids
    _ids = iter(())


os.register_at_fork(after_in_child=_forget_ids)


def fingerprint(*parts: Any, metadata: bytes | None = None) -> str:
    """What an idempotency key (or a reservation or event id, for commit and refund) stands
    for: every field of the request, metadata included, so a key reused with a different body
    is refused (422; 409 for a commit or refund: the reservation or event is settled already)
    instead of answering for a request that was not made. Metadata arrives
    with sorted keys (api.Context.metadata), so a retry that reorders them is the same request."""
    fp = "|".join(map(str, parts))
    if metadata:
        fp += "|m:" + hashlib.sha256(metadata).hexdigest()[:24]
    return fp


class Decider:
    def __init__(self, redis: Redis, config: Config, layout: Layout, ledger: Database | None = None) -> None:
        self.redis = redis
        self.ledger = ledger  # where refunds find drained charges (None: the stream only)
        self.config = config
        self.layout = layout
        self.scripts = Scripts(redis)
        # a cluster: one coalescer per primary, each call sent to its org's slot owner
        wait_ms = config.behaviour.replica_wait_ms
        self._coalescer = Lanes(redis, wait_ms) if isinstance(redis, RedisCluster) else Coalescer(redis, wait_ms)
        self._run = self._coalescer.run if config.behaviour.coalesce else self._coalescer.run_now
        self._stream_reads = self._coalescer if isinstance(self._coalescer, Lanes) else redis  # charges.find
        b = config.behaviour
        self._ttl = (str(b.idempotency_ttl_s),)
        self._terms: dict[tuple[str, str, str], tuple[str, dict[str, Any], list[Any], str, int]] = {}
        self._keys: dict[tuple[str, str], list[str]] = {}  # (org, key id) -> the gate's KEYS (_gate_keys)
        self._settle_keys: dict[str, list[str]] = {}  # org -> SETTLE_KEYS less the last (_settle_call)
        self._alerts = ",".join(str(t) for t in sorted(config.alerts.thresholds, reverse=True))

    async def aclose(self) -> None:
        """Closes the decision connection (the client's pool is the owner's to close)."""
        await self._coalescer.aclose()

    def plan(self, ident: Identity) -> Plan:
        p = self.config.plans.get(ident.plan)
        if p is None:
            raise Problem(503, "unavailable", f"org {ident.org_id} is on plan {ident.plan!r}, which the config does not define")
        return p

    def _priced(self, ident: Identity, feature: str) -> tuple[str, dict[str, Any], list[Any], int]:
        """The plan's terms for a feature's meter (GateTerms fields), the gate's ARGV template and
        how many of the gate's KEYS a call without an idempotency key sends (the rate windows' keys
        only when the plan has them), computed once per (plan, the org's entitlements, feature):
        an org's override is its own template, found with the same one dict lookup. The template's
        `terms` argument is the terms as text, or (stored 4th) the same without rate limits (a
        replayed call)."""
        hit = self._terms.get((ident.plan, ident.entitlements, feature))
        if hit is None:
            meter = self.config.features[feature].meter
            plan = self.plan(ident)
            rl = plan.rate_limits
            terms: dict[str, Any] = {"feature": feature, "meter": meter, "allocation": plan.allocation(meter),
                                     "period": plan.period, "rollover": int(plan.rollover)}
            for name, lim in (("user", rl.user), ("key", rl.key), ("org", rl.org)):
                terms[f"rl_{name}_interval_us"], terms[f"rl_{name}_burst"] = \
                    (lim.interval_us, lim.burst_or_limit) if lim else (0, 0)
            terms.update(entitlements.gate_terms(plan, ident.entitlements))
            terms.update(auto_register=int(self.config.behaviour.auto_register_users), idem_ttl_s=self._ttl[0],
                         alert_thresholds=self._alerts)
            text = terms_text(GateTerms(**terms))
            unlimited = terms_text(GateTerms(**{**terms, **{f"rl_{who}_{what}": 0 for who in ("user", "key", "org")
                                                             for what in ("interval_us", "burst")}}))
            template = argv(GateArgs(event_id="", org="", user="", key_id="", cost=0, terms=text))
            n_keys = _K_RL_ORG + 1 if terms["rl_org_interval_us"] else \
                _K_RL_KEY + 1 if terms["rl_key_interval_us"] else _K_RL_KEY
            if len(self._terms) > 10_000:  # overrides are few; bound it anyway
                self._terms.clear()
            hit = self._terms[(ident.plan, ident.entitlements, feature)] = (meter, terms, template, unlimited, n_keys)
        return hit[0], hit[1], hit[2], hit[4]

    def _unlimited_terms(self, ident: Identity, feature: str) -> str:
        self._priced(ident, feature)
        return self._terms[(ident.plan, ident.entitlements, feature)][3]

    def _gate_call(self, ident: Identity, feature: str, cost: int, user: str, idem: str | None,
                   fingerprint: str, metadata: bytes | None, shadow: bool,
                   event_id: str | None = None, whole: bool = True) -> tuple[list[str], list[Any]]:
        """KEYS (lua/_lib.lua GATE_KEYS, in order, those the call reads) and ARGV (GateArgs), sent
        as sent_argv(args). `whole`: every field, for the caller (reserve, check) to set its own;
        not (a consume): up to `terms`, the rest only with a field of its own to send."""
        org = ident.org_id
        _, _, template, n_keys = self._priced(ident, feature)
        event_id = event_id or new_id()
        keys = self._gate_keys(org, ident.key_id)
        keys = [*keys, self.layout.idem(org, "d", idem)] if idem else keys[:n_keys]
        if whole or idem or shadow:
            args = template.copy()
            if metadata:
                args[_G_META] = metadata.decode()
            if idem:
                args[_G_FP] = fingerprint
            if shadow:
                args[_G_SHADOW] = 1
        else:
            args = template[:_G_TERMS + 1]
            if metadata:
                args.append(metadata.decode())  # (at _G_META: right after `terms`)
        args[_G_EVENT], args[_G_ORG], args[_G_USER], args[_G_KEY], args[_G_COST] = event_id, org, user, ident.key_id, cost
        return keys, args

    def _gate_keys(self, org: str, key_id: str) -> list[str]:
        """The gate's KEYS but the idempotency key, built once per (org, key): formatting the
        names took as long as packing the call. (The caller's to copy, not to change.)"""
        keys = self._keys.get((org, key_id))
        if keys is None:
            L = self.layout
            keys = [L.balances(org), L.quotas(org), L.stream(org), L.reservations(org), L.expiries(org),
                    L.rate(org, "k", key_id), L.rate(org, "o", "-")]
            if len(self._keys) > 100_000:  # keys in use are few; bound it anyway
                self._keys.clear()
            self._keys[(org, key_id)] = keys
        return keys

    def cost(self, feature: str, units: int) -> int:
        return self.config.features[feature].cost * units

    def _observed(self, op: str, ident: Identity, feature: str, d: Decision, t0: float) -> Decision:
        meter, priced, _, _ = self._priced(ident, feature)
        metrics.observe(op, feature, meter, int(priced["allocation"]), d, t0)
        return d

    async def consume(self, ident: Identity, feature: str, units: int, user: str, idem: str | None = None,
                      metadata: bytes | None = None, shadow: bool = False, rate_limit: bool = True) -> Decision:
        """`rate_limit=False`: for a call that already happened (the fail-open spool's replay)."""
        t0 = time.perf_counter()
        # (the fingerprint is sent only with an idempotency key: not made without one)
        keys, args = self._gate_call(ident, feature, self.cost(feature, units), user, idem,
                                     fingerprint("consume", feature, units, user, metadata=metadata) if idem else "",
                                     metadata, shadow, whole=False)
        if not rate_limit:  # no user, key or org rate limit
            args[_G_TERMS] = self._unlimited_terms(ident, feature)
        d = Decision.from_reply(await self._run(self.scripts.consume, keys, sent_argv(args)))
        return self._observed("consume", ident, feature, d, t0)

    async def check(self, ident: Identity, feature: str, units: int, user: str, explain: bool = False) -> Decision:
        """`explain`: the answer's `extra` is the waterfall as evaluated (layers, refused_by)."""
        t0 = time.perf_counter()
        keys, args = self._gate_call(ident, feature, self.cost(feature, units), user, None, "", None, False)
        if explain:
            args[GATE["explain"]] = 1
        d = Decision.from_reply(await self._run(self.scripts.check, keys, sent_argv(args)))
        return self._observed("check", ident, feature, d, t0)

    async def reserve(self, ident: Identity, feature: str, units: int, user: str, ttl_s: int,
                      idem: str | None = None, shadow: bool = False, cost: int | None = None,
                      min_cost: int = 0) -> Decision:
        """Holds `units` x the feature's cost, or an explicit `cost` (LLM estimates; committed per
        token). With `min_cost`, holds less than asked, down to `min_cost`, when that is all there is."""
        t0 = time.perf_counter()
        unit = self.config.features[feature].cost
        held = self.cost(feature, units) if cost is None else cost
        keys, args = self._gate_call(ident, feature, held, user, idem,
                                     fingerprint("reserve", feature, units, user, ttl_s, cost if cost is not None else "")
                                     if idem else "", None, shadow)
        args[GATE["reservation_ttl_s"]] = str(ttl_s)
        args[GATE["unit_cost"]] = unit if cost is None else 1
        args[GATE["min_cost"]] = min_cost
        d = Decision.from_reply(await self._run(self.scripts.reserve, keys, sent_argv(args)))
        return self._observed("reserve", ident, feature, d, t0)

    def _settle_call(self, ident: Identity, rid: str, units: int, metadata: bytes | None,
                     op: str = "commit", beyond_hold: bool = False) -> tuple[list[str], list[Any]]:
        """KEYS (lua/_lib.lua SETTLE_KEYS, in order) and ARGV of commit and release."""
        org = ident.org_id
        event_id = new_id()
        keys = self._settle_keys.get(org)
        if keys is None:  # the org's five, formatted once (as _gate_keys)
            L = self.layout
            keys = [L.balances(org), L.quotas(org), L.reservations(org), L.expiries(org), L.stream(org)]
            if len(self._settle_keys) > 100_000:  # orgs in use are few; bound it anyway
                self._settle_keys.clear()
            self._settle_keys[org] = keys
        keys = [*keys, self.layout.settled(org, rid)]
        args = SettleArgs(reservation_id=rid, event_id=event_id, org=org, key_id=ident.key_id, units=units,
                          answer_ttl_s=self._ttl[0], metadata=metadata.decode() if metadata else "",
                          fingerprint=fingerprint(op, units, metadata=metadata), beyond_hold="1" if beyond_hold else "",
                          alert_thresholds=self._alerts if op == "commit" else "")
        return keys, argv(args)

    async def commit(self, ident: Identity, rid: str, units: int, metadata: bytes | None = None,
                     beyond_hold: bool = False) -> Decision:
        """Charges `units` of the hold. `beyond_hold` (the sidecar: the upstream already did the
        work) charges more than the hold as far as the balance goes; the rest is `overage`."""
        t0 = time.perf_counter()
        keys, args = self._settle_call(ident, rid, units, metadata, beyond_hold=beyond_hold)
        d = Decision.from_reply(await self._run(self.scripts.commit, keys, args))
        feature = d.extra.get("feature") or ""  # the reservation's, from the script
        meter = d.extra.get("meter") or ""
        plan = self.config.plans.get(ident.plan)
        metrics.observe("commit", feature, meter, plan.allocation(meter) if plan and meter else -1, d, t0)
        return d

    async def release(self, ident: Identity, rid: str) -> Decision:
        t0 = time.perf_counter()
        keys, args = self._settle_call(ident, rid, 0, None, "release")
        d = Decision.from_reply(await self._run(self.scripts.release, keys, args))
        metrics.observe("release", "", "", -1, d, t0)
        return d

    async def refund(self, ident: Identity, event_id: str, metadata: bytes | None = None) -> Decision:
        """Once per event inside the refund window. The charge's facts come from its event
        (charges.find: ledger or stream, 503 while the ledger is down and the event drained);
        refund.lua checks the guard and applies them in one script."""
        t0 = time.perf_counter()
        L, org = self.layout, ident.org_id
        window = self.config.behaviour.refund_window_s
        c = await charges.find(self._stream_reads, self.ledger, L, org, event_id, window)
        if c is None or not c.refundable_by(org):
            d = Decision(404, "not_found", 0, -1, "", 0, -1, -1, 0, False, "", {}, "", f"no refundable event {event_id}")
        else:
            keys = [L.balances(org), L.quotas(org), L.refund_guard(org, event_id), L.stream(org),
                    L.reservations(org), L.expiries(org), L.event_record(org, event_id)]
            args = RefundArgs(refunded_event_id=event_id, event_id=new_id(), org=org, key_id=ident.key_id,
                              metadata=metadata.decode() if metadata else "",
                              fingerprint=fingerprint("refund", metadata=metadata), meter=c.meter,
                              allocated=c.allocated, purchased=c.purchased, cost=c.cost, user=c.user,
                              feature=c.feature, charged_at_us=c.ts_us, period=self.plan(ident).period,
                              refund_window_s=window, sources=c.sources)
            d = Decision.from_reply(await self._run(self.scripts.refund, keys, argv(args)))
        metrics.observe("refund", "", "", -1, d, t0)
        return d

    async def grant(self, org: str, meter: str, amount: int, kind: str = "grant", metadata: dict[str, Any] | None = None,
                    idem: str | None = None, actor: str = "admin", user: str = "",
                    event_id: str | None = None, also_idem: str | None = None,
                    idem_ttl_s: int | None = None, lot: str = "", expires: str = "",
                    take_lot: bool = False) -> Decision:
        """Adds (or, for `adjust`, removes) purchased credit; once per idempotency key (and once
        per `also_idem`, a second key: a purchase is once per Stripe event and once per session).
        `lot` names the credit (a purchase id) and `expires` ends it (unix s, or '+<s>' from now);
        `take_lot` takes back what is left of lot `lot` (`amount`: what it gave)."""
        if kind not in events.CREDIT_KINDS:  # the ledger's kinds are events.KINDS: grant.lua writes this one
            raise ValueError(f"grant kind {kind!r} is not one of events.CREDIT_KINDS")
        L = self.layout
        meta = orjson.dumps(metadata or {}, option=orjson.OPT_SORT_KEYS)
        keys = [L.balances(org), L.idem(org, "g", idem or "-"), L.stream(org), L.reservations(org),
                L.expiries(org)]
        if also_idem:
            keys.append(L.idem(org, "g", also_idem))
        ttl = str(idem_ttl_s) if idem_ttl_s else self._ttl[0]
        args = GrantArgs(event_id=event_id or new_id(), org=org, meter=meter, amount=amount, kind=kind,
                         metadata=meta.decode(), idem_ttl_s=ttl,
                         fingerprint=fingerprint(kind, meter, amount, user, lot, expires, metadata=meta) if idem else "",
                         actor_key_id=actor, user=user, lot_id=lot, lot_expiry=expires,
                         take_lot="take_lot" if take_lot else "")
        return Decision.from_reply(await self._run(self.scripts.grant, keys, argv(args)))

    async def balances(self, org: str, plan: Plan) -> dict[str, dict[str, int]]:
        """Every meter as the next decision would see it (read only)."""
        args: list[Any] = []
        meters = self.config.meter_names
        for m in meters:
            args += argv(BalanceArgs(meter=m, allocation=plan.allocation(m), period=plan.period,
                                     rollover=int(plan.rollover)))
        L = self.layout
        rows = await self._run(self.scripts.balance, [L.balances(org), L.reservations(org), L.expiries(org)], args)
        out = {}
        for m, (a, p, h, u, pe, lim, pt, ps, nx, nn) in zip(meters, rows):
            out[m] = {"allocated": int(a), "purchased": int(p), "held": int(h), "used": int(u),
                      "period_end": int(pe), "limit": int(lim), "purchased_total": int(pt),
                      "purchased_at_start": int(ps), "next_expiry": int(nx), "next_expiry_amount": int(nn)}
        return out
