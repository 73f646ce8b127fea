"""A call's bytes: the request read whole, sent upstream over the pool, the answer streamed back.

The request body is read whole (AI calls are small; larger than MAX_BODY is 413). The answer
is relayed chunk by chunk as it arrives, through the call's Charge (which may watch it for
usage or rewrite it), while the client is watched for going away. How it ended — done, the
client gone, the upstream cut — decides how the Charge settles (settling.py); the last byte
reaches the client only after that, so the quota headers and the charge agree.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from starlette.types import Receive, Send

from ..api import receive_body
from ..config import Route as RouteConfig
from ..problems import Problem
from . import pool
from .headers import RESPONSE_DROP, header_key
from .settling import Charge

log = logging.getLogger("quota_gw.proxy")

UPSTREAM_DOWN = (OSError, TimeoutError)  # pool.py's errors: the socket's, ServerDisconnected, BadResponse
MAX_BODY = 16 * 1024 * 1024  # request bodies are read whole (AI calls are small); larger is 413


def read_body(receive: Receive, method: str, framed: bool) -> Awaitable[bytes]:
    """The request body, whole, to await (`framed`: Content-Length or Transfer-Encoding was sent;
    a GET or HEAD without either has none to wait for). A client gone before its end is
    ClientDisconnect, answered as on every route (app.on_client_gone). receive_body's coroutine
    itself, not one around it: each level costs its making and a pass on every resume."""
    if method in ("GET", "HEAD") and not framed:
        return _no_body()
    return receive_body(receive, None, MAX_BODY)


async def _no_body() -> bytes:
    return b""


async def forward(upstream: pool.Pool, route: RouteConfig, method: str, receive: Receive, send: Send, url: str,
                  headers: list[tuple[str, str]], body: bytes, charge: Charge) -> None:
    answered = False
    try:
        try:
            resp = await upstream.request(method, url, headers, body, route.connect_timeout_s,
                                          route.timeout_s)
        except TimeoutError:
            await charge.failed("timeout")
            raise Problem(504, "upstream_timeout", f"the upstream did not answer within {route.timeout_s:g} s; "
                          "nothing was charged", headers=charge.headers()) from None
        except UPSTREAM_DOWN as e:
            await charge.failed("connect")
            raise Problem(502, "upstream_error", f"the upstream is unreachable ({type(e).__name__}); "
                          "nothing was charged", headers=charge.headers()) from None
        answered = True
        try:  # (not `async with resp`: two coroutines a call for nothing to await)
            await relay(receive, send, resp, charge)
        finally:
            resp.release()
    finally:
        if not charge.settled:  # cancelled (shutdown) or a bug: settle by how far it got
            await asyncio.shield(charge.abandoned() if answered else charge.failed("error"))


async def relay(receive: Receive, send: Send, resp: pool.Response, charge: Charge) -> None:
    charge.status = resp.status
    sse = resp.content_type.startswith(b"text/event-stream")
    charge.start(sse)
    if resp.status in charge.route.refund_statuses:
        # Known failure before a byte is sent: settle first, so the quota headers are true.
        await charge.failed(f"status {resp.status}")
    elif charge.redis_down:
        charge.rewrites = True  # the spool entry is written before the client sees the end
    ours = charge.raw_headers()
    # the upstream cannot speak for the gateway (X-Quota-*) in any spelling either
    drop = dropped(tuple(dict(ours)), charge.rewrites)
    out = []
    for k, v in resp.raw_headers:
        lower, key = _NAMES[k]
        if key not in drop:
            out.append((lower, v))
    out += ours
    start = {"type": "http.response.start", "status": resp.status, "headers": out}
    if resp.complete():
        # The whole body came with the head (most small answers): nothing left to stream, so
        # no copy and watch tasks. It settles before anything is sent, and the body goes out
        # as the last message: one write for body and end (a chunked answer's end was a write
        # of its own, and a wake-up of the client).
        body = resp.read_now()
        body = (charge.feed(body) if body else b"") + charge.flush()
        await charge.succeeded()
        try:
            await send(start)
            await send({"type": "http.response.body", "body": body, "more_body": False})
        except OSError:  # ASGI 2.4 servers raise when the client has gone: it is settled already
            pass
        return
    await send(start)
    ended = await pump(resp, receive, send, charge.feed)
    if ended == "done":
        tail = charge.flush()
        await charge.succeeded()
        await send({"type": "http.response.body", "body": tail, "more_body": False})
    elif ended == "disconnect":
        await charge.abandoned()
    else:  # the upstream broke mid-answer: refund, and cut the client's response too
        await charge.failed("cut mid-response")


def dropped(ours: tuple[bytes, ...], rewrites: bool) -> frozenset[str]:
    """The header_keys of the upstream's answer headers that do not cross: RESPONSE_DROP, the
    gateway's own (`ours`), and Content-Length when the body may change. One set per
    combination (a few), made once."""
    drop = _DROPS.get((ours, rewrites))
    if drop is None:
        drop = RESPONSE_DROP | {header_key(k) for k in ours} | ({"content-length"} if rewrites else set())
        if len(_DROPS) < 1024:
            _DROPS[(ours, rewrites)] = drop
    return drop


_DROPS: dict[tuple[tuple[bytes, ...], bool], frozenset[str]] = {}


class _Names(dict[bytes, tuple[bytes, str]]):
    """An upstream answer's header name -> (in lower case, its header_key), learnt once (bounded:
    names are the upstream's to choose)."""

    def __missing__(self, name: bytes) -> tuple[bytes, str]:
        if len(self) >= 4096:
            self.clear()
        self[name] = found = (name.lower(), header_key(name))
        return found


_NAMES = _Names()


async def pump(resp: pool.Response, receive: Receive, send: Send,
               feed: Callable[[bytes], bytes]) -> str:
    """Copies the upstream body to the client as it arrives. Returns 'done', 'disconnect'
    (the client went away: stop reading, the upstream is closed) or 'upstream' (it broke)."""

    async def copy() -> None:
        async for chunk in resp.chunks():
            out = feed(chunk)
            if out:
                try:
                    await send({"type": "http.response.body", "body": out, "more_body": True})
                except OSError as e:  # ASGI 2.4 servers raise when the client has gone
                    raise _ClientGone() from e

    async def watch() -> None:
        while (await receive())["type"] != "http.disconnect":
            pass

    copier = asyncio.ensure_future(copy())
    watcher = asyncio.ensure_future(watch())
    try:
        done, _ = await asyncio.wait({copier, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t in (copier, watcher):
            if not t.done():
                t.cancel()
        await asyncio.gather(copier, watcher, return_exceptions=True)
    if copier in done and not copier.cancelled():
        exc = copier.exception()
        if exc is None:
            return "done"
        if isinstance(exc, _ClientGone):
            return "disconnect"
        if isinstance(exc, UPSTREAM_DOWN):
            log.warning("upstream cut mid-response: %r", exc)
            return "upstream"
        raise exc
    return "disconnect"


class _ClientGone(Exception):
    """Sending to the client failed: it went away (not the upstream's fault)."""
