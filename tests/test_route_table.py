"""RouteTable.match: the longest prefix covering a path on a segment boundary, remembered per
path (authorize asks for the same few paths on every call) and bounded (paths are the
caller's to choose)."""

from __future__ import annotations

from conftest import test_config_data
from quota_gw import config as config_mod
from quota_gw.sidecar.routing import RouteTable


def table() -> RouteTable:
    data = test_config_data()
    data["routes"] = [{"prefix": p, "upstream": "http://x", "metering": "none"}
                      for p in ("/ai", "/ai/goals", "/api/", "/")]
    return RouteTable(config_mod.parse(data))


def test_a_path_gets_the_same_route_the_first_time_and_the_next() -> None:
    t = table()
    expected = {"/ai": "/ai", "/ai/x": "/ai", "/ai/goals": "/ai/goals", "/ai/goals/1": "/ai/goals",
                "/ai/goalsx": "/ai", "/aix": "/", "/api/": "/api/", "/api/v1": "/api/", "/api": "/", "/x": "/"}
    for _ in range(2):
        assert {p: t.match(p).prefix for p in expected} == expected  # type: ignore[union-attr]


def test_the_remembered_paths_are_bounded_and_the_answers_stay_right() -> None:
    t = table()
    for i in range(10_000):
        assert t.match(f"/ai/goals/{i}").prefix == "/ai/goals"  # type: ignore[union-attr]
        assert t.match(f"/other/{i}").prefix == "/"  # type: ignore[union-attr]
    assert len(t._matched) <= 4096
    data = test_config_data()
    data["routes"] = [{"prefix": "/ai", "upstream": "http://x", "metering": "none"}]
    only = RouteTable(config_mod.parse(data))
    assert only.match("/nowhere") is None and only.match("/nowhere") is None and only.match("/ai/x") is not None
