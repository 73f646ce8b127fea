"""Enterprise entitlements: an org's own override of its plan's waterfall layers, set by admin.

An override names only what differs from the plan: `overflow`, `overflow_cost`, `credit_order`
and, per rate window, `overflow` / `overflow_cost`; what it leaves out is the plan's. Allocations,
periods and rate limits themselves stay the plan's (a different allowance is a different plan).

It travels as one canonical JSON text (sorted keys, nothing left out) so that no decision pays a
round trip for it: Postgres holds it (org_entitlements, migration 009), the org's Redis hash holds
the text next to `plan`, the key cache reads both in the one read it already makes
(auth.KeyStore), and the decider keys its per-plan ARGV template by (plan, text, feature): the
text is the override's version, so an org without one shares its plan's template.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import orjson
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator

from .config import CreditLayer, Plan
from .problems import Problem, invalid


def _whole(v: Any) -> Any:
    """JSON has one number type: 2.0 is the integer 2 (JSON Schema agrees; api.int_field does the same)."""
    return int(v) if isinstance(v, float) and v.is_integer() and abs(v) <= 10**6 else v


# null or left out: the plan's
Multiple = Annotated[Annotated[int, Field(ge=1, le=1000)] | None, BeforeValidator(_whole)]


class _Strict(BaseModel):
    # strict: "2" is not 2 and true is not 1 — an admin body says what it means or is refused.
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class WindowOverride(_Strict):
    overflow: Literal["none", "credit"] | None = None
    overflow_cost: Multiple = None


class RateOverrides(_Strict):
    user: WindowOverride | None = None
    key: WindowOverride | None = None
    org: WindowOverride | None = None


class Entitlements(_Strict):
    overflow: Literal["credit", "none"] | None = None
    overflow_cost: Multiple = None
    credit_order: list[CreditLayer] | None = None
    rate_limits: RateOverrides | None = None

    @field_validator("credit_order")
    @classmethod
    def _credit_order(cls, v: list[str] | None) -> list[str] | None:
        if v is not None and sorted(v) != ["grants", "purchased"]:
            raise ValueError("name 'grants' and 'purchased' once each, in the order they are drawn")
        return v

    def text(self) -> str:
        """The canonical text ('' for no override): what Redis holds and the template is keyed by."""
        d = self.model_dump(exclude_none=True)
        d["rate_limits"] = {k: v for k, v in (d.get("rate_limits") or {}).items() if v}
        if not d["rate_limits"]:
            del d["rate_limits"]
        return orjson.dumps(d, option=orjson.OPT_SORT_KEYS).decode() if d else ""


def parse(data: Any) -> Entitlements:
    """An admin body (or a stored value); 422 naming the first field that is wrong."""
    if not isinstance(data, dict):
        raise invalid("the body must be a JSON object", status=400)
    try:
        return Entitlements.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        field = ".".join(str(p) for p in err["loc"]) or "entitlements"
        raise invalid(f"{field}: {err['msg']}", field=field) from None


def from_text(text: str | None) -> Entitlements:
    """The stored text back (a text this module wrote; '' or None: no override)."""
    return Entitlements.model_validate_json(text) if text else Entitlements()


def canonical(value: Any) -> str:
    """The canonical text of a stored value (Postgres jsonb, as text or decoded)."""
    if value is None:
        return ""
    if isinstance(value, str):
        return from_text(value).text()
    return Entitlements.model_validate(value).text()


def gate_terms(plan: Plan, text: str) -> dict[str, Any]:
    """The waterfall's GateArgs fields for a plan under an override (decisions.Decider._priced)."""
    ent = from_text(text)
    rl = plan.rate_limits
    rov = ent.rate_limits or RateOverrides()
    terms: dict[str, Any] = {}
    for name in ("user", "key", "org"):
        lim, ov = getattr(rl, name), getattr(rov, name) or WindowOverride()
        overflow = ov.overflow or (lim.overflow if lim else "none")
        cost = ov.overflow_cost or (lim.overflow_cost if lim else 1)
        # An override of a window the plan does not have changes nothing: there is nothing to pass.
        terms[f"rl_{name}_overflow"] = cost if lim and overflow == "credit" else 0
    overflow = ent.overflow or plan.overflow
    terms["alloc_overflow"] = (ent.overflow_cost or plan.overflow_cost) if overflow == "credit" else 0
    terms["credit_order"] = "".join(c[0] for c in (ent.credit_order or plan.credit_order))
    return terms


def effective(plan: Plan, text: str) -> dict[str, Any]:
    """What the org's decisions use: the plan's layers with the override applied (GET answers it)."""
    ent = from_text(text)
    rov = ent.rate_limits or RateOverrides()
    windows = {}
    for name in ("user", "key", "org"):
        lim, ov = getattr(plan.rate_limits, name), getattr(rov, name) or WindowOverride()
        if lim is not None:
            windows[name] = {"overflow": ov.overflow or lim.overflow, "overflow_cost": ov.overflow_cost or lim.overflow_cost}
    return {"overflow": ent.overflow or plan.overflow, "overflow_cost": ent.overflow_cost or plan.overflow_cost,
            "credit_order": list(ent.credit_order or plan.credit_order), "rate_limits": windows}


def not_found(org_id: str) -> Problem:
    return Problem(404, "not_found", f"no org {org_id}")
