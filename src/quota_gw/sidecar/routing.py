"""Which configured route a path belongs to, and that route's effective settings.

A prefix matches whole path segments (`covers`) and the longest one wins. Routes are ordered
once (`longest_first`); the same order and the same rule serve matching here and the Starlette
routes that mount them (PrefixRoute), so the two cannot disagree. (A `{rest:path}` pattern
matched characters, not segments: /ai/goalsx went to /ai/goals, which refused it, instead of
to /ai; a POST to /openapi.json went to a route /open instead of being 405.)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from starlette._utils import get_route_path
from starlette.routing import Match, Route
from starlette.types import Scope

from ..config import Config
from ..config import Route as RouteConfig
from ..problems import Problem


def covers(prefix: str, path: str) -> bool:
    """Whether `path` is under `prefix` on a segment boundary (/ai/goals covers /ai/goals and
    /ai/goals/x, not /ai/goalsx; /api/ covers /api/ and /api/x)."""
    return path == prefix or path.startswith(prefix if prefix.endswith("/") else prefix + "/")


def longest_first(routes: Sequence[RouteConfig]) -> list[int]:
    """Indexes of `routes`, longest prefix first (equal lengths keep the config's order)."""
    return sorted(range(len(routes)), key=lambda i: len(routes[i].prefix), reverse=True)


class RouteTable:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.routes = [config.routes[i] for i in longest_first(config.routes)]
        # path -> its route (None: none), remembered: authorize asks for the same few paths on every call
        self._matched: dict[str, RouteConfig | None] = {}

    def match(self, path: str) -> RouteConfig | None:
        """The longest configured prefix that covers `path` on a segment boundary."""
        try:
            return self._matched[path]
        except KeyError:
            pass
        route = next((r for r in self.routes if covers(r.prefix, path)), None)
        if len(self._matched) >= 4096:  # paths are the caller's to choose: bounded
            self._matched.clear()
        self._matched[path] = route
        return route

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


class PrefixRoute(Route):
    """The Starlette route of one configured prefix: it matches what `covers` says (its path,
    `<prefix>{rest:path}`, only names it), with `rest` the path after the prefix."""

    def __init__(self, prefix: str, endpoint: Any, methods: list[str]) -> None:
        super().__init__((prefix.rstrip("/") or "/") + "{rest:path}", endpoint, methods=methods)
        self.prefix = prefix
        self._under = prefix if prefix.endswith("/") else prefix + "/"
        self._cut = len(prefix.rstrip("/"))

    def matches(self, scope: Scope) -> tuple[Match, Scope]:
        if scope["type"] == "http":
            path = get_route_path(scope)
            if path == self.prefix or path.startswith(self._under):
                child = {"endpoint": self.endpoint, "path_params": {**scope.get("path_params", {}),
                                                                    "rest": path[self._cut:]}}
                return (Match.FULL if not self.methods or scope["method"] in self.methods else Match.PARTIAL), child
        return Match.NONE, {}
