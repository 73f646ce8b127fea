"""Bounds on a request's head (request line and headers) for `quota-gw serve`: 431 beyond them.

uvicorn's httptools protocol keeps whatever head a client sends (no size or count limit; only
its h11 protocol has one, and it is slower), so one connection could make the server hold an
unbounded header. This subclass counts the head as it arrives and, past
`behaviour.max_header_bytes` bytes or `behaviour.max_headers` headers, answers 431
problem+json and closes the connection before the app sees the request. The close lingers
(reads are discarded for a moment) so the client reads the answer instead of a reset.
Request bodies are bounded by the routes themselves (api.bounded_body: 413).

It also sends what one pass of the event loop writes to a connection as one write (_Corked):
uvicorn writes an answer's head and its body separately, and uvloop sends each at once: two
system calls, and two segments for the client to read, for every answer. And it keeps a
connection's keep-alive timer armed while the connection is used (uvicorn made one at the end
of every answer and cancelled it at the next request's first bytes): an idle connection still
closes `timeout_keep_alive` after its last answer.
"""

from __future__ import annotations

import asyncio
import functools
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from .config import Behaviour
from .problems import problem_body

LINGER_S = 2.0
_TIMER_SLACK_S = 0.001  # a timer may fire this early (the loop's clock counts milliseconds)


@functools.cache
def head_limits() -> tuple[int, int]:
    """(max head bytes, max headers) from the config `serve` was started with (the worker
    processes read $QUOTA_GW_CONFIG, which `serve` sets); the defaults without one."""
    from . import config as config_mod

    try:
        b = config_mod.load().behaviour
    except config_mod.ConfigError:
        b = Behaviour()
    return b.max_header_bytes, b.max_headers


class _Refused(Exception):
    """Stops the parser once the answer is sent."""


class _Corked:
    """A connection's transport whose writes wait for the end of the loop's current pass and
    leave together (one system call; the order kept). Everything else is the transport's own;
    closing, or ending the stream, sends what waits first."""

    __slots__ = ("transport", "loop", "waiting")

    def __init__(self, transport: asyncio.Transport) -> None:
        self.transport = transport
        self.loop = asyncio.get_running_loop()
        self.waiting: list[bytes] = []

    def write(self, data: bytes) -> None:
        if not self.waiting:
            self.loop.call_soon(self.send)
        self.waiting.append(data)

    def send(self) -> None:
        waiting, self.waiting = self.waiting, []
        if waiting and not self.transport.is_closing():
            self.transport.write(waiting[0] if len(waiting) == 1 else b"".join(waiting))

    def is_closing(self) -> bool:  # (asked after every answer: not through __getattr__)
        return self.transport.is_closing()

    def write_eof(self) -> None:
        self.send()
        self.transport.write_eof()

    def close(self) -> None:
        self.send()
        self.transport.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.transport, name)


class BoundedHttpToolsProtocol(HttpToolsProtocol):
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(_Corked(transport))  # type: ignore[arg-type]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.max_head_bytes, self.max_headers = head_limits()
        self._in_head = True  # between the end of a message and the end of the next one's headers
        self._raw_head = 0  # bytes received while in the head (covers a header still being parsed)
        self._head = 0  # bytes of the URL and the headers parsed so far
        self._count = 0
        self._refused = False
        self._idle = False  # no byte has come since the last answer ended
        self._idle_since = 0.0  # when it ended (loop time)

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return  # lingering: read and drop
        if self._in_head:
            self._raw_head += len(data)
        super().data_received(data)
        if self._in_head and not self._refused and self._raw_head > self.max_head_bytes:
            self._refuse(f"request headers larger than {self.max_head_bytes} bytes")

    def on_message_begin(self) -> None:
        self._head = self._count = 0
        super().on_message_begin()

    def on_url(self, url: bytes) -> None:
        self._grow(len(url), 0)
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        # _grow and uvicorn's on_header, inline: three Python calls a header were one
        self._head += len(name) + len(value) + 4
        self._count += 1
        if self._count > self.max_headers or self._head > self.max_head_bytes:
            self._grow(0, 0)
        name = name.lower()
        if name == b"expect" and value.lower() == b"100-continue":
            self.expect_100_continue = True
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        self._in_head = False
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        self._in_head, self._raw_head = True, 0
        super().on_message_complete()

    # -- the keep-alive timer: armed when an answer ends and none is armed, kept while the
    # connection is used (a request's bytes only mark it busy); when it fires it closes the
    # connection if it has been idle timeout_keep_alive since its last answer, is set again for
    # what is left if it has been idle less, and is left unset if a request came since (the end
    # of its answer arms it again). uvicorn's own made a timer per answer and cancelled it at
    # the next request's first bytes.
    def _unset_keepalive_if_required(self) -> None:  # uvicorn: on every read, and at the end of an answer
        self._idle = False

    def on_response_complete(self) -> None:
        # uvicorn's, but for the timer
        self.server_state.total_requests += 1
        if self.transport.is_closing():
            return
        self.flow.resume_reading()
        if self.pipeline:
            cycle, app = self.pipeline.pop()
            self._start_asgi_task(cycle, app)
            return
        self._idle = True
        self._idle_since = self.loop.time()
        if self.timeout_keep_alive_task is None:
            self.timeout_keep_alive_task = self.loop.call_at(self._idle_since + self.timeout_keep_alive,
                                                             self._check_idle)

    def _check_idle(self) -> None:
        self.timeout_keep_alive_task = None
        if not self._idle:
            return
        left = self._idle_since + self.timeout_keep_alive - self.loop.time()
        if left > _TIMER_SLACK_S:
            self.timeout_keep_alive_task = self.loop.call_later(left, self._check_idle)
            return
        self.timeout_keep_alive_handler()

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        if self.timeout_keep_alive_task is not None:
            self.timeout_keep_alive_task.cancel()
            self.timeout_keep_alive_task = None

    def send_400_response(self, msg: str) -> None:
        if not self._refused:  # (the parser error our _Refused raised: answered already)
            super().send_400_response(msg)

    def _grow(self, size: int, count: int) -> None:
        self._head += size
        self._count += count
        if self._count > self.max_headers:
            self._refuse(f"more than {self.max_headers} request headers")
            raise _Refused
        if self._head > self.max_head_bytes:
            self._refuse(f"request headers larger than {self.max_head_bytes} bytes")
            raise _Refused

    def _refuse(self, detail: str) -> None:
        self._refused = True
        body = problem_body(431, "invalid_request", detail)
        self.transport.write(b"".join([
            b"HTTP/1.1 431 Request Header Fields Too Large\r\n",
            b"content-type: application/problem+json\r\n",
            b"content-length: %d\r\n" % len(body),
            b"connection: close\r\n\r\n",
            body,
        ]))
        if self.transport.can_write_eof():
            self.transport.write_eof()
        asyncio.get_running_loop().call_later(LINGER_S, self.transport.close)
