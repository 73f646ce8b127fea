"""POST /v1/check and /v1/consume, and /v1/authorize, are answered before Starlette's router
(app.Gateway, for CPU: docs/benchmarks.md); through the router (a request under a root_path goes
that way) the same requests must get the same answers, errors included: status, every header in
order, body."""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import httpx

from conftest import RUN, Admin, hang_up_mid_body, test_config_data
from quota_gw import config as config_mod
from quota_gw import embedded
from quota_gw.app import Gateway, create_app

FEATURE = {"feature": "generate_insight"}


def answer(r: httpx.Response) -> tuple[int, list[tuple[str, str]], str]:
    return r.status_code, list(r.headers.multi_items()), re.sub(r"[0-9a-f]{32}", "<id>", r.text)


async def test_the_decision_routes_answer_the_same_with_and_without_the_router(app: Any, client: httpx.AsyncClient,
                                                                               tenant: Any) -> None:
    assert isinstance(app, Gateway) and set(app.direct) == {"/v1/check", "/v1/consume", "/v1/authorize"}
    _, h = await tenant("pro")
    _, read_only = await tenant("pro")
    cases: list[tuple[str, dict[str, str], Any]] = [
        ("/v1/check", h, FEATURE),
        ("/v1/check", {**h, "X-Quota-User": "alice"}, FEATURE),
        ("/v1/consume", {}, FEATURE),
        ("/v1/consume", {"Authorization": "Bearer qgw_unknown"}, FEATURE),
        ("/v1/consume", h, b"{not json"),
        ("/v1/consume", h, b"[1]"),
        ("/v1/consume", h, b""),
        ("/v1/consume", h, b"x" * 70_000),
        ("/v1/consume", h, {"feature": "no-such-feature"}),
        ("/v1/consume", h, {**FEATURE, "units": 0}),
        ("/v1/consume", {**h, "X-Quota-User": "not a name"}, FEATURE),
        ("/v1/consume", {**h, "Idempotency-Key": "a\x7fb"}, FEATURE),
        ("/v1/consume", h, {**FEATURE, "metadata": "not an object"}),
        ("/v1/check", {**h, "Authorization": read_only["Authorization"].replace("qgw_", "qgw_x")}, FEATURE),
    ]
    routed = httpx.AsyncClient(transport=httpx.ASGITransport(app=app, root_path="/gw"), base_url="http://gw")
    async with routed:
        for path, headers, body in cases:
            kw: dict[str, Any] = {"json": body} if isinstance(body, dict) else {"content": body}
            direct = await client.post(path, headers=headers, **kw)
            via_router = await routed.post("/gw" + path, headers=headers, **kw)
            assert answer(direct) == answer(via_router), (path, headers)
        # A charge answers the same too (its own event id and the balance one lower).
        first = await client.post("/v1/consume", headers=h, json=FEATURE)
        second = await routed.post("/gw/v1/consume", headers=h, json=FEATURE)
        assert first.status_code == second.status_code == 200
        assert [k for k, _ in first.headers.multi_items()] == [k for k, _ in second.headers.multi_items()]
        assert second.json()["remaining"] == first.json()["remaining"] - 1
        assert first.json().keys() == second.json().keys()


# --- /v1/authorize (nginx auth_request, Envoy ext_authz) ------------------------------------------

def authorize_config(upstream: str, spool_dir: str) -> config_mod.Config:
    data = test_config_data()
    data["routes"] = [
        {"prefix": "/ai/goals", "upstream": upstream, "feature": "generate_goal"},
        {"prefix": "/ai/open", "upstream": upstream, "feature": "generate_goal", "fail": "open"},
        {"prefix": "/ai/ins", "upstream": upstream, "feature": "generate_insight"},
        {"prefix": "/ai/free", "upstream": upstream, "metering": "none"},
        {"prefix": "/v1/chat/completions", "upstream": upstream, "feature": "chat", "metering": "openai"},
    ]
    data["behaviour"] = {"spool_dir": spool_dir}
    return config_mod.parse(data, "tests/test_direct_routes.py")


