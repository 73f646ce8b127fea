"""Property-based fuzz run of the whole API with schemathesis, against a live gateway: a real
`quota-gw serve` (uvicorn) on 127.0.0.1, on real Redis and Postgres, driven from the OpenAPI
document it serves. For every generated request (valid and invalid, per the document):

- no 5xx, and the response conforms to the document (status, content type, headers, schema);
- every 4xx is application/problem+json with status, title, detail and code;
- no state change on a 4xx: the fuzz org's balances, sub-quotas, users and reservations in
  Redis, its event stream (a refusal adds one `denied` event with delta 0, nothing else) and
  the admin tables in Postgres are what they were before the request.

Purchases run for real: the `stripe` SDK talks to the local stand-in for Stripe's servers
(tests/stripe_support.py). The Stripe webhook's secret is set, so every fuzzed (unsigned) event
is the 400 that is its contract.

Bounded: QUOTA_GW_FUZZ_EXAMPLES random examples per operation (default 20, valid and invalid)
with a fixed seed (QUOTA_GW_FUZZ_SEED; `random` for a new one each run), so `make test` stays
reproducible; QUOTA_GW_FUZZ_COVERAGE=1 adds schemathesis' coverage phase (every boundary and
every way to break each field, ~1000 more cases). The counts are printed at the end.
Nothing is tolerated: every failure is a defect of the gateway or of the document."""

from __future__ import annotations

import asyncio
import os
import re
import secrets
import subprocess
import sys
import threading
import time
import zlib
from collections import Counter
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
import redis
import requests
import schemathesis
import yaml
from hypothesis import HealthCheck, settings

from conftest import ADMIN_TOKEN, RUN, test_config_data
from quota_gw import config as config_mod
from quota_gw import db, openapi
from quota_gw.config import NAME_RE
from quota_gw.embedded import free_port
from quota_gw.layout import Layout
from quota_gw.events import entries
from stripe_support import FakeStripeAPI

EXAMPLES = int(os.environ.get("QUOTA_GW_FUZZ_EXAMPLES", "20"))
SEED = os.environ.get("QUOTA_GW_FUZZ_SEED", "20261130")
if SEED == "random":  # a new seed, printed so a failing run can be repeated with it
    SEED = str(secrets.randbelow(2**31))
    print(f"openapi fuzz: QUOTA_GW_FUZZ_SEED={SEED}")
COVERAGE = os.environ.get("QUOTA_GW_FUZZ_COVERAGE") == "1"
STRIPE_KEY_ENV, STRIPE_HOOK_ENV = "QGW_FUZZ_STRIPE_SECRET_KEY", "QGW_FUZZ_STRIPE_WEBHOOK_SECRET"
UUID_RE = r"[0-9a-fA-F]{32}|[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}"
PROBLEM_FIELDS = ("type", "title", "status", "detail", "code")
STATS: Counter[str] = Counter()
OPERATIONS: set[str] = set()


class Pg:
    """A Postgres connection usable from sync tests (schemathesis calls them synchronously)."""

    def __init__(self, url: str) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.conn: asyncpg.Connection = self.run(asyncpg.connect(url))

    def run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(30)

    def close(self) -> None:
        self.run(self.conn.close())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


async def _create_db(admin_url: str, name: str) -> str:
    conn = await asyncpg.connect(admin_url)
    await conn.execute(f'CREATE DATABASE "{name}"')
    await conn.close()
    url = admin_url.rsplit("/", 1)[0] + "/" + name
    await db.migrate_url(url)
    return url


async def _drop_db(admin_url: str, name: str) -> None:
    conn = await asyncpg.connect(admin_url)
    await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    await conn.close()


