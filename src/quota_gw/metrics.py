"""Prometheus metrics of the gateway (GET /metrics).

Every metric declared here moves (tests/test_metrics.py scrapes after traffic and checks each
family has a sample). Under `quota-gw serve --workers N` every process keeps its own values, so
a scrape that reaches one process would see a part of the truth: `serve` points
PROMETHEUS_MULTIPROC_DIR at a fresh folder before the workers import prometheus_client, each
process writes its values there (prometheus-client's multiprocess mode), and /metrics merges them
all. Gauges say how to merge (`multiprocess_mode`). Without the variable (tests, `dev`, embedding)
the process's own registry is served.
"""

from __future__ import annotations

import asyncio
import atexit
import os
import time
from bisect import bisect_left
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.requests import Request
from starlette.responses import Response

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
# A decision whose remaining balance is under this share of the period's allocation is "near
# the limit": the token dashboard's first (amber) threshold.
NEAR_LIMIT_SHARE = 0.25

REGISTRY = CollectorRegistry(auto_describe=True)
DECISIONS = Counter("quota_gw_decisions_total", "Decisions by operation, outcome (ok or the refusal code) and feature",
                    ["op", "outcome", "feature"], registry=REGISTRY)
DECISION_SECONDS = Histogram("quota_gw_decision_seconds", "Time to decide (one Lua script in Redis, coalesced)",
                             ["op"], registry=REGISTRY,
                             buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5))
NEAR_LIMIT = Counter("quota_gw_near_limit_decisions_total",
                     "Allowed decisions that left the meter under 25 % of its allocation", ["feature"],
                     registry=REGISTRY)
CHARGED = Counter("quota_gw_tokens_charged_total", "Tokens charged by consume and commit", ["meter"],
                  registry=REGISTRY)
ROUND_TRIPS = Counter("quota_gw_redis_round_trips_total", "Round trips to Redis carrying decisions",
                      registry=REGISTRY)
SCRIPT_CALLS = Counter("quota_gw_redis_script_calls_total", "Decision scripts run", registry=REGISTRY)
REDIS_ERRORS = Counter("quota_gw_redis_errors_total", "Requests that failed on Redis", registry=REGISTRY)
REPLICA_WAIT_SHORT = Counter("quota_gw_replica_wait_short_total", "Decision batches answered before a replica "
                             "acknowledged them (behaviour.replica_wait_ms ran out)", registry=REGISTRY)
REDIS_REDIRECTS = Counter("quota_gw_redis_redirects_total", "Decisions a Redis Cluster answered with a redirect "
                          "(moved, ask, tryagain, clusterdown): not run, sent again", ["kind"], registry=REGISTRY)
SPOOL_ENTRIES = Gauge("quota_gw_spool_entries", "Fail-open usage entries on disk waiting for replay",
                      registry=REGISTRY, multiprocess_mode="max")  # every process counts the same folder
KEY_CACHE = Counter("quota_gw_key_cache_total", "API key lookups by result (hit: served from the in-process cache)",
                    ["result"], registry=REGISTRY)


# Labelled children by (metric, label values): `labels()` takes a lock and checks its arguments
# on every call, which cost more than the observation itself. Label values come from the config
# (features, meters) and the contract (operations, codes), so this stays small.
_children: dict[tuple[object, tuple[str, ...]], Any] = {}


def child(metric: Any, *labels: str) -> Any:
    key = (metric, labels)
    c = _children.get(key)
    if c is None:
        c = _children[key] = metric.labels(*labels)
    return c


# What the hot path records is tallied here and written into the metrics once per event-loop
# turn (`flush`, scheduled by the first record of the turn; /metrics flushes first). Each
# prometheus_client write takes a lock and checks its arguments (in multiprocess mode it also
# writes to an mmap), and a decision made five of them, its key lookup a sixth: ~8 % of an
# authorize call's instructions (docs/benchmarks.md). The decisions of one turn mostly share
# their labels, so their counts add up into one write each. What this costs: under
# `--workers N`, a scrape served by another process sees a decision once the turn that made it
# has ended (microseconds after its answer was written), not before.
_decided: list[tuple[str, str, str, int, Any, float]] = []  # observe()'s arguments, the time taken last
_counted: dict[Any, float] = {}  # a counter (a labelled child) -> its increase, from count()
_flush_on: Any = None  # the loop a flush is scheduled on (None: none is)


