"""How `quota-gw` commands fail: one line on stderr saying what is wrong and what to do, and an
exit code an alert or a script can act on, never a traceback.

    0  done (reconcile: no drift)
    1  the command ran and found a problem or was refused (reconcile: drift; an org that exists,
       a key or org that does not)
    2  usage or config error (bad argument, bad config file, missing environment variable)
    3  a store is unreachable or not ready (Redis, Postgres, the database does not exist)
    4  an unexpected error (a bug); QUOTA_GW_DEBUG=1 prints the traceback

Stores are reached once, up front, by `reach_redis` / `reach_postgres`, so the line names the
store, its address and the variable that configures it; an outage in the middle of a command
is caught by `run` and reported the same way.
"""

from __future__ import annotations

import asyncio
import os
import sys
import traceback
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

OK, PROBLEM, USAGE, UNREACHABLE, INTERNAL = 0, 1, 2, 3, 4

EXIT_CODES = """exit codes:
  0  done
  1  the command ran and found a problem or was refused (see the message)
  2  usage or config error (bad argument, bad config, missing environment variable)
  3  Redis or Postgres unreachable, or the database does not exist
  4  unexpected error (QUOTA_GW_DEBUG=1 prints the traceback)"""

ENV_REDIS = "  REDIS_URL             Redis to use (default redis://127.0.0.1:6379/0)"
ENV_DATABASE = "  DATABASE_URL          Postgres database (required), e.g. postgresql://user@host:5432/quota_gw"
ENV_CONFIG = "  QUOTA_GW_CONFIG       config file when --config is not given (required)"
ENV_PREFIX = "  QUOTA_GW_PREFIX       Redis key prefix (default qgw); every process of one deployment uses the same"
ENV_ADMIN = "  QUOTA_GW_ADMIN_TOKEN  bearer token of the /v1/admin routes (unset: the admin API answers 403)"
ENV_DEBUG = "  QUOTA_GW_DEBUG        1: print the traceback of an unexpected error"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"


def epilog(*env: str, codes: str = EXIT_CODES) -> str:
    lines = ["environment:", *env, ENV_DEBUG, "", codes] if env else [codes]
    return "\n".join(lines)


class Fail(Exception):
    """A command's one-line failure and its exit code."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.message, self.code = message, code


def where(url: str) -> str:
    """host:port/db of a URL, without the password."""
    try:
        u = urlsplit(url)
        host = u.hostname or "localhost"
        return f"{host}:{u.port}" if u.port else host
    except ValueError:
        return "?"


def database_name(url: str) -> str:
    return urlsplit(url).path.lstrip("/") or (urlsplit(url).username or "postgres")


def redis_url() -> str:
    return os.environ.get("REDIS_URL") or DEFAULT_REDIS_URL


def database_url() -> str:
    url = os.environ.get("DATABASE_URL")
    if not url:
        raise Fail("DATABASE_URL is not set; set it to the Postgres database, e.g. "
                   "DATABASE_URL=postgresql://postgres@127.0.0.1:5432/quota_gw", USAGE)
    if not url.startswith(("postgres://", "postgresql://")):
        raise Fail(f"DATABASE_URL must start with postgresql://, not {url.split(':', 1)[0]!r}", USAGE)
    return url


def _reason(e: BaseException) -> str:
    msg = " ".join(str(e).split()).rstrip(".") or type(e).__name__
    return msg[:300]


def postgres_failure(e: BaseException, url: str) -> Fail | None:
    """The one line for an error from reaching or using Postgres, or None if it is not one."""
    import asyncpg

    name = database_name(url)
    if isinstance(e, asyncpg.InvalidCatalogNameError):
        return Fail(f"database {name!r} does not exist on {where(url)}; run `quota-gw migrate` (it creates it) "
                    f"or `{createdb_command(url)}`", UNREACHABLE)
    if isinstance(e, (asyncpg.InvalidPasswordError, asyncpg.InvalidAuthorizationSpecificationError)):
        return Fail(f"Postgres at {where(url)} refused the login: {_reason(e)}; check the user and password "
                    "in DATABASE_URL", UNREACHABLE)
    if isinstance(e, (OSError, asyncio.TimeoutError, asyncpg.PostgresConnectionError,
                      asyncpg.CannotConnectNowError, asyncpg.TooManyConnectionsError,
                      asyncpg.exceptions.ConnectionDoesNotExistError)):
        return Fail(f"cannot reach Postgres at {where(url)} (DATABASE_URL): {_reason(e)}; start it or fix "
                    "DATABASE_URL", UNREACHABLE)
    return None


def redis_failure(e: BaseException, url: str) -> Fail | None:
    from redis.exceptions import AuthenticationError, ConnectionError, TimeoutError

    if isinstance(e, AuthenticationError):
        return Fail(f"Redis at {where(url)} refused the login: {_reason(e)}; check REDIS_URL", UNREACHABLE)
    if isinstance(e, (ConnectionError, TimeoutError)):
        return Fail(f"cannot reach Redis at {where(url)} (REDIS_URL): {_reason(e)}; start it or fix REDIS_URL",
                    UNREACHABLE)
    return None


def createdb_command(url: str, as_owner: bool = False) -> str:
    """The `createdb` that makes the database of `url`: as its user, or (as_owner) run by
    someone who may create databases, owned by the URL's user."""
    u = urlsplit(url)
    parts = ["createdb"]
    if u.hostname:
        parts += ["-h", u.hostname]
    if u.port:
        parts += ["-p", str(u.port)]
    if u.username:
        parts += ["-O" if as_owner else "-U", u.username]
    return " ".join([*parts, database_name(url)])


async def reach_postgres(url: str, timeout: float = 10) -> Any:
    """An open asyncpg connection, or Fail with what is wrong (exit 3)."""
    import asyncpg

    try:
        return await asyncpg.connect(url, timeout=timeout)
    except Exception as e:
        f = postgres_failure(e, url)
        if f is None:
            raise
        raise f from None


async def reach_redis(url: str, timeout: float = 5) -> None:
    """Pings Redis once, or Fail with what is wrong (exit 3)."""
    import redis.asyncio as aioredis

    from .cluster import plain_url

    try:
        r = aioredis.from_url(plain_url(url), socket_connect_timeout=timeout, socket_timeout=timeout)
    except ValueError as e:
        raise Fail(f"REDIS_URL is not a Redis URL: {e}", USAGE) from None
    try:
        await r.ping()
    except Exception as e:
        f = redis_failure(e, url)
        if f is None:
            raise
        raise f from None
    finally:
        await r.aclose()


def run(name: str, fn: Callable[[], int]) -> int:
    """Runs a command; turns every failure into one line `quota-gw NAME: ...` and its exit code."""
    try:
        return fn()
    except Fail as f:
        print(f"quota-gw {name}: {f.message}", file=sys.stderr)
        return f.code
    except KeyboardInterrupt:
        return 130
    except SystemExit:
        raise
    except BaseException as e:  # noqa: BLE001 - the command's last word
        failure = None
        if "DATABASE_URL" in os.environ:
            failure = postgres_failure(e, os.environ["DATABASE_URL"])
        failure = failure or redis_failure(e, redis_url())
        if failure is not None:
            print(f"quota-gw {name}: {failure.message}", file=sys.stderr)
            return failure.code
        if os.environ.get("QUOTA_GW_DEBUG") == "1":
            traceback.print_exc()
        print(f"quota-gw {name}: unexpected error: {type(e).__name__}: {_reason(e)} "
              "(QUOTA_GW_DEBUG=1 prints the traceback; please report it)", file=sys.stderr)
        return INTERNAL
