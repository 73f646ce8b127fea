"""The gateway as the benchmark serves it: the real app plus a hello-world route beside it."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from quota_gw import config
from quota_gw.app import create_app


async def hello(request: Request) -> Response:
    return PlainTextResponse("hello")


def factory():
    return create_app(config.load(), extra_routes=[Route("/hello", hello, methods=["GET", "POST"])])
