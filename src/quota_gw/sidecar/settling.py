"""How a proxied call settles: exactly once, by how it ended.

| ended by                        | fixed route           | LLM route (a hold)             |
|---------------------------------|-----------------------|--------------------------------|
| upstream answered               | charged at admission  | commit the reported usage (*)  |
| status in `refund_statuses`     | refund                | release                        |
| connect error, timeout, a cut   | refund                | release                        |
| the client went away            | stays charged         | commit what was produced       |

(*) All of it, beyond the hold too, as far as the balance and the user's and team's quotas
go (never below zero, other holds stay covered); what could not be charged is the commit
event's `overage` (its metadata) and `quota_gw_overage_tokens_total`. Where the usage is in
an answer is the route's Metering's business (metering.py); without usage, the produced
text is estimated. With Redis down (fail open) the usage goes to the spool instead.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Coroutine
from typing import TYPE_CHECKING, Any

import orjson
from prometheus_client import Counter

from .. import metering, metrics
from ..config import Route as RouteConfig
from ..decisions import Decision, Identity
from ..problems import Problem
from ..redis_errors import REDIS_DOWN
from ..spool import consume_unlimited, entry

if TYPE_CHECKING:
    from .core import Sidecar

log = logging.getLogger("quota_gw.proxy")

MAX_JSON_RESPONSE = 8 * 1024 * 1024  # a JSON answer larger than this is forwarded and charged the whole hold

OVERAGE = Counter("quota_gw_overage_tokens_total", "Usage the upstream reported that the balance could not cover"
                  " (the commit event's metadata says `overage`)", ["route"], registry=metrics.REGISTRY)
PROXIED = Counter("quota_gw_proxied_total", "Proxied calls by route and how they settled",
                  ["route", "outcome"], registry=metrics.REGISTRY)
SPOOLED = Counter("quota_gw_spooled_total", "Calls whose usage went to the fail-open spool", ["op"],
                  registry=metrics.REGISTRY)

_PROXIED: dict[tuple[str, str], Any] = {}


def proxied(route: str, outcome: str) -> Any:
    """PROXIED's child for (route, outcome), looked up once (labels() costs a lock and a
    tuple of str() per call)."""
    child = _PROXIED.get((route, outcome))
    if child is None:
        child = _PROXIED[(route, outcome)] = PROXIED.labels(route, outcome)
    return child


class Charge:
    """One proxied call's settlement; every path through `forward` ends in exactly one of
    succeeded / failed / abandoned. This base class charges nothing (metering: none).

    `rewrites`: the body may change, or the call settles after the last upstream byte; either
    way Content-Length is dropped (chunked), so the client sees the end only once settled."""

    rewrites = False

    def __init__(self, sidecar: Sidecar, route: RouteConfig, ident: Identity, user: str) -> None:
        self.sidecar, self.route, self.ident, self.user = sidecar, route, ident, user
        self.decision: Decision | None = None
        self.redis_down = False
        self.settled = False
        self.status = 0
        self.outcome = ""

    def decided(self, d: Decision) -> None:
        self.decision = d

    def headers(self) -> dict[str, str]:
        h = self.decision.headers() if self.decision is not None else {}
        if self.redis_down:
            h["X-Quota-Degraded"] = "fail-open"
        return h

    def raw_headers(self) -> list[tuple[bytes, bytes]]:
        """headers() as the answer carries them (lower-case names, bytes)."""
        h = self.decision.raw_headers() if self.decision is not None else []
        if self.redis_down:
            h.append((b"x-quota-degraded", b"fail-open"))
        return h

    def start(self, sse: bool) -> None:
        pass

    def feed(self, chunk: bytes) -> bytes:
        return chunk

    def flush(self) -> bytes:
        return b""

    async def _settle(self, outcome: str, fn: Callable[[], Awaitable[None]]) -> None:
        if self.settled:
            return
        self.settled = True
        self.outcome = outcome
        metrics.count(proxied(self.route.prefix, outcome))  # tallied: written with the turn's decisions
        try:
            await fn()
        except Exception:
            log.exception("settling a %s call on %s failed", outcome, self.route.prefix)

    async def succeeded(self) -> None:
        await self._settle("ok", self._nothing)

    async def failed(self, reason: str) -> None:
        await self._settle("upstream_failed", self._nothing)

    async def abandoned(self) -> None:
        await self._settle("client_gone", self._nothing)

    async def _nothing(self) -> None:
        return None

    async def spool(self, op: str, **fields: Any) -> None:
        SPOOLED.labels(op).inc()
        await self.sidecar.spool.append(entry(op, self.ident, user=self.user, feature=self.route.feature,
                                              metadata={"route": self.route.prefix}, **fields))


class FixedCharge(Charge):
    """Charged on admission; refunded once if the upstream fails."""

    @property
    def event_id(self) -> str | None:
        d = self.decision
        return d.event_id if d is not None and d.ok and not d.would else None

    async def succeeded(self) -> None:
        if self.status in self.route.refund_statuses:
            await self.failed(f"status {self.status}")
        else:
            await self._settle("ok", self.keep)

    async def abandoned(self) -> None:
        await self._settle("client_gone", self.keep)

    async def keep(self) -> None:
        """The charge stands; with Redis down it was never made, so it goes to the spool."""
        if self.redis_down:
            await self.spool("consume", units=1)

    async def failed(self, reason: str) -> None:
        async def refund() -> None:
            eid = self.event_id
            if eid is None:
                return
            meta = orjson.dumps({"reason": reason, "route": self.route.prefix})
            try:
                d = await self.sidecar.ctx.decider.refund(self.ident, eid, meta)
            except REDIS_DOWN:
                await self.spool("refund", event_id=eid)
                return
            except Problem as e:  # 503: the ledger is down and the charge already drained (charges.py)
                if e.status != 503:
                    raise
                await self.spool("refund", event_id=eid)
                return
            if d.ok:
                self.decision.remaining = d.remaining  # type: ignore[union-attr]

        await self._settle("refunded", refund)


class LLMCharge(Charge):
    """A hold of prompt + budget, committed from the usage the upstream reports."""

    def __init__(self, sidecar: Sidecar, route: RouteConfig, ident: Identity, user: str,
                 api: metering.Metering) -> None:
        super().__init__(sidecar, route, ident, user)
        self.api = api
        self.prompt = 0
        self.most = 0  # tokens the call may use at most (the hold, in tokens)
        self.lowered: int | None = None
        self.drop_usage_only = False
        self.body = b""
        self.sse: metering.StreamMeter | None = None
        self._json = bytearray()
        self._json_over = False
        self.charged_tokens: int | None = None
        self.source = ""

    @property
    def rid(self) -> str | None:
        d = self.decision
        return d.event_id if d is not None and d.ok and not d.would else None

    @property
    def unit(self) -> int:
        assert self.route.feature is not None
        return self.sidecar.config.features[self.route.feature].cost

    def headers(self) -> dict[str, str]:
        h = super().headers()
        if self.lowered is not None:
            h["X-Quota-Max-Tokens"] = str(self.lowered)
        return h

    def raw_headers(self) -> list[tuple[bytes, bytes]]:
        h = super().raw_headers()
        if self.lowered is not None:
            h.append((b"x-quota-max-tokens", b"%d" % self.lowered))
        return h

    def start(self, sse: bool) -> None:
        self.rewrites = True  # the commit lands before the client sees the end of the answer
        if sse:
            self.sse = metering.StreamMeter(drop_usage_only=self.drop_usage_only, api=self.api)

    def feed(self, chunk: bytes) -> bytes:
        if self.sse is not None:
            return self.sse.feed(chunk)
        if not self._json_over:
            if len(self._json) + len(chunk) > MAX_JSON_RESPONSE:
                self._json_over = True
                self._json.clear()
            else:
                self._json += chunk
        return chunk

    def flush(self) -> bytes:
        return self.sse.flush() if self.sse is not None else b""

    def _produced(self) -> int:
        """Tokens the call used: the upstream's usage, else an estimate from what was relayed."""
        if self.sse is not None:
            total = self.sse.total()
            if total is not None:
                self.source = "usage"
                return total
            self.source = "streamed_chunks"
            return self.prompt + self.sse.completion_chunks
        if self._json_over:  # too large to read the usage in it: as much as it was allowed
            self.source = "over_limit"
            return self.most
        try:
            obj = orjson.loads(self._json) if self._json else None
        except orjson.JSONDecodeError:
            obj = None
        total = self.api.answer_total(obj) if isinstance(obj, dict) else None
        if total is not None:
            self.source = "usage"
            return total
        self.source = "estimate"
        text = self.api.answer_text(obj) if isinstance(obj, dict) else ""
        return self.prompt + metering.text_tokens(text)

    async def _commit(self) -> None:
        tokens = self._produced()
        self.charged_tokens = tokens
        if self.redis_down:
            await self.spool("consume", units=tokens)
            return
        rid = self.rid
        if rid is None:  # shadow let a refused call through: nothing was held
            return
        meta = orjson.dumps({"route": self.route.prefix, "tokens": tokens, "source": self.source,
                             "status": self.status, "prompt_estimate": self.prompt})
        try:
            # beyond the hold: the upstream did the work, whatever the estimate said
            d = await self.sidecar.ctx.decider.commit(self.ident, rid, tokens * self.unit, meta, beyond_hold=True)
        except REDIS_DOWN:
            await self.spool("commit", rid=rid, units=tokens * self.unit)
            return
        overage = d.extra.get("overage", 0) if d.ok else 0
        if overage:
            OVERAGE.labels(self.route.prefix).inc(overage)
            log.warning("%s: usage %d beyond what org %s could pay; %d uncharged (commit %s)",
                        self.route.prefix, tokens * self.unit, self.ident.org_id, overage, d.event_id)
        if d.status == 404:  # the hold expired before the answer ended: charge it plainly
            await self._consume_after_expiry(rid, tokens, meta)

    async def _consume_after_expiry(self, rid: str, tokens: int, meta: bytes) -> None:
        """The usage of a call whose hold expired, as a consume; when the balance no longer
        covers all of it, what is left is charged and the rest recorded as overage (as commit does)."""
        decider, feature = self.sidecar.ctx.decider, self.route.feature or ""
        d = await consume_unlimited(decider, self.ident, feature, tokens, self.user, f"commit:{rid}", meta)
        if d.status != 402 or self.unit <= 0 or d.remaining <= 0:
            return
        part = min(tokens - 1, d.remaining // self.unit)
        if part <= 0:
            return
        overage = (tokens - part) * self.unit
        meta = orjson.dumps({**orjson.loads(meta), "requested": tokens * self.unit, "overage": overage})
        d = await consume_unlimited(decider, self.ident, feature, part, self.user, f"commit:{rid}:part", meta)
        if d.ok:
            OVERAGE.labels(self.route.prefix).inc(overage)

    async def _release(self) -> None:
        rid = self.rid
        if rid is None or self.redis_down:
            return
        try:
            d = await self.sidecar.ctx.decider.release(self.ident, rid)
        except REDIS_DOWN:
            return  # the hold expires by itself after reservation_ttl_s
        if d.ok and self.decision is not None:
            self.decision.remaining = d.remaining

    def succeeded(self) -> Coroutine[Any, Any, None]:
        # the settling coroutine itself, not one around it: each level is passed again on resume
        if self.status >= 400:
            self._produced()
            if self.status in self.route.refund_statuses or self.source != "usage":
                return self._settle("released", self._release)
        return self._settle("ok", self._commit)

    async def failed(self, reason: str) -> None:
        await self._settle("released", self._release)

    async def abandoned(self) -> None:
        await self._settle("client_gone", self._commit)
