"""`quota-gw serve` as users run it: a real uvicorn with several worker processes."""

from __future__ import annotations

import gc
import subprocess
import sys

import httpx
import yaml

from conftest import ADMIN_TOKEN, served, test_config_data
from quota_gw import config as config_mod
from quota_gw import embedded
from quota_gw.app import GC_YOUNG_THRESHOLD, create_app


def test_serve_with_two_workers(tmp_path, redis_url, database_url, prefix):
    env = {"REDIS_URL": redis_url, "DATABASE_URL": database_url, "QUOTA_GW_PREFIX": prefix}
    data = test_config_data()
    data["routes"] = [{"prefix": "/ai", "upstream": "http://127.0.0.1:9", "metering": "none"}]
    authorize_port = embedded.free_port()
    with served(tmp_path, data, env, "--workers", "2", "--authorize-port", str(authorize_port)) as (base, ready):
        assert ready.status_code == 200, ready.text
        admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
        with httpx.Client(base_url=base, timeout=10) as c:
            org = f"served-{base.rsplit(':', 1)[1]}"
            assert c.post("/v1/admin/orgs", json={"org_id": org, "plan": "bulk"}, headers=admin).status_code == 201
            key = c.post(f"/v1/admin/orgs/{org}/keys", json={"scopes": ["consume", "read"]}, headers=admin).json()["key"]
            h = {"Authorization": f"Bearer {key}"}
            codes = [c.post("/v1/consume", json={"feature": "generate_insight", "units": 30}, headers=h).status_code
                     for _ in range(4)]
            assert codes == [200, 200, 200, 402]
            assert c.get("/v1/balance", headers=h).json()["meters"]["general"]["balance"] == 10
        # the authorize port, shared by both workers: new connections answered, whichever takes them
        for _ in range(8):
            with httpx.Client(base_url=f"http://127.0.0.1:{authorize_port}", timeout=10) as a:
                r = a.head("/v1/authorize", headers={**h, "X-Original-URI": "/ai/x"})
                assert r.status_code == 200 and r.headers["x-quota-org"] == org
                assert a.get("/v1/balance", headers=h).status_code == 404  # that port answers authorize alone


def test_serve_refuses_an_authorize_port_that_is_its_own_port(tmp_path):
    cfg = tmp_path / "gw.yaml"
    cfg.write_text(yaml.safe_dump(test_config_data()))
    r = subprocess.run([sys.executable, "-m", "quota_gw.cli", "serve", "--config", str(cfg), "--port", "8999",
                        "--authorize-port", "8999"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "--authorize-port 8999: a port 1..65535 other than --port" in r.stderr


async def test_unknown_users_refused_when_registration_is_off(redis_url, database_url, prefix, admin):
    data = test_config_data()
    data["behaviour"] = {"auto_register_users": False}
    app = create_app(config_mod.parse(data), redis_url, database_url, prefix)
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw") as c:
            org = await admin.org("pro")
            h = {"Authorization": f"Bearer {await admin.key(org)}"}
            r = await c.post("/v1/consume", json={"feature": "generate_goal", "user_id": "stranger"}, headers=h)
            assert r.status_code == 403 and r.json()["code"] == "forbidden" and "stranger" in r.json()["detail"]
            await admin.user(org, "stranger")
            r = await c.post("/v1/consume", json={"feature": "generate_goal", "user_id": "stranger"}, headers=h)
            assert r.status_code == 200


async def test_a_serving_app_freezes_its_start_up_and_collects_young_objects_less_often_until_it_stops(config, redis_url,
                                                                                                      prefix):
    outer = gc.get_threshold()
    gc.unfreeze()  # another app of this session may be serving
    gc.set_threshold(700, 10, 10)  # CPython's defaults
    try:
        application = create_app(config, redis_url, "", prefix)
        async with application.router.lifespan_context(application):
            assert gc.get_threshold() == (GC_YOUNG_THRESHOLD, 10, 10)
            assert gc.get_freeze_count() > 0  # start-up's objects: out of the collector's walks
        assert gc.get_threshold() == (700, 10, 10)
        assert gc.get_freeze_count() == 0  # the stopped app's objects are collectable again
    finally:
        gc.set_threshold(*outer)
