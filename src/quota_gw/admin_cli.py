"""The admin CLI: `quota-gw orgs create|list|entitlements`, `keys create|revoke`, `grant`, `worker-status`.

Each command is a call of the admin API, run in process (httpx over ASGI into the gateway's
own app): the same validation, the same Postgres-then-Redis writes, the same answers; there is
no second implementation of the rules. The API's problem becomes one line and an exit code:
422/400/413 → 2, 404/409 → 1, 503 → 3. The app's spool is an empty temporary folder, so a CLI
call never replays usage a gateway spooled. Redis and Postgres are reached first, so an
unreachable store is named with its address.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import secrets
import sys
import tempfile
from collections.abc import AsyncIterator, Callable
from typing import Any
from urllib.parse import quote

import orjson

from .cli_support import (ENV_CONFIG, ENV_DATABASE, ENV_PREFIX, ENV_REDIS, INTERNAL, PROBLEM, UNREACHABLE, USAGE,
                          Fail, database_url, reach_postgres, reach_redis, redis_url)

ENV = (ENV_CONFIG, ENV_REDIS, ENV_DATABASE, ENV_PREFIX)

ADMIN_CODES = """exit codes:
  0  done
  1  refused: the org exists already, or the org or key does not exist (the message says)
  2  usage or config error, or a value the API refuses (the message names it)
  3  Redis or Postgres unreachable, or the database does not exist
  4  unexpected error (QUOTA_GW_DEBUG=1 prints the traceback)"""

STATUS_CODES = {400: USAGE, 401: USAGE, 403: USAGE, 404: PROBLEM, 409: PROBLEM, 413: USAGE, 422: USAGE,
                503: UNREACHABLE}


@contextlib.asynccontextmanager
async def admin_api(config: Any) -> AsyncIterator[Any]:
    """An httpx client on the gateway's app, in this process, with the admin token set."""
    import httpx

    from .app import create_app

    r_url, d_url = redis_url(), database_url()
    await reach_redis(r_url)
    await (await reach_postgres(d_url)).close()
    token = os.environ.get("QUOTA_GW_ADMIN_TOKEN") or "qgw_cli_" + secrets.token_urlsafe(24)
    os.environ["QUOTA_GW_ADMIN_TOKEN"] = token
    with tempfile.TemporaryDirectory(prefix="quota-gw-cli-") as spool:
        os.environ["QUOTA_GW_SPOOL_DIR"] = spool
        app = create_app(config, r_url, d_url)
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://quota-gw",
                                         headers={"Authorization": f"Bearer {token}"}, timeout=60) as client:
                yield client


def answer(r: Any, ok: int = 200) -> Any:
    """The JSON body of a success, or Fail with the problem's detail and its exit code."""
    if r.status_code == ok:
        return r.json()
    raise Fail(answer_detail(r), STATUS_CODES.get(r.status_code, INTERNAL))


def answer_detail(r: Any) -> str:
    """A problem's detail, on one line."""
    try:
        detail = r.json().get("detail") or r.text
    except ValueError:
        detail = r.text or f"HTTP {r.status_code}"
    return " ".join(str(detail).split())[:500]


def _call(config: Any, fn: Callable[[Any], Any]) -> Any:
    async def go() -> Any:
        async with admin_api(config) as client:
            return await fn(client)

    return asyncio.run(go())


def _scopes(v: str) -> list[str]:
    scopes = [s.strip() for s in v.split(",") if s.strip()]
    if not scopes:
        raise argparse.ArgumentTypeError("a comma-separated list, e.g. consume,read")
    return scopes


def _body(source: str) -> bytes:
    """The bytes of FILE, or of stdin for `-`, sent as they are: the API's own checks judge them."""
    try:
        if source == "-":
            return sys.stdin.buffer.read()
        with open(source, "rb") as f:
            return f.read()
    except OSError as e:
        raise Fail(f"cannot read {source}: {e.strerror or e}", USAGE) from None


def _err(msg: str) -> None:
    print(msg, file=sys.stderr)


def _table(rows: list[list[str]]) -> str:
    if not rows:
        return ""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def _meters_text(org: dict[str, Any]) -> str:
    if org.get("meters") is None:
        return org.get("error") or "-"
    parts = []
    for name, m in org["meters"].items():
        if not m["available"]:
            continue
        bal = "unlimited" if m["unlimited"] else f"{m['balance']}/{m['limit']}"
        parts.append(f"{name}={bal}{' LOW' if m['low'] else ''}")
    return " ".join(parts) or "-"


