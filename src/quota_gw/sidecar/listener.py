"""A second listener for `/v1/authorize` alone (`quota-gw serve --authorize-port`): nginx's
auth_request subrequest without uvicorn's per-request cost.

nginx asks quota-gw once per proxied call, and a fixed answer's HTTP handling cost ~29 µs of CPU
through uvicorn against ~17 µs here, more than an authorize decision's own Python (~17 µs;
docs/benchmarks.md). This listener parses with httptools (uvicorn's own
parser), builds the request's ASGI scope and hands it to the same app, which answers
`/v1/authorize` on its direct path (app.Gateway): status, headers and body are the main port's,
byte for byte, less uvicorn's `server` header. What it leaves out is what an auth subrequest
never needs:

- Only `/v1/authorize` and `/v1/authorize/{path}`: anything else is 404 (the API is on the main
  port). A request body is read and dropped; past `behaviour.max_body_bytes`, 413 and close.
- The head is bounded as on the main port (limits.py): 431 and close past `max_header_bytes` or
  `max_headers`. Bytes that are not HTTP/1.x: 400 and close. Each refusal is answered after the
  requests before it, and the close lingers so the client reads it.
- Keep-alive; pipelined requests are answered in order, one at a time (reading pauses while
  PIPELINE_MAX are waiting, and while the client does not read). HTTP/1.0 closes after each
  answer, as does a request with `Upgrade` (answered as a plain one); after a client's
  half-close, what it sent is answered, then the connection closes. An idle connection is closed after `keepalive_s`, which `quota-gw serve` sets from
  `--timeout-keep-alive`, for the reason given there.

Every worker process of `quota-gw serve --workers N` listens on the port (SO_REUSEPORT, only
then): the kernel spreads connections over them.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import http
import logging
import time
from email.utils import formatdate
from typing import Any
from urllib.parse import unquote

import httptools

from ..limits import LINGER_S
from ..problems import problem_body

log = logging.getLogger("quota_gw")

PATH = "/v1/authorize"
UNDER = PATH + "/"
PIPELINE_MAX = 32  # requests read ahead of their answers on one connection
_STATUS = {s.value: b"HTTP/1.1 %d %s\r\n" % (s.value, s.phrase.encode()) for s in http.HTTPStatus}
_DISCONNECT = {"type": "http.disconnect"}


def status_line(status: int) -> bytes:
    return _STATUS.get(status) or b"HTTP/1.1 %d \r\n" % status


class Listener:
    """The listening socket and its connections; `app` is the gateway's ASGI app."""

    def __init__(self, app: Any, *, max_head_bytes: int, max_headers: int, max_body_bytes: int,
                 keepalive_s: float) -> None:
        self.app = app
        self.max_head_bytes, self.max_headers, self.max_body_bytes = max_head_bytes, max_headers, max_body_bytes
        self.keepalive_s = keepalive_s
        self.connections: set[Connection] = set()
        self.drained = asyncio.Event()  # set when the last connection is gone
        self.server: asyncio.Server | None = None
        self._second = 0
        self._date = b""

    async def start(self, host: str, port: int, shared: bool = False) -> None:
        """`shared`: the port is every worker process's (SO_REUSEPORT); alone, a port in use is an error."""
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(lambda: Connection(self), host, port, reuse_port=shared or None,
                                               backlog=2048)

    @property
    def port(self) -> int:
        assert self.server is not None
        return int(self.server.sockets[0].getsockname()[1])

    def date(self) -> bytes:
        """The Date header line, made once a second (as uvicorn does)."""
        now = int(time.time())
        if now != self._second:
            self._second = now
            self._date = b"date: " + formatdate(now, usegmt=True).encode() + b"\r\n"
        return self._date

    async def close(self, grace_s: float = 5.0) -> None:
        """Stops listening, closes idle connections and lets the others finish their answer."""
        if self.server is None:
            return
        self.server.close()
        for c in list(self.connections):
            c.close_when_done()
        if self.connections:
            self.drained.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.drained.wait(), grace_s)
        for c in list(self.connections):
            c.transport.abort()
        await self.server.wait_closed()


class _Refused(Exception):
    """Stops the parser: the answer is queued and the connection will close."""


