"""A second LLM metering kind, Anthropic-style messages: one class in metering.py plus its name
in config.Route.metering, and the sidecar holds, rewrites and settles it like openai.

The upstream is a few lines of Starlette answering /v1/messages the way Anthropic's API does
(usage as input/output tokens; streamed, split over message_start and message_delta).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import httpx
import orjson
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from conftest import test_config_data
from quota_gw import config as config_mod
from quota_gw import metering
from quota_gw.app import create_app
from quota_gw.dev import serve
from quota_gw.layout import Layout
from quota_gw.events import entries

INPUT, CACHED, OUTPUT = 11, 5, 7  # what the upstream reports, whatever it is sent


def sse(event: dict[str, Any]) -> bytes:
    return b"event: " + event["type"].encode() + b"\ndata: " + orjson.dumps(event) + b"\n\n"


STREAM = [
    {"type": "message_start", "message": {"id": "msg_1", "type": "message", "role": "assistant", "content": [],
                                          "usage": {"input_tokens": INPUT, "cache_read_input_tokens": CACHED,
                                                    "output_tokens": 1}}},
    {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
    {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Hel"}},
    {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "lo"}},
    {"type": "content_block_stop", "index": 0},
    {"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": {"output_tokens": OUTPUT}},
    {"type": "message_stop"},
]


def messages_upstream() -> tuple[Starlette, list[dict[str, Any]]]:
    seen: list[dict[str, Any]] = []

    async def messages(request: Request) -> Response:
        body = orjson.loads(await request.body())
        seen.append(body)
        if body.get("stream"):
            async def events() -> AsyncIterator[bytes]:
                for e in STREAM:
                    yield sse(e)
            return StreamingResponse(events(), media_type="text/event-stream")
        return Response(orjson.dumps({
            "id": "msg_1", "type": "message", "role": "assistant", "content": [{"type": "text", "text": "Hello"}],
            "usage": {"input_tokens": INPUT, "cache_read_input_tokens": CACHED, "output_tokens": OUTPUT}}),
            media_type="application/json")

    return Starlette(routes=[Route("/v1/messages", messages, methods=["POST"])]), seen


@pytest.fixture(scope="module")
async def gw(redis_url: str, database_url: str, prefix: str, redis: Any,
             tmp_path_factory: Any) -> AsyncIterator[tuple[httpx.AsyncClient, list[dict[str, Any]], Layout]]:
    upstream, seen = messages_upstream()
    async with serve(upstream, lifespan="off") as up:
        data = test_config_data()
        data["routes"] = [{"prefix": "/anthropic", "upstream": f"http://127.0.0.1:{up.port}", "feature": "chat",
                           "metering": "anthropic", "strip_prefix": True}]
        data["behaviour"] = {"spool_dir": str(tmp_path_factory.mktemp("spool"))}
        cfg = config_mod.parse(data, "tests/test_anthropic_metering.py")
        app = create_app(cfg, redis_url, database_url, prefix)
        async with serve(app) as server:
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.port}", timeout=30) as http:
                yield http, seen, Layout(prefix, cfg.shards)


async def tokens_left(http: httpx.AsyncClient, h: dict[str, str]) -> int:
    m = (await http.get("/v1/balance", headers=h)).json()["meters"]["tokens"]
    assert m["held"] == 0, "a hold was left behind"
    return m["balance"]


async def commit_meta(redis: Any, layout: Layout, org: str) -> dict[str, Any]:
    async with asyncio.timeout(10):
        while True:
            for e in entries(await redis.xrange(layout.stream(org))):
                if e["org"] == org and e["kind"] == "commit":
                    return orjson.loads(e["meta"])
            await asyncio.sleep(0.02)


BODY = {"model": "claude-x", "system": "Be brief.", "max_tokens": 300,
        "messages": [{"role": "user", "content": "Say hello."}]}


def test_the_anthropic_metering_reads_its_own_bodies_and_usage():
    api = metering.METERINGS["anthropic"]
    assert api.endpoint("/v1/messages") == "messages" and api.endpoint("/v1/chat/completions") is None
    assert api.prompt_tokens("messages", BODY, 0) == 3 + 3 + (4 + 3)  # reply + system + one message
    assert api.usage_total({"input_tokens": 3, "cache_creation_input_tokens": 2, "output_tokens": 4}) == 9
    assert api.usage_total({"prompt_tokens": 3, "completion_tokens": 4}) is None  # OpenAI's names are not its
    m = metering.StreamMeter(api=api)
    raw = b"".join(sse(e) for e in STREAM)
    assert b"".join(m.feed(raw[i:i + 5]) for i in range(0, len(raw), 5)) + m.flush() == raw
    assert m.total() == INPUT + CACHED + OUTPUT and m.completion_chunks == 2


@pytest.mark.parametrize("stream", [False, True])
async def test_an_anthropic_route_holds_the_budget_and_charges_the_reported_usage(gw, tenant, redis, stream):
    http, seen, layout = gw
    org, h = await tenant("pro")
    before = await tokens_left(http, h)
    r = await http.post("/anthropic/v1/messages", json={**BODY, "stream": stream}, headers=h)
    assert r.status_code == 200, r.text
    assert (b"message_stop" in r.content) if stream else r.json()["content"][0]["text"] == "Hello"
    assert seen[-1]["max_tokens"] == 300 and "stream_options" not in seen[-1]  # its own budget field, nothing added
    meta = await commit_meta(redis, layout, org)
    assert meta["request"]["source"] == "usage" and meta["request"]["tokens"] == INPUT + CACHED + OUTPUT
    assert before - await tokens_left(http, h) == INPUT + CACHED + OUTPUT


async def test_an_anthropic_route_lowers_max_tokens_to_what_the_org_can_pay(gw, tenant):
    http, seen, _ = gw
    org, h = await tenant("bulk")  # 1,000 tokens
    r = await http.post("/anthropic/v1/messages", json={**BODY, "max_tokens": 5000}, headers=h)
    assert r.status_code == 200, r.text
    lowered = int(r.headers["X-Quota-Max-Tokens"])
    assert seen[-1]["max_tokens"] == lowered < 1000
