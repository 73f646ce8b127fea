"""Decisions: each operation is one Lua script call, so one Redis round trip.

Python only prices the call, names the keys and translates the script's reply; every read
and write of a balance happens inside the script, atomically, on the Redis server clock.
Every decision is counted here (metrics.observe), whichever route asked for it: API or proxy.
"""

from __future__ import annotations

import hashlib
import time
import uuid
from dataclasses import dataclass
from typing import Any

import orjson
from redis.asyncio import Redis

from . import metrics
from .cluster import Lanes, RedisCluster
from .coalesce import Coalescer
from .config import Config, Plan
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


@dataclass(slots=True)
class Decision:
    status: int
    code: str
    detail: str
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

    @classmethod
    def from_reply(cls, r: list[Any]) -> Decision:
        return cls(int(r[0]), r[1], r[2], int(r[3]), int(r[4]), r[5], int(r[6]), int(r[7]), int(r[8]),
                   int(r[9]), bool(int(r[10])), r[11], orjson.loads(r[12]) if r[12] else {})

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
        return h

    def problem(self) -> Problem:
        return Problem(self.status, self.code, self.detail, headers=self.headers(), cost=self.cost,
                       remaining=self.remaining)


def new_id() -> str:
    return uuid.uuid4().hex


def fingerprint(*parts: Any, metadata: bytes | None = None) -> str:
    """What an idempotency key (or a reservation or event id, for commit and refund) stands
    for: every field of the request, metadata included, so a key reused with a different body
    is refused (422; 409 for a commit or refund: the reservation or event is settled already)
    instead of answering for a request that was not made. Metadata arrives
    with sorted keys (api.Context.metadata), so a retry that reorders them is the same request."""
    fp = "|".join(str(p) for p in parts)
    if metadata:
        fp += "|m:" + hashlib.sha256(metadata).hexdigest()[:24]
    return fp


