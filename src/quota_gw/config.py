"""The configuration file: meters, features, plans, packs, routes and behaviour.

One YAML file, validated into typed, frozen models at start. A bad file is refused with a
message naming the file, the key path and what is wrong, because an operator reading a crash
log at 3 a.m. should not have to guess which of 200 lines broke the gateway.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal, TypeGuard

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

NAME_RE = r"^[A-Za-z0-9_.-]{1,64}$"  # (as in the orgs table's check) always applied with fullmatch
_NAME = re.compile(NAME_RE)
UNLIMITED = -1
MAX_AMOUNT = 10**12  # keeps every sum exact in Lua doubles and in JSON


def is_name(v: Any) -> TypeGuard[str]:
    """A name (org, user, team, meter, feature): the whole string matches NAME_RE. With
    re.match, `$` also matches before a trailing newline, so "u0\n" passed."""
    return isinstance(v, str) and _NAME.fullmatch(v) is not None


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


CreditLayer = Literal["grants", "purchased"]
CREDIT_ORDER: tuple[CreditLayer, ...] = ("grants", "purchased")


class RateLimit(_Model):
    """`limit` calls per `window` seconds, at most `burst` at once (default: `limit`)."""

    limit: int = Field(gt=0, description="Calls allowed per `window`.")
    window: int = Field(gt=0, description="The window in seconds: a number, or a duration such as '60s', '5m', '1h', '1d'.")
    burst: int | None = Field(default=None, gt=0, description="Calls allowed at once after a quiet spell "
                              "(GCRA burst); default: `limit`.")
    overflow: Literal["none", "credit"] = Field(default="none", description=(
        "Past the window: 'none' refuses the call (429); 'credit' lets it through, charged from the credit "
        "layers only (`credit_order`; never the allocation), at `overflow_cost` times its cost, and the "
        "window does not advance for it. No credit left: 429 as with 'none'."))
    overflow_cost: int = Field(default=1, ge=1, le=1000, description=(
        "With `overflow: credit`: what a call past the window costs, as a multiple of its price."))

    _w = field_validator("window", mode="before")(_seconds)

    @property
    def interval_us(self) -> int:
        return self.window * 1_000_000 // self.limit

    @property
    def burst_or_limit(self) -> int:
        return self.burst or self.limit


class RateLimits(_Model):
    user: RateLimit | None = Field(default=None, description="Per user of the org; applies only to calls that "
                                   "name a user (`user_id`, `X-Quota-User` or a user's key).")
    key: RateLimit | None = Field(default=None, description="Per API key.")
    org: RateLimit | None = Field(default=None, description="Per org, all its keys and users together.")


class Plan(_Model):
    allocations: dict[str, int | Literal["unlimited"]] = Field(default_factory=dict, description=(
        "Tokens per period for each meter (0..10^12), or 'unlimited' (metered, never limited). A meter left out "
        "is 0: forbidden (403 plan_forbids) until the org is granted credit on it."))
    period: str = Field(default="month", description=(
        "When the allocation refills: 'month' (calendar month, UTC), 'week' (Monday 00:00 UTC), 'day', or a "
        "duration ('3600s', '12h', '7d': fixed windows aligned to the Unix epoch)."))
    rollover: bool = Field(default=False, description="Unused allocation carries over into the next period.")
    rate_limits: RateLimits = Field(default_factory=RateLimits, description="Rate limits of callers on this plan "
                                    "(a refused call consumes no rate).")
    overflow: Literal["credit", "none"] = Field(default="credit", description=(
        "Past the period allocation: 'credit' takes the rest of a call from the credit layers (`credit_order`), "
        "at `overflow_cost` times; 'none' refuses it (402) even with credit left (a meter the plan leaves "
        "out, allocation 0, still runs on credit)."))
    overflow_cost: int = Field(default=1, ge=1, le=1000, description=(
        "What the part of a call past the allocation costs in credit, as a multiple of its price."))
    credit_order: list[CreditLayer] = Field(default_factory=lambda: list(CREDIT_ORDER),
                                                               description=(
        "The order the credit layers are drawn in: 'grants' (credit that expires, earliest expiry first) and "
        "'purchased' (credit that never expires). Each named once."))

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

    @field_validator("credit_order")
    @classmethod
    def _credit_order(cls, v: list[str]) -> list[str]:
        if sorted(v) != ["grants", "purchased"]:
            raise ValueError("name 'grants' and 'purchased' once each, in the order they are drawn")
        return v

    def allocation(self, meter: str) -> int:
        """Tokens per period for a meter; -1 for unlimited, 0 when the plan leaves it out."""
        v = self.allocations.get(meter, 0)
        return UNLIMITED if v == "unlimited" else int(v)


class Feature(_Model):
    meter: str = Field(description="The meter this feature draws from (one of `meters`).")
    cost: int = Field(ge=0, le=MAX_AMOUNT, description="Tokens per unit: a call of `units` costs `units` x `cost`; "
                      "on an LLM route, tokens of the meter per model token.")


class Pack(_Model):
    meter: str = Field(description="The meter the pack credits (one of `meters`).")
    tokens: int = Field(gt=0, le=MAX_AMOUNT, description="Tokens of purchased credit the pack adds.")
    price_cents: int = Field(ge=0, description="Price in the currency's smallest unit.")
    currency: str = Field(default="usd", description="ISO 4217 currency code, lower case.")
    name: str | None = Field(default=None, description="Display name.")
    expires_in: int | None = Field(default=None, gt=0, description=(
        "How long the bought credit counts: a duration such as '365d' or '12h' (seconds); unset: it never "
        "expires."))
    stripe_price: str | None = Field(default=None, description=(
        "A Stripe Price id (price_...) the checkout sells; without it the checkout names `price_cents` and "
        "`currency` itself."))

    _e = field_validator("expires_in", mode="before")(_seconds)

    @field_validator("currency")
    @classmethod
    def _currency(cls, v: str) -> str:
        if not re.fullmatch(r"[a-z]{3}", v):
            raise ValueError("an ISO 4217 code in lower case, e.g. 'usd'")
        return v


class Stripe(_Model):
    """Selling packs through Stripe Checkout. The secrets stay in the environment: the config
    names the variables, never their values."""

    secret_key_env: str = Field(default="STRIPE_SECRET_KEY", description=(
        "Environment variable holding the Stripe secret API key (sk_...); unset: POST /v1/purchases is 503."))
    webhook_secret_env: str = Field(default="STRIPE_WEBHOOK_SECRET", description=(
        "Environment variable holding the webhook endpoint's signing secret (whsec_...); unset: "
        "POST /v1/webhooks/stripe is 503."))
    success_url: str = Field(description="Where Stripe sends the buyer after paying (Checkout `success_url`; "
                             "Stripe replaces {CHECKOUT_SESSION_ID}).")
    cancel_url: str = Field(description="Where Stripe sends the buyer who leaves the checkout (`cancel_url`).")
    api_base: str | None = Field(default=None, description=(
        "Base URL of the Stripe API (default: Stripe's own). For tests against a local Stripe-compatible server."))

    @field_validator("success_url", "cancel_url", "api_base")
    @classmethod
    def _url(cls, v: str | None) -> str | None:
        if v is not None and not re.fullmatch(r"https?://[^/\s]+(/\S*)?", v):
            raise ValueError(f"not an http(s) URL: {v!r}")
        return v


class Route(_Model):
    """A path prefix forwarded to an upstream, priced by a feature or by LLM usage."""

    prefix: str = Field(description="Path prefix this route serves, matched on whole path segments; the longest "
                        "matching prefix wins, and the gateway's own API always wins over a route.")
    upstream: str = Field(description="Base URL (http or https) the calls are forwarded to.")
    feature: str | None = Field(default=None, description=(
        "The feature a call is priced by (one of `features`). Required unless `metering` is 'none'."))
    # An LLM metering name is a class in metering.py (METERINGS); adding one adds its name here.
    metering: Literal["fixed", "openai", "anthropic", "none"] = Field(default="fixed", description=(
        "'fixed': each call costs the feature's cost, charged on admission and refunded if the upstream fails; "
        "'openai': OpenAI-style chat/completions/embeddings, a hold settled at the usage the upstream reports; "
        "'anthropic': Anthropic-style messages, the same way; "
        "'none': authenticated and forwarded, not charged."))
    fail: Literal["open", "closed"] | None = Field(default=None, description=(
        "When Redis is down: 'closed' answers 503 and forwards nothing; 'open' forwards and spools the usage. "
        "Default: `behaviour.fail`."))
    shadow: bool | None = Field(default=None, description="Shadow mode for this route: decide and record, never "
                                "block. Default: `behaviour.shadow`.")
    timeout_s: float = Field(default=60.0, gt=0, description="Longest wait for the response head and for each "
                             "next chunk (not the whole stream); past it the call is 504 and settled as failed.")
    connect_timeout_s: float = Field(default=5.0, gt=0, description="Longest wait to connect to the upstream.")
    refund_statuses: list[int] = Field(default_factory=lambda: [500, 502, 503, 504], description=(
        "Upstream statuses that count as a failure: passed through as they are, and the call is refunded "
        "(fixed) or its hold released (openai, anthropic)."))
    strip_prefix: bool = Field(default=False, description="Forward the path without the prefix (/ai/goals/plan "
                               "with prefix /ai/goals goes upstream as /plan).")
    upstream_keepalive_s: float = Field(default=4.0, gt=0, le=3600, description=(
        "Seconds an idle pooled connection to the upstream is kept: keep it below the upstream's own idle "
        "timeout (uvicorn: 5 s), so the gateway never reuses a connection the upstream is closing."))
    # LLM metering — the completion budget held when the caller sends no max_tokens, and the
    # least a call may be lowered to before it is refused with 402 (see sidecar/admission.py).
    default_max_tokens: int = Field(default=1024, gt=0, le=1_000_000, description=(
        "LLM metering: the completion budget held and sent upstream as max_tokens when the caller sends none."))
    min_completion_tokens: int = Field(default=16, gt=0, le=1_000_000, description=(
        "LLM metering: the least completion budget a call may be lowered to when the org cannot afford "
        "max_tokens; below it the call is 402."))
    # OpenAI's reasoning models refuse max_tokens and want max_completion_tokens.
    max_tokens_field: Literal["max_tokens", "max_completion_tokens", "max_output_tokens"] = Field(
        default="max_tokens", description=(
            "openai metering: the budget field added when a caller sends none (every budget field a caller "
            "sends is set to the hold)."))
    image_tokens: int = Field(default=85 + 170 * 8, ge=0, le=1_000_000, description=(
        "LLM metering: tokens held per image part of a prompt (default: the most one image costs by "
        "OpenAI's tile method)."))
    # Set after the caller's headers are filtered (a caller cannot override them). Never in repr or errors.
    headers: dict[str, str] = Field(default_factory=dict, repr=False, description=(
        "Headers set on every forwarded request, e.g. the upstream's own key: "
        "`{Authorization: \"Bearer ${OPENAI_API_KEY}\"}`. `${NAME}` is read from the environment when the "
        "gateway starts (a missing variable stops it, naming route and variable); `$${` is a literal `${`."))

    @field_validator("prefix")
    @classmethod
    def _prefix(cls, v: str) -> str:
        if not v.startswith("/"):
            raise ValueError("must start with '/'")
        return v

    @field_validator("upstream")
    @classmethod
    def _upstream(cls, v: str) -> str:
        if not re.fullmatch(r"https?://[^/\s]+(/\S*)?", v):
            raise ValueError(f"not an http(s) URL: {v!r}")
        return v.rstrip("/")

    @field_validator("headers")
    @classmethod
    def _headers(cls, v: dict[str, str]) -> dict[str, str]:
        # Messages name the header, never its value (it may hold a credential).
        seen: set[str] = set()
        for name, value in v.items():
            if not _TOKEN.fullmatch(name):
                raise ValueError(f"{name!r}: not a header name")
            norm = name.lower().replace("_", "-")
            if norm in _GATEWAY_HEADERS:
                raise ValueError(f"{name}: set by the gateway, a route cannot set it")
            if norm in seen:
                raise ValueError(f"{name}: given twice")
            seen.add(norm)
            if any(c in value for c in "\r\n\0"):
                raise ValueError(f"{name}: the value holds a line break or NUL")
            for m in _VAR.finditer(value):
                if m.group(0) == "$${":
                    continue
                if m.group(1) is None:
                    raise ValueError(f"{name}: '${{' must be followed by NAME}} (letters, digits, _) or written $${{")
        return v


_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # RFC 9110 field-name
_VAR = re.compile(r"\$\$\{|\$\{(?:([A-Za-z_][A-Za-z0-9_]*)\})?")
# Request headers the gateway owns on the way upstream (hop-by-hop, framing, forwarding, the
# caller's quota-gw key): a route's `headers` may set Authorization (the upstream's own key)
# but none of these. The identity headers (behaviour.org_header/user_header) are checked in Config.
_GATEWAY_HEADERS = frozenset({"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te",
                              "trailer", "trailers", "transfer-encoding", "upgrade", "proxy-connection",
                              "host", "content-length", "x-forwarded-for", "x-forwarded-proto",
                              "x-forwarded-host"})


def resolve_route_headers(config: Config, environ: Any = None, file: str | None = None) -> list[list[tuple[str, str]]]:
    """Each route's `headers` with `${NAME}` read from the environment, in route order. A
    variable that is unset or empty is a ConfigError naming the route and the variable (never
    a value). Called when the gateway starts: only the process that forwards needs the secrets."""
    env = os.environ if environ is None else environ
    file = file or os.environ.get("QUOTA_GW_CONFIG") or "<config>"
    out = []
    for i, r in enumerate(config.routes):
        resolved = []
        for name, template in r.headers.items():
            def sub(m: re.Match[str], name: str = name, i: int = i, r: Route = r) -> str:
                if m.group(0) == "$${":
                    return "${"
                var = m.group(1)
                value = env.get(var)
                problem = ("is not set" if value is None else "is empty" if not value
                           else "holds a line break or NUL" if any(c in value for c in "\r\n\0") else None)
                if problem:
                    raise ConfigError(file, f"routes.{i}.headers.{name}",
                                      f"environment variable {var} {problem} (route {r.prefix})")
                assert value is not None  # "is not set" raised above
                return value
            resolved.append((name, _VAR.sub(sub, template)))
        out.append(resolved)
    return out


class Behaviour(_Model):
    shadow: bool = Field(default=False, description=(
        "Shadow mode: refused calls pass uncharged, each recorded as a `denied` event, and the answer says "
        "`X-Quota-Shadow: <code>`. For trying limits out on live traffic."))
    fail: Literal["open", "closed"] = Field(default="closed", description=(
        "Proxy routes when Redis is down: 'closed' answers 503; 'open' checks the key in Postgres, forwards, "
        "and spools the usage for replay. Routes may override it."))
    auto_register_users: bool = Field(default=True, description=(
        "A user_id the org has not registered is registered on first use; false: such calls are 403."))
    idempotency_ttl_s: int = Field(default=86400, gt=0, description=(
        "Seconds an idempotency key (and a commit's or release's answer) is remembered."))
    refund_window_s: int = Field(default=7 * 86400, gt=0, description="Seconds after a charge during which it "
                                 "can be refunded.")
    reservation_ttl_s: int = Field(default=300, gt=0, description="Default lifetime of a reservation (`ttl_s`); "
                                   "an expired hold returns to the balance.")
    max_reservation_ttl_s: int = Field(default=3600, gt=0, description="Largest `ttl_s` a reservation may ask for.")
    max_units: int = Field(default=1_000_000, gt=0, description="Largest `units` of one call (a commit may give "
                           "up to 1000 times this).")
    low_balance_percent: int = Field(default=25, ge=0, le=100, description=(
        "GET /v1/balance marks a meter `low` below this percentage of its allocation when "
        "`alerts.thresholds` is empty (otherwise below the highest threshold)."))
    key_cache_s: float = Field(default=1.0, ge=0, le=1.0, description=(
        "Seconds an API key and an org's plan are cached in each process: a revocation or plan change reaches "
        "every replica within this. 0: read on every call."))
    coalesce: bool = Field(default=True, description=(  # see coalesce.py
        "Send the decisions of one event-loop turn together in one pipeline (fewer round trips under load)."))
    replica_wait_ms: int = Field(default=0, ge=0, le=4000, description=(  # see coalesce.py
        "Durability: after each batch of decisions, `WAIT 1 <ms>` for a replica to have them before answering. "
        "A failover then loses fewer acknowledged charges, at the cost of a replication round trip per batch. "
        "0: off (Redis replicates asynchronously)."))
    org_header: str = Field(default="X-Quota-Org", description="Header that carries the org to the upstream (the "
                            "caller's own is dropped).")
    user_header: str = Field(default="X-Quota-User", description=(
        "Header naming the user on a call with an org key; also sent upstream (the caller's own is replaced)."))
    spool_dir: str = Field(default=".quota-gw/spool", description=(
        "Folder of the fail-open spool (usage written while Redis is down); $QUOTA_GW_SPOOL_DIR overrides it."))
    max_body_bytes: int = Field(default=64 * 1024, ge=1024, le=16 * 1024 * 1024, description=(
        "Largest request body of the decision and admin API, in bytes (413 beyond; refused from Content-Length "
        "or while a chunked body streams, never read whole). Proxy routes have their own 16 MiB."))
    max_header_bytes: int = Field(default=32 * 1024, ge=4096, le=1024 * 1024, description=(
        "Largest request line plus headers `quota-gw serve` accepts, in bytes (431 beyond, connection closed)."))
    max_headers: int = Field(default=100, ge=16, le=1000, description=(
        "Most request headers `quota-gw serve` accepts (431 beyond, connection closed)."))
    allow_evicting_redis: bool = Field(default=False, description=(
        "Start on a Redis whose maxmemory-policy may evict keys (an evicted balance comes back full); logs an "
        "error-level warning. Also $QUOTA_GW_ALLOW_EVICTING_REDIS=1. Default: refuse to start."))


class Alerts(_Model):
    thresholds: list[int] = Field(default_factory=lambda: [25, 10, 0], description=(
        "Low-balance alerts, in percent of a meter's period allocation plus the purchased credit it started the "
        "period with: the charge that takes the balance to or below one (a consume, or a reservation's commit: the "
        "sidecar's LLM calls too; a hold alone does not) records an `alert` event (once per threshold per meter "
        "per period), delivered to the org's webhook by `quota-gw notifier`. The highest is also where GET "
        "/v1/balance says `low`."))
    retry_initial_s: float = Field(default=5.0, gt=0, description=(
        "First wait before a failed webhook delivery is tried again; doubled each attempt."))
    retry_max_s: float = Field(default=3600.0, gt=0, description="Longest wait between two delivery attempts.")
    timeout_s: float = Field(default=10.0, gt=0, description="Longest wait for the org's webhook to answer.")

    @field_validator("thresholds")
    @classmethod
    def _thresholds(cls, v: list[int]) -> list[int]:
        if any(not 0 <= t <= 100 for t in v) or len(set(v)) != len(v):
            raise ValueError("distinct percentages, 0..100")
        return sorted(v, reverse=True)


class Config(_Model):
    shards: int = Field(default=16, ge=1, le=4096, description=(
        "Shards the orgs are hashed over (each has its own event stream). Fixed for the life of the data: "
        "another count puts an org's Redis keys elsewhere."))
    default_plan: str | None = Field(default=None, description=(
        "Plan of an org created without one (admin API); must be one of `plans`."))
    meters: list[str] | dict[str, Any] = Field(description=(
        "Meter names (a list, or a mapping whose keys are the names): the balances every org holds."))
    features: dict[str, Feature] = Field(description="Priced operations by name: a meter and a cost per unit.")
    plans: dict[str, Plan] = Field(description="Plans by name: allocations per period and rate limits.")
    packs: dict[str, Pack] = Field(default_factory=dict, description=(
        "Credit packs by name, listed by GET /v1/pricing and sold by POST /v1/purchases (with a `stripe` "
        "section)."))
    stripe: Stripe | None = Field(default=None, description=(
        "Stripe Checkout for the packs; without it POST /v1/purchases is 503."))
    alerts: Alerts = Field(default_factory=Alerts, description="Low-balance alerts and their webhook delivery.")
    routes: list[Route] = Field(default_factory=list, description="Proxy routes: path prefixes forwarded to "
                                "upstreams and charged.")
    behaviour: Behaviour = Field(default_factory=Behaviour, description="How the gateway decides, caches and "
                                 "fails.")

    @field_validator("meters")
    @classmethod
    def _meters(cls, v: Any) -> list[str]:
        names = list(v)
        for n in names:
            if not is_name(n):
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
            if not is_name(name):
                raise _PathError(f"features.{name}", f"feature name must match {NAME_RE}")
            known(f.meter, f"features.{name}.meter")
        for name, p in self.plans.items():
            for meter in p.allocations:
                known(meter, f"plans.{name}.allocations.{meter}")
        for name, pk in self.packs.items():
            if not is_name(name):
                raise _PathError(f"packs.{name}", f"pack name must match {NAME_RE}")
            known(pk.meter, f"packs.{name}.meter")
        for i, r in enumerate(self.routes):
            if r.feature is not None and r.feature not in self.features:
                raise _PathError(f"routes.{i}.feature", f"unknown feature {r.feature!r}")
            if r.metering == "fixed" and r.feature is None:
                raise _PathError(f"routes.{i}.feature", "a fixed-cost route needs a feature")
            for name in r.headers:
                if name.lower().replace("_", "-") in (self.behaviour.org_header.lower().replace("_", "-"),
                                                      self.behaviour.user_header.lower().replace("_", "-")):
                    raise _PathError(f"routes.{i}.headers.{name}", "set by the gateway, a route cannot set it")
            if r.metering not in ("fixed", "none") and r.feature is None:
                raise _PathError(f"routes.{i}.feature", f"an {r.metering} route needs a feature (its meter, 1 token = cost)")
        if self.default_plan is not None and self.default_plan not in self.plans:
            raise _PathError("default_plan", f"unknown plan {self.default_plan!r}")
        return self

    @property
    def meter_names(self) -> list[str]:
        return list(self.meters)

    @property
    def low_balance_mark(self) -> int:
        """The percentage under which a meter is `low` (GET /v1/balance) and in the `low_balances`
        view (the store records it in Postgres): the highest alert threshold, else
        `behaviour.low_balance_percent`."""
        return low_balance_mark(self.alerts, self.behaviour)


def low_balance_mark(alerts: Alerts, behaviour: Behaviour) -> int:
    return alerts.thresholds[0] if alerts.thresholds else behaviour.low_balance_percent


# What `migrate` seeds the view's mark with, before any gateway records its own config's.
DEFAULT_LOW_BALANCE_MARK = low_balance_mark(Alerts(), Behaviour())


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
