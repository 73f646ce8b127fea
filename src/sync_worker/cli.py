"""`quota-gw worker`, `quota-gw rebuild`, `quota-gw reconcile` (hooked into quota_gw.cli).

Imports stay inside the commands so `quota-gw serve` does not load the worker.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Callable
from typing import Any


def _env(name: str, default: str | None = None) -> str:
    v = os.environ.get(name, default)
    if not v:
        print(f"quota-gw: {name} is not set", file=sys.stderr)
        raise SystemExit(2)
    return v


def _layout(args: argparse.Namespace, load_config: Callable[[argparse.Namespace], Any]) -> Any:
    from quota_gw.layout import Layout

    cfg = load_config(args)
    return cfg, Layout(os.environ.get("QUOTA_GW_PREFIX", "qgw"), cfg.shards)


def _logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def _run(coro: Any) -> Any:
    try:
        import uvloop

        return uvloop.run(coro)
    except ImportError:
        return asyncio.run(coro)


def add_commands(command: Callable[..., argparse.ArgumentParser],
                 load_config: Callable[[argparse.Namespace], Any]) -> None:
    def cmd_worker(args: argparse.Namespace) -> int:
        from .worker import main

        _, layout = _layout(args, load_config)
        _logging(args.log_level)
        port = args.metrics_port
        if port is None and os.environ.get("QUOTA_GW_WORKER_METRICS_PORT"):
            port = int(os.environ["QUOTA_GW_WORKER_METRICS_PORT"])
        return _run(main(_env("REDIS_URL", "redis://127.0.0.1:6379/0"), _env("DATABASE_URL"), layout,
                         args.consumer, args.batch, args.block_ms, args.claim_idle, port, args.metrics_host))

    def cmd_rebuild(args: argparse.Namespace) -> int:
        from .recovery import rebuild_main

        cfg, layout = _layout(args, load_config)
        _logging(args.log_level)
        return _run(rebuild_main(_env("REDIS_URL", "redis://127.0.0.1:6379/0"), _env("DATABASE_URL"), cfg, layout,
                                 force=args.force))

    def cmd_reconcile(args: argparse.Namespace) -> int:
        from .recovery import reconcile_main

        cfg, layout = _layout(args, load_config)
        _logging(args.log_level)
        return _run(reconcile_main(_env("REDIS_URL", "redis://127.0.0.1:6379/0"), _env("DATABASE_URL"), cfg,
                                   layout, org=args.org))

    p = command("worker", cmd_worker, "Drain the event streams into Postgres usage_events, exactly once.")
    p.add_argument("--config", help="config file (default: $QUOTA_GW_CONFIG); the worker needs its shard count")
    p.add_argument("--consumer", help="consumer name in the group (default: the host name); stable across "
                                      "restarts so a restarted worker re-reads its own pending entries. "
                                      "Give each worker on one host its own name.")
    p.add_argument("--batch", type=int, default=1000, help="entries read per stream per round; one round is "
                                                           "written in one Postgres transaction (default 1000)")
    p.add_argument("--block-ms", type=int, default=500, help="how long one read waits for new entries")
    p.add_argument("--claim-idle", type=float, default=30.0,
                   help="claim entries another consumer has held unacked this many seconds (default 30)")
    p.add_argument("--metrics-port", type=int, default=None,
                   help="serve /metrics, /healthz, /readyz on this port (default: $QUOTA_GW_WORKER_METRICS_PORT, "
                        "else off)")
    p.add_argument("--metrics-host", default="127.0.0.1")
    p.add_argument("--log-level", default="info")

    p = command("rebuild", cmd_rebuild, "Restore Redis (balances, users, quotas, orgs, keys) from Postgres, "
                                        "into an empty Redis for this prefix.")
    p.add_argument("--config", help="config file (default: $QUOTA_GW_CONFIG)")
    p.add_argument("--force", action="store_true",
                   help="write even if Redis already holds keys of this prefix (overwrites balances)")
    p.add_argument("--log-level", default="warning")

    p = command("reconcile", cmd_reconcile, "Compare Redis balances with the Postgres ledger (plus events not "
                                            "yet drained); exit 1 and print the differences on drift.")
    p.add_argument("--config", help="config file (default: $QUOTA_GW_CONFIG)")
    p.add_argument("--org", help="only this org")
    p.add_argument("--log-level", default="warning")
