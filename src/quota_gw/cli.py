"""`quota-gw` commands (SPEC §6)."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Callable

from . import config as config_mod


def _config(args: argparse.Namespace) -> config_mod.Config:
    """Loads and validates the config, or exits 2 with the file, key and reason."""
    if getattr(args, "config", None):
        os.environ["QUOTA_GW_CONFIG"] = args.config
    try:
        return config_mod.load()
    except config_mod.ConfigError as e:
        print(f"quota-gw: bad config: {e}", file=sys.stderr)
        raise SystemExit(2) from None


def _database_url() -> str:
    url = os.environ.get("DATABASE_URL")
    if not url:
        print("quota-gw: DATABASE_URL is not set", file=sys.stderr)
        raise SystemExit(2)
    return url


def app_factory():  # noqa: ANN201 - uvicorn factory
    from .app import create_app

    return create_app(config_mod.load())


def cmd_serve(args: argparse.Namespace) -> int:
    import shutil
    import tempfile

    import uvicorn

    _config(args)
    # /metrics sums every worker process (metrics.py): they write their values into one fresh
    # folder, named before any of them imports prometheus_client.
    metrics_dir = tempfile.mkdtemp(prefix="quota-gw-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
    try:
        uvicorn.run("quota_gw.cli:app_factory", factory=True, host=args.host, port=args.port, workers=args.workers,
                    log_level=args.log_level, access_log=False, loop="uvloop", http="httptools")
    finally:
        shutil.rmtree(metrics_dir, ignore_errors=True)
    return 0


def cmd_migrate(args: argparse.Namespace) -> int:
    from . import db

    applied = asyncio.run(db.migrate_url(_database_url()))
    print("applied: " + ", ".join(applied) if applied else "up to date")
    return 0


def cmd_demo_upstream(args: argparse.Namespace) -> int:
    import uvicorn

    from .demo import create_demo_app

    app = create_demo_app(args.latency_ms, args.fail_rate, args.token_delay_ms)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, access_log=False)
    return 0


def _env_int(name: str) -> int | None:
    v = os.environ.get(name)
    return int(v) if v else None


def cmd_dev(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .dev import run

    cfg = _config(args)
    try:
        import uvloop

        runner = uvloop.run
    except ImportError:
        runner = asyncio.run
    return runner(run(cfg, args.config or os.environ.get("QUOTA_GW_CONFIG"), args.host, args.port,
                      Path(args.data_dir), args.redis_port, args.pg_port, worker=not args.no_worker))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="quota-gw", description="Redis-backed quota gateway for AI features.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, fn: Callable[[argparse.Namespace], int], help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help)
        p.set_defaults(fn=fn)
        return p

    p = command("serve", cmd_serve, "Run the gateway (decision API, proxy routes, admin).")
    p.add_argument("--config", help="config file (default: $QUOTA_GW_CONFIG)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--workers", type=int, default=1, help="server processes")
    p.add_argument("--log-level", default="info")

    command("migrate", cmd_migrate, "Apply the Postgres migrations (idempotent).")

    from sync_worker.cli import add_commands as add_sync_commands  # worker, rebuild, reconcile

    add_sync_commands(command, _config)

    p = command("demo-upstream", cmd_demo_upstream, "Run an OpenAI-compatible fake model (dev, tests, load tests).")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=9100)
    p.add_argument("--latency-ms", type=float, default=0, help="wait before each answer")
    p.add_argument("--token-delay-ms", type=float, default=0, help="pause between streamed tokens")
    p.add_argument("--fail-rate", type=float, default=0.0, help="share of calls answered 500 (0..1)")
    p.add_argument("--log-level", default="info")

    p = command("dev", cmd_dev, "Everything on one machine: Redis, Postgres (embedded unless REDIS_URL/DATABASE_URL), "
                                "migrations, a demo org and key, the demo upstream, gateway and worker.")
    p.add_argument("--config", help="config file (default: $QUOTA_GW_CONFIG)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--data-dir", default=os.environ.get("QUOTA_GW_DEV_DIR", ".quota-gw"),
                   help="where embedded Redis/Postgres keep their data between runs (default ./.quota-gw)")
    p.add_argument("--redis-port", type=int, default=_env_int("QUOTA_GW_DEV_REDIS_PORT"),
                   help="embedded Redis port (default: a free port)")
    p.add_argument("--pg-port", type=int, default=_env_int("QUOTA_GW_DEV_PG_PORT"),
                   help="embedded Postgres port (default: a free port)")
    p.add_argument("--no-worker", action="store_true", help="do not start the sync worker")

    args = parser.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    raise SystemExit(main())