class Connection(asyncio.Protocol):
    """One client connection: httptools callbacks in, answers out, in request order."""

    def __init__(self, listener: Listener) -> None:
        self.listener = listener
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport = None  # type: ignore[assignment]
        self.parser = httptools.HttpRequestParser(self)
        # requests parsed and not yet answered: (scope, keep-alive), or a final refusal's bytes
        self.queue: collections.deque[tuple[dict[str, Any], bool] | bytes] = collections.deque()
        self.busy = False  # an answer is being made
        self.done = False  # nothing more is read or answered (a refusal, a close, the client gone)
        self.closing = False  # close once the queue is answered (shutdown)
        self.reading_paused = self.writing_paused = False
        # The idle timer stays armed while the connection is used (re-armed for what is left
        # when it fires early): made and cancelled per request, it cost a timer each way.
        self.idle: asyncio.TimerHandle | None = None
        self.idle_since = 0.0  # when the connection last became idle (loop time)
        self.server: tuple[str, int] | None = None
        self.client: tuple[str, int] | None = None
        self.raw_head = 0  # bytes received while in a head (covers a header still being parsed)
        self._message_begun()

    # --- asyncio.Protocol ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # (uvloop's is no asyncio.Transport subclass)
        self.server = _address(transport.get_extra_info("sockname"))
        self.client = _address(transport.get_extra_info("peername"))
        self.listener.connections.add(self)
        self._arm_idle()

    def connection_lost(self, exc: Exception | None) -> None:
        self.done = True
        self.queue.clear()
        self.listener.connections.discard(self)
        if not self.listener.connections:
            self.listener.drained.set()
        if self.idle is not None:
            self.idle.cancel()

    def eof_received(self) -> bool:
        """The client is done sending (a half-close): answer what it sent, then close."""
        self.close_when_done()
        return True  # keep the transport open for those answers

    def pause_writing(self) -> None:
        self.writing_paused = True

    def resume_writing(self) -> None:
        self.writing_paused = False
        self._next()

    def data_received(self, data: bytes) -> None:
        if self.done:
            return  # lingering after a refusal: read and drop
        if self.in_head:
            self.raw_head += len(data)
        try:
            self.parser.feed_data(data)
        except _Refused:
            pass
        except httptools.HttpParserUpgrade:
            # Answered as a plain request (a server may ignore Upgrade), then closed: what follows
            # it is not HTTP/1.1, and nothing more is read.
            if self.queue and isinstance(self.queue[-1], tuple):
                self.queue[-1] = (self.queue[-1][0], False)
            self.done = True
        except httptools.HttpParserError as e:
            if not self.done:  # (a refusal raised in a callback comes back as a parser error)
                self._refuse(400, f"malformed HTTP request: {e}")
        if not self.done and self.in_head and self.raw_head > self.listener.max_head_bytes:
            self._refuse(431, f"request headers larger than {self.listener.max_head_bytes} bytes")
        if len(self.queue) >= PIPELINE_MAX and not self.reading_paused:
            self.reading_paused = True
            self.transport.pause_reading()
        self._next()
        if not self.busy and not self.queue:
            self._arm_idle()

    # --- httptools callbacks ---------------------------------------------------------------

    def _message_begun(self) -> None:
        # (raw_head is not reset here: it counts this message's bytes from the packet they began in)
        self.in_head = True
        self.head = self.count = self.body = 0
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []

    def on_message_begin(self) -> None:
        self._message_begun()

    def on_url(self, url: bytes) -> None:
        self.url += url  # may come in pieces
        self.head += len(url)
        if self.head > self.listener.max_head_bytes:
            self._too_large()

    def on_header(self, name: bytes, value: bytes) -> None:
        self.head += len(name) + len(value) + 4
        self.count += 1
        if self.count > self.listener.max_headers or self.head > self.listener.max_head_bytes:
            self._too_large()
        self.headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        self.in_head = False

    def on_body(self, body: bytes) -> None:
        self.body += len(body)
        if self.body > self.listener.max_body_bytes:
            self._refuse(413, f"request body larger than {self.listener.max_body_bytes} bytes")
            raise _Refused

    def on_message_complete(self) -> None:
        parser = self.parser
        version = parser.get_http_version()
        try:
            url = httptools.parse_url(self.url)
        except httptools.HttpParserInvalidURLError:
            self._refuse(400, "malformed request target")
            raise _Refused from None
        raw_path = url.path or b"/"
        path = raw_path.decode("latin-1")
        if "%" in path:
            path = unquote(path)
        scope = {
            "type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": version,
            "server": self.server, "client": self.client, "scheme": "http",
            "method": parser.get_method().decode("ascii"), "root_path": "", "path": path, "raw_path": raw_path,
            "query_string": url.query or b"", "headers": self.headers, "state": {},
        }
        self.queue.append((scope, version == "1.1" and parser.should_keep_alive()))
        self.in_head, self.raw_head = True, 0

    def _too_large(self) -> None:
        if self.count > self.listener.max_headers:
            self._refuse(431, f"more than {self.listener.max_headers} request headers")
        else:
            self._refuse(431, f"request headers larger than {self.listener.max_head_bytes} bytes")
        raise _Refused

    # --- answers ---------------------------------------------------------------------------

    def _refuse(self, status: int, detail: str) -> None:
        """Queues the refusal after the requests before it; nothing more is read."""
        if self.done:
            return
        self.done = True
        self.queue.append(_plain(status, "invalid_request", detail, self.listener.date()))

    def _next(self) -> None:
        """Starts on the oldest request when no answer is being made and the client reads."""
        if self.busy or self.writing_paused or not self.queue or self.transport.is_closing():
            return
        item = self.queue.popleft()
        if isinstance(item, bytes):  # a refusal: the last answer on this connection
            self.queue.clear()
            self.transport.write(item)
            self._linger()
            return
        self.busy = True
        self.loop.create_task(self._answer(*item))
        if self.reading_paused and len(self.queue) < PIPELINE_MAX // 2:
            self.reading_paused = False
            self.transport.resume_reading()

    async def _answer(self, scope: dict[str, Any], keep_alive: bool) -> None:
        path = scope["path"]
        if path == PATH or path.startswith(UNDER):
            out = Answer(scope["method"] == "HEAD")
            try:
                await self.listener.app(scope, out.receive, out.send)
            except Exception:  # the app's own handlers answered (500) and logged it, or nothing was sent
                if not out.complete:
                    log.exception("unhandled error on %s %s (authorize listener)", scope["method"], path)
            answer = out.bytes(self.listener.date(), keep_alive) if out.complete else None
            if answer is None:  # nothing (complete) was sent: never a hang
                answer = _plain(500, "internal", "internal error", self.listener.date())
                keep_alive = False
        else:
            answer = _plain(404, "not_found", f"{path}: this port answers {PATH} only", self.listener.date(),
                            keep_alive, head_only=scope["method"] == "HEAD")
        self.busy = False
        if self.transport.is_closing():
            return
        self.transport.write(answer)
        if not keep_alive or (self.closing and not self.queue):
            self.done = True
            self.transport.close()
            return
        self._next()
        if not self.busy and not self.queue:
            self._arm_idle()

    def _linger(self) -> None:
        """Closes after a refusal, reading (and dropping) for a moment so the client gets the
        answer rather than a reset."""
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self.loop.call_later(LINGER_S, self.transport.close)

    def _arm_idle(self) -> None:
        """The connection is idle from now: closed `keepalive_s` later unless it is used again."""
        if self.closing and not self.done:
            self.done = True
            self.transport.close()
            return
        self.idle_since = self.loop.time()
        if self.idle is None and not self.done:
            self.idle = self.loop.call_later(self.listener.keepalive_s, self._idle_timeout)

    def _idle_timeout(self) -> None:
        self.idle = None
        if self.busy or self.queue or self.done:
            return  # in use: armed again when it is idle again
        left = self.idle_since + self.listener.keepalive_s - self.loop.time()
        if left > 0:  # used since the timer was armed
            self.idle = self.loop.call_later(left, self._idle_timeout)
            return
        self.done = True
        self.transport.close()

    def close_when_done(self) -> None:
        self.closing = True
        if not self.busy and not self.queue:
            self.done = True
            self.transport.close()


