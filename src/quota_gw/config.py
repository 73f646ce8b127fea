"""The configuration file: meters, features, plans, packs, routes and behaviour.

One YAML file, validated into typed, frozen models at start. A bad file is refused with a
message naming the file, the key path and what is wrong, because an operator reading a crash
log at 3 a.m. should not have to guess which of 200 lines broke the gateway.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

NAME_RE = r"^[A-Za-z0-9_.-]{1,64}$"
UNLIMITED = -1
MAX_AMOUNT = 10**12  # keeps every sum exact in Lua doubles and in JSON


class ConfigError(Exception):
    """A config file that cannot be used, with where and why."""

    def __init__(self, file: str, path: str, message: str) -> None:
        self.file, self.path, self.message = file, path, message
        super().__init__(f"{file}: {path}: {message}" if path else f"{file}: {message}")


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _seconds(value: Any) -> Any:
    """Accepts 60, '60s', '5m', '1h', '1d' and gives whole seconds."""
    if isinstance(value, str):
        m = re.fullmatch(r"\s*(\d+)\s*([smhd]?)\s*", value)
        if not m:
            raise ValueError(f"not a duration: {value!r} (use 60, '60s', '5m', '1h' or '1d')")
        return int(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)]
    return value


class RateLimit(_Model):
    """`limit` calls per `window` seconds, at most `burst` at once (default: `limit`)."""

    limit: int = Field(gt=0)
    window: int = Field(gt=0)
    burst: int | None = Field(default=None, gt=0)

    _w = field_validator("window", mode="before")(_seconds)

    @property
    def interval_us(self) -> int:
        return self.window * 1_000_000 // self.limit

    @property
    def burst_or_limit(self) -> int:
        return self.burst or self.limit


class RateLimits(_Model):
    user: RateLimit | None = None
    key: RateLimit | None = None
    org: RateLimit | None = None


class Plan(_Model):
    allocations: dict[str, int | Literal["unlimited"]] = Field(default_factory=dict)
    period: str = "month"
    rollover: bool = False
    rate_limits: RateLimits = Field(default_factory=RateLimits)

    @field_validator("period")
    @classmethod
    def _period(cls, v: str) -> str:
        if v in ("month", "week", "day"):
            return v
        return f"{_seconds(v)}s"

    @field_validator("allocations")
    @classmethod
    def _allocations(cls, v: dict[str, Any]) -> dict[str, Any]:
        for meter, amount in v.items():
            if amount != "unlimited" and not 0 <= amount <= MAX_AMOUNT:
                raise ValueError(f"{meter}: allocation must be 0..{MAX_AMOUNT} or 'unlimited'")
        return v

    def allocation(self, meter: str) -> int:
        """Tokens per period for a meter; -1 for unlimited, 0 when the plan leaves it out."""
        v = self.allocations.get(meter, 0)
        return UNLIMITED if v == "unlimited" else int(v)


class Feature(_Model):
    meter: str
    cost: int = Field(ge=0, le=MAX_AMOUNT)


class Pack(_Model):
    meter: str
    tokens: int = Field(gt=0, le=MAX_AMOUNT)
    price_cents: int = Field(ge=0)
    currency: str = "usd"
    name: str | None = None


class Route(_Model):
    """A path prefix forwarded to an upstream, priced by a feature or by LLM usage."""

    prefix: str
    upstream: str
    feature: str | None = None
    metering: Literal["fixed", "openai", "none"] = "fixed"
    fail: Literal["open", "closed"] | None = None
    shadow: bool | None = None
    timeout_s: float = Field(default=60.0, gt=0)
    connect_timeout_s: float = Field(default=5.0, gt=0)
    refund_statuses: list[int] = Field(default_factory=lambda: [500, 502, 503, 504])
    strip_prefix: bool = False
    # How long an idle pooled connection to the upstream is kept: below the upstream's own idle
    # timeout (uvicorn: 5 s), so the gateway never reuses one the upstream is closing.
    upstream_keepalive_s: float = Field(default=4.0, gt=0, le=3600)
    # metering: openai — the completion budget held when the caller sends no max_tokens, and the
    # least a call may be lowered to before it is refused with 402 (see proxy.py).
    default_max_tokens: int = Field(default=1024, gt=0, le=1_000_000)
    min_completion_tokens: int = Field(default=16, gt=0, le=1_000_000)

    @field_validator("prefix")
    @classmethod
    def _prefix(cls, v: str) -> str:
        if not v.startswith("/"):
            raise ValueError("must start with '/'")
        return v

    @field_validator("upstream")
    @classmethod
    def _upstream(cls, v: str) -> str:
        if not re.match(r"^https?://[^/]+", v):
            raise ValueError(f"not an http(s) URL: {v!r}")
        return v.rstrip("/")


class Behaviour(_Model):
    shadow: bool = False
    fail: Literal["open", "closed"] = "closed"
    auto_register_users: bool = True
    idempotency_ttl_s: int = Field(default=86400, gt=0)
    refund_window_s: int = Field(default=7 * 86400, gt=0)
    reservation_ttl_s: int = Field(default=300, gt=0)
    max_reservation_ttl_s: int = Field(default=3600, gt=0)
    max_units: int = Field(default=1_000_000, gt=0)
    low_balance_percent: int = Field(default=25, ge=0, le=100)
    key_cache_s: float = Field(default=1.0, ge=0, le=1.0)
    coalesce: bool = True  # pipeline the decisions of one event-loop turn (see coalesce.py)
    org_header: str = "X-Quota-Org"
    user_header: str = "X-Quota-User"
    spool_dir: str = ".quota-gw/spool"
    allow_evicting_redis: bool = False  # start on a Redis whose maxmemory-policy may evict (see redis_policy.py)


class Config(_Model):
    shards: int = Field(default=16, ge=1, le=4096)
    default_plan: str | None = None
    meters: list[str] | dict[str, Any]
    features: dict[str, Feature]
    plans: dict[str, Plan]
    packs: dict[str, Pack] = Field(default_factory=dict)
    routes: list[Route] = Field(default_factory=list)
    behaviour: Behaviour = Field(default_factory=Behaviour)

    @field_validator("meters")
    @classmethod
    def _meters(cls, v: Any) -> list[str]:
        names = list(v)
        for n in names:
            if not isinstance(n, str) or not re.match(NAME_RE, n):
                raise ValueError(f"meter name {n!r} must match {NAME_RE}")
        if len(set(names)) != len(names):
            raise ValueError("meter names repeat")
        return names

    @model_validator(mode="after")
    def _references(self) -> Config:
        meters = set(self.meters)

        def known(meter: str, where: str) -> None:
            if meter not in meters:
                raise _PathError(where, f"unknown meter {meter!r} (meters: {', '.join(self.meters)})")

        for name, f in self.features.items():
            if not re.match(NAME_RE, name):
                raise _PathError(f"features.{name}", f"feature name must match {NAME_RE}")
            known(f.meter, f"features.{name}.meter")
        for name, p in self.plans.items():
            for meter in p.allocations:
                known(meter, f"plans.{name}.allocations.{meter}")
        for name, pk in self.packs.items():
            known(pk.meter, f"packs.{name}.meter")
        for i, r in enumerate(self.routes):
            if r.feature is not None and r.feature not in self.features:
                raise _PathError(f"routes.{i}.feature", f"unknown feature {r.feature!r}")
            if r.metering == "fixed" and r.feature is None:
                raise _PathError(f"routes.{i}.feature", "a fixed-cost route needs a feature")
            if r.metering == "openai" and r.feature is None:
                raise _PathError(f"routes.{i}.feature", "an openai route needs a feature (its meter, 1 token = cost)")
        if self.default_plan is not None and self.default_plan not in self.plans:
            raise _PathError("default_plan", f"unknown plan {self.default_plan!r}")
        return self

    @property
    def meter_names(self) -> list[str]:
        return list(self.meters)


class _PathError(ValueError):
    def __init__(self, path: str, message: str) -> None:
        self.path, self.message = path, message
        super().__init__(message)


def _loc(loc: tuple[Any, ...]) -> str:
    # Drop pydantic's union/type tags (e.g. 'int', "literal['unlimited']") from the key path.
    parts = [str(p) for p in loc if not (isinstance(p, str) and ("[" in p or p in ("int", "str", "float")))]
    return ".".join(parts)


def parse(data: Any, file: str = "<config>") -> Config:
    """Validates already-loaded YAML data."""
    if not isinstance(data, dict):
        raise ConfigError(file, "", "the top level must be a mapping")
    try:
        return Config.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        ctx_err = (err.get("ctx") or {}).get("error")
        if isinstance(ctx_err, _PathError):
            raise ConfigError(file, ctx_err.path, ctx_err.message) from None
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        elif err["type"] == "missing":
            msg = "required key is missing"
        raise ConfigError(file, _loc(err["loc"]), msg) from None


def load(path: str | os.PathLike[str] | None = None) -> Config:
    """Loads the file named by `path` or $QUOTA_GW_CONFIG."""
    path = path or os.environ.get("QUOTA_GW_CONFIG")
    if not path:
        raise ConfigError("<none>", "", "no config file: pass --config FILE or set QUOTA_GW_CONFIG")
    file = str(path)
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise ConfigError(file, "", f"cannot read: {e.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        raise ConfigError(file, "", f"not valid YAML: {where}{getattr(e, 'problem', e)}") from None
    return parse(data, file)
