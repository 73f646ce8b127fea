"""The sidecar (SPEC §1): forwarding, streaming, LLM metering, refunds, shadow mode, authorize.

A real gateway (uvicorn, in this event loop, 127.0.0.1 on a free port) in front of the demo
upstream (the same), with the shared Redis and Postgres. Settlement must be exactly once and
before the response completes, so a balance read right after a call sees the final number.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import httpx
import orjson
import pytest
from starlette.applications import Starlette

from conftest import hang_up_mid_body, test_config_data
from quota_gw import config as config_mod
from quota_gw import metering
from quota_gw.app import create_app
from quota_gw.demo import Stats, create_demo_app
from quota_gw.dev import serve
from quota_gw.embedded import free_port
from quota_gw.layout import Layout
from quota_gw.events import entries

CHAT = "/v1/chat/completions"


class Gateway:
    def __init__(self, base: str, app: Any, demo: Stats, layout: Layout) -> None:
        self.base, self.app, self.demo, self.layout = base, app, demo, layout
        self.http = httpx.AsyncClient(base_url=base, timeout=30, limits=httpx.Limits(max_connections=200))


def proxy_config(upstream: str, spool_dir: str) -> config_mod.Config:
    data = test_config_data()
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there: connection refused
    data["routes"] = [
        {"prefix": "/ai/goals", "upstream": upstream, "feature": "generate_goal"},
        {"prefix": "/ai/slow", "upstream": upstream, "feature": "generate_goal", "timeout_s": 0.5},
        {"prefix": "/ai/down", "upstream": dead, "feature": "generate_goal", "connect_timeout_s": 1},
        {"prefix": "/ai/shadow", "upstream": upstream, "feature": "generate_goal", "shadow": True},
        {"prefix": "/ai/free", "upstream": upstream, "metering": "none"},
        {"prefix": "/api", "upstream": upstream + "/v2", "feature": "generate_insight", "strip_prefix": True},
        {"prefix": "/v1", "upstream": upstream, "feature": "chat", "metering": "openai", "timeout_s": 1},
        {"prefix": "/llm-down", "upstream": dead, "feature": "chat", "metering": "openai", "strip_prefix": True},
    ]
    data["behaviour"] = {"spool_dir": spool_dir}
    return config_mod.parse(data, "tests/test_proxy.py")


@pytest.fixture(scope="module")
async def gw(redis_url: str, database_url: str, prefix: str, redis: Any, tmp_path_factory: Any) -> AsyncIterator[Gateway]:
    demo_app = create_demo_app()
    async with serve(demo_app, lifespan="off") as up:
        cfg = proxy_config(f"http://127.0.0.1:{up.port}", str(tmp_path_factory.mktemp("spool")))
        app = create_app(cfg, redis_url, database_url, prefix)
        async with serve(app) as server:
            g = Gateway(f"http://127.0.0.1:{server.port}", app, demo_app.state.demo.stats, Layout(prefix, cfg.shards))
            yield g
            await g.http.aclose()


async def tokens_left(gw: Gateway, h: dict[str, str], meter: str = "tokens") -> int:
    r = await gw.http.get("/v1/balance", headers=h)
    assert r.status_code == 200, r.text
    m = r.json()["meters"][meter]
    assert m["held"] == 0, "a hold was left behind"
    return m["balance"]


async def org_events(redis: Any, gw: Gateway, org: str) -> list[dict[str, str]]:
    return [f for f in entries(await redis.xrange(gw.layout.stream(org))) if f["org"] == org]


async def wait_event(redis: Any, gw: Gateway, org: str, kind: str, timeout: float = 10) -> dict[str, str]:
    """Waits for the org's first event of `kind` to appear in its Redis stream."""
    async with asyncio.timeout(timeout):
        while True:
            for e in await org_events(redis, gw, org):
                if e["kind"] == kind:
                    return e
            await asyncio.sleep(0.02)


def chat(max_tokens: int | None = 50, stream: bool = False, content: str = "Say something about quotas.",
         **extra: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"model": "demo-1", "messages": [{"role": "user", "content": content}], "stream": stream}
    if max_tokens is not None:
        body["max_tokens"] = max_tokens
    body.update(extra)
    return body


def sse_events(raw: bytes) -> list[Any]:
    out = []
    for block in raw.split(b"\n\n"):
        if block.startswith(b"data: "):
            data = block[6:]
            out.append("[DONE]" if data == b"[DONE]" else orjson.loads(data))
    return out


# --- fixed-cost routes ------------------------------------------------------------------------

async def test_fixed_route_forwards_the_request_and_charges_once(gw, tenant):
    org, h = await tenant("pro")
    before = await tokens_left(gw, h, "goal_generation")
    r = await gw.http.post("/ai/goals/new?lang=en&x=1", content=b'{"goal":"grow"}', headers={
        **h, "Content-Type": "application/json", "X-Custom": "kept", "X-Quota-Org": "spoofed-org",
        "Connection": "keep-alive, X-Drop-Me", "X-Drop-Me": "hop", "X-Forwarded-For": "10.0.0.9"})
    assert r.status_code == 200, r.text
    assert r.json() == {"ok": True, "method": "POST", "path": "/ai/goals/new", "query": "lang=en&x=1"}
    assert r.headers["X-Quota-Remaining"] == str(before - 3)
    seen = gw.demo.requests[-1]
    hs = seen["headers"]
    assert seen["body"] == {"goal": "grow"}
    assert hs["x-custom"] == "kept" and hs["content-type"] == "application/json"
    assert "authorization" not in hs and "x-drop-me" not in hs
    assert hs["x-quota-org"] == org  # the gateway's word, never the caller's
    assert hs["x-forwarded-for"] == "10.0.0.9"  # uvicorn trusts a local proxy's chain (forwarded_allow_ips)
    assert hs["x-forwarded-proto"] == "http" and hs["x-forwarded-host"] == gw.base.removeprefix("http://")
    assert await tokens_left(gw, h, "goal_generation") == before - 3


