"""A bad config file is refused at start, naming the file, the key path and what is wrong."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml

from quota_gw import config as config_mod

ROOT = Path(__file__).resolve().parent.parent


def test_example_config_holds_the_seed_catalogue():
    c = config_mod.load(ROOT / "examples" / "quota-gw.yaml")
    assert {f: (x.meter, x.cost) for f, x in c.features.items() if f != "chat"} == {
        "generate_leads": ("lead_generation", 5), "generate_goal": ("goal_generation", 3),
        "analyze_strategy": ("strategy_analysis", 2), "forecast_revenue": ("forecast", 4),
        "generate_insight": ("general", 1)}
    pro = c.plans["pro"]
    assert [pro.allocation(m) for m in ("lead_generation", "goal_generation", "strategy_analysis", "forecast",
                                       "general")] == [50, 20, 100, 30, 50]
    assert (pro.rate_limits.user.limit, pro.rate_limits.user.window) == (5, 60)
    assert all(c.plans["starter"].allocation(m) == 0 for m in c.meter_names)
    ent = c.plans["enterprise"]
    assert [ent.allocation(m) for m in ("lead_generation", "goal_generation", "strategy_analysis", "forecast",
                                       "general")] == [500, 200, 1000, 200, 500]


BASE = {"meters": ["general"], "features": {"f": {"meter": "general", "cost": 1}},
        "plans": {"p": {"allocations": {"general": 5}}}}


@pytest.mark.parametrize("patch, path, words", [
    ({"features": {"f": {"meter": "gold", "cost": 1}}}, "features.f.meter", "unknown meter 'gold'"),
    ({"features": {"f": {"meter": "general", "cost": -2}}}, "features.f.cost", "greater than or equal to 0"),
    ({"features": {"f": {"meter": "general"}}}, "features.f.cost", "required key is missing"),
    ({"plans": {"p": {"allocations": {"silver": 5}}}}, "plans.p.allocations.silver", "unknown meter"),
    ({"plans": {"p": {"allocations": {"general": -5}}}}, "plans.p.allocations", "allocation must be"),
    ({"plans": {"p": {"rate_limits": {"user": {"limit": 5, "window": "soon"}}}}}, "plans.p.rate_limits.user.window", "not a duration"),
    ({"plans": {"p": {"rate_limits": {"user": {"limit": 0, "window": 60}}}}}, "plans.p.rate_limits.user.limit", "greater than 0"),
    ({"routes": [{"prefix": "ai", "upstream": "http://x", "feature": "f"}]}, "routes.0.prefix", "must start with '/'"),
    ({"routes": [{"prefix": "/ai", "upstream": "http://x", "feature": "g"}]}, "routes.0.feature", "unknown feature 'g'"),
    ({"routes": [{"prefix": "/ai", "upstream": "ftp://x", "feature": "f"}]}, "routes.0.upstream", "not an http(s) URL"),
    ({"shards": 0}, "shards", "greater than or equal to 1"),
    ({"colour": "blue"}, "colour", "unknown key"),
    ({"default_plan": "gold"}, "default_plan", "unknown plan"),
    ({"meters": ["general\n"]}, "meters", "must match"),
    ({"features": {"f\n": {"meter": "general", "cost": 1}}}, "features.f\n", "must match"),
    ({"routes": [{"prefix": "/ai", "upstream": "http://x\n", "feature": "f"}]}, "routes.0.upstream", "not an http(s) URL"),
    ({"behaviour": {"max_body_bytes": 10}}, "behaviour.max_body_bytes", "greater than or equal to 1024"),
    ({"behaviour": {"max_header_bytes": 10**9}}, "behaviour.max_header_bytes", "less than or equal to"),
    ({"behaviour": {"max_headers": 2}}, "behaviour.max_headers", "greater than or equal to 16"),
    ({"plans": {"p": {"rate_limits": {"user": {"limit": 5, "window": 60, "overflow": "debt"}}}}},
     "plans.p.rate_limits.user.overflow", "'none' or 'credit'"),
    ({"plans": {"p": {"rate_limits": {"user": {"limit": 5, "window": 60, "overflow_cost": 0}}}}},
     "plans.p.rate_limits.user.overflow_cost", "greater than or equal to 1"),
    ({"plans": {"p": {"overflow_cost": 0}}}, "plans.p.overflow_cost", "greater than or equal to 1"),
    ({"plans": {"p": {"credit_order": ["grants"]}}}, "plans.p.credit_order", "once each"),
    ({"plans": {"p": {"credit_order": ["grants", "gifts"]}}}, "plans.p.credit_order.1", "'grants' or 'purchased'"),
])
def test_bad_config_names_the_key(patch, path, words):
    with pytest.raises(config_mod.ConfigError) as e:
        config_mod.parse({**BASE, **patch}, "gw.yaml")
    assert e.value.file == "gw.yaml"
    assert e.value.path == path, str(e.value)
    assert words in e.value.message
    assert str(e.value).startswith(f"gw.yaml: {path}: ")


def test_overflow_defaults_keep_a_hard_rate_limit_and_credit_past_the_allocation():
    plan = config_mod.parse(BASE).plans["p"]
    assert (plan.overflow, plan.overflow_cost, plan.credit_order) == ("credit", 1, ["grants", "purchased"])
    rl = config_mod.parse({**BASE, "plans": {"p": {"rate_limits": {"user": {
        "limit": 5, "window": "1m", "overflow": "credit", "overflow_cost": 2}}}}}).plans["p"].rate_limits.user
    assert (rl.limit, rl.window, rl.overflow, rl.overflow_cost) == (5, 60, "credit", 2)
    assert config_mod.parse(BASE).plans["p"].rate_limits.user is None


def test_serve_refuses_a_bad_file_at_start(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({**BASE, "features": {"f": {"meter": "nope", "cost": 1}}}))
    r = subprocess.run([sys.executable, "-m", "quota_gw.cli", "serve", "--config", str(bad), "--port", "1"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert f"{bad}: features.f.meter: unknown meter 'nope'" in r.stderr
    broken = tmp_path / "broken.yaml"
    broken.write_text("meters: [a\nfeatures: {")
    r = subprocess.run([sys.executable, "-m", "quota_gw.cli", "serve", "--config", str(broken)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and f"{broken}: not valid YAML: line" in r.stderr
    r = subprocess.run([sys.executable, "-m", "quota_gw.cli", "serve", "--config", str(tmp_path / "missing.yaml")],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "cannot read" in r.stderr


def test_wheel_ships_the_lua_scripts(wheel):
    """An installed gateway finds its scripts without the source tree."""
    names = zipfile.ZipFile(wheel).namelist()
    for script in ("consume", "check", "reserve", "commit", "release", "refund", "grant", "_lib", "worker_maintain",
                   "worker_forget"):
        assert f"quota_gw/lua/{script}.lua" in names
    assert "quota_gw/migrations/001_core.sql" in names
    assert "quota_gw/client/__init__.py" in names and "quota_gw/client/sync.py" in names  # the client ships too
    assert "quota_gw/openapi.json" in names  # GET /openapi.json


def test_request_limits_have_defaults_and_are_configurable():
    b = config_mod.parse(BASE).behaviour
    assert (b.max_body_bytes, b.max_header_bytes, b.max_headers) == (64 * 1024, 32 * 1024, 100)
    b = config_mod.parse({**BASE, "behaviour": {"max_body_bytes": 2048, "max_header_bytes": 8192,
                                                 "max_headers": 20}}).behaviour
    assert (b.max_body_bytes, b.max_header_bytes, b.max_headers) == (2048, 8192, 20)


async def test_the_configured_body_limit_is_the_one_applied(redis_url, database_url, prefix, admin):
    import httpx

    from conftest import test_config_data
    from quota_gw.app import create_app

    data = test_config_data()
    data["behaviour"] = {"max_body_bytes": 2048}
    app = create_app(config_mod.parse(data), redis_url, database_url, prefix)
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw") as c:
            org = await admin.org("bulk")
            h = {"Authorization": f"Bearer {await admin.key(org)}"}
            body = {"feature": "generate_insight", "pad": "x" * 1900}
            assert (await c.post("/v1/check", json=body, headers=h)).status_code == 200
            r = await c.post("/v1/check", json={**body, "pad": "x" * 2100}, headers=h)
            assert r.status_code == 413 and r.headers["content-type"] == "application/problem+json"
