"""`quota-gw` commands (SPEC §6).

Every command fails with one line on stderr and a documented exit code (cli_support.py); the
`--help` of each names the environment variables it reads.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Callable, Coroutine
from typing import Any

from . import config as config_mod
from .cli_support import (ENV_ADMIN, ENV_CONFIG, ENV_DATABASE, ENV_PREFIX, ENV_REDIS, EXIT_CODES, UNREACHABLE,
                          USAGE, Fail, createdb_command, database_name, database_url, epilog, postgres_failure,
                          run, where)


class Parser(argparse.ArgumentParser):
    """argparse, with a usage error as one line (what is wrong, where to look) and exit 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        print(f"{self.prog}: {message}; see `{self.prog} --help`", file=sys.stderr)
        raise SystemExit(USAGE)

# uvicorn's httptools protocol with the request head bounded (431 past behaviour.max_header_bytes
# or behaviour.max_headers; see limits.py).
HTTP_PROTOCOL = "quota_gw.limits:BoundedHttpToolsProtocol"


def _config(args: argparse.Namespace) -> config_mod.Config:
    """Loads and validates the config, or fails (exit 2) with the file, key and reason."""
    if getattr(args, "config", None):
        os.environ["QUOTA_GW_CONFIG"] = args.config
    try:
        return config_mod.load()
    except config_mod.ConfigError as e:
        raise Fail(f"bad config: {e.message}" if e.file == "<none>" else f"bad config: {e}", USAGE) from None


def _route_env(cfg: config_mod.Config) -> None:
    """Route headers' ${ENV} are read when the gateway starts: a missing one stops it here, in one line."""
    try:
        config_mod.resolve_route_headers(cfg)
    except config_mod.ConfigError as e:
        raise Fail(f"bad config: {e}", USAGE) from None


def app_factory():
    from .app import create_app

    return create_app(config_mod.load())


def cmd_serve(args: argparse.Namespace) -> int:
    import shutil
    import tempfile

    import uvicorn

    if args.authorize_port is not None and not (1 <= args.authorize_port <= 65535 and args.authorize_port != args.port):
        raise Fail(f"--authorize-port {args.authorize_port}: a port 1..65535 other than --port", USAGE)
    _route_env(_config(args))
    # /metrics sums every worker process (metrics.py): they write their values into one fresh
    # folder, named before any of them imports prometheus_client.
    metrics_dir = tempfile.mkdtemp(prefix="quota-gw-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
    os.environ["QUOTA_GW_TIMEOUT_KEEP_ALIVE"] = str(args.timeout_keep_alive)  # the authorize listener's too
    os.environ["QUOTA_GW_WORKERS"] = str(args.workers)
    if args.authorize_port is not None:
        host = f"[{args.host}]" if ":" in args.host else args.host
        os.environ["QUOTA_GW_AUTHORIZE_LISTEN"] = f"{host}:{args.authorize_port}"
    try:
        uvicorn.run("quota_gw.cli:app_factory", factory=True, host=args.host, port=args.port, workers=args.workers,
                    log_level=args.log_level, access_log=False, loop="uvloop", http=HTTP_PROTOCOL,
                    timeout_keep_alive=args.timeout_keep_alive)
    finally:
        shutil.rmtree(metrics_dir, ignore_errors=True)
    return 0


async def _ensure_database(url: str) -> None:
    """Creates the database when it is missing and the login may; else says the exact command."""
    import asyncpg

    from . import db

    name = database_name(url)
    try:
        created = await db.ensure_database(url)
    except asyncpg.InsufficientPrivilegeError:
        raise Fail(f"database {name!r} does not exist on {where(url)} and this login may not create it; run "
                   f"`{createdb_command(url, as_owner=True)}` as a user who may create databases, then `quota-gw migrate` again", UNREACHABLE) from None
    except asyncpg.InvalidCatalogNameError:  # no `postgres` maintenance database to connect to
        raise Fail(f"database {name!r} does not exist on {where(url)}; run `{createdb_command(url)}`, then "
                   "`quota-gw migrate` again", UNREACHABLE) from None
    except Exception as e:
        f = postgres_failure(e, url)
        if f is None:
            raise
        raise f from None
    if created:
        print(f"created database {name!r} on {where(url)}")


def cmd_migrate(args: argparse.Namespace) -> int:
    from . import db

    url = database_url()

    async def migrate() -> list[str]:
        await _ensure_database(url)
        return await db.migrate_url(url)

    applied = asyncio.run(migrate())
    print("applied: " + ", ".join(applied) if applied else "up to date")
    return 0


def cmd_notifier(args: argparse.Namespace) -> int:
    from . import notifier

    cfg = _config(args)
    dsn = database_url()
    try:
        asyncio.run(notifier.run(dsn, cfg, args.interval))
    except KeyboardInterrupt:
        return 0
    return 0


def cmd_demo_upstream(args: argparse.Namespace) -> int:
    import uvicorn

    from .demo import create_demo_app

    app = create_demo_app(args.latency_ms, args.fail_rate, args.token_delay_ms,
                          require_key=args.require_key or os.environ.get("QUOTA_GW_DEMO_KEY"))
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, access_log=False)
    return 0