def add_commands(command: Callable[..., argparse.ArgumentParser],
                 load_config: Callable[[argparse.Namespace], Any]) -> None:
    def cmd_orgs_create(args: argparse.Namespace) -> int:
        cfg = load_config(args)
        body: dict[str, Any] = {"org_id": args.org}
        if args.plan is not None:
            body["plan"] = args.plan
        if args.name is not None:
            body["name"] = args.name
        org = _call(cfg, lambda c: c.post("/v1/admin/orgs", json=body))
        org = answer(org, 201)
        print(f"created org {org['org_id']} (plan {org['plan']})")
        return 0

    def cmd_orgs_list(args: argparse.Namespace) -> int:
        cfg = load_config(args)

        async def pages(c: Any) -> list[dict[str, Any]]:
            out: list[dict[str, Any]] = []
            cursor = None
            while True:
                params = {"limit": str(min(args.limit - len(out), 1000) if args.limit else 1000)}
                if args.low:
                    params["low"] = "true"
                if cursor:
                    params["cursor"] = cursor
                page = answer(await c.get("/v1/admin/orgs", params=params))
                out += page["orgs"]
                cursor = page["next_cursor"]
                if not cursor or (args.limit and len(out) >= args.limit):
                    return out

        orgs = _call(cfg, pages)
        if args.json:
            sys.stdout.write(orjson.dumps(orgs, option=orjson.OPT_INDENT_2).decode() + "\n")
            return 0
        rows = [["ORG", "PLAN", "NAME", "CREATED", "BALANCES (balance/allocation)"]]
        rows += [[o["org_id"], o["plan"], o["name"] or "-", o["created_at"][:10], _meters_text(o)] for o in orgs]
        print(_table(rows))
        _err(f"{len(orgs)} org{'s' if len(orgs) != 1 else ''}{' with a low balance' if args.low else ''}")
        return 0

    def cmd_orgs_entitlements(args: argparse.Namespace) -> int:
        cfg = load_config(args)
        url = f"/v1/admin/orgs/{quote(args.org, safe='')}/entitlements"
        body = None if args.set is None else _body(args.set)

        async def call(c: Any) -> Any:
            if body is not None:
                return await c.put(url, content=body, headers={"Content-Type": "application/json"})
            return await (c.delete(url) if args.clear else c.get(url))

        r = _call(cfg, call)
        if r.status_code == 503 and (body is not None or args.clear):
            # Postgres is written before Redis (store.py): the change may be in Postgres only. The
            # same command again, once Redis is back, sets both.
            raise Fail(f"{answer_detail(r)}; Postgres may hold the change already: run the command again once "
                       "Redis is back", UNREACHABLE)
        sys.stdout.write(orjson.dumps(answer(r), option=orjson.OPT_INDENT_2).decode() + "\n")
        return 0

    def cmd_keys_create(args: argparse.Namespace) -> int:
        cfg = load_config(args)
        body: dict[str, Any] = {"scopes": args.scopes}
        if args.user:
            body["user_id"] = args.user
        k = answer(_call(cfg, lambda c: c.post(f"/v1/admin/orgs/{quote(args.org, safe='')}/keys", json=body)), 201)
        print(k["key"])  # stdout holds the key alone: KEY=$(quota-gw keys create ORG)
        who = f", user {k['user_id']}" if k.get("user_id") else ""
        _err(f"created key {k['key_id']} for org {k['org_id']}{who} (scopes {','.join(k['scopes'])}); "
             "it is shown once and cannot be read back: store it now")
        return 0

    def cmd_keys_revoke(args: argparse.Namespace) -> int:
        cfg = load_config(args)
        answer(_call(cfg, lambda c: c.delete(f"/v1/admin/keys/{quote(args.key_id, safe='')}")))
        print(f"revoked key {args.key_id}")
        return 0

    def cmd_grant(args: argparse.Namespace) -> int:
        cfg = load_config(args)
        body: dict[str, Any] = {"meter": args.meter, "amount": args.amount, "reason": args.reason}
        if args.idempotency_key:
            body["idempotency_key"] = args.idempotency_key
        g = answer(_call(cfg, lambda c: c.post(f"/v1/admin/orgs/{quote(args.org, safe='')}/grants", json=body)), 201)
        print(f"granted {g['amount']} {args.meter} to {args.org}: balance {g['balance']} (event {g['event_id']})")
        return 0

    def cmd_worker_status(args: argparse.Namespace) -> int:
        cfg = load_config(args)

        async def get(c: Any) -> Any:
            return answer(await c.get("/v1/admin/worker"))

        st = _call(cfg, get)
        if args.json:
            sys.stdout.write(orjson.dumps(st, option=orjson.OPT_INDENT_2).decode() + "\n")
            return 0
        rows = [["STREAM", "UNACKED", "PENDING", "OLDEST_S", "DEAD", "LAST_DELIVERED", "CONSUMERS (pending, idle s)"]]
        for s in st["streams"]:
            cons = " ".join(f"{x['name']}({x['pending']},{x['idle_s']:.0f})" for x in s["consumers"]) or (
                "-" if s["group_exists"] else "no group: no worker has run")
            age = s["oldest_unacked_age_s"]
            rows.append([s["stream"], str(s["unacked"]), str(s["pending"]), "-" if age is None else f"{age:.1f}",
                         str(s["dead_letters"]), s["last_delivered_at"] or "-", cons])
        print(_table(rows))
        t = st["totals"]
        age = t["oldest_unacked_age_s"]
        for w in st.get("workers", []):
            lb = w["last_batch"]
            last = "no batch yet" if lb is None else (f"last batch {lb['entries']} entries in {lb['seconds']:.3f}s, "
                                                      f"{lb['age_s']:.1f}s ago")
            print(f"worker {w['consumer']}: {w['inserted']} inserted, {w['duplicates']} duplicates, "
                  f"{w['dead_letters']} dead letters, {w['errors']} errors in {w['batches']} batches; {last}")
        print(f"group {st['group']}: {t['unacked']} unacked ({t['pending']} pending), oldest "
              f"{'-' if age is None else f'{age:.1f}s'}, {t['dead_letters']} dead letters, consumers: "
              f"{', '.join(t['consumers']) or 'none'}")
        return 0

    cfg_help = "config file (default: $QUOTA_GW_CONFIG)"

    orgs = command("orgs", lambda a: 0, "Create and list orgs (tenants); read or set an org's entitlements.", *ENV,
                   codes=ADMIN_CODES)
    orgs_sub = orgs.add_subparsers(dest="subcommand", required=True, metavar="SUBCOMMAND")
    p = command("create", cmd_orgs_create, "Create an org on a plan.", *ENV, codes=ADMIN_CODES, parent=orgs_sub)
    p.add_argument("org", metavar="ORG", help="org id: letters, digits, _ . - (at most 64)")
    p.add_argument("--plan", help="plan name from the config (default: the config's default_plan)")
    p.add_argument("--name", help="display name")
    p.add_argument("--config", help=cfg_help)
    p = command("list", cmd_orgs_list, "List orgs with their live balances, by org id.", *ENV, codes=ADMIN_CODES,
                parent=orgs_sub)
    p.add_argument("--low", action="store_true",
                   help="only orgs with a meter under behaviour.low_balance_percent of its allocation")
    p.add_argument("--limit", type=int, default=0, help="at most this many orgs (default: all)")
    p.add_argument("--json", action="store_true", help="the orgs as JSON (as GET /v1/admin/orgs gives them)")
    p.add_argument("--config", help=cfg_help)

    p = command("entitlements", cmd_orgs_entitlements,
                "An org's entitlements (its override of its plan's overflow, overflow_cost, credit_order and "
                "rate windows' overflow/overflow_cost) and the layers its decisions use, as JSON (as GET "
                "/v1/admin/orgs/ORG/entitlements answers). --set replaces the override, --clear removes it; "
                "every gateway uses the change within 1 s.", *ENV, codes=ADMIN_CODES, parent=orgs_sub)
    p.add_argument("org", metavar="ORG")
    change = p.add_mutually_exclusive_group()
    change.add_argument("--set", metavar="FILE", help="replace the override with the JSON object in FILE (- for "
                        "stdin), as PUT takes it: only what differs from the plan; {} removes it")
    change.add_argument("--clear", action="store_true", help="remove the override: the plan's layers again")
    p.add_argument("--config", help=cfg_help)

    keys = command("keys", lambda a: 0, "Create and revoke API keys.", *ENV, codes=ADMIN_CODES)
    keys_sub = keys.add_subparsers(dest="subcommand", required=True, metavar="SUBCOMMAND")
    p = command("create", cmd_keys_create, "Create an API key for an org; prints the key (once) on stdout.", *ENV,
                codes=ADMIN_CODES, parent=keys_sub)
    p.add_argument("org", metavar="ORG")
    p.add_argument("--user", help="bind the key to this user of the org (default: an org key)")
    p.add_argument("--scopes", type=_scopes, default=["consume", "read"],
                   help="comma-separated: consume, read (default consume,read)")
    p.add_argument("--config", help=cfg_help)
    p = command("revoke", cmd_keys_revoke, "Revoke an API key by its id (key_id, not the key).", *ENV,
                codes=ADMIN_CODES, parent=keys_sub)
    p.add_argument("key_id", metavar="KEY_ID")
    p.add_argument("--config", help=cfg_help)

    p = command("grant", cmd_grant, "Add credit to an org's meter (a `grant` event in the ledger).", *ENV,
                codes=ADMIN_CODES)
    p.add_argument("org", metavar="ORG")
    p.add_argument("meter", metavar="METER", help="a meter of the config")
    p.add_argument("amount", metavar="AMOUNT", type=int, help="tokens to add (a positive integer)")
    p.add_argument("--reason", required=True, help="why (kept in the ledger's metadata; at most 500 characters)")
    p.add_argument("--idempotency-key", help="a retry with the same key grants once")
    p.add_argument("--config", help=cfg_help)

    p = command("worker-status", cmd_worker_status, "The sync worker's progress per shard stream: entries not yet "
                                                    "acked, the oldest one's age, dead letters, consumers.", *ENV,
                codes=ADMIN_CODES)
    p.add_argument("--json", action="store_true", help="as GET /v1/admin/worker gives it")
    p.add_argument("--config", help=cfg_help)
