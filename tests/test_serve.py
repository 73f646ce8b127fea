"""`quota-gw serve` as users run it: a real uvicorn with several worker processes."""

from __future__ import annotations

import httpx

from conftest import ADMIN_TOKEN, served, test_config_data
from quota_gw import config as config_mod
from quota_gw.app import create_app


def test_serve_with_two_workers(tmp_path, redis_url, database_url, prefix):
    env = {"REDIS_URL": redis_url, "DATABASE_URL": database_url, "QUOTA_GW_PREFIX": prefix}
    with served(tmp_path, test_config_data(), env, "--workers", "2") as (base, ready):
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
