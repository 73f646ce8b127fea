"""Which of an upstream answer's headers reach the caller: not one the gateway sets on that
answer (X-Quota-Remaining..., in any spelling), not the hop-by-hop ones, Date and Server once
(the gateway's), Content-Length only while the body is relayed unchanged; everything else as
the upstream sent it."""

from __future__ import annotations

from typing import Any

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from conftest import test_config_data
from quota_gw import config as config_mod
from quota_gw.app import create_app
from quota_gw.dev import serve

SPOOFED = [("X-Quota-Remaining", "999999"), ("X_Quota_Remaining", "888888"), ("X-Upstream", "kept"),
           ("Keep-Alive", "timeout=5")]


def spoofing_upstream() -> Starlette:
    async def answer(request: Request) -> Response:
        body = b'{"choices":[{"message":{"content":"hi"}}],"usage":{"total_tokens":12}}'
        r = Response(body, media_type="application/json")
        for k, v in SPOOFED:
            r.raw_headers.append((k.encode(), v.encode()))
        return r

    return Starlette(routes=[Route("/{path:path}", answer, methods=["GET", "POST"])])


async def test_the_upstream_cannot_speak_for_the_gateway_in_any_spelling(redis_url, database_url, prefix, tenant,
                                                                         tmp_path: Any):
    async with serve(spoofing_upstream(), lifespan="off") as up:
        data = test_config_data()
        base = f"http://127.0.0.1:{up.port}"
        data["routes"] = [{"prefix": "/fixed", "upstream": base, "feature": "generate_goal"},
                          {"prefix": "/v1", "upstream": base, "feature": "chat", "metering": "openai"}]
        data["behaviour"] = {"spool_dir": str(tmp_path)}
        app = create_app(config_mod.parse(data, "tests/test_answer_headers.py"), redis_url, database_url, prefix)
        async with serve(app) as gw, httpx.AsyncClient(base_url=f"http://127.0.0.1:{gw.port}") as c:
            _, h = await tenant("pro")
            for path, kw in (("/fixed/x", {}), ("/v1/chat/completions", {"json": {
                    "model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}})):
                r = await c.post(path, headers=h, **kw)
                assert r.status_code == 200, r.text
                names = [k.decode().lower().replace("_", "-") for k, _ in r.headers.raw]
                assert names.count("x-quota-remaining") == 1 and int(r.headers["x-quota-remaining"]) < 888888
                assert "keep-alive" not in names
                assert r.headers["x-upstream"] == "kept"
                assert names.count("date") == 1 and names.count("server") == 1
                # a fixed route relays the body unchanged; an LLM route settles before its end (chunked)
                assert ("content-length" in names) == (path == "/fixed/x"), names
                assert r.json()["choices"][0]["message"]["content"] == "hi"
