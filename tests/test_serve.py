"""`quota-gw serve` as users run it: a real uvicorn with several worker processes."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import httpx
import yaml

from conftest import ADMIN_TOKEN, test_config_data
from quota_gw import config as config_mod
from quota_gw.app import create_app
from quota_gw.embedded import free_port


def test_serve_with_two_workers(tmp_path, redis_url, database_url, prefix):
    cfg = tmp_path / "gw.yaml"
    cfg.write_text(yaml.safe_dump(test_config_data()))
    port = free_port()
    env = {**os.environ, "REDIS_URL": redis_url, "DATABASE_URL": database_url, "QUOTA_GW_PREFIX": prefix,
           "QUOTA_GW_ADMIN_TOKEN": ADMIN_TOKEN}
    proc = subprocess.Popen([sys.executable, "-m", "quota_gw.cli", "serve", "--config", str(cfg), "--port", str(port),
                             "--workers", "2", "--log-level", "warning"], env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"{base}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None, "serve exited"
            assert time.monotonic() < deadline, "serve did not become ready"
            time.sleep(0.1)
        admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
        with httpx.Client(base_url=base, timeout=10) as c:
            org = f"served-{port}"
            assert c.post("/v1/admin/orgs", json={"org_id": org, "plan": "bulk"}, headers=admin).status_code == 201
            key = c.post(f"/v1/admin/orgs/{org}/keys", json={"scopes": ["consume", "read"]}, headers=admin).json()["key"]
            h = {"Authorization": f"Bearer {key}"}
            codes = [c.post("/v1/consume", json={"feature": "generate_insight", "units": 30}, headers=h).status_code
                     for _ in range(4)]
            assert codes == [200, 200, 200, 402]
            assert c.get("/v1/balance", headers=h).json()["meters"]["general"]["balance"] == 10
    finally:
        proc.terminate()
        assert proc.wait(timeout=20) == 0


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