async def test_strip_prefix_user_header_and_unmetered_route(gw, tenant):
    org, h = await tenant("pro")
    r = await gw.http.get("/api/items", headers={**h, "X-Quota-User": "alice"})
    assert r.status_code == 200 and r.json()["path"] == "/v2/items"
    assert gw.demo.requests[-1]["headers"]["x-quota-user"] == "alice"
    assert gw.demo.requests[-1]["headers"]["x-forwarded-for"] == "127.0.0.1"
    assert await tokens_left(gw, h, "general") == 49
    r = await gw.http.get("/ai/free/x", headers=h)
    assert r.status_code == 200 and await tokens_left(gw, h, "general") == 49
    assert (await gw.http.get("/ai/free/x")).status_code == 401  # still authenticated
    assert (await gw.http.get("/ai/goalsX", headers=h)).status_code == 404  # prefixes match whole segments


async def test_a_prefix_takes_whole_segments_only_on_every_path(redis_url, database_url, prefix, tenant, tmp_path):
    """A prefix /open is not /openapi.json (a POST there is 405, not a proxied 404) and /ai/goalsx
    belongs to /ai, not to /ai/goals: the same through app.Gateway's shortcut and the router."""
    demo_app = create_demo_app()
    async with serve(demo_app, lifespan="off") as up:
        data = test_config_data()
        upstream, dead = f"http://127.0.0.1:{up.port}", f"http://127.0.0.1:{free_port()}"
        data["routes"] = [{"prefix": "/open", "upstream": upstream, "metering": "none"},
                          {"prefix": "/ai", "upstream": upstream, "metering": "none"},
                          {"prefix": "/ai/goals", "upstream": dead, "metering": "none", "connect_timeout_s": 1}]
        data["behaviour"] = {"spool_dir": str(tmp_path)}
        app = create_app(config_mod.parse(data), redis_url, database_url, prefix)
        org, h = await tenant("pro")
        async with app.router.lifespan_context(app):
            async def via_router(scope, receive, send):  # Starlette's own dispatch, no shortcut
                await Starlette.__call__(app, scope, receive, send)

            for asgi in (app, via_router):
                async with httpx.AsyncClient(transport=httpx.ASGITransport(app=asgi), base_url="http://gw") as c:
                    assert (await c.post("/openapi.json", headers=h)).status_code == 405
                    assert (await c.get("/openapi.json")).json()["openapi"].startswith("3.")
                    r = await c.get("/ai/goalsx", headers=h)
                    assert r.status_code == 200 and r.json()["path"] == "/ai/goalsx", r.text
                    assert (await c.get("/ai/goals/x", headers=h)).status_code == 502  # /ai/goals
                    assert (await c.get("/openx", headers=h)).status_code == 404
                    r = await c.get("/open/x", headers=h)
                    assert r.status_code == 200 and r.json()["path"] == "/open/x"


async def test_refused_calls_are_not_forwarded(gw, tenant):
    org, h = await tenant("starter")  # goal_generation not on the plan
    n = gw.demo.count
    r = await gw.http.post("/ai/goals", headers=h)
    assert r.status_code == 403 and r.json()["code"] == "plan_forbids"
    assert r.headers["content-type"] == "application/problem+json"
    r = await gw.http.post("/ai/goals", headers={"Authorization": "Bearer qgw_nope"})
    assert r.status_code == 401
    assert gw.demo.count == n


@pytest.mark.parametrize("path,headers,status,code", [
    ("/ai/goals", {"X-Demo-Status": "500"}, 500, None),
    ("/ai/goals", {"X-Demo-Status": "503"}, 503, None),
    ("/ai/slow", {"X-Demo-Hang": "1"}, 504, "upstream_timeout"),
    ("/ai/down", {}, 502, "upstream_error"),
])
async def test_upstream_failure_is_refunded_once(gw, tenant, redis, path, headers, status, code):
    org, h = await tenant("pro")
    before = await tokens_left(gw, h, "goal_generation")
    r = await gw.http.post(path, headers={**h, **headers})
    assert r.status_code == status, r.text
    if code:
        assert r.json()["code"] == code
    assert await tokens_left(gw, h, "goal_generation") == before
    kinds = [e["kind"] for e in await org_events(redis, gw, org) if e["kind"] in ("consume", "refund")]
    assert kinds == ["consume", "refund"]


async def test_upstream_client_errors_stay_charged(gw, tenant):
    org, h = await tenant("pro")
    r = await gw.http.post("/ai/goals", headers={**h, "X-Demo-Status": "404"})
    assert r.status_code == 404  # not in refund_statuses: the upstream did its work
    assert await tokens_left(gw, h, "goal_generation") == 17