def _env_int(name: str) -> int | None:
    v = os.environ.get(name)
    if not v:
        return None
    if not (v.isascii() and v.isdigit()):
        print(f"quota-gw: {name} must be a port number, not {v!r}", file=sys.stderr)
        raise SystemExit(USAGE)
    return int(v)


def cmd_dev(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .dev import run as run_dev
    from .embedded import DevExtraMissing

    cfg = _config(args)
    _route_env(cfg)
    runner: Callable[[Coroutine[Any, Any, int]], int]
    try:
        import uvloop

        runner = uvloop.run
    except ImportError:
        runner = asyncio.run
    try:
        return runner(run_dev(cfg, args.config or os.environ.get("QUOTA_GW_CONFIG"), args.host, args.port,
                              Path(args.data_dir), args.redis_port, args.pg_port, worker=not args.no_worker,
                              authorize_port=args.authorize_port))
    except DevExtraMissing as e:  # no dev extra and no REDIS_URL/DATABASE_URL: one line, exit 2
        print(f"quota-gw dev: {e}", file=sys.stderr)
        return 2


SERVE_CODES = """exit codes:
  0  stopped; stopped by SIGTERM or Ctrl-C, it shuts down gracefully, then exits as that signal
     (143 or 130 in a shell), as servers do
  2  usage or config error
  3  the server could not start (e.g. the port is in use: uvicorn's ERROR line says why)
  4  unexpected error (QUOTA_GW_DEBUG=1 prints the traceback)

Redis or Postgres down does not stop the gateway from starting: calls answer 503 with
Retry-After until the store is back, and /readyz says which store is down."""


def main(argv: list[str] | None = None) -> int:
    parser = Parser(prog="quota-gw", description="Redis-backed quota gateway for AI features.",
                    formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EXIT_CODES)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, fn: Callable[[argparse.Namespace], int], help: str, *env: str,
                codes: str = EXIT_CODES, parent: argparse._SubParsersAction | None = None) -> argparse.ArgumentParser:
        p = (parent or sub).add_parser(name, help=help, description=help, epilog=epilog(*env, codes=codes),
                                       formatter_class=argparse.RawDescriptionHelpFormatter)
        p.set_defaults(fn=fn)
        return p

    p = command("serve", cmd_serve, "Run the gateway (decision API, proxy routes, admin).", ENV_CONFIG, ENV_REDIS,
                "  DATABASE_URL          Postgres of the admin, usage and analytics routes (unset: they answer 503)",
                ENV_PREFIX, ENV_ADMIN,
                "  QUOTA_GW_SPOOL_DIR    where fail-open routes spool usage while Redis is down "
                "(default: behaviour.spool_dir)",
                "  QUOTA_GW_AUTHORIZE_LISTEN  HOST:PORT of the /v1/authorize listener (what --authorize-port sets)",
                codes=SERVE_CODES)
    p.add_argument("--config", help="config file (default: $QUOTA_GW_CONFIG)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1, this machine only; 0.0.0.0 for every interface, "
                        "e.g. in a container)")
    p.add_argument("--port", type=int, default=8080, help="TCP port to listen on (default 8080)")
    p.add_argument("--workers", type=int, default=1, help="server processes sharing the port (default 1)")
    p.add_argument("--log-level", default="info", help="critical, error, warning, info (default) or debug")
    p.add_argument("--timeout-keep-alive", type=int, default=75, metavar="SECONDS",
                   help="close idle client connections after this long (default 75: longer than the 60 s "
                        "proxies such as nginx keep idle upstream connections, so they never reuse one "
                        "the gateway is closing); on --authorize-port too")
    p.add_argument("--authorize-port", type=int, metavar="PORT",
                   help="also answer GET/HEAD /v1/authorize (nginx auth_request) on this port, on --host, with "
                        "a minimal HTTP/1.1 server in each worker: the same answers for less CPU a call "
                        "(default: none; the main port answers it either way)")

    command("migrate", cmd_migrate, "Apply the Postgres migrations (idempotent). Creates the database first when "
                                    "it does not exist and the login may.", ENV_DATABASE)

    from sync_worker.cli import add_commands as add_sync_commands  # worker, rebuild, reconcile

    add_sync_commands(command, _config)

    from .admin_cli import add_commands as add_admin_commands  # orgs, keys, grant, worker-status

    add_admin_commands(command, _config)

    p = command("notifier", cmd_notifier, "Deliver low-balance alerts to the orgs' webhooks (signed, retried "
                "until a 2xx; several may run).", ENV_CONFIG, ENV_DATABASE)
    p.add_argument("--config", help="config file (default: $QUOTA_GW_CONFIG)")
    p.add_argument("--interval", type=float, default=1.0, help="seconds between polls of the ledger (default 1)")

    p = command("demo-upstream", cmd_demo_upstream, "Run an OpenAI-compatible fake model (dev, tests, load tests).")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=9100, help="TCP port (default 9100, the example config's upstream)")
    p.add_argument("--latency-ms", type=float, default=0, help="wait before each answer")
    p.add_argument("--token-delay-ms", type=float, default=0, help="pause between streamed tokens")
    p.add_argument("--fail-rate", type=float, default=0.0, help="share of calls answered 500 (0..1)")
    p.add_argument("--require-key", metavar="KEY", help="answer 401 (OpenAI's shape) to calls without "
                   "Authorization: Bearer KEY, like a real provider (default: $QUOTA_GW_DEMO_KEY; none: no key needed)")
    p.add_argument("--log-level", default="info")

    p = command("dev", cmd_dev, "Everything on one machine: Redis, Postgres (embedded unless REDIS_URL/DATABASE_URL), "
                                "migrations, a demo org and key, the demo upstream, gateway and worker.",
                ENV_CONFIG,
                "  REDIS_URL             use this Redis (default: an embedded one in --data-dir)",
                "  DATABASE_URL          use this Postgres database (default: an embedded one in --data-dir)",
                "  QUOTA_GW_ADMIN_TOKEN  admin token (default: one made once and kept in --data-dir/admin-token)",
                "  QUOTA_GW_DEV_DIR, QUOTA_GW_DEV_REDIS_PORT, QUOTA_GW_DEV_PG_PORT  defaults of the options below")
    p.add_argument("--config", help="config file (default: $QUOTA_GW_CONFIG)")
    p.add_argument("--host", default="127.0.0.1", help="gateway address (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8080, help="gateway port (default 8080)")
    p.add_argument("--data-dir", default=os.environ.get("QUOTA_GW_DEV_DIR", ".quota-gw"),
                   help="where embedded Redis/Postgres keep their data between runs (default ./.quota-gw)")
    p.add_argument("--redis-port", type=int, default=_env_int("QUOTA_GW_DEV_REDIS_PORT"),
                   help="embedded Redis port (default: a free port)")
    p.add_argument("--pg-port", type=int, default=_env_int("QUOTA_GW_DEV_PG_PORT"),
                   help="embedded Postgres port (default: a free port)")
    p.add_argument("--no-worker", action="store_true", help="do not start the sync worker")
    p.add_argument("--authorize-port", type=int, default=None,
                   help="also answer /v1/authorize alone on this port, for nginx auth_request "
                        "(examples/nginx.conf asks 8081; `make dev` passes it)")

    args = parser.parse_args(argv)
    name = " ".join(x for x in (args.command, getattr(args, "subcommand", None)) if x)
    return run(name, lambda: args.fn(args))


if __name__ == "__main__":
    raise SystemExit(main())