class Decider:
    def __init__(self, redis: Redis, config: Config, layout: Layout) -> None:
        self.redis = redis
        self.config = config
        self.layout = layout
        self.scripts = Scripts(redis)
        # a cluster: one coalescer per primary, each call sent to its org's slot owner
        wait_ms = config.behaviour.replica_wait_ms
        self._coalescer = Lanes(redis, wait_ms) if isinstance(redis, RedisCluster) else Coalescer(redis, wait_ms)
        self._run = self._coalescer.run if config.behaviour.coalesce else self._coalescer.run_now
        b = config.behaviour
        self._ttl = (str(b.idempotency_ttl_s), str(b.refund_window_s))
        self._terms: dict[tuple[str, str], tuple[str, tuple[Any, ...]]] = {}
        self._alerts = ",".join(str(t) for t in sorted(config.alerts.thresholds, reverse=True))

    async def aclose(self) -> None:
        """Closes the decision connection (the client's pool is the owner's to close)."""
        await self._coalescer.aclose()

    def plan(self, ident: Identity) -> Plan:
        p = self.config.plans.get(ident.plan)
        if p is None:
            raise Problem(503, "unavailable", f"org {ident.org_id} is on plan {ident.plan!r}, which the config does not define")
        return p

    def _priced(self, ident: Identity, feature: str) -> tuple[str, tuple[Any, ...]]:
        """The plan's terms for a feature's meter (ARGV 8..18), computed once per (plan, feature)."""
        hit = self._terms.get((ident.plan, feature))
        if hit is None:
            meter = self.config.features[feature].meter
            plan = self.plan(ident)
            rl = plan.rate_limits
            terms: list[Any] = [plan.allocation(meter), plan.period, int(plan.rollover)]
            for lim in (rl.user, rl.key, rl.org):
                terms += (lim.interval_us, lim.burst_or_limit) if lim else (0, 0)
            terms += [int(self.config.behaviour.auto_register_users), self._ttl[0]]
            hit = self._terms[(ident.plan, feature)] = (meter, tuple(terms))
        return hit

    def _gate_call(self, ident: Identity, feature: str, cost: int, user: str, idem: str | None,
                   fingerprint: str, metadata: bytes | None, shadow: bool, extra: str = "", unit: int | None = None,
                   event_id: str | None = None) -> tuple[list[str], list[Any]]:
        """KEYS and ARGV of the gate (see lua/_lib.lua gate())."""
        L, org = self.layout, ident.org_id
        meter, priced = self._priced(ident, feature)
        event_id = event_id or new_id()
        keys = [
            L.balances(org), L.quotas(org), L.users(org),
            L.rate(org, "u", user), L.rate(org, "k", ident.key_id), L.rate(org, "o", "-"),
            L.idem(org, "d", idem) if idem else L.idem(org, "d", "-"),
            L.stream(org), L.event_record(org, event_id), L.reservations(org), L.expiries(org),
        ]
        args: list[Any] = [event_id, org, user, ident.key_id, feature, meter, cost, *priced,
                           fingerprint if idem else "", metadata.decode() if metadata else "", int(shadow),
                           self._ttl[1], extra, "" if unit is None else unit, 0, self._alerts]
        return keys, args

    def cost(self, feature: str, units: int) -> int:
        return self.config.features[feature].cost * units

    def _observed(self, op: str, ident: Identity, feature: str, d: Decision, t0: float) -> Decision:
        meter, priced = self._priced(ident, feature)
        metrics.observe(op, feature, meter, int(priced[0]), d, t0)
        return d

    async def consume(self, ident: Identity, feature: str, units: int, user: str, idem: str | None = None,
                      metadata: bytes | None = None, shadow: bool = False, rate_limit: bool = True) -> Decision:
        """`rate_limit=False`: for a call that already happened (the fail-open spool's replay)."""
        t0 = time.perf_counter()
        keys, args = self._gate_call(ident, feature, self.cost(feature, units), user, idem,
                                     fingerprint("consume", feature, units, user, metadata=metadata), metadata, shadow)
        if not rate_limit:
            args[10:16] = (0, 0, 0, 0, 0, 0)  # ARGV 11..16: no user, key or org rate limit
        d = Decision.from_reply(await self._run(self.scripts.consume, keys, args))
        return self._observed("consume", ident, feature, d, t0)

    async def check(self, ident: Identity, feature: str, units: int, user: str) -> Decision:
        t0 = time.perf_counter()
        keys, args = self._gate_call(ident, feature, self.cost(feature, units), user, None, "", None, False)
        d = Decision.from_reply(await self._run(self.scripts.check, keys, args))
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
                                     fingerprint("reserve", feature, units, user, ttl_s, cost if cost is not None else ""),
                                     None, shadow, extra=str(ttl_s), unit=unit if cost is None else 1)
        args[24] = min_cost  # ARGV 25
        d = Decision.from_reply(await self._run(self.scripts.reserve, keys, args))
        return self._observed("reserve", ident, feature, d, t0)

    def _settle_call(self, ident: Identity, rid: str, units: int, metadata: bytes | None,
                     op: str = "commit") -> tuple[list[str], list[Any]]:
        """KEYS and ARGV of settle_start (lua/_lib.lua); ARGV 9 is the request's fingerprint."""
        L, org = self.layout, ident.org_id
        event_id = new_id()
        keys = [L.balances(org), L.quotas(org), L.reservations(org), L.expiries(org), L.stream(org),
                L.settled(org, rid), L.event_record(org, event_id)]
        args = [rid, event_id, org, ident.key_id, units, self._ttl[0], self._ttl[1],
                metadata.decode() if metadata else "", fingerprint(op, units, metadata=metadata)]
        return keys, args

    async def commit(self, ident: Identity, rid: str, units: int, metadata: bytes | None = None,
                     beyond_hold: bool = False) -> Decision:
        """Charges `units` of the hold. `beyond_hold` (the sidecar: the upstream already did the
        work) charges more than the hold as far as the balance goes; the rest is `overage`."""
        t0 = time.perf_counter()
        keys, args = self._settle_call(ident, rid, units, metadata)
        args.append("1" if beyond_hold else "")
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
        t0 = time.perf_counter()
        L, org = self.layout, ident.org_id
        keys = [L.balances(org), L.quotas(org), L.event_record(org, event_id), L.stream(org),
                L.reservations(org), L.expiries(org)]
        args = [event_id, new_id(), org, ident.key_id, metadata.decode() if metadata else "",
                fingerprint("refund", metadata=metadata)]
        d = Decision.from_reply(await self._run(self.scripts.refund, keys, args))
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
        L = self.layout
        meta = orjson.dumps(metadata or {}, option=orjson.OPT_SORT_KEYS)
        keys = [L.balances(org), L.idem(org, "g", idem or "-"), L.stream(org), L.reservations(org),
                L.expiries(org)]
        if also_idem:
            keys.append(L.idem(org, "g", also_idem))
        ttl = str(idem_ttl_s) if idem_ttl_s else self._ttl[0]
        args = [event_id or new_id(), org, meter, amount, kind, meta.decode(), ttl,
                fingerprint(kind, meter, amount, user, lot, expires, metadata=meta) if idem else "", actor, user,
                lot, expires, "take_lot" if take_lot else ""]
        return Decision.from_reply(await self._run(self.scripts.grant, keys, args))

    async def balances(self, org: str, plan: Plan) -> dict[str, dict[str, int]]:
        """Every meter as the next decision would see it (read only)."""
        args: list[Any] = []
        meters = self.config.meter_names
        for m in meters:
            args += [m, plan.allocation(m), plan.period, int(plan.rollover)]
        L = self.layout
        rows = await self._run(self.scripts.balance, [L.balances(org), L.reservations(org), L.expiries(org)], args)
        out = {}
        for m, (a, p, h, u, pe, lim, pt, ps, nx, nn) in zip(meters, rows):
            out[m] = {"allocated": int(a), "purchased": int(p), "held": int(h), "used": int(u),
                      "period_end": int(pe), "limit": int(lim), "purchased_total": int(pt),
                      "purchased_at_start": int(ps), "next_expiry": int(nx), "next_expiry_amount": int(nn)}
        return out