def observe(op: str, feature: str, meter: str, allocation: int, d: Any, started: float) -> None:
    """Records one decision (decisions.Decider calls this for every script it runs)."""
    _decided.append((op, feature, meter, allocation, d, time.perf_counter() - started))
    if _flush_on is None or _flush_on.is_closed():  # (closed first: it never will)
        _schedule()


def count(counter: Any, amount: float = 1) -> None:
    """`counter.inc(amount)`, written at the end of the turn."""
    _counted[counter] = _counted.get(counter, 0) + amount
    if _flush_on is None or _flush_on.is_closed():  # (closed first: it never will)
        _schedule()


def _schedule() -> None:
    global _flush_on
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:  # no loop: now
        flush()
        return
    _flush_on = loop
    loop.call_soon(flush)


def flush() -> None:
    """Writes what was tallied into the metrics: each labelled child once (a decision's
    duration goes into its histogram with the others of its operation, `_observe_all`)."""
    global _flush_on
    _flush_on = None
    counted = _counted.copy()
    _counted.clear()
    decided = _decided.copy()
    _decided.clear()
    timed: dict[str, list[float]] = {}
    outcomes: dict[tuple[str, str, str, str], int] = {}  # (op, code, would, feature) -> decisions
    charged: dict[str, int] = {}  # meter -> cost charged
    near: dict[str, int] = {}  # feature -> decisions near the limit
    for op, feature, meter, allocation, d, seconds in decided:
        times = timed.get(op)
        if times is None:
            times = timed[op] = []
        times.append(seconds)
        key = (op, d.code, d.would, feature)
        outcomes[key] = outcomes.get(key, 0) + 1
        if d.status >= 300:
            continue
        if d.cost > 0 and meter and (op == "consume" or op == "commit"):
            charged[meter] = charged.get(meter, 0) + d.cost
        if allocation > 0 and 0 <= d.remaining < allocation * NEAR_LIMIT_SHARE and op in ("consume", "reserve", "commit"):
            near[feature] = near.get(feature, 0) + 1
    for (op, code, would, feature), n in outcomes.items():
        c = child(DECISIONS, op, code or ("shadow_" + would if would else "ok"), feature)
        counted[c] = counted.get(c, 0) + n
    for meter, cost in charged.items():
        c = child(CHARGED, meter)
        counted[c] = counted.get(c, 0) + cost
    for feature, n in near.items():
        c = child(NEAR_LIMIT, feature)
        counted[c] = counted.get(c, 0) + n
    for op, times in timed.items():
        _observe_all(child(DECISION_SECONDS, op), times)
    for counter, amount in counted.items():
        counter.inc(amount)


def _observe_all(histogram: Any, amounts: list[float]) -> None:
    """`histogram.observe(a)` for each of `amounts`, written as observe writes it (the first
    bucket whose bound is at least `a`, and the sum) through the same values, each bucket and
    the sum once: observe() per decision, ~1 µs each, was most of the cost of the metrics.
    prometheus_client's Histogram child: _upper_bounds (ending in +Inf), _buckets, _sum
    (tests/test_metrics.py holds the two ways together)."""
    bounds = histogram._upper_bounds
    counts = [0] * len(bounds)
    for a in amounts:
        counts[bisect_left(bounds, a)] += 1
    histogram._sum.inc(sum(amounts))
    buckets = histogram._buckets
    for i, n in enumerate(counts):
        if n:
            buckets[i].inc(n)


def _multiproc_dir() -> str | None:
    return os.environ.get(MULTIPROC_ENV) or None


if _multiproc_dir():
    from prometheus_client import multiprocess

    _pid = os.getpid()
    # A process that exits cleanly takes its gauge values with it (counters stay: they are totals).
    atexit.register(lambda: multiprocess.mark_process_dead(_pid))


async def endpoint(request: Request) -> Response:
    flush()
    path = _multiproc_dir()
    if path:
        from prometheus_client import multiprocess

        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry, path=path)
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)
    return Response(generate_latest(REGISTRY), media_type=CONTENT_TYPE_LATEST)
