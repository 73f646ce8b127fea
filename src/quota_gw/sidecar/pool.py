"""The upstream client: HTTP/1.1 on pooled keep-alive connections, parsed by httptools.

Why not aiohttp's client: the proxy sends one small request and relays one answer per call,
and aiohttp's generality (a request and a response object with multidicts, a payload
registry, a body-writing task, trace hooks, a cookie filter) cost ~90 µs of CPU per JSON
call where this client, which writes the request in one `write` and hands the answer's bytes
over as the parser yields them, costs ~50 (docs/benchmarks.md, "Sidecar, round 3"). What it keeps of aiohttp's behaviour: the request line and Host as
yarl would make them, `Accept: */*` when the caller sent none, `Content-Length` on every
method that may carry a body, TLS for https upstreams, no cookies, no redirects followed,
bodies passed through untouched (no decompression).

The keep-alive race: the upstream closes an idle connection (uvicorn after 5 s) just as the
gateway picks it; a request written on it reaches no one and comes back as a 502. The
defences, in order:

1. `upstream_keepalive_s` (per route, default 4 s) below the upstream's own idle timeout: the
   pool gives a connection up before the upstream does (looked at on every pick, and a
   timer closes the ones left idle).
2. When a pooled connection is picked, a look at its socket (poll(2) without waiting): end of
   stream, an error or bytes nobody asked for mean the upstream closed it; it is dropped
   (`quota_gw_upstream_idle_dropped_total`) and the request takes another one, or a new one.
   The request is written in the same step, with no wait between the look and the write.

A request of which anything was written is never sent again, whatever the error: on the
wire, an upstream that read the request and then died looks exactly like one that closed
the idle connection as the request crossed, and the upstream may have started, and billed,
the work. That is a 502 and the charge is refunded.

Errors: connecting fails with the OSError of the socket (ConnectionRefusedError, ...); an
answer that stops early is `ServerDisconnected`, one that does not parse `BadResponse` (both
ConnectionError); no head, or no byte for `read_timeout` while streaming, is TimeoutError.
"""

from __future__ import annotations

import asyncio
import base64
import re
import select
import ssl
from collections.abc import AsyncIterator
from typing import Any

import httptools
from prometheus_client import Counter
from yarl import URL

from .. import metrics

DROPPED_IDLE = Counter("quota_gw_upstream_idle_dropped_total", "Pooled upstream connections found closed by "
                       "the upstream just before reuse (the request went on another one)", registry=metrics.REGISTRY)

_BODYLESS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE"})  # aiohttp sends no Content-Length: 0 on these
# A request target that needs no quoting (yarl would leave it as it is): the common case, checked once
_PLAIN_TARGET = re.compile(r"[A-Za-z0-9\-._~/?=&:@!$'()*+,;]*")
# Control characters are refused in header names and values as aiohttp refuses them (header
# injection): each line of the head ends in the one CRLF, and has no other control character
# (tab is allowed). Looked for in UTF-8, where every byte below 0x80 is that ASCII character.
_CONTROL = bytes([*range(0x00, 0x09), *range(0x0A, 0x20), 0x7F])  # with CR and LF
_INLINE_BODY = 64 * 1024  # smaller bodies go out in the same buffer as the head


def checked(text: str, crlfs: int) -> str:
    """`text`, which must hold exactly `crlfs` CRLF pairs and no other CR, LF or control
    character (the pairs are counted, and deleting every CR, LF and control character must take
    2 × crlfs bytes); ValueError otherwise."""
    data = text.encode("utf-8")
    if data.count(b"\r\n") != crlfs or len(data) - len(data.translate(None, _CONTROL)) != 2 * crlfs:
        raise ValueError("Forbidden control character detected in headers. Potential header injection attack.")
    return text