def test_the_answers_raw_quota_headers_are_the_quota_headers():
    """The proxy writes Decision.raw_headers (and the charge's own) straight into the answer:
    they must say what headers() says, for every header a decision can carry."""
    from quota_gw.decisions import Decision
    from quota_gw.sidecar.settling import LLMCharge

    def decision(**kw: Any) -> Decision:
        base = dict(status=200, code="", detail="", cost=5, remaining=95, event_id="e", retry_after_ms=0,
                    rl_limit=-1, rl_remaining=-1, rl_reset=0, replay=False, would="", extra={}, sources="")
        return Decision(**{**base, **kw})

    cases = [decision(), decision(remaining=-1), decision(rl_limit=10, rl_remaining=-2, rl_reset=30),
             decision(status=429, code="rate_limited", retry_after_ms=1500, rl_limit=10, rl_remaining=0),
             decision(status=429, retry_after_ms=0), decision(would="rate_limited"), decision(replay=True),
             decision(sources="allocated:3"), decision(sources="allocated:2,grant:lot_1:2,purchased:1")]
    for d in cases:
        assert d.raw_headers() == [(k.lower().encode(), v.encode()) for k, v in d.headers().items()], d
    charge = LLMCharge(None, None, None, "", metering.OPENAI)  # type: ignore[arg-type]
    for d, down, lowered in ((None, True, 7), (cases[3], False, None), (cases[8], True, 0)):
        charge.decision, charge.redis_down, charge.lowered = d, down, lowered
        assert charge.raw_headers() == [(k.lower().encode(), v.encode()) for k, v in charge.headers().items()]

# --- LLM routes -------------------------------------------------------------------------------

async def test_streamed_completion_arrives_in_chunks_and_charges_exactly_the_usage(gw, tenant):
    org, h = await tenant("pro")
    before = await tokens_left(gw, h)
    body = chat(200, stream=True, stream_options={"include_usage": True})
    reads, raw, first_at_active = 0, b"", None
    async with gw.http.stream("POST", CHAT, json=body, headers={**h, "X-Demo-Token-Delay-Ms": "3"}) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        async for chunk in r.aiter_raw():
            if first_at_active is None:
                first_at_active = gw.demo.active_streams  # the upstream is still generating
            reads += 1
            raw += chunk
    assert first_at_active == 1
    assert reads >= 100, f"the stream was buffered: {reads} reads"
    events = sse_events(raw)
    assert events[-1] == "[DONE]"
    content = [e for e in events[:-1] if e["choices"] and e["choices"][0]["delta"].get("content")]
    assert len(content) == 200
    usage = events[-2]["usage"]
    assert usage["completion_tokens"] == 200
    assert before - await tokens_left(gw, h) == usage["total_tokens"]


async def test_usage_chunk_is_hidden_from_callers_that_did_not_ask(gw, tenant):
    org, h = await tenant("pro")
    before = await tokens_left(gw, h)
    body = chat(20, stream=True)
    r = await gw.http.post(CHAT, json=body, headers=h)
    assert r.status_code == 200
    events = sse_events(r.content)
    assert all(e == "[DONE]" or e["choices"] for e in events)  # no usage-only chunk
    sent = gw.demo.requests[-1]["body"]
    assert sent["stream_options"] == {"include_usage": True} and sent["max_tokens"] == 20
    assert gw.demo.requests[-1]["headers"]["accept-encoding"] == "identity"  # usage must be readable
    assert before - await tokens_left(gw, h) == metering.prompt_tokens("chat/completions", body) + 20


async def test_non_streamed_completion_and_embeddings_charge_the_usage(gw, tenant):
    org, h = await tenant("pro")
    before = await tokens_left(gw, h)
    r = await gw.http.post(CHAT, json=chat(None), headers=h)  # no max_tokens: the route's default
    assert r.status_code == 200
    assert gw.demo.requests[-1]["body"]["max_tokens"] == 1024
    spent = r.json()["usage"]["total_tokens"]
    assert before - await tokens_left(gw, h) == spent
    r = await gw.http.post("/v1/embeddings", json={"model": "demo-embed", "input": ["a" * 40, "b" * 8]}, headers=h)
    assert r.status_code == 200 and r.json()["usage"]["total_tokens"] == 12
    assert before - await tokens_left(gw, h) == spent + 12
    r = await gw.http.get("/v1/models", headers=h)  # on an LLM route but not metered
    assert r.status_code == 200 and before - await tokens_left(gw, h) == spent + 12


async def test_max_tokens_is_lowered_to_what_the_org_can_afford(gw, tenant, client):
    org, h = await tenant("bulk")  # 1,000 tokens
    r = await client.post("/v1/consume", json={"feature": "chat", "units": 800}, headers=h)
    assert r.status_code == 200
    body = chat(500)
    prompt = metering.prompt_tokens("chat/completions", body)
    r = await gw.http.post(CHAT, json=body, headers=h)
    assert r.status_code == 200
    assert r.headers["X-Quota-Max-Tokens"] == str(200 - prompt)
    assert gw.demo.requests[-1]["body"]["max_tokens"] == 200 - prompt
    assert r.json()["usage"]["total_tokens"] == 200
    assert await tokens_left(gw, h) == 0
    r = await gw.http.post(CHAT, json=body, headers=h)
    assert r.status_code == 402 and r.json()["code"] == "insufficient_balance"


