"""Upstream credentials per route (issue 9): `headers` with ${ENV}, read when the gateway starts.

A real gateway in front of a demo upstream that requires its own key, like a provider does:
the route adds the key, the caller's quota-gw key never reaches the upstream, a caller cannot
override the route's headers, and a missing variable stops the gateway, naming the route and
the variable and never a value.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from conftest import test_config_data
from quota_gw import config as config_mod
from quota_gw.app import create_app
from quota_gw.demo import create_demo_app
from quota_gw.dev import serve
from quota_gw.embedded import free_port

ROOT = Path(__file__).resolve().parent.parent
UPSTREAM_KEY = "sk-upstream-secret-4f1c"
VAR = "QGW_TEST_UPSTREAM_KEY"


def routes(upstream: str) -> list[dict[str, Any]]:
    return [
        {"prefix": "/v1/chat/completions", "upstream": upstream, "feature": "chat", "metering": "openai",
         "headers": {"Authorization": "Bearer ${" + VAR + "}", "OpenAI-Organization": "org-route",
                     "X-Literal": "cost$${NOT_A_VAR}"}},
        {"prefix": "/v1/models", "upstream": upstream, "metering": "none",
         "headers": {"Authorization": "Bearer ${" + VAR + "}"}},
        {"prefix": "/open", "upstream": upstream, "metering": "none"},
    ]


@pytest.fixture(scope="module")
async def keyed() -> AsyncIterator[tuple[str, Any]]:
    demo = create_demo_app(require_key=UPSTREAM_KEY)
    async with serve(demo, lifespan="off") as up:
        yield f"http://127.0.0.1:{up.port}", demo.state.demo.stats


def gateway_config(upstream: str) -> config_mod.Config:
    data = test_config_data()
    data["routes"] = routes(upstream)
    return config_mod.parse(data, "tests/test_route_headers.py")


async def test_the_demo_upstream_requires_its_key_in_openais_error_shape(keyed):
    base, _ = keyed
    async with httpx.AsyncClient(base_url=base) as c:
        r = await c.get("/v1/models")
        assert r.status_code == 401 and r.json()["error"]["type"] == "invalid_request_error"
        r = await c.get("/v1/models", headers={"Authorization": "Bearer sk-wrong"})
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert "sk-wrong" not in r.text
        r = await c.get("/v1/models", headers={"Authorization": f"Bearer {UPSTREAM_KEY}"})
        assert r.status_code == 200
        assert r.json()["object"] == "list"
        assert all(set(m) >= {"id", "object", "created", "owned_by"} for m in r.json()["data"])


async def test_a_route_adds_the_upstream_key_and_the_callers_key_never_reaches_it(
        keyed, monkeypatch, redis_url, database_url, prefix, redis, tenant):
    base, stats = keyed
    monkeypatch.setenv(VAR, UPSTREAM_KEY)
    app = create_app(gateway_config(base), redis_url, database_url, prefix)
    org, h = await tenant("pro")
    caller_key = h["Authorization"].removeprefix("Bearer ")
    async with serve(app) as gw, httpx.AsyncClient(base_url=f"http://127.0.0.1:{gw.port}", timeout=30) as c:
        body = {"model": "demo-1", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}
        r = await c.post("/v1/chat/completions", json=body, headers={
            **h, "OpenAI-Organization": "org-caller", "openai_organization": "org-caller2",
            "X-Literal": "caller"})
        assert r.status_code == 200, r.text
        seen = stats.requests[-1]["headers"]
        assert seen["authorization"] == f"Bearer {UPSTREAM_KEY}"
        assert seen["openai-organization"] == "org-route" and "openai_organization" not in seen
        assert seen["x-literal"] == "cost${NOT_A_VAR}"
        r = await c.get("/v1/models", headers=h)
        assert r.status_code == 200 and [m["id"] for m in r.json()["data"]] == ["demo-1", "demo-embed"]
        # a route without headers: the caller's key is still never forwarded (and the upstream says 401)
        r = await c.get("/open/x", headers=h)
        assert r.status_code == 401 and "authorization" not in stats.requests[-1]["headers"]
        assert all(caller_key not in v for req in stats.requests for v in req["headers"].values())
        r = await c.get("/v1/models")  # no quota-gw key: the gateway refuses before the upstream
        assert r.status_code == 401 and "problem" in r.headers["content-type"]


async def test_a_missing_variable_stops_the_gateway_naming_the_route_and_the_variable(monkeypatch, keyed):
    base, _ = keyed
    monkeypatch.delenv(VAR, raising=False)
    cfg = gateway_config(base)
    with pytest.raises(config_mod.ConfigError) as e:
        create_app(cfg)
    assert e.value.path == "routes.0.headers.Authorization"
    assert VAR in e.value.message and "/v1/chat/completions" in e.value.message
    monkeypatch.setenv(VAR, "")
    with pytest.raises(config_mod.ConfigError, match=f"{VAR} is empty"):
        create_app(cfg)
    monkeypatch.setenv(VAR, UPSTREAM_KEY + "\n")  # a key file read with its newline
    with pytest.raises(config_mod.ConfigError, match=f"{VAR} holds a line break") as e:
        create_app(cfg)
    assert UPSTREAM_KEY not in str(e.value)


def test_serve_refuses_to_start_without_the_variable_in_one_line(tmp_path):
    data = test_config_data()
    data["routes"] = routes("http://127.0.0.1:9")
    cfg = tmp_path / "gw.yaml"
    cfg.write_text(yaml.safe_dump(data))
    env = {k: v for k, v in os.environ.items() if k != VAR}
    p = subprocess.run([sys.executable, "-m", "quota_gw.cli", "serve", "--config", str(cfg), "--port",
                        str(free_port())], env=env, capture_output=True, text=True, timeout=60)
    assert p.returncode == 2
    assert p.stderr.strip().splitlines() == [
        f"quota-gw serve: bad config: {cfg}: routes.0.headers.Authorization: environment variable {VAR} is not set"
        " (route /v1/chat/completions)"]


def test_route_header_values_are_never_echoed_in_errors_or_repr():
    secret = "sk-literal-secret-9d2e"
    data = test_config_data()
    data["routes"] = [{"prefix": "/x", "upstream": "http://u", "metering": "none",
                       "headers": {"Authorization": f"Bearer {secret}"}}]
    cfg = config_mod.parse(data)
    assert secret not in repr(cfg) and secret not in str(cfg) and secret not in repr(cfg.routes[0])
    for headers, path, words in [
        ({"Authorization": f"Bearer {secret}\r\nX-Evil: 1"}, "routes.0.headers", "line break"),
        ({"Authorization": "Bearer ${" + secret}, "routes.0.headers", "must be followed by NAME}"),
        ({"Authorization": 12}, "routes.0.headers.Authorization", "valid string"),
        ({"Host": secret}, "routes.0.headers", "Host: set by the gateway"),
        ({"X_Quota_Org": secret}, "routes.0.headers.X_Quota_Org", "set by the gateway"),
        ({"Bad Name": secret}, "routes.0.headers", "not a header name"),
    ]:
        data["routes"][0]["headers"] = headers
        with pytest.raises(config_mod.ConfigError) as e:
            config_mod.parse(data, "f.yaml")
        assert e.value.path == path and words in e.value.message, (headers, str(e.value))
        assert secret not in str(e.value)


async def test_the_example_config_forwards_v1_models_unmetered(redis_url, database_url, prefix, redis, tenant):
    demo = create_demo_app()
    async with serve(demo, lifespan="off") as up:
        text = (ROOT / "examples" / "quota-gw.yaml").read_text().replace("127.0.0.1:9100", f"127.0.0.1:{up.port}")
        data = yaml.safe_load(text)
        data["plans"]["bulk"] = {"allocations": {"tokens": 1000}}
        app = create_app(config_mod.parse(data, "examples/quota-gw.yaml"), redis_url, database_url, prefix)
        org, h = await tenant("bulk")
        async with serve(app) as gw, httpx.AsyncClient(base_url=f"http://127.0.0.1:{gw.port}", timeout=30) as c:
            r = await c.get("/v1/models", headers=h)  # what client.models.list() sends
            assert r.status_code == 200, r.text
            listed = r.json()
            assert listed["object"] == "list" and {m["id"] for m in listed["data"]} == {"demo-1", "demo-embed"}
            assert all(m["object"] == "model" and isinstance(m["created"], int) for m in listed["data"])
            r = await c.get("/v1/models/demo-1", headers=h)  # client.models.retrieve()
            assert r.status_code == 200 and r.json()["id"] == "demo-1"
            r = await c.get("/v1/balance", headers=h)
            assert r.json()["meters"]["tokens"]["balance"] == 1000  # never charged
