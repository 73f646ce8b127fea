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
    import uvicorn

    _config(args)
    uvicorn.run("quota_gw.cli:app_factory", factory=True, host=args.host, port=args.port, workers=args.workers,
                log_level=args.log_level, access_log=False, loop="uvloop", http="httptools")
    return 0


def cmd_migrate(args: argparse.Namespace) -> int:
    from . import db

    async def run() -> list[str]:
        import asyncpg

        conn = await asyncpg.connect(_database_url())
        try:
            return await db.migrate(conn)
        finally:
            await conn.close()

    applied = asyncio.run(run())
    print("applied: " + ", ".join(applied) if applied else "up to date")
    return 0


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

    args = parser.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    raise SystemExit(main())