class Live:
    """The gateway under test and what the checks read behind its back."""

    def __init__(self, base: str, prefix: str, redis_url: str, pg: Pg, config_data: dict[str, Any]) -> None:
        self.base, self.pg = base, pg
        self.r = redis.Redis.from_url(redis_url, decode_responses=True)
        self.layout = Layout(prefix, config_data["shards"])
        self.admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
        self.org = f"fuzz-{RUN}"
        self.http = httpx.Client(base_url=base, timeout=30)
        self.session = requests.Session()  # keep-alive for the fuzzer's calls

    def setup(self) -> None:
        def ok(r: httpx.Response) -> dict[str, Any]:
            assert r.status_code in (200, 201), r.text
            return r.json()

        ok(self.http.post("/v1/admin/orgs", json={"org_id": self.org, "plan": "fuzz"}, headers=self.admin))
        key = ok(self.http.post(f"/v1/admin/orgs/{self.org}/keys", json={"scopes": ["consume", "read"]},
                                headers=self.admin))["key"]
        self.key = {"Authorization": f"Bearer {key}"}
        # A key the fuzzer may revoke (DELETE /v1/admin/keys/{key_id}); never the one it uses.
        self.spare_key_id = ok(self.http.post(f"/v1/admin/orgs/{self.org}/keys", json={"scopes": ["read"]},
                                              headers=self.admin))["key_id"]
        ok(self.http.post(f"/v1/admin/orgs/{self.org}/users", json={"user_id": "u1", "team": "t1"}, headers=self.admin))
        self.reservations = [ok(self.http.post("/v1/reservations", json={"feature": "chat", "units": 10, "ttl_s": 3600},
                                               headers=self.key))["reservation_id"] for _ in range(4)]
        self.events = [ok(self.http.post("/v1/consume", json={"feature": "generate_insight"},
                                         headers=self.key))["event_id"] for _ in range(4)]

    def state(self, admin: bool) -> tuple[Any, ...]:
        """What a refused or invalid request must leave as it was."""
        L, org = self.layout, self.org
        with self.r.pipeline(transaction=False) as p:
            p.hgetall(L.balances(org))  # with the org's users in it
            p.hgetall(L.quotas(org))
            p.hgetall(L.reservations(org))
            p.zrange(L.expiries(org), 0, -1, withscores=True)
            p.hgetall(L.org(org))
            p.xrevrange(L.stream(org), count=1)
            redis_state = p.execute()
        last = redis_state.pop()
        if not admin:  # only the admin routes write Postgres
            return redis_state, None, last[0][0] if last else "0-0"
        tables = self.pg.run(self.pg.conn.fetchval(
            """SELECT md5(concat_ws('|',
                 (SELECT string_agg(o::text, ',' ORDER BY org_id) FROM orgs o),
                 (SELECT string_agg(u::text, ',' ORDER BY org_id, user_id) FROM users u),
                 (SELECT string_agg(k::text, ',' ORDER BY key_id) FROM api_keys k),
                 (SELECT string_agg(q::text, ',' ORDER BY org_id, meter, scope, subject) FROM sub_quotas q),
                 (SELECT string_agg(w::text, ',' ORDER BY org_id) FROM org_webhooks w)))"""))
        return redis_state, tables, last[0][0] if last else "0-0"

    def new_events(self, after: str) -> list[dict[str, str]]:
        return [f for f in entries(self.r.xrange(self.layout.stream(self.org), min=f"({after}"))]


def fuzz_config_data() -> dict[str, Any]:
    data = test_config_data()
    # No rate limits (a 429 would end most runs early) and room for every feature.
    data["plans"]["fuzz"] = {"allocations": {m: 10**9 for m in data["meters"]}}
    # authorize needs routes to decide for; nothing is ever forwarded to the upstream.
    data["routes"] = [
        {"prefix": "/ai/goals", "upstream": "http://127.0.0.1:9", "feature": "generate_goal"},
        {"prefix": "/llm/chat", "upstream": "http://127.0.0.1:9", "feature": "chat", "metering": "openai"},
        {"prefix": "/plain", "upstream": "http://127.0.0.1:9", "metering": "none"},
    ]
    # Purchases through the stand-in Stripe (its address is the live fixture's: api_base).
    data["stripe"] = {"secret_key_env": STRIPE_KEY_ENV, "webhook_secret_env": STRIPE_HOOK_ENV,
                      "success_url": "https://app.example/bought", "cancel_url": "https://app.example/pricing"}
    return data


