"""The pages the gateway serves: the token dashboard (GET /dashboard), the ops dashboard (GET /ops),
their static files (GET /dashboard/static/...), and the admin route that mints signed read-only
dashboard links (POST /v1/admin/orgs/{org_id}/dashboard-links).

The pages are package data (web/), Chart.js included (web/vendor/, see its README): nothing is
fetched from the network when they run, and they read the JSON API only, so a number on a page is
the API's. Credentials never travel in a URL the server sees: a key or admin token typed into the
page stays in the tab's sessionStorage, a signed link's token sits in the URL fragment.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from starlette.requests import Request
from starlette.responses import FileResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from . import links
from .admin import _admin
from .api import int_field, json_body, json_response
from .problems import Problem

WEB = Path(__file__).resolve().parent / "web"
DEFAULT_LINK_TTL_S, MAX_LINK_TTL_S = 3600, 7 * 86400

# Everything the pages load comes from this origin; no inline script or style, no framing.
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                               "connect-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'",
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-cache",
}


def _page(name: str) -> Response:
    return FileResponse(WEB / name, media_type="text/html; charset=utf-8", headers=PAGE_HEADERS)


async def dashboard(request: Request) -> Response:
    return _page("dashboard.html")


async def ops(request: Request) -> Response:
    return _page("ops.html")


def dashboard_url(base: str, org_id: str, expires_at: int) -> str:
    return f"{base.rstrip('/')}/dashboard#t={links.mint(org_id, expires_at)}"


async def create_dashboard_link(request: Request) -> Response:
    """POST /v1/admin/orgs/{org_id}/dashboard-links {ttl_s?} -> 201 {url, org_id, expires_at}."""
    c = await _admin(request)
    org_id = request.path_params["org_id"]
    ttl = int_field(await json_body(request, required=False), "ttl_s", DEFAULT_LINK_TTL_S, 60, MAX_LINK_TTL_S)
    await c.store.require_org(org_id)
    if not links.can_mint():
        raise Problem(503, "unavailable", "no signing secret: set QUOTA_GW_DASHBOARD_SECRET or QUOTA_GW_ADMIN_TOKEN")
    expires_at = int(time.time()) + ttl
    base = os.environ.get("QUOTA_GW_PUBLIC_URL") or str(request.base_url)
    return json_response({"url": dashboard_url(base, org_id, expires_at), "org_id": org_id,
                          "expires_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(expires_at))}, 201)


routes = [
    Route("/dashboard", dashboard, methods=["GET", "HEAD"]),
    Route("/ops", ops, methods=["GET", "HEAD"]),
    Mount("/dashboard/static", StaticFiles(directory=WEB), name="dashboard-static"),
    Route("/v1/admin/orgs/{org_id}/dashboard-links", create_dashboard_link, methods=["POST"]),
]
