"""The upstream connection pool, and the one case in which a request is sent twice.

aiohttp pools connections per upstream; the sidecar keeps one session per keep-alive setting
(aiohttp sets it per connector). What this module adds is a look at a pooled connection
before it is reused (LiveConnector, LiveRequest) and `send`, which resends a request only
when that look found the connection closed before a byte was written.
"""

from __future__ import annotations

import select
import time
from contextvars import ContextVar
from typing import Any

import aiohttp
from prometheus_client import Counter

from .. import metrics

DROPPED_IDLE = Counter("quota_gw_upstream_idle_dropped_total", "Pooled upstream connections found closed by "
                       "the upstream just before reuse (the request went on another one)", registry=metrics.REGISTRY)
RESENT = Counter("quota_gw_upstream_resent_total", "Requests sent again on a new connection because their "
                 "pooled one was found closed before a byte was written", registry=metrics.REGISTRY)


def session(keepalive_s: float) -> aiohttp.ClientSession:
    """A pooled client for upstreams whose idle connections are kept `keepalive_s`."""
    conn = LiveConnector(limit=0, limit_per_host=0, ttl_dns_cache=300, keepalive_timeout=keepalive_s,
                         enable_cleanup_closed=False)
    # No cookie jar: the pool serves every caller, so a cookie the upstream set for one would
    # go out with the next caller's requests (and filtering a jar costs every call).
    return aiohttp.ClientSession(
        connector=conn, request_class=LiveRequest, auto_decompress=False, trust_env=False,
        cookie_jar=aiohttp.DummyCookieJar(),
        skip_auto_headers=("User-Agent", "Accept-Encoding", "Content-Type"),
        timeout=aiohttp.ClientTimeout(total=None))


async def send(session: aiohttp.ClientSession, method: str, url: str, headers: list[tuple[str, str]],
               body: bytes, timeout: aiohttp.ClientTimeout) -> aiohttp.ClientResponse:
    """Sends the request; once more on a new connection only if the first attempt found its
    pooled connection closed before writing a byte (see LiveConnector for why no other)."""
    attempt: dict[str, bool] = {}
    token = _ATTEMPT.set(attempt)
    try:
        return await session.request(method, url, headers=headers, data=body or None,
                                     allow_redirects=False, timeout=timeout)
    except aiohttp.ClientConnectionError:
        if not attempt.get("unsent"):
            raise
    finally:
        _ATTEMPT.reset(token)
    RESENT.inc()
    fresh = _FRESH.set(True)
    try:
        return await session.request(method, url, headers=headers, data=body or None,
                                     allow_redirects=False, timeout=timeout)
    finally:
        _FRESH.reset(fresh)


class LiveConnector(aiohttp.TCPConnector):
    """The upstream pool, with a look at a pooled connection before it is reused.

    The race: the upstream closes an idle keep-alive connection (uvicorn after 5 s) just as the
    gateway picks it for a request; the request meets a closed socket, reaches no one, and the
    caller got a 502. The defences, in order:

    1. `upstream_keepalive_s` (per route, default 4 s) below the upstream's own idle timeout:
       the pool gives a connection up before the upstream does (aiohttp checks on every reuse).
    2. Here, when a pooled connection is picked: a look at its socket (poll(2) without waiting).
       End of stream, an error or bytes nobody asked for mean the upstream closed it; it is
       dropped and the request takes another one, or a new one.
    3. LiveRequest, just before the first byte is written: the same look. A connection closed
       in between (the body is written by a task of its own, a loop turn later) is closed
       unwritten, and `send` (below) sends the request once more, on a new connection.

    A request of which anything was written is never sent again, whatever the error
    (ServerDisconnectedError, ClientOSError): on the wire, an upstream that read the request
    and then died looks exactly like one that closed the idle connection as the request
    crossed, and the upstream may have started, and billed, the work. That is a 502 and the
    charge is refunded."""

    async def _get(self, key: Any, traces: Any) -> Any:
        if _FRESH.get():
            return None  # a resend: never a pooled connection
        conns = self._conns.get(key)  # aiohttp's idle pool for this host (a deque of (proto, t))
        if conns:
            # Only the connection aiohttp will take is looked at (one syscall per call, not one
            # per idle connection): it takes the oldest that is connected and within keep-alive.
            now, keepalive = time.monotonic(), self._keepalive_timeout
            for proto, t0 in conns:
                if not proto.is_connected() or (keepalive is not None and now - t0 > keepalive):
                    continue  # aiohttp's _get discards it itself
                if not closed_by_peer(proto.transport):
                    break
                proto.close()  # not connected any more: aiohttp's _get discards it
                DROPPED_IDLE.inc()
        return await super()._get(key, traces)


class LiveRequest(aiohttp.ClientRequest):
    """Looks at the connection again right before the request is written (LiveConnector, 3):
    when sending starts (the head of a request without a body is written in that same step)
    and when the body-writing task starts (a loop turn later; it writes head and body at once)."""

    async def send(self, conn: Any) -> aiohttp.ClientResponse:
        if _closed(conn):
            raise Unsent(WRITE_REFUSED)
        return await super().send(conn)

    async def write_bytes(self, writer: Any, conn: Any, content_length: int | None = None) -> None:
        if _closed(conn):
            conn.close()  # nothing written: the response read fails, and send() sends it again
            return
        await super().write_bytes(writer, conn, content_length)


class Unsent(aiohttp.ClientConnectionError):
    """The connection was found closed before a byte of the request was written."""


def _closed(conn: Any) -> bool:
    proto = conn.protocol
    if proto is not None and proto.is_connected() and not closed_by_peer(proto.transport):
        return False
    attempt = _ATTEMPT.get()
    if attempt is not None:
        attempt["unsent"] = True
    return True


# Per forwarded call (context variables reach the connector and the body-writing task):
_ATTEMPT: ContextVar[dict[str, bool] | None] = ContextVar("qgw_upstream_attempt", default=None)
_FRESH: ContextVar[bool] = ContextVar("qgw_upstream_fresh", default=False)
WRITE_REFUSED = "the upstream closed the pooled connection before the request was written"


def closed_by_peer(transport: Any) -> bool:
    """True when the socket under `transport` has an end of stream, an error or unread bytes
    waiting (an idle HTTP/1.1 connection has none of those). One poll(2) with no wait on a
    poll object kept for the purpose (a MSG_PEEK recv needed a socket object made and detached
    around it: ~7× the CPU)."""
    sock = transport.get_extra_info("socket") if transport is not None else None
    if sock is None:
        return False
    fd = sock.fileno()
    if fd < 0:
        return True
    _POLL.register(fd, select.POLLIN | select.POLLPRI)  # POLLHUP and POLLERR are always reported
    try:
        return bool(_POLL.poll(0))
    finally:
        _POLL.unregister(fd)


_POLL = select.poll()  # the event loop's thread only, like everything here