class _Lines(dict[tuple[str, ...], str]):
    """The head's lines, made and checked (`checked`) once: a header's (`Name: value`, CRLF) by
    (name, value), and the request line with Host by (method, target, host). A route's calls
    repeat them (the caller's client, the forwarding and identity headers, the route's own);
    formatting and checking the whole head on every call was most of the cost of writing it.
    `accept`: the lines of an Accept header (any case), so a caller's Accept is found among the
    lines in C. Bounded (values are the caller's to choose): emptied between requests, never
    while one request's lines are looked up, so `accept` always holds that request's."""

    def __init__(self) -> None:
        super().__init__()
        self.accept: set[str] = set()

    def bound(self) -> None:
        if len(self) >= 4096:
            self.clear()
            self.accept.clear()

    def __missing__(self, key: tuple[str, ...]) -> str:
        if len(key) == 3:  # the request line and Host
            method, target, host = key
            line = checked(f"{method} {target} HTTP/1.1\r\nHost: {host}\r\n", 2)
        else:
            name, value = key
            line = checked(f"{name}: {value}\r\n", 1)
            if len(name) == 6 and name.lower() == "accept":
                self.accept.add(line)
        self[key] = line
        return line


_LINES = _Lines()
_LINE = _LINES.__getitem__


class ServerDisconnected(ConnectionError):
    """The upstream closed the connection before the answer was complete."""


class BadResponse(ConnectionError):
    """The upstream's answer is not HTTP/1.1 the parser accepts."""


class Origin:
    """An upstream's scheme, host and port, read once (yarl's rules, as aiohttp read them)."""

    __slots__ = ("host", "port", "ssl", "host_header", "auth")

    def __init__(self, url: URL) -> None:
        if not url.raw_host or url.scheme not in ("http", "https"):
            raise ValueError(f"not an http(s) URL: {url}")
        self.host: str = url.raw_host
        self.port: int = url.port or (443 if url.scheme == "https" else 80)
        self.ssl = url.scheme == "https"
        self.host_header: str = url.host_port_subcomponent or self.host
        self.auth: str | None = None
        if url.raw_user or url.raw_password:  # user:password@ in the upstream URL is basic auth
            raw = f"{url.user or ''}:{url.password or ''}".encode("latin-1")
            self.auth = "Basic " + base64.b64encode(raw).decode("ascii")


class Response:
    """An upstream answer: status and raw headers at once, the body as it arrives."""

    __slots__ = ("conn", "status", "raw_headers", "content_type", "framed", "done", "keep_alive", "_parts",
                 "_error", "_eof_ends")

    def __init__(self, conn: Connection) -> None:
        self.conn: Connection | None = conn
        self.status = 0
        self.raw_headers: list[tuple[bytes, bytes]] = []
        self.content_type = b""
        self.framed = False  # Content-Length or Transfer-Encoding was sent
        self.done = False  # the whole body has arrived
        self.keep_alive = False
        self._parts: list[bytes] = []
        self._error: BaseException | None = None
        self._eof_ends = False  # no length, not chunked: the body ends when the connection does

    def complete(self) -> bool:
        """Whether the whole body has arrived (the usual case for a small answer)."""
        return self.done

    def read_now(self) -> bytes:
        """The body bytes that have arrived and were not read yet."""
        parts = self._parts
        if not parts:
            return b""
        self._parts = []
        return parts[0] if len(parts) == 1 else b"".join(parts)

    async def chunks(self) -> AsyncIterator[bytes]:
        """The body, as it arrives; raises ServerDisconnected, BadResponse or TimeoutError when it
        breaks off."""
        while True:
            if self._parts:
                yield self.read_now()
            elif self.done:
                return
            elif self._error is not None:
                raise self._error
            else:
                conn = self.conn
                assert conn is not None
                await conn.wait()

    def release(self) -> None:
        """Gives the connection back to the pool when the answer was read whole and the upstream
        keeps it open; closes it otherwise (an answer abandoned halfway cannot be reused)."""
        conn, self.conn = self.conn, None
        if conn is None:
            return
        if self.done and self.keep_alive and not self._parts:
            conn.idle()
        else:
            conn.close()

    async def __aenter__(self) -> Response:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.release()