@pytest.fixture(scope="module")
def live(servers: tuple[str, str], tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Any:
    redis_url, pg_admin = servers
    name = f"qgw_fuzz_{RUN}"
    database_url = asyncio.run(_create_db(pg_admin, name))
    prefix = f"qgwfz{RUN}"
    data = fuzz_config_data()
    pg = Pg(database_url)
    fake_stripe = FakeStripeAPI()
    data["stripe"]["api_base"] = pg.run(fake_stripe.start())
    cfg = tmp_path_factory.mktemp("fuzz") / "gw.yaml"
    cfg.write_text(yaml.safe_dump(data))
    port = free_port()
    env = {**os.environ, "REDIS_URL": redis_url, "DATABASE_URL": database_url, "QUOTA_GW_PREFIX": prefix,
           "QUOTA_GW_ADMIN_TOKEN": ADMIN_TOKEN, "QUOTA_GW_SPOOL_DIR": str(cfg.parent / "spool"),
           STRIPE_KEY_ENV: "sk_test_fuzz", STRIPE_HOOK_ENV: "whsec_fuzz_" + RUN}
    proc = subprocess.Popen([sys.executable, "-m", "quota_gw.cli", "serve", "--config", str(cfg), "--host", "127.0.0.1",
                             "--port", str(port), "--log-level", "warning"], env=env)
    base = f"http://127.0.0.1:{port}"
    gw = Live(base, prefix, redis_url, pg, data)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None, "serve exited"
            assert time.monotonic() < deadline, "serve did not become ready"
            time.sleep(0.1)
        assert httpx.get(f"{base}/openapi.json").json() == DOCUMENT
        gw.setup()
        yield gw
    finally:
        proc.terminate()
        proc.wait(timeout=20)
        gw.http.close()
        gw.session.close()
        pg.run(fake_stripe.stop())
        pg.close()
        for k in gw.r.scan_iter(match=f"{prefix}:*", count=1000):
            gw.r.delete(k)
        gw.r.close()
        asyncio.run(_drop_db(pg_admin, name))
        summary = f"openapi fuzz: operations={len(OPERATIONS)}, " + ", ".join(f"{k}={v}" for k, v in sorted(STATS.items()))
        Path(os.environ.get("QUOTA_GW_FUZZ_SUMMARY", "/dev/null")).write_text(summary + "\n")
        reporter = request.config.pluginmanager.get_plugin("terminalreporter")
        capture = request.config.pluginmanager.get_plugin("capturemanager")
        if reporter is not None and capture is not None:
            with capture.global_and_fixture_disabled():
                reporter.write_line("\n" + summary)


# The document the gateway under test serves (the live fixture checks it is), loaded when the
# module is: schemathesis' pytest integration makes one test per operation at collection.
DOCUMENT = openapi.for_config(config_mod.parse(fuzz_config_data()))

schema = schemathesis.openapi.from_dict(DOCUMENT, config=schemathesis.Config.from_dict({
    "seed": int(SEED),
    "generation": {"max-examples": EXAMPLES, "mode": "all"},
    # The coverage phase (every boundary and every way to break each field, ~1000 cases, about
    # two minutes here) runs when asked for; `make test` runs the random phase.
    "phases": {"stateful": {"enabled": False},
               "coverage": {"enabled": COVERAGE, "unexpected-methods": ["patch"]}},
    "checks": {
        # A valid request may still be refused for what it asks: no balance (402) for units a
        # meter cannot pay; the document cannot know balances.
        "positive_data_acceptance": {"expected-statuses": ["2xx", "401", "402", "403", "404", "409", "429"]},
    },
    "request-timeout": 30,
}))


def refused_for_what_no_schema_says(case: schemathesis.Case, problem: dict[str, Any]) -> bool:
    """422s for valid-looking data that are the contract but no JSON Schema can state: an
    idempotency key an earlier example used for another request, metadata over its byte size
    or with a NUL inside, a usage cursor this API did not return (opaque), `since` not before
    `until` (a relation between two parameters), an orgs-list cursor this API did not return, a
    grant's `expires_at` already past (a relation to the clock)."""
    if "idempotency key reused" in problem.get("detail", ""):
        return True
    if problem.get("field") == "metadata":  # over 4096 bytes of JSON, or a NUL somewhere in it
        return True
    if case.operation.label == "GET /v1/admin/orgs" and problem.get("field") == "cursor":
        return True
    if case.operation.label == "POST /v1/purchases" and problem.get("field") == "pack":
        return True  # a name that is not one of the config's packs (the document does not list them)
    if case.operation.label == "POST /v1/admin/orgs/{org_id}/grants" and problem.get("field") == "expires_at":
        return "in the future" in problem.get("detail", "")  # a time already past (a relation to now)
    return case.operation.label == "GET /v1/usage" and problem.get("field") in ("cursor", "since")


def unsigned_event_refused(case: schemathesis.Case, status: int, problem: dict[str, Any]) -> bool:
    """The Stripe webhook's contract: an event not signed with the endpoint secret (the fuzzer
    cannot sign) is 400, however valid its shape."""
    return (case.operation.label == "POST /v1/webhooks/stripe" and status == 400
            and problem.get("field") == "Stripe-Signature")


def pick(value: Any, choices: list[str], valid: str = r".*") -> Any:
    """A real id for about half of the generated ones that are valid (an invalid one is the
    point of a negative case). Deterministic, so hypothesis replays and shrinks it."""
    if not isinstance(value, str) or not re.fullmatch(valid, value):
        return value
    h = zlib.crc32(value.encode())
    return choices[h % len(choices)] if h % 2 else value


def credentials(case: schemathesis.Case, live: Live) -> dict[str, str]:
    """The real key or token in place of the generated one, unless the case is about its
    absence (a negative case without a Bearer header expects the 401)."""
    if not case.operation.definition.raw.get("security", case.operation.schema.raw_schema.get("security")):
        return {}
    generated = (case.headers or {}).get("Authorization")
    negative = case.meta is not None and case.meta.generation.mode.is_negative
    if negative and not (isinstance(generated, str) and generated.startswith("Bearer ")):
        return {}
    return live.admin if case.path.startswith("/v1/admin/") else live.key


@schema.parametrize()
@settings(deadline=None, suppress_health_check=list(HealthCheck), print_blob=True)
def test_fuzzed_requests_get_documented_answers_and_refusals_change_nothing(case: schemathesis.Case,
                                                                           live: Live) -> None:
    pp = case.path_parameters or {}
    if "org_id" in pp:
        pp["org_id"] = pick(pp["org_id"], [live.org], NAME_RE[1:-1])
    if "rid" in pp:
        pp["rid"] = pick(pp["rid"], live.reservations, UUID_RE)
    if "key_id" in pp:
        pp["key_id"] = pick(pp["key_id"], [live.spare_key_id])
    body = case.body if isinstance(case.body, dict) else {}
    if case.operation.label == "POST /v1/refunds" and "event_id" in body:
        body["event_id"] = pick(body["event_id"], live.events, UUID_RE)
    if case.operation.label == "POST /v1/purchases" and "pack" in body:
        body["pack"] = pick(body["pack"], sorted(fuzz_config_data()["packs"]), NAME_RE[1:-1])
    if case.operation.label == "POST /v1/reservations":
        ttl = body.get("ttl_s")
        if isinstance(ttl, int) and not isinstance(ttl, bool) and 1 <= ttl <= 3600:
            body["ttl_s"] = 3600  # no hold expires during the run: expiry is not the request's doing
    auth = credentials(case, live)  # sent over the generated Authorization header
    admin = case.path.startswith("/v1/admin/")
    before = live.state(admin)
    response = case.call(base_url=live.base, headers=auth, session=live.session)
    status = response.status_code
    OPERATIONS.add(case.operation.label)
    STATS["examples"] += 1
    STATS[f"{status // 100}xx"] += 1
    excluded = []
    if status == 422 and refused_for_what_no_schema_says(case, response.json()):
        excluded.append(schemathesis.checks.positive_data_acceptance)
    if status == 400 and unsigned_event_refused(case, status, response.json()):
        excluded.append(schemathesis.checks.positive_data_acceptance)
    case.validate_response(response, headers=auth, excluded_checks=excluded)
    if 400 <= status < 500:
        assert response.headers.get("content-type") == ["application/problem+json"], response.text
        problem = response.json()
        assert all(k in problem for k in PROBLEM_FIELDS) and problem["status"] == status, problem
        after = live.state(admin)
        assert after[:2] == before[:2], f"{case.operation.label} answered {status} and changed state"
        for e in live.new_events(before[2]):
            assert e["kind"] == "denied" and e["delta"] == "0", f"{status} wrote {e}"
