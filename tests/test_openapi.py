"""The OpenAPI document (src/quota_gw/openapi.json, served at GET /openapi.json) is the API:
every route the app exposes is in it with the same methods, everything it lists exists, and
it is a valid OpenAPI 3.1 document. The fuzz run against a live gateway is test_openapi_fuzz.py."""

from __future__ import annotations

import re

from openapi_spec_validator import validate
from starlette.routing import Mount, Route

from conftest import test_config_data
from quota_gw import config as config_mod
from quota_gw import openapi
from quota_gw.app import create_app
from quota_gw.problems import TITLES

HTTP_METHODS = {"get", "put", "post", "delete", "options", "head", "patch", "trace"}


def app_routes(config: config_mod.Config) -> dict[str, set[str]]:
    """{path: methods} the app answers, without the configured proxy prefixes. Starlette adds
    HEAD to every GET route by itself; the document lists HEAD nowhere, so it is left out."""
    proxied = {r.prefix.rstrip("/") + "{rest:path}" for r in config.routes}
    out: dict[str, set[str]] = {}
    for r in create_app(config, "redis://127.0.0.1:1/0", "").routes:
        if isinstance(r, Mount) and r.path == "/dashboard/static":
            continue  # the pages' files (scripts, styles, Chart.js): not API; the pages are documented
        assert isinstance(r, Route), f"not a plain route: {r!r}"
        if r.path in proxied:
            continue
        path = re.sub(r"\{(\w+):\w+\}", r"{\1}", r.path)
        methods = {m.lower() for m in r.methods or ()}
        if "get" in methods:
            methods.discard("head")
        out.setdefault(path, set()).update(methods)
    return out


def documented(doc: dict) -> dict[str, set[str]]:
    return {path: {m for m in ops if m in HTTP_METHODS} for path, ops in doc["paths"].items()}


def sidecar_config() -> config_mod.Config:
    data = test_config_data()
    data["routes"] = [
        {"prefix": "/ai/goals", "upstream": "http://127.0.0.1:9", "feature": "generate_goal"},
        {"prefix": "/v1/chat/completions", "upstream": "http://127.0.0.1:9", "feature": "chat", "metering": "openai"},
    ]
    return config_mod.parse(data)


def test_every_route_is_documented_and_every_documented_route_exists():
    cfg = sidecar_config()
    assert documented(openapi.document()) == app_routes(cfg)


def test_the_route_check_sees_an_undocumented_route():
    """The comparison above is not vacuous: a route added to the app shows up in it."""
    cfg = sidecar_config()
    routes = app_routes(cfg)
    assert "/v1/chat/completions" not in routes and "/ai/goals" not in routes  # proxy prefixes left out
    assert routes["/v1/authorize/{rest}"] == {"get", "post", "put", "patch", "delete", "options"}
    assert routes["/v1/reservations/{rid}"] == {"delete"}


def test_document_is_valid_openapi_3_1():
    doc = openapi.document()
    assert doc["openapi"].startswith("3.1")
    validate(doc)


def test_served_document_names_the_deployment(config):
    doc = openapi.for_config(config)
    validate(doc)
    s = doc["components"]["schemas"]
    assert s["FeatureName"]["enum"] == sorted(config.features)
    assert s["MeterName"]["enum"] == list(config.meter_names)
    assert "pro" in s["PlanName"]["enum"]
    assert s["ConsumeRequest"]["properties"]["units"]["maximum"] == config.behaviour.max_units


def test_event_kinds_are_the_ledgers():
    """EventKind is events.KINDS (held to what the scripts write by tests/test_event_schema.py)."""
    from quota_gw import events

    assert openapi.document()["components"]["schemas"]["EventKind"]["enum"] == list(events.KINDS)


def test_problem_codes_are_the_ones_the_gateway_uses():
    assert set(openapi.document()["components"]["schemas"]["Problem"]["properties"]["code"]["enum"]) == set(TITLES)


def test_every_operation_documents_its_errors_as_problems():
    doc = openapi.document()
    for path, ops in doc["paths"].items():
        for method, op in ops.items():
            for status, resp in op["responses"].items():
                if status.startswith("4") or (status.startswith("5") and path not in ("/readyz",)):
                    name = resp["$ref"].rsplit("/", 1)[-1]
                    content = doc["components"]["responses"][name]["content"]
                    assert list(content) == ["application/problem+json"], (method, path, status)


async def test_gateway_serves_its_document(client, config):
    r = await client.get("/openapi.json")
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    doc = r.json()
    assert doc["paths"].keys() == openapi.document()["paths"].keys()
    assert doc["components"]["schemas"]["FeatureName"]["enum"] == sorted(config.features)