class _Roles(dict[bytes, int]):
    """An answer's header name -> what the client reads of it: _TYPE (Content-Type), _FRAMING
    (Content-Length, Transfer-Encoding), 0 nothing. Learnt once per spelling, so a header costs
    one look-up in C (bounded: names are the upstream's to choose)."""

    def __missing__(self, name: bytes) -> int:
        if len(self) >= 4096:
            self.clear()
        lower = name.lower()
        role = self[name] = _TYPE if lower == b"content-type" else \
            _FRAMING if lower in (b"content-length", b"transfer-encoding") else 0
        return role


_TYPE, _FRAMING = 1, 2
_TIMER_SLACK_S = 0.001  # a timer may fire this early (the loop's clock counts milliseconds)
_ROLES = _Roles()


class Connection(asyncio.Protocol):
    """One keep-alive connection to an upstream; one request at a time. Its parser lives as
    long as it does (llhttp starts each answer afresh): making one per request cost as much as
    parsing the answer (httptools looks up each of its callbacks on the protocol, and five of
    them are missing here)."""

    def __init__(self, pool: Pool, key: tuple[str, int, bool]) -> None:
        self.pool, self.key = pool, key
        self.transport: asyncio.Transport | None = None
        self.parser: Any = None
        self.resp: Response | None = None
        self.head_only = False  # HEAD: the answer has no body, whatever its Content-Length says
        self.waiter: asyncio.Future[None] | None = None
        self.read_timeout = 60.0
        self.deadline = 0.0  # loop time by which the awaited bytes must have come (wait)
        self.timer: asyncio.TimerHandle | None = None  # fires at or before the deadline
        self.timer_at = 0.0  # when it fires
        self.idle_since = 0.0
        self.closed = False
        self.poller: Any = None  # its socket's own poll object (peer_closed)

    # -- asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.fileno() >= 0:
            self.poller = select.poll()
            self.poller.register(sock.fileno(), select.POLLIN | select.POLLPRI)  # POLLHUP, POLLERR: always

    def data_received(self, data: bytes) -> None:
        resp = self.resp
        if resp is None or resp.done:  # bytes nobody asked for: this connection cannot be trusted
            self.close()
            return
        try:
            self.parser.feed_data(data)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade) as e:
            self._fail(BadResponse(f"the upstream's answer does not parse: {e}"))
            self.close()

    def eof_received(self) -> bool:
        return False  # close the transport (connection_lost follows)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.pool.forget(self)
        resp = self.resp
        if resp is not None and not resp.done:
            if resp._eof_ends and resp.status:
                resp.done = True
                self._wake()
            else:
                self._fail(ServerDisconnected("the upstream closed the connection before the answer was complete"))

    # -- httptools callbacks
    def on_message_begin(self) -> None:
        resp = self.resp
        if resp is not None and resp.done:  # a second answer to one request: the connection is out of step
            resp.keep_alive = False

    def on_header(self, name: bytes, value: bytes) -> None:
        resp = self.resp
        resp.raw_headers.append((name, value))  # type: ignore[union-attr]
        role = _ROLES[name]
        if role:
            if role == _TYPE:
                resp.content_type = value  # type: ignore[union-attr]
            else:
                resp.framed = True  # type: ignore[union-attr]

    def on_headers_complete(self) -> None:
        resp = self.resp
        assert resp is not None
        status = self.parser.get_status_code()
        if 100 <= status < 200 and status != 101:  # an interim answer (103 Early Hints): the real one follows
            resp.raw_headers = []
            resp.content_type = b""
            resp.framed = False
            return
        resp.status = status
        resp.keep_alive = self.parser.should_keep_alive()
        if self.head_only:
            resp.done = True
            self.parser = None  # whatever Content-Length says, nothing follows
        elif status not in (204, 304) and not resp.framed:
            resp._eof_ends = True
            resp.keep_alive = False
        self._wake()

    def on_body(self, body: bytes) -> None:
        self.resp._parts.append(body)  # type: ignore[union-attr]
        self._wake()

    def on_message_complete(self) -> None:
        resp = self.resp
        if resp is None or not resp.status:  # the end of an interim answer
            return
        resp.done = True
        self._wake()

    # -- the gateway's side
    def send(self, data: bytes, body: bytes, head_only: bool, read_timeout: float) -> Response:
        self.resp = resp = Response(self)
        if self.parser is None:  # a new connection, or the last answer was to a HEAD
            self.parser = httptools.HttpResponseParser(self)
        self.head_only = head_only
        self.read_timeout = read_timeout
        assert self.transport is not None
        if body and len(body) > _INLINE_BODY:
            self.transport.writelines((data, body))
        else:
            self.transport.write(data + body if body else data)
        return resp

    def wait(self) -> asyncio.Future[None]:
        """A future done when the parser has more for the answer, failed when the connection
        breaks or `read_timeout` passes first. The connection's one timer is moved, not remade:
        a wait sets the deadline, and the timer, firing before it, sets itself again for it (a
        timer made and cancelled around each wait was ~4k instructions a call)."""
        loop = self.pool.loop
        self.deadline = deadline = loop.time() + self.read_timeout
        if self.timer_at > deadline or self.timer is None:  # (earlier: a shorter timeout than the last call's)
            if self.timer is not None:
                self.timer.cancel()
            self.timer = loop.call_at(deadline, self._check_deadline)
            self.timer_at = deadline
        fut = self.waiter = loop.create_future()
        return fut

    def _check_deadline(self) -> None:
        self.timer = None
        fut = self.waiter
        if fut is None or fut.done() or self.closed:
            return  # nothing waits: the next wait sets the timer again
        loop = self.pool.loop
        if loop.time() < self.deadline - _TIMER_SLACK_S:
            self.timer = loop.call_at(self.deadline, self._check_deadline)
            self.timer_at = self.deadline
            return
        self._fail(TimeoutError(f"no answer from the upstream within {self.read_timeout:g} s"))
        self.close()

    def _wake(self) -> None:
        fut = self.waiter
        if fut is not None and not fut.done():
            fut.set_result(None)

    def _fail(self, error: BaseException) -> None:
        resp = self.resp
        if resp is not None and not resp.done and resp._error is None:
            resp._error = error
        fut = self.waiter
        if fut is not None and not fut.done():
            fut.set_exception(error)

    def peer_closed(self) -> bool:
        """True when its socket has an end of stream, an error or unread bytes waiting (an idle
        HTTP/1.1 connection has none of those). One poll(2) with no wait, on a poll object of
        the connection's own with its socket registered once (a MSG_PEEK recv needed a socket
        object made and detached around it: ~7× the CPU; finding the socket and registering it
        around each look, a shared poll object's way, were ~5k instructions a call)."""
        poller = self.poller
        return poller is not None and bool(poller.poll(0))

    def idle(self) -> None:
        self.resp = None
        if self.closed:
            return
        self.idle_since = self.pool.loop.time()
        self.pool.put(self)

    def close(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.transport is not None and not self.closed:
            self.transport.close()
        self.closed = True
        self.pool.forget(self)


class Pool:
    """Idle keep-alive connections per upstream (host, port, TLS), kept `keepalive_s`."""

    def __init__(self, keepalive_s: float) -> None:
        self.keepalive_s = keepalive_s
        self.idle: dict[tuple[str, int, bool], list[Connection]] = {}
        self.busy: set[Connection] = set()
        self.origins: dict[str, Origin] = {}
        self.targets: dict[str, tuple[Origin, str]] = {}  # url -> _split(url)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._sweeper: asyncio.TimerHandle | None = None
        self._ssl: ssl.SSLContext | None = None

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        return self._loop

    async def request(self, method: str, url: str, headers: list[tuple[str, str]], body: bytes,
                      connect_timeout: float, read_timeout: float) -> Response:
        """Sends the request and returns the answer once its head has arrived (release it, or
        use it as an async context manager)."""
        origin, target = self._split(url)
        if origin.auth is not None:  # user:password@ in the upstream URL: its Authorization, not the caller's
            headers = [(k, v) for k, v in headers if k.lower() != "authorization"]
            headers.append(("Authorization", origin.auth))
        _LINES.bound()
        lines = [_LINES[(method, target, origin.host_header)], *map(_LINE, headers)]
        if _LINES.accept.isdisjoint(lines):
            lines.append("Accept: */*\r\n")
        if body or method not in _BODYLESS:
            lines.append(f"Content-Length: {len(body)}\r\n")
        lines.append("\r\n")
        data = "".join(lines).encode("utf-8")  # as aiohttp wrote them
        conn = self._pick(origin) or await self._connect(origin, connect_timeout)
        self.busy.add(conn)
        try:
            resp = conn.send(data, body, method == "HEAD", read_timeout)
            while not resp.status:  # until the head has arrived
                if resp._error is not None:
                    raise resp._error
                await conn.wait()
            return resp
        except BaseException:
            conn.close()
            raise

    def _split(self, url: str) -> tuple[Origin, str]:
        """(origin, request target) of an absolute URL; the target quoted as yarl quotes it.
        Remembered by URL: a route's calls go to a few (bounded: paths are the callers')."""
        known = self.targets.get(url)
        if known is not None:
            return known
        cut = url.find("/", url.find("://") + 3)
        base, target = (url, "/") if cut < 0 else (url[:cut], url[cut:])
        origin = self.origins.get(base)
        if origin is None:
            origin = Origin(URL(base))
            if len(self.origins) < 1024:  # routes' upstreams: few
                self.origins[base] = origin
        if not _PLAIN_TARGET.fullmatch(target):
            target = URL(url).raw_path_qs
        if len(self.targets) >= 4096:
            self.targets.clear()
        self.targets[url] = known = (origin, target)
        return known

    def _pick(self, origin: Origin) -> Connection | None:
        conns = self.idle.get((origin.host, origin.port, origin.ssl))
        if not conns:
            return None
        oldest_kept = self.loop.time() - self.keepalive_s
        while conns:
            conn = conns.pop()  # the most recently used: the others may time out unused
            if conn.closed:
                continue
            if conn.idle_since < oldest_kept:
                conn.close()
                continue
            if conn.peer_closed():
                conn.close()
                DROPPED_IDLE.inc()
                continue
            return conn
        return None

    async def _connect(self, origin: Origin, timeout: float) -> Connection:
        key = (origin.host, origin.port, origin.ssl)
        ctx = None
        if origin.ssl:
            if self._ssl is None:
                self._ssl = ssl.create_default_context()
            ctx = self._ssl
        _, conn = await asyncio.wait_for(self.loop.create_connection(
            lambda: Connection(self, key), origin.host, origin.port, ssl=ctx,
            server_hostname=origin.host if ctx is not None else None), timeout)
        return conn

    def put(self, conn: Connection) -> None:
        self.busy.discard(conn)
        self.idle.setdefault(conn.key, []).append(conn)
        if self._sweeper is None:
            self._sweeper = self.loop.call_later(self.keepalive_s, self._sweep)

    def forget(self, conn: Connection) -> None:
        self.busy.discard(conn)  # a closed idle connection is skipped when picked or swept

    def _sweep(self) -> None:
        """Closes the connections idle longer than keepalive_s (an upstream may never close them)."""
        self._sweeper = None
        oldest_kept = self.loop.time() - self.keepalive_s
        left = 0
        for key, conns in list(self.idle.items()):
            kept = [c for c in conns if not c.closed and c.idle_since >= oldest_kept]
            for c in conns:
                if not c.closed and c.idle_since < oldest_kept:
                    c.close()
            if kept:
                self.idle[key] = kept
                left += len(kept)
            else:
                del self.idle[key]
        if left:
            self._sweeper = self.loop.call_later(self.keepalive_s, self._sweep)

    async def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        for conns in self.idle.values():
            for c in conns:
                c.close()
        self.idle.clear()
        for c in list(self.busy):
            c.close()
        self.busy.clear()
