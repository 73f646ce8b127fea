"""What the pages need to know about presentation, in one place: the balance thresholds at which
a bar turns amber and red, and whether the buy buttons may show.

Both reach the pages through GET /v1/pricing (`balance_thresholds`, `purchases_available`), so a
page never hard-codes them. The warning threshold is `alerts.thresholds`' highest non-zero
percentage when the config has alerts, else `behaviour.low_balance_percent` (the API's own `low`
flag, 25 by default); the critical one is the next, else 10.
"""

from __future__ import annotations

from typing import Any

DEFAULT_CRITICAL_PERCENT = 10


def thresholds(cfg: Any) -> dict[str, int]:
    alerts = getattr(cfg, "alerts", None)
    configured = getattr(alerts, "thresholds", None) or []
    levels = sorted({int(t) for t in configured if isinstance(t, (int, float)) and 0 < t <= 100}, reverse=True)
    warn = levels[0] if levels else cfg.behaviour.low_balance_percent
    critical = levels[1] if len(levels) > 1 else min(DEFAULT_CRITICAL_PERCENT, warn)
    return {"warn_percent": warn, "critical_percent": critical}


def purchases_available(cfg: Any) -> bool:
    """True when POST /v1/purchases can sell: packs configured and a `stripe` section (the secret
    key is read per request; without it the route says 503 naming the variable)."""
    return bool(cfg.packs) and getattr(cfg, "stripe", None) is not None
