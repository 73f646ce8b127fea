"""POST /v1/check and /v1/consume are answered before Starlette's router (app.Gateway, for CPU:
docs/benchmarks.md); through the router (a request under a root_path goes that way) the same
requests must get the same answers, errors included: status, every header in order, body."""

from __future__ import annotations

import re
from typing import Any

import httpx

from quota_gw.app import Gateway

FEATURE = {"feature": "generate_insight"}


def answer(r: httpx.Response) -> tuple[int, list[tuple[str, str]], str]:
    return r.status_code, list(r.headers.multi_items()), re.sub(r"[0-9a-f]{32}", "<id>", r.text)


async def test_the_decision_routes_answer_the_same_with_and_without_the_router(app: Any, client: httpx.AsyncClient,
                                                                               tenant: Any) -> None:
    assert isinstance(app, Gateway) and set(app.direct) == {"/v1/check", "/v1/consume"}
    _, h = await tenant("pro")
    _, read_only = await tenant("pro")
    cases: list[tuple[str, dict[str, str], Any]] = [
        ("/v1/check", h, FEATURE),
        ("/v1/check", {**h, "X-Quota-User": "alice"}, FEATURE),
        ("/v1/consume", {}, FEATURE),
        ("/v1/consume", {"Authorization": "Bearer qgw_unknown"}, FEATURE),
        ("/v1/consume", h, b"{not json"),
        ("/v1/consume", h, b"[1]"),
        ("/v1/consume", h, b""),
        ("/v1/consume", h, b"x" * 70_000),
        ("/v1/consume", h, {"feature": "no-such-feature"}),
        ("/v1/consume", h, {**FEATURE, "units": 0}),
        ("/v1/consume", {**h, "X-Quota-User": "not a name"}, FEATURE),
        ("/v1/consume", {**h, "Idempotency-Key": "a\x7fb"}, FEATURE),
        ("/v1/consume", h, {**FEATURE, "metadata": "not an object"}),
        ("/v1/check", {**h, "Authorization": read_only["Authorization"].replace("qgw_", "qgw_x")}, FEATURE),
    ]
    routed = httpx.AsyncClient(transport=httpx.ASGITransport(app=app, root_path="/gw"), base_url="http://gw")
    async with routed:
        for path, headers, body in cases:
            kw: dict[str, Any] = {"json": body} if isinstance(body, dict) else {"content": body}
            direct = await client.post(path, headers=headers, **kw)
            via_router = await routed.post("/gw" + path, headers=headers, **kw)
            assert answer(direct) == answer(via_router), (path, headers)
        # A charge answers the same too (its own event id and the balance one lower).
        first = await client.post("/v1/consume", headers=h, json=FEATURE)
        second = await routed.post("/gw/v1/consume", headers=h, json=FEATURE)
        assert first.status_code == second.status_code == 200
        assert [k for k, _ in first.headers.multi_items()] == [k for k, _ in second.headers.multi_items()]
        assert second.json()["remaining"] == first.json()["remaining"] - 1
        assert first.json().keys() == second.json().keys()