@contextlib.asynccontextmanager
async def two_ways(app: Any) -> AsyncIterator[Callable[..., Awaitable[tuple[Any, Any]]]]:
    """ask(method, path, headers): the same request to the app directly and under a root_path
    (which goes through Starlette's router and middleware), as (answer, answer)."""
    direct = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw")
    routed = httpx.AsyncClient(transport=httpx.ASGITransport(app=app, root_path="/gw"), base_url="http://gw")

    async def ask(method: str, path: str, headers: dict[str, str], *, again: dict[str, str] | None = None,
                  names: tuple[str, ...] = ()) -> tuple[Any, Any]:
        """`again`: the headers of the routed request when it must come from another org (a
        charge changes the balance); `names` are replaced by placeholders in both answers."""
        a = await direct.request(method, path, headers=headers)
        b = await routed.request(method, "/gw" + path, headers=again or headers)
        return tuple(normalized(r, names[i::2] if again else names) for i, r in enumerate((a, b)))

    async with direct, routed:
        yield ask


def normalized(r: httpx.Response, names: tuple[str, ...]) -> tuple[int, list[tuple[str, str]], str]:
    status, headers, body = answer(r)
    for i, n in enumerate(names):
        headers = [(k, v.replace(n, f"<{i}>")) for k, v in headers]
        body = body.replace(n, f"<{i}>")
    return status, [(k, re.sub(r"[0-9a-f]{32}", "<id>", v)) for k, v in headers], body


async def test_authorize_answers_the_same_with_and_without_the_router(redis_url: str, database_url: str,
                                                                      prefix: str, tenant: Any, admin: Any,
                                                                      tmp_path: Any) -> None:
    app = create_app(authorize_config("http://127.0.0.1:9", str(tmp_path)), redis_url, database_url, prefix)
    assert app.direct["/v1/authorize"].keys() == {"GET", "HEAD", "POST"}
    async with app.router.lifespan_context(app), two_ways(app) as ask:
        org, h = await tenant("pro")
        org2, h2 = await tenant("pro")
        uri = {"X-Original-URI": "/ai/goals/x?y=1", "X-Original-Method": "POST"}
        # allowed: a fixed route (charged; each org once), an LLM route (checked), a `none` route
        for method in ("GET", "HEAD", "POST"):
            a, b = await ask(method, "/v1/authorize", {**h, **uri, "X-Quota-User": "bob"},
                             again={**h2, **uri, "X-Quota-User": "bob"}, names=(org, org2))
            assert a == b and a[0] == 200, a
        for u in ("/v1/chat/completions", "/ai/free/x", "/ai/free"):
            a, b = await ask("GET", "/v1/authorize", {**h, "X-Original-URI": u})
            assert a == b and a[0] == 200, (u, a)
        # Envoy's path form: the original path, the original method
        a, b = await ask("PUT", "/v1/authorize/ai/goals/y", h, again=h2, names=(org, org2))
        assert a == b and a[0] == 200, a
        assert b[1] == [(k, v) for k, v in a[1]]
        # refusals: 400 (no URI), 401, 403 (scope; another user), 402, 404 (no route), 400 (user spellings)
        _, read_only = await tenant("pro")
        read_key = await admin.key(org, scopes=["read"])
        bound_org, bound = await tenant("pro", user_id="bob")
        refusals = [
            h,
            uri,
            {"Authorization": "Bearer qgw_unknown", **uri},
            {"Authorization": f"Bearer {read_key}", **uri},
            {**bound, **uri, "X-Quota-User": "admin"},
            {**bound, **uri, "X_Quota_User": "admin"},
            {**h, "X-Original-URI": "/nowhere"},
            {"X-Original-URI": "/nowhere"},
            {**h, **uri, "X-Quota-User": "alice", "X_Quota_User": "eve"},
            {**h, **uri, "X-Quota-User": "not a name"},
        ]
        for headers in refusals:
            a, b = await ask("GET", "/v1/authorize", headers)
            assert a == b and a[0] in (400, 401, 403, 404, 422), (headers, a)
        assert {s for s, _, _ in [(await ask("GET", "/v1/authorize", x))[0] for x in refusals]} == {
            400, 401, 403, 404, 422}
        # 402: the org's goal_generation (20) spent, 3 a call
        for _ in range(10):
            a, b = await ask("GET", "/v1/authorize", {**h, **uri})
            if a[0] == 402:
                break
        assert a == b and a[0] == 402 and ("x-quota-status", "402") in a[1], a
        # 429: pro allows a user 5 calls a minute (two orgs: the routed call from the second, so
        # both are the sixth; the reset time may differ by a second across the two)
        for _ in range(5):
            await ask("GET", "/v1/authorize", {**h2, "X-Original-URI": "/ai/ins", "X-Quota-User": "rl"},
                      again={**h, "X-Original-URI": "/ai/ins", "X-Quota-User": "rl"})
        a, b = await ask("GET", "/v1/authorize", {**h2, "X-Original-URI": "/ai/ins", "X-Quota-User": "rl"},
                         again={**h, "X-Original-URI": "/ai/ins", "X-Quota-User": "rl"}, names=(org2, org))
        assert a[0] == b[0] == 429 and ("x-quota-status", "429") in a[1], a
        assert [k for k, _ in a[1]] == [k for k, _ in b[1]]
        assert re.sub(r"\d+", "N", str(a)) == re.sub(r"\d+", "N", str(b))
        assert bound_org and read_only


