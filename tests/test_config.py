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
])
def test_bad_config_names_the_key(patch, path, words):
    with pytest.raises(config_mod.ConfigError) as e:
        config_mod.parse({**BASE, **patch}, "gw.yaml")
    assert e.value.file == "gw.yaml"
    assert e.value.path == path, str(e.value)
    assert words in e.value.message
    assert str(e.value).startswith(f"gw.yaml: {path}: ")


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


def test_wheel_ships_the_lua_scripts(tmp_path):
    """An installed gateway finds its scripts without the source tree."""
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                        str(tmp_path), str(ROOT)], capture_output=True, text=True, timeout=300)
    if r.returncode != 0 and "No module named" in r.stderr:
        pytest.skip(f"cannot build a wheel here: {r.stderr.strip()[-200:]}")
    assert r.returncode == 0, r.stderr
    (wheel,) = tmp_path.glob("quota_gw-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for script in ("consume", "check", "reserve", "commit", "release", "refund", "grant", "_lib"):
        assert f"quota_gw/lua/{script}.lua" in names
    assert "quota_gw/migrations/001_core.sql" in names
    assert "quota_gw/client/__init__.py" in names and "quota_gw/client/sync.py" in names  # the client ships too
    assert "quota_gw/openapi.json" in names  # GET /openapi.json