async def test_the_hold_covers_every_requested_choice(gw, tenant, redis):
    org, h = await tenant("bulk")  # 1,000 tokens
    body = chat(100, n=3)
    prompt = metering.prompt_tokens("chat/completions", body)
    r = await gw.http.post(CHAT, json=body, headers=h)
    assert r.status_code == 200 and "X-Quota-Max-Tokens" not in r.headers
    reserve = await wait_event(redis, gw, org, "reserve")
    assert orjson.loads(reserve["meta"])["held"] == prompt + 300
    r = await gw.http.post(CHAT, json=chat(400, n=3), headers=h)  # 1000 - used left, split three ways
    left = 1000 - (prompt + 100)
    assert r.status_code == 200 and r.headers["X-Quota-Max-Tokens"] == str((left - prompt) // 3)


async def test_50_concurrent_streams_never_overspend_1000_tokens(gw, tenant, redis):
    org, h = await tenant("bulk")  # 1,000 tokens
    served: list[tuple[int, int]] = []

    async def one(i: int) -> int:
        headers = {**h, "X-Demo-Token-Delay-Ms": "1"}
        async with gw.http.stream("POST", CHAT, json=chat(500, stream=True), headers=headers) as r:
            raw = await r.aread()
            if r.status_code == 200:
                limit = int(r.headers.get("X-Quota-Max-Tokens", 500))
                n = sum(1 for e in sse_events(raw) if e != "[DONE]" and e["choices"]
                        and e["choices"][0]["delta"].get("content"))
                served.append((limit, n))
            return r.status_code

    codes = await asyncio.gather(*(one(i) for i in range(50)))
    assert set(codes) <= {200, 402}, codes
    assert codes.count(200) == len(served) >= 1
    assert all(n == limit <= 500 for limit, n in served)
    left = await tokens_left(gw, h)
    assert left == 0  # the fake model spends every token it is allowed: the org's 1,000 exactly
    assert any(limit < 500 for limit, _ in served), "no call was lowered to what was left"
    events = await org_events(redis, gw, org)
    assert all(int(e["bal"]) >= 0 for e in events)
    charged = -sum(int(e["delta"]) for e in events if e["kind"] == "commit")
    assert charged == 1000 - left
    assert len([e for e in events if e["kind"] == "reserve"]) == len(served)


async def test_client_disconnect_mid_stream_charges_only_what_was_produced(gw, tenant, redis):
    org, h = await tenant("pro")
    before = await tokens_left(gw, h)
    aborted = gw.demo.aborted_streams
    body = chat(200, stream=True)
    seen = 0
    async with httpx.AsyncClient(base_url=gw.base, timeout=30) as c:
        async with c.stream("POST", CHAT, json=body, headers={**h, "X-Demo-Token-Delay-Ms": "20"}) as r:
            assert r.status_code == 200
            async for line in r.aiter_lines():
                if '"content":" ' in line:
                    seen += 1
                    if seen == 10:
                        break
    # the client closed its connection; the gateway must notice, stop the upstream and settle
    await gw.demo.wait_for(lambda s: s.aborted_streams > aborted)
    commit = await wait_event(redis, gw, org, "commit")
    meta = orjson.loads(commit["meta"])["request"]  # what the gateway attached to the commit
    produced = meta["tokens"] - metering.prompt_tokens("chat/completions", body)
    assert meta["source"] == "streamed_chunks"
    assert 10 <= produced < 200
    assert before - await tokens_left(gw, h) == meta["tokens"]


@pytest.mark.parametrize("path,headers,status", [
    (CHAT, {"X-Demo-Status": "503"}, 503),
    (CHAT, {"X-Demo-Hang": "1"}, 504),
    ("/llm-down/v1/chat/completions", {}, 502),
])
async def test_llm_upstream_failure_releases_the_hold(gw, tenant, redis, path, headers, status):
    org, h = await tenant("pro")
    before = await tokens_left(gw, h)
    r = await gw.http.post(path, json=chat(100), headers={**h, **headers})
    assert r.status_code == status
    assert await tokens_left(gw, h) == before
    kinds = [e["kind"] for e in await org_events(redis, gw, org) if e["kind"] in ("reserve", "commit", "release")]
    assert kinds == ["reserve", "release"]


async def test_upstream_cut_mid_stream_releases_the_hold(gw, tenant, redis):
    org, h = await tenant("pro")
    before = await tokens_left(gw, h)
    with pytest.raises(httpx.HTTPError):
        async with gw.http.stream("POST", CHAT, json=chat(100, stream=True),
                                  headers={**h, "X-Demo-Drop-After": "5"}) as r:
            await r.aread()
    await wait_event(redis, gw, org, "release")
    assert await tokens_left(gw, h) == before


async def test_bad_llm_body_is_400_and_charges_nothing(gw, tenant):
    org, h = await tenant("pro")
    r = await gw.http.post(CHAT, content=b"{nope", headers=h)
    assert r.status_code == 400 and r.json()["code"] == "invalid_request"
    assert await tokens_left(gw, h) == 100000



async def test_a_client_that_hangs_up_mid_body_on_a_proxy_route_is_400_and_nothing_is_forwarded(gw, tenant, caplog):
    """The proxy reads the body from the ASGI messages itself: a client gone halfway through it
    is answered as on every route (400 to nobody, not an unhandled error), with nothing held,
    charged or sent upstream, on an LLM route and a fixed one alike."""
    org, h = await tenant("pro")
    n = gw.demo.count
    goals = await tokens_left(gw, h, "goal_generation")
    for path in (CHAT, "/ai/goals"):
        caplog.clear()
        assert await hang_up_mid_body(gw.app, path, h["Authorization"], b'{"model": "demo-1", "mess') == [400], path
        assert "unhandled error" not in caplog.text, path
    assert gw.demo.count == n
    assert await tokens_left(gw, h) == 100000
    assert await tokens_left(gw, h, "goal_generation") == goals

# --- shadow mode and authorize ----------------------------------------------------------------

async def test_shadow_route_lets_an_exhausted_org_through_and_records_denied(gw, tenant, client, redis):
    org, h = await tenant("pro")
    assert (await client.post("/v1/consume", json={"feature": "generate_goal", "units": 6}, headers=h)).status_code == 200
    assert (await gw.http.post("/ai/goals", headers=h)).status_code == 402  # 2 left, a call costs 3
    n = gw.demo.count
    for _ in range(3):
        r = await gw.http.post("/ai/shadow", headers=h)
        assert r.status_code == 200
        assert r.headers["X-Quota-Shadow"] == "insufficient_balance"
    assert gw.demo.count == n + 3
    assert await tokens_left(gw, h, "goal_generation") == 2
    denied = [e for e in await org_events(redis, gw, org) if e["kind"] == "denied"]
    assert len(denied) == 4 and all(e["delta"] == "0" for e in denied)
    assert [orjson.loads(e["meta"])["code"] for e in denied] == ["insufficient_balance"] * 4


async def test_global_shadow_setting_and_route_override(gw):
    sc = gw.app.state.sidecar
    by_prefix = {r.prefix: r for r in sc.routes}
    assert sc.table.shadow(by_prefix["/ai/shadow"]) is True and sc.table.shadow(by_prefix["/ai/goals"]) is False
    data = test_config_data()
    data["routes"] = [{"prefix": "/a", "upstream": "http://x", "feature": "chat", "shadow": False},
                      {"prefix": "/b", "upstream": "http://x", "feature": "chat"}]
    data["behaviour"] = {"shadow": True, "fail": "open"}
    cfg = config_mod.parse(data)
    from quota_gw.sidecar.routing import RouteTable

    table = RouteTable(cfg)
    assert table.shadow(cfg.routes[0]) is False and table.shadow(cfg.routes[1]) is True
    assert table.fail_open(cfg.routes[1]) is True


async def test_authorize_decides_for_the_original_uri(gw, tenant):
    org, h = await tenant("pro")
    ask = {**h, "X-Original-URI": "/ai/goals/x?y=1", "X-Original-Method": "POST", "X-Quota-User": "bob"}
    r = await gw.http.get("/v1/authorize", headers=ask)
    assert r.status_code == 200, r.text
    assert r.headers["X-Quota-Org"] == org and r.headers["X-Quota-User"] == "bob"
    assert r.headers["X-Quota-Remaining"] == "17" and "X-Quota-Event" in r.headers
    assert (await gw.http.get("/v1/authorize", headers=h)).status_code == 400
    r = await gw.http.get("/v1/authorize", headers={**h, "X-Original-URI": "/nowhere"})
    assert r.status_code == 404 and r.headers["X-Quota-Status"] == "404"
    r = await gw.http.get("/v1/authorize", headers={"X-Original-URI": "/ai/goals"})
    assert r.status_code == 401 and orjson.loads(r.headers["X-Quota-Problem"])["code"] == "unauthorized"
    for _ in range(5):
        assert (await gw.http.get("/v1/authorize", headers={**h, "X-Original-URI": "/ai/goals"})).status_code == 200
    r = await gw.http.get("/v1/authorize", headers={**h, "X-Original-URI": "/ai/goals"})
    assert r.status_code == 402 and r.headers["X-Quota-Status"] == "402"
    assert orjson.loads(r.headers["X-Quota-Problem"])["code"] == "insufficient_balance"
    # Envoy's ext_authz calls path_prefix + the original path with the original method
    org2, h2 = await tenant("pro")
    r = await gw.http.post("/v1/authorize/ai/goals/x", headers=h2)
    assert r.status_code == 200 and r.headers["X-Quota-Org"] == org2 and r.headers["X-Quota-Remaining"] == "17"
    # An LLM route cannot be metered from here: authorize checks, and charges nothing.
    before = await tokens_left(gw, h)
    assert (await gw.http.get("/v1/authorize", headers={**h, "X-Original-URI": CHAT})).status_code == 200
    assert await tokens_left(gw, h) == before


# --- metering that cannot be gamed (issue 8) -----------------------------------------------------

BIG_TOOL = {"type": "function", "function": {"name": "lookup", "description": "d" * 40_000,
                                             "parameters": {"type": "object", "properties": {}}}}


async def test_tool_schemas_are_held_as_prompt_and_their_usage_charged(gw, tenant, redis):
    org, h = await tenant("pro")
    before = await tokens_left(gw, h)
    body = chat(20, tools=[BIG_TOOL])
    r = await gw.http.post(CHAT, json=body, headers=h)
    assert r.status_code == 200, r.text
    reserve = await wait_event(redis, gw, org, "reserve")
    assert orjson.loads(reserve["meta"])["held"] >= 10_000 + 20  # 40 kB of description is ~10k tokens
    usage = r.json()["usage"]["total_tokens"]
    assert usage >= 10_000 and before - await tokens_left(gw, h) == usage


async def test_functions_schemas_and_images_are_held(gw, tenant, redis):
    org, h = await tenant("pro")
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA", "detail": "low"}}
    body = chat(20, functions=[BIG_TOOL["function"]])
    body["messages"].append({"role": "user", "content": [{"type": "text", "text": "what is this?"}, image]})
    r = await gw.http.post(CHAT, json=body, headers=h)
    assert r.status_code == 200, r.text
    held = orjson.loads((await wait_event(redis, gw, org, "reserve"))["meta"])["held"]
    assert held >= 10_000 + (85 + 170 * 8) + 20  # an image at its documented bound


async def test_usage_beyond_the_hold_is_charged_in_full_while_the_balance_covers_it(gw, tenant, redis):
    org, h = await tenant("pro")
    before = await tokens_left(gw, h)
    for stream in (False, True):  # the upstream's tokenizer counts 5,000 where the estimate said ~16
        body = chat(20, stream=stream)
        r = await gw.http.post(CHAT, json=body, headers={**h, "X-Demo-Prompt-Tokens": "5000"})
        assert r.status_code == 200, r.text
    commits = [orjson.loads(e["meta"]) for e in await org_events(redis, gw, org) if e["kind"] == "commit"]
    assert [c["requested"] for c in commits] == [5020, 5020]
    assert all(c["held"] < 100 and "overage" not in c for c in commits)
    assert before - await tokens_left(gw, h) == 2 * 5020


async def test_usage_beyond_the_balance_is_recorded_as_overage_and_never_goes_below_zero(gw, tenant, redis, client):
    from quota_gw.sidecar import settling

    def overage_total() -> float:
        return sum(s.value for m in settling.OVERAGE.collect() for s in m.samples if s.name.endswith("_total"))

    before = overage_total()
    org, h = await tenant("bulk")  # 1,000 tokens
    body = chat(20)
    r = await gw.http.post(CHAT, json=body, headers={**h, "X-Demo-Prompt-Tokens": "5000"})
    assert r.status_code == 200
    assert await tokens_left(gw, h) == 0
    commit = await wait_event(redis, gw, org, "commit")
    meta = orjson.loads(commit["meta"])
    assert (commit["cost"], commit["bal"], meta["requested"], meta["overage"]) == ("1000", "0", 5020, 4020)
    assert overage_total() - before == 4020  # quota_gw_overage_tokens_total, for operators
    # another hold stays covered: usage beyond the hold only takes what no other hold has taken
    org, h = await tenant("bulk")
    d = await client.post("/v1/reservations", json={"feature": "chat", "units": 600}, headers=h)
    assert d.status_code == 201
    r = await gw.http.post(CHAT, json=body, headers={**h, "X-Demo-Prompt-Tokens": "5000"})
    assert r.status_code == 200
    commit = await wait_event(redis, gw, org, "commit")
    assert commit["cost"] == "400" and orjson.loads(commit["meta"])["overage"] == 4620
    rid = d.json()["reservation_id"]
    c = await client.post(f"/v1/reservations/{rid}/commit", json={"units": 600}, headers=h)
    assert c.status_code == 200 and c.json()["cost"] == 600
    assert await tokens_left(gw, h) == 0


async def test_an_llm_call_spending_the_balance_below_a_threshold_records_one_alert_at_its_commit(gw, tenant, redis):
    org, h = await tenant("bulk")  # 1,000 tokens; alerts at 25, 10 and 0 %
    for prompt in ("800", "10"):  # 820 charged (the hold was far less): 180 left, 18 %; then ~30 more, still above 10 %
        r = await gw.http.post(CHAT, json=chat(20), headers={**h, "X-Demo-Prompt-Tokens": prompt})
        assert r.status_code == 200, r.text
    events = await org_events(redis, gw, org)
    kinds = [e["kind"] for e in events]
    assert kinds == ["reset", "reserve", "commit", "alert", "reserve", "commit"], kinds
    alert = events[3]
    meta = orjson.loads(alert["meta"])
    assert (meta["threshold"], meta["balance"], meta["base"]) == (25, 180, 1000)
    assert (alert["meter"], alert["feature"], alert["delta"]) == ("tokens", "chat", "0")


async def test_usage_beyond_the_hold_respects_a_user_sub_quota(gw, tenant, redis, admin):
    org, h = await tenant("pro")  # 100,000 tokens for the org
    await admin.quota(org, "tokens", 500, user_id="alice")
    r = await gw.http.post(CHAT, json=chat(20), headers={**h, "X-Quota-User": "alice", "X-Demo-Prompt-Tokens": "5000"})
    assert r.status_code == 200, r.text
    commit = await wait_event(redis, gw, org, "commit")
    assert commit["cost"] == "500" and orjson.loads(commit["meta"])["overage"] == 4520
    assert await tokens_left(gw, h) == 100_000 - 500
    r = await gw.http.post(CHAT, json=chat(20), headers={**h, "X-Quota-User": "alice"})
    assert r.status_code == 402  # alice's quota is spent, not overdrawn


async def test_the_decision_api_commit_still_never_charges_more_than_the_hold(client, tenant):
    org, h = await tenant("bulk")
    d = await client.post("/v1/reservations", json={"feature": "chat", "units": 100}, headers=h)
    rid = d.json()["reservation_id"]
    c = await client.post(f"/v1/reservations/{rid}/commit", json={"units": 300}, headers=h)
    assert c.status_code == 200 and c.json()["cost"] == 100


async def test_every_budget_field_the_caller_sent_is_set_to_the_hold(gw, tenant):
    org, h = await tenant("pro")
    before = await tokens_left(gw, h)
    body = chat(4000, max_completion_tokens=20, max_output_tokens=3000)
    r = await gw.http.post(CHAT, json=body, headers=h)
    assert r.status_code == 200
    sent = gw.demo.requests[-1]["body"]
    assert (sent["max_tokens"], sent["max_completion_tokens"], sent["max_output_tokens"]) == (20, 20, 20)
    assert r.json()["usage"]["completion_tokens"] == 20  # the demo spends the largest field it gets
    assert before - await tokens_left(gw, h) == metering.prompt_tokens("chat/completions", body) + 20
    # lowered to what the org can afford: every field, not only one
    org, h = await tenant("bulk")
    r = await gw.http.post(CHAT, json=chat(None, max_completion_tokens=5000), headers=h)
    sent = gw.demo.requests[-1]["body"]
    lowered = int(r.headers["X-Quota-Max-Tokens"])
    assert sent["max_completion_tokens"] == lowered < 1000 and "max_tokens" not in sent


async def test_more_completions_than_the_upstream_allows_are_refused_before_anything_is_held(gw, tenant):
    org, h = await tenant("pro")
    n = gw.demo.count
    r = await gw.http.post(CHAT, json=chat(10, n=129), headers=h)
    assert r.status_code == 400 and r.json()["field"] == "n"
    assert gw.demo.count == n and await tokens_left(gw, h) == 100_000


# --- headers (issue 8) ---------------------------------------------------------------------------

async def test_gateway_headers_in_any_spelling_never_reach_the_upstream(gw, tenant):
    org, h = await tenant("pro")
    r = await gw.http.get("/api/x", headers={**h, "X_Quota_Org": "victim-org", "x_quota_user": "alice",
                                              "X_Forwarded_For": "6.6.6.6", "X-Forwarded_Host": "evil",
                                              "Connection": "X_Drop_Me", "x-drop-me": "hop", "X_Custom": "kept"})
    assert r.status_code == 200, r.text
    hs = gw.demo.requests[-1]["headers"]
    assert hs["x-quota-org"] == org and hs["x-quota-user"] == "alice"  # the gateway's, read from x_quota_user
    assert hs["x-forwarded-for"] == "127.0.0.1" and hs["x-forwarded-host"] != "evil"
    assert hs["x_custom"] == "kept"
    names = [k.replace("_", "-") for k in hs]
    for name in ("x-quota-org", "x-quota-user", "x-forwarded-for", "x-forwarded-host", "authorization", "x-drop-me"):
        assert names.count(name) <= 1, (name, list(hs))
    assert "victim-org" not in hs.values() and "6.6.6.6" not in hs["x-forwarded-for"]


async def test_a_user_bound_key_naming_another_user_is_403_in_any_spelling(gw, tenant):
    org, h = await tenant("pro", user_id="bob")
    n = gw.demo.count
    for name in ("X-Quota-User", "X_Quota_User", "x_quota_user"):
        r = await gw.http.get("/api/x", headers={**h, name: "admin"})
        assert r.status_code == 403, (name, r.text)
    r = await gw.http.get("/v1/authorize", headers={**h, "X-Original-URI": "/api/x", "X_Quota_User": "admin"})
    assert r.status_code == 403
    assert gw.demo.count == n
    r = await gw.http.get("/api/x", headers={**h, "X_Quota_User": "bob"})
    assert r.status_code == 200 and gw.demo.requests[-1]["headers"]["x-quota-user"] == "bob"
    org, h = await tenant("pro")  # an org key: two spellings that disagree are refused
    r = await gw.http.get("/api/x", headers={**h, "X-Quota-User": "alice", "X_Quota_User": "admin"})
    assert r.status_code == 400


async def test_proxied_answers_carry_one_date_and_one_server(gw, tenant):
    org, h = await tenant("pro")
    for method, path, kw in (("GET", "/api/x", {}), ("POST", CHAT, {"json": chat(5)}),
                             ("POST", CHAT, {"json": chat(5, stream=True)})):
        r = await gw.http.request(method, path, headers=h, **kw)
        assert r.status_code == 200
        assert len(r.headers.get_list("date")) == 1 and len(r.headers.get_list("server")) == 1, r.headers


async def test_an_answer_too_large_to_read_is_charged_the_whole_hold(gw, tenant, redis, monkeypatch):
    from quota_gw.sidecar import settling

    monkeypatch.setattr(settling, "MAX_JSON_RESPONSE", 1000)  # a 500-token answer is ~2.5 kB
    org, h = await tenant("pro")
    before = await tokens_left(gw, h)
    body = chat(500)
    r = await gw.http.post(CHAT, json=body, headers=h)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 500  # forwarded whole
    commit = orjson.loads((await wait_event(redis, gw, org, "commit"))["meta"])
    assert commit["request"]["source"] == "over_limit"
    assert before - await tokens_left(gw, h) == metering.prompt_tokens("chat/completions", body) + 500


async def test_work_an_llm_route_cannot_meter_is_not_forwarded_free(gw, tenant):
    org, h = await tenant("pro")
    n = gw.demo.count
    for path in ("/v1/responses", "/v1/images/generations", "/v1/audio/speech"):
        r = await gw.http.post(path, json={"model": "demo-1", "input": "x" * 10_000}, headers=h)
        assert r.status_code == 404 and r.json()["code"] == "not_found", (path, r.text)
    assert gw.demo.count == n
    r = await gw.http.get("/v1/models", headers=h)  # reads still pass, unmetered
    assert r.status_code == 200 and await tokens_left(gw, h) == 100_000


async def test_a_batch_of_prompts_holds_a_completion_budget_for_each(gw, tenant, redis):
    org, h = await tenant("pro")
    body = {"model": "demo-1", "prompt": ["one", "two", "three"], "max_tokens": 100, "n": 2}
    r = await gw.http.post("/v1/completions", json=body, headers=h)
    assert r.status_code == 200, r.text
    held = orjson.loads((await wait_event(redis, gw, org, "reserve"))["meta"])["held"]
    assert held == metering.prompt_tokens("completions", body) + 100 * 2 * 3


async def test_usage_of_an_expired_hold_is_charged_as_far_as_the_balance_goes(redis_url, database_url, prefix, redis,
                                                                              tenant, client, tmp_path):
    demo_app = create_demo_app()
    async with serve(demo_app, lifespan="off") as up:
        cfg = proxy_config(f"http://127.0.0.1:{up.port}", str(tmp_path))
        cfg = cfg.model_copy(update={"behaviour": cfg.behaviour.model_copy(update={"reservation_ttl_s": 1})})
        app = create_app(cfg, redis_url, database_url, prefix)
        async with serve(app) as server:
            gw = Gateway(f"http://127.0.0.1:{server.port}", app, demo_app.state.demo.stats, Layout(prefix, cfg.shards))
            org, h = await tenant("bulk")  # 1,000 tokens
            slow = {**h, "X-Demo-Prompt-Tokens": "5000", "X-Demo-Token-Delay-Ms": "150"}
            call = asyncio.create_task(gw.http.post(CHAT, json=chat(20, stream=True), headers=slow))
            await wait_event(redis, gw, org, "reserve")
            async with asyncio.timeout(10):  # a write decision after expiry returns the hold
                while not [e for e in await org_events(redis, gw, org) if e["kind"] == "release"]:
                    await asyncio.sleep(0.2)
                    await client.post("/v1/consume", json={"feature": "generate_insight", "units": 1}, headers=h)
            r = await call
            assert r.status_code == 200
            # settled before the answer ended: the commit was 404 (expired), the usage a consume
            events = await org_events(redis, gw, org)
            assert not [e for e in events if e["kind"] == "commit"]
            charged = [e for e in events if e["kind"] == "consume" and e["feature"] == "chat"]
            assert len(charged) == 1
            meta = orjson.loads(charged[0]["meta"])
            assert (charged[0]["cost"], meta["requested"], meta["overage"]) == ("1000", 5020, 4020)
            assert await tokens_left(gw, h) == 0
            await gw.http.aclose()


async def test_a_body_nested_as_deep_as_json_allows_is_a_400_not_a_500(gw, tenant):
    org, h = await tenant("pro")
    n = gw.demo.count
    for depth in (300, 1000):  # orjson reads 1,024 levels, writes 255; Python recurses 1,000
        deep = "[" * depth + "]" * depth
        raw = ('{"model":"demo-1","max_tokens":5,"messages":[{"role":"user","content":"hi","name":"x",'
               f'"extra":{deep}}}],"tools":[{{"type":"function","function":{{"name":"f","parameters":{deep}}}}}]}}')
        r = await gw.http.post(CHAT, content=raw.encode(), headers={**h, "Content-Type": "application/json"})
        assert r.status_code == 400 and r.json()["code"] == "invalid_request", r.text
    assert gw.demo.count == n and await tokens_left(gw, h) == 100_000  # nothing held or charged


async def test_an_absurd_budget_is_held_at_the_largest_exact_amount_not_wrapped_to_zero(gw, tenant):
    org, h = await tenant("enterprise")  # unlimited tokens: nothing lowers the budget but the bound
    body = chat(10**18, n=128)
    r = await gw.http.post(CHAT, json=body, headers=h)
    assert r.status_code == 200, r.text
    sent = gw.demo.requests[-1]["body"]["max_tokens"]
    assert sent == int(r.headers["X-Quota-Max-Tokens"])
    assert sent == (config_mod.MAX_AMOUNT - metering.prompt_tokens("chat/completions", body)) // 128
