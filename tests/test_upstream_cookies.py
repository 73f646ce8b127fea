"""The sidecar keeps no cookies: a Set-Cookie from the upstream goes to the caller it answered
and nowhere else. The pool is shared by every caller, so a cookie jar in it would hand one
caller's upstream session to the next caller's requests. (A named host: aiohttp's jar
refuses cookies from an IP address.)"""

from __future__ import annotations

from typing import Any

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from conftest import test_config_data
from quota_gw import config as config_mod
from quota_gw.app import create_app
from quota_gw.dev import serve


def cookie_upstream() -> Starlette:
    async def set_cookie(request: Request) -> Response:
        r = JSONResponse({"ok": True})
        r.set_cookie("session", "caller-a-secret", path="/")
        return r

    async def echo(request: Request) -> Response:
        return JSONResponse({"cookie": request.headers.get("cookie")})

    return Starlette(routes=[Route("/set", set_cookie), Route("/echo", echo)])


async def test_a_cookie_the_upstream_sets_reaches_its_caller_only(redis_url, database_url, prefix, tenant,
                                                                   tmp_path: Any):
    async with serve(cookie_upstream(), lifespan="off") as up:
        data = test_config_data()
        data["routes"] = [{"prefix": "/site", "upstream": f"http://localhost:{up.port}", "metering": "none",
                           "strip_prefix": True}]
        data["behaviour"] = {"spool_dir": str(tmp_path)}
        app = create_app(config_mod.parse(data, "tests/test_upstream_cookies.py"), redis_url, database_url, prefix)
        async with serve(app) as gw, httpx.AsyncClient(base_url=f"http://127.0.0.1:{gw.port}") as c:
            _, a = await tenant("pro")
            _, b = await tenant("pro")
            r = await c.get("/site/set", headers=a)
            assert r.status_code == 200 and "caller-a-secret" in r.headers["set-cookie"]
            c.cookies.clear()
            r = await c.get("/site/echo", headers=b)
            assert r.status_code == 200 and r.json() == {"cookie": None}
            r = await c.get("/site/echo", headers={**b, "Cookie": "mine=1"})  # the caller's own still pass
            assert r.json() == {"cookie": "mine=1"}