async def test_authorize_with_redis_down_answers_the_same_with_and_without_the_router(
        database_url: str, tmp_path: Any) -> None:
    rs = await asyncio.to_thread(embedded.start_redis, tmp_path / "redis")
    prefix = f"az{RUN}"
    app = create_app(authorize_config("http://127.0.0.1:9", str(tmp_path / "spool")), rs.url, database_url, prefix)
    try:
        async with app.router.lifespan_context(app), two_ways(app) as ask:
            admin = Admin(httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw"))
            org = await admin.org("pro", f"authz-{RUN}")
            h = {"Authorization": f"Bearer {await admin.key(org)}"}
            await admin.c.aclose()
            await asyncio.to_thread(rs.stop)
            a, b = await ask("HEAD", "/v1/authorize", {**h, "X-Original-URI": "/ai/goals"})
            assert a == b and a[0] == 503 and ("x-quota-status", "503") in a[1], a
            a, b = await ask("GET", "/v1/authorize", {**h, "X-Original-URI": "/ai/open/x"})  # fail: open
            assert a == b and a[0] == 200 and ("x-quota-degraded", "fail-open") in a[1], a
            assert app.state.sidecar.spool.pending() == 2
    finally:
        await asyncio.to_thread(rs.stop)


async def test_a_client_that_hangs_up_mid_body_is_not_a_server_error(app: Any, tenant, redis, caplog) -> None:
    """Never a 500 for what a client can do: closing the connection halfway through a body, on the
    direct decision routes and through the router alike, is answered 400 (to nobody), not logged as
    an unhandled error, and charges nothing."""
    org, h = await tenant("pro")
    before = (await httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw")
              .get("/v1/balance", headers=h)).json()["meters"]["general"]["balance"]
    for path in ("/v1/consume", "/v1/check", "/v1/reservations"):
        caplog.clear()
        assert await hang_up_mid_body(app, path, h["Authorization"], b'{"feature": "generate_ins') == [400], path
        assert "unhandled error" not in caplog.text, path
    after = (await httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw")
             .get("/v1/balance", headers=h)).json()["meters"]["general"]["balance"]
    assert after == before
