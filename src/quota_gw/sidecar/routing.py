"""Which configured route a path belongs to, and that route's effective settings.

A prefix matches whole path segments and the longest one wins. Routes are ordered once
(`longest_first`); the same order serves matching here and the Starlette routes that mount
them (sidecar/__init__.py), so the two cannot disagree.
"""

from __future__ import annotations

from collections.abc import Sequence

from ..config import Config
from ..config import Route as RouteConfig
from ..problems import Problem


def longest_first(routes: Sequence[RouteConfig]) -> list[int]:
    """Indexes of `routes`, longest prefix first (equal lengths keep the config's order)."""
    return sorted(range(len(routes)), key=lambda i: len(routes[i].prefix), reverse=True)


class RouteTable:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.routes = [config.routes[i] for i in longest_first(config.routes)]

    def match(self, path: str) -> RouteConfig | None:
        """The longest configured prefix that covers `path` on a segment boundary."""
        for r in self.routes:
            p = r.prefix
            if path == p or path.startswith(p if p.endswith("/") else p + "/"):
                return r
        return None

    def shadow(self, route: RouteConfig) -> bool:
        return self.config.behaviour.shadow if route.shadow is None else route.shadow

    def fail_open(self, route: RouteConfig) -> bool:
        return (route.fail or self.config.behaviour.fail) == "open"


def target(route: RouteConfig, path: str, query: bytes) -> str:
    """The upstream URL of a call on `route` (404 when the path only shares the prefix's
    characters, not its segments: /ai/goalsx on /ai/goals)."""
    rest = path[len(route.prefix.rstrip("/")):]
    if rest and not rest.startswith("/") and not route.prefix.endswith("/"):
        raise Problem(404, "not_found", f"no route for {path}")
    url = route.upstream + ((rest or "/") if route.strip_prefix else path)
    if query:
        url += "?" + query.decode("latin-1")
    return url
