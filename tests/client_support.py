"""Live gateways for the client tests: a real uvicorn on 127.0.0.1 in a thread of its own (so the
blocking client can call it from the test), and a TCP proxy that can lose a response."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from typing import Any

from quota_gw.dev import serve


async def _read_message(r: asyncio.StreamReader) -> bytes | None:
    """One HTTP/1.1 message with a Content-Length body (all the gateway's API answers have one)."""
    try:
        head = await r.readuntil(b"\r\n\r\n")
    except (asyncio.IncompleteReadError, ConnectionError):
        return None
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value.strip())
    return head + (await r.readexactly(length) if length else b"")


class LossyProxy:
    """Forwards HTTP/1.1 between a client and the gateway, message by message. The first `drops`
    requests whose head starts with `match` reach the gateway, which answers; the proxy keeps that
    answer and closes the client's connection instead: the response is lost after the effect."""

    def __init__(self, upstream_port: int, match: bytes, drops: int = 1) -> None:
        self.upstream_port, self.match, self.drops = upstream_port, match, drops
        self.lost: list[bytes] = []  # the answers the client never saw
        self.forwarded = 0
        self.port = 0
        self._server: asyncio.base_events.Server | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()

    async def _handle(self, cr: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
        ur, uw = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        try:
            while (req := await _read_message(cr)) is not None:
                uw.write(req)
                await uw.drain()
                resp = await _read_message(ur)
                if resp is None:
                    break
                self.forwarded += 1
                if req.startswith(self.match) and len(self.lost) < self.drops:
                    self.lost.append(resp)
                    break  # close the client's side without answering
                cw.write(resp)
                await cw.drain()
        finally:
            for w in (cw, uw):
                w.close()


class Gateway:
    """An app served by uvicorn in a background thread's event loop (plus a LossyProxy in front).
    `call(coro_fn)` runs a coroutine in that loop, for what the test must do there."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.port = 0
        self.proxy: LossyProxy | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._run, name="client-test-gateway", daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def proxy_url(self) -> str:
        assert self.proxy is not None
        return f"http://127.0.0.1:{self.proxy.port}"

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as e:  # noqa: BLE001 - reported to the starting thread
            self._error = e
            self._ready.set()

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        async with serve(self.app) as server:
            self.port = server.port
            self._ready.set()
            await self._stop.wait()

    def start(self, timeout: float = 60) -> Gateway:
        self._thread.start()
        if not self._ready.wait(timeout) or self._error is not None:
            raise RuntimeError(f"gateway did not start: {self._error!r}")
        return self

    def call(self, fn: Callable[[], Any], timeout: float = 30) -> Any:
        assert self._loop is not None
        return asyncio.run_coroutine_threadsafe(fn(), self._loop).result(timeout)

    def lossy(self, match: bytes = b"POST /v1/consume ", drops: int = 1) -> LossyProxy:
        """A fresh proxy in front of the gateway that loses the answers to the first `drops`
        requests whose head starts with `match`."""
        if self.proxy is not None:
            self.call(self.proxy.stop)
        self.proxy = LossyProxy(self.port, match, drops)
        self.call(self.proxy.start)
        return self.proxy

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None:
            if self.proxy is not None:
                self.call(self.proxy.stop)
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(30)