class Answer:
    """The ASGI messages of one answer, as bytes on the wire; and what the app receives."""

    def __init__(self, head_only: bool) -> None:
        self.head_only = head_only
        self.start: dict[str, Any] | None = None
        self.body: list[bytes] = []
        self.complete = False
        self.received = False

    async def receive(self) -> dict[str, Any]:
        """An empty body, then a disconnect (the body, if any, was dropped by the parser)."""
        if self.received:
            return _DISCONNECT
        self.received = True
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(self, message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            self.start = message
        elif message["type"] == "http.response.body":
            self.body.append(message.get("body", b""))
            if not message.get("more_body", False):
                self.complete = True

    def bytes(self, date: bytes, keep_alive: bool) -> bytes:
        assert self.start is not None
        body = b"".join(self.body)
        lines = [status_line(self.start["status"])]
        sized = False
        for name, value in self.start.get("headers", ()):
            lines += (name, b": ", value, b"\r\n")
            if not sized and name.lower() == b"content-length":
                sized = True
        if not sized:
            lines.append(b"content-length: %d\r\n" % len(body))
        lines.append(date)
        if not keep_alive:
            lines.append(b"connection: close\r\n")
        lines.append(b"\r\n")
        if not self.head_only:
            lines.append(body)
        return b"".join(lines)


def _plain(status: int, code: str, detail: str, date: bytes, keep_alive: bool = False,
           head_only: bool = False) -> bytes:
    body = problem_body(status, code, detail)
    return b"".join([status_line(status), b"content-type: application/problem+json\r\n",
                     b"content-length: %d\r\n" % len(body), date,
                     b"" if keep_alive else b"connection: close\r\n", b"\r\n", b"" if head_only else body])


def _address(addr: Any) -> tuple[str, int] | None:
    return (str(addr[0]), int(addr[1])) if isinstance(addr, tuple) and len(addr) >= 2 else None
