"""`quota-gw worker`, `quota-gw rebuild`, `quota-gw reconcile` (hooked into quota_gw.cli).

Imports stay inside the commands so `quota-gw serve` does not load the worker. Each command
reaches Redis and Postgres once before it starts, so an unreachable store is one line and
exit 3 (quota_gw/cli_support.py), not a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Callable
from typing import Any

from quota_gw.cli_support import (ENV_CONFIG, ENV_DATABASE, ENV_PREFIX, ENV_REDIS, USAGE, Fail, database_url,
                                  reach_postgres, reach_redis, redis_url)

WORKER_CODES = """exit codes:
  0  stopped (SIGTERM, Ctrl-C) after writing and acking the batch in hand
  2  usage or config error
  3  Redis or Postgres unreachable at start, or the database does not exist (run `quota-gw migrate`).
     Once running, the worker rides out outages: it backs off, reconnects and loses nothing.
  4  unexpected error (QUOTA_GW_DEBUG=1 prints the traceback)"""

REBUILD_CODES = """exit codes:
  0  rebuilt (with --org: that org's balances match the ledger, and its configuration Postgres, now)
  1  --org: some field still differs (traffic or an admin write kept changing it; run again)
  2  usage or config error, or refused: Redis already holds state for the prefix, or events are not
     drained yet (the message says which; --force overrides)
  3  Redis or Postgres unreachable, or the database does not exist
  4  unexpected error (QUOTA_GW_DEBUG=1 prints the traceback)"""

RECONCILE_CODES = """exit codes (for cron and alerts):
  0  clean: every Redis balance matches the ledger plus the events not yet drained, and every org's
     configuration in Redis (plan, entitlements, user teams, sub-quota limits) matches Postgres
  1  drift: the differences are printed, one line each
  2  usage or config error
  3  Redis or Postgres unreachable, or the database does not exist
  4  unexpected error (QUOTA_GW_DEBUG=1 prints the traceback)"""


def _layout(args: argparse.Namespace, load_config: Callable[[argparse.Namespace], Any]) -> Any:
    from quota_gw.layout import Layout

    cfg = load_config(args)
    prefix = os.environ.get("QUOTA_GW_PREFIX", "qgw")
    try:
        return cfg, Layout(prefix, cfg.shards)
    except ValueError as e:
        raise Fail(f"QUOTA_GW_PREFIX {prefix!r}: {e}", USAGE) from None


def _stores() -> tuple[str, str]:
    """(REDIS_URL, DATABASE_URL), both reached once, or Fail naming the one that is not."""
    r_url, d_url = redis_url(), database_url()

    async def reach() -> None:
        await reach_redis(r_url)
        conn = await reach_postgres(d_url)
        await conn.close()

    asyncio.run(reach())
    return r_url, d_url


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
        port = args.metrics_port
        env_port = os.environ.get("QUOTA_GW_WORKER_METRICS_PORT")
        if port is None and env_port:
            if not (env_port.isascii() and env_port.isdigit()):
                raise Fail(f"QUOTA_GW_WORKER_METRICS_PORT must be a port number, not {env_port!r}", USAGE)
            port = int(env_port)
        r_url, d_url = _stores()
        _logging(args.log_level)
        return _run(main(r_url, d_url, layout, args.consumer, args.batch, args.block_ms, args.claim_idle, port,
                         args.metrics_host))

    def cmd_rebuild(args: argparse.Namespace) -> int:
        from .recovery import rebuild_main, repair_main

        cfg, layout = _layout(args, load_config)
        r_url, d_url = _stores()
        _logging(args.log_level)
        if args.org:
            return _run(repair_main(r_url, d_url, layout, args.org, cfg.meter_names))
        return _run(rebuild_main(r_url, d_url, cfg, layout, force=args.force))

    def cmd_reconcile(args: argparse.Namespace) -> int:
        from .recovery import reconcile_main

        cfg, layout = _layout(args, load_config)
        r_url, d_url = _stores()
        _logging(args.log_level)
        return _run(reconcile_main(r_url, d_url, cfg, layout, org=args.org))

    env = (ENV_CONFIG, ENV_REDIS, ENV_DATABASE, ENV_PREFIX)
    p = command("worker", cmd_worker, "Drain the event streams into Postgres usage_events, exactly once.", *env,
                "  QUOTA_GW_WORKER_METRICS_PORT  default of --metrics-port", codes=WORKER_CODES)
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
    p.add_argument("--metrics-host", default="127.0.0.1", help="address of the metrics port (default 127.0.0.1)")
    p.add_argument("--log-level", default="info")

    p = command("rebuild", cmd_rebuild, "Restore Redis (balances and their credit lots, users, quotas, orgs, "
                                        "keys) from Postgres, into an empty Redis for this prefix.", *env,
                codes=REBUILD_CODES)
    p.add_argument("--config", help="config file (default: $QUOTA_GW_CONFIG)")
    p.add_argument("--force", action="store_true",
                   help="write even if Redis already holds keys of this prefix (overwrites balances)")
    p.add_argument("--org", help="only this org, while the gateways run: each balance field reconcile finds "
                                 "drifting is set from the ledger (compare-and-set; after a failover lost writes), "
                                 "each configuration field (plan, entitlements, user teams, sub-quota limits) "
                                 "from Postgres")
    p.add_argument("--log-level", default="warning")

    p = command("reconcile", cmd_reconcile, "Compare Redis balances and credit lots with the Postgres ledger "
                                            "(plus events not yet drained), and each org's configuration in Redis with "
                                            "Postgres; exit 1 and print the differences on drift.", *env,
                codes=RECONCILE_CODES)
    p.add_argument("--config", help="config file (default: $QUOTA_GW_CONFIG)")
    p.add_argument("--org", help="only this org")
    p.add_argument("--log-level", default="warning")
