"""The sidecar's upstream client (sidecar/pool.py) against a raw socket server that answers
each request with canned bytes: every framing an upstream may use (Content-Length, chunked,
until close, HEAD, interim 1xx), the errors it must report (a cut, no answer, garbage), what
it writes (request line, Host, Accept, Content-Length), and connection reuse."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import pytest

from quota_gw.sidecar.pool import BadResponse, Pool, Response, ServerDisconnected


class Upstream:
    """Answers request i with answers[i] (bytes, or None: say nothing), records requests and
    connections."""

    def __init__(self, answers: list[bytes | None], close_after: bool = False) -> None:
        self.answers = answers
        self.close_after = close_after
        self.requests: list[bytes] = []
        self.connections = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":")[1])
                body = await reader.readexactly(length) if length else b""
                self.requests.append(head + body)
                answer = self.answers[len(self.requests) - 1]
                if answer is None:
                    await asyncio.sleep(3600)
                writer.write(answer)
                await writer.drain()
                if self.close_after:
                    writer.close()
                    return
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()


async def served(up: Upstream) -> tuple[asyncio.AbstractServer, str]:
    server = await asyncio.start_server(up.handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    return server, f"http://127.0.0.1:{port}"


async def body_of(pool: Pool, method: str, url: str, body: bytes = b"", read_timeout: float = 5) -> tuple[int, bytes]:
    resp = await pool.request(method, url, [("X-Test", "1")], body, 5, read_timeout)
    async with resp:
        out = b"".join([c async for c in resp.chunks()])
    return resp.status, out


async def with_upstream(answers: list[bytes | None], run: Callable[[Pool, str, Upstream], object],
                        close_after: bool = False) -> Upstream:
    up = Upstream(answers, close_after)
    server, base = await served(up)
    pool = Pool(4)
    try:
        await run(pool, base, up)  # type: ignore[misc]
    finally:
        await pool.close()
        server.close()
    return up


OK = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"
CHUNKED = (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
           b"7\r\ndata: 1\r\n7\r\ndata: 2\r\n0\r\n\r\n")


async def test_content_length_and_chunked_answers_reuse_one_connection() -> None:
    async def run(pool: Pool, base: str, up: Upstream) -> None:
        assert await body_of(pool, "POST", base + "/v1/x?a=1", b'{"q":1}') == (200, b"{}")
        assert await body_of(pool, "GET", base + "/sse") == (200, b"data: 1data: 2")
        assert await body_of(pool, "POST", base + "/again") == (200, b"{}")
        assert up.connections == 1

    up = await with_upstream([OK, CHUNKED, OK], run)
    first = up.requests[0].decode()
    assert first.startswith("POST /v1/x?a=1 HTTP/1.1\r\nHost: 127.0.0.1:")
    assert "X-Test: 1\r\nAccept: */*\r\nContent-Length: 7\r\n\r\n" in first and first.endswith('{"q":1}')
    assert "Content-Length" not in up.requests[1].decode()  # a GET without a body says nothing
    assert "Content-Length: 0\r\n" in up.requests[2].decode()  # a POST without one says 0, as aiohttp did


async def test_a_path_is_quoted_as_yarl_quotes_it() -> None:
    async def run(pool: Pool, base: str, up: Upstream) -> None:
        for _ in range(2):  # the second from what the pool remembers of the URL
            await body_of(pool, "GET", base + "/a b/é")
            await body_of(pool, "GET", base + "/plain?q=1")

    up = await with_upstream([OK] * 4, run)
    for i in (0, 2):
        assert up.requests[i].startswith(b"GET /a%20b/%C3%A9 HTTP/1.1\r\n")
        assert up.requests[i + 1].startswith(b"GET /plain?q=1 HTTP/1.1\r\n")


async def test_an_answer_without_length_ends_with_the_connection() -> None:
    async def run(pool: Pool, base: str, up: Upstream) -> None:
        assert await body_of(pool, "GET", base + "/") == (200, b"until the end")
        assert await body_of(pool, "GET", base + "/") == (200, b"{}")
        assert up.connections == 2

    await with_upstream([b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nuntil the end", OK], run, close_after=True)


async def test_head_and_interim_answers() -> None:
    async def run(pool: Pool, base: str, up: Upstream) -> None:
        assert await body_of(pool, "HEAD", base + "/") == (200, b"")
        assert await body_of(pool, "GET", base + "/") == (200, b"{}")
        assert up.connections == 1

    await with_upstream([b"HTTP/1.1 200 OK\r\nContent-Length: 99\r\n\r\n",
                         b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n" + OK], run)


async def test_bytes_after_the_answer_asked_for_retire_the_connection_and_the_next_answer_parses_whole() -> None:
    async def run(pool: Pool, base: str, up: Upstream) -> None:
        # the start of a second answer nobody asked for, in the same write as the first
        assert await body_of(pool, "GET", base + "/") == (200, b"{}")
        for _ in range(2):  # on a new connection, whose parser starts clean, and again on it
            assert await body_of(pool, "GET", base + "/") == (200, b"[1]")
        assert up.connections == 2

    again = b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\n[1]"
    await with_upstream([OK + b"HTTP/1.1 200 OK\r\nContent-Le", again, again], run)


async def test_a_cut_a_silence_and_garbage_are_errors_and_the_connection_is_not_reused() -> None:
    async def run(pool: Pool, base: str, up: Upstream) -> None:
        with pytest.raises(ServerDisconnected):
            await body_of(pool, "GET", base + "/cut")
        with pytest.raises(TimeoutError):
            await body_of(pool, "GET", base + "/silent", read_timeout=0.2)
        with pytest.raises(BadResponse):
            await body_of(pool, "GET", base + "/garbage")
        assert await body_of(pool, "GET", base + "/") == (200, b"{}")
        assert up.connections == 4

    await with_upstream([b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc", None, b"NOT HTTP\r\n\r\n", OK], run,
                        close_after=True)


async def test_a_connection_reused_with_a_shorter_read_timeout_times_out_at_the_shorter_one() -> None:
    """A connection's timer is moved, not remade, per wait: a call whose timeout ends before
    the last call's still times out when its own ends."""
    async def run(pool: Pool, base: str, up: Upstream) -> None:
        assert await body_of(pool, "GET", base + "/", read_timeout=30) == (200, b"{}")
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(TimeoutError):
            await body_of(pool, "GET", base + "/silent", read_timeout=0.2)
        assert loop.time() - started < 5
        assert up.connections == 1

    await with_upstream([OK, None], run)


async def test_a_refused_connection_is_an_oserror() -> None:
    server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    server.close()
    await server.wait_closed()
    pool = Pool(4)
    with pytest.raises(OSError):
        await body_of(pool, "GET", f"http://127.0.0.1:{port}/")
    await pool.close()


async def test_control_characters_in_headers_are_refused() -> None:
    pool = Pool(4)
    for bad in ("a\r\nX-Evil: 1", "a\nb", "a\rb", "a\x00", "a\x1b", "a\x7f", "é\x0b"):
        with pytest.raises(ValueError):
            await pool.request("GET", "http://127.0.0.1:9/", [("X-Test", bad)], b"", 5, 5)
        with pytest.raises(ValueError):
            await pool.request("GET", "http://127.0.0.1:9/", [("X-Test", "1"), (f"X-{bad}", "1")], b"", 5, 5)
        for _ in range(2):  # a line refused is not remembered as a good one
            with pytest.raises(ValueError):
                await pool.request(f"GET{bad}", "http://127.0.0.1:9/", [("X-Test", "1")], b"", 5, 5)
    await pool.close()


async def test_a_callers_accept_in_any_case_replaces_the_default_and_tabs_and_latin_1_pass() -> None:
    async def run(pool: Pool, base: str, up: Upstream) -> None:
        # header lines are remembered, a few thousand at most: filled up, a caller's Accept is still found
        many = [[(f"X-Id-{n}-{i}", "1") for i in range(1000)] for n in range(4)]
        for headers in ([("ACCEPT", "text/plain"), ("X-Tab", "a\tb é\xa0")], [("Accept-Language", "fr")], [],
                        *many, [("accept", "text/plain")] + [(f"X-Id-{i}", "1") for i in range(200)]):
            resp = await pool.request("GET", base + "/", headers, b"", 5, 5)
            async with resp:
                assert resp.status == 200

    up = await with_upstream([OK] * 8, run)
    first, second, third, fourth = (r.decode() for r in (*up.requests[:3], up.requests[-1]))
    assert "ACCEPT: text/plain\r\nX-Tab: a\tb é\xa0\r\n\r\n" in first and "*/*" not in first
    assert "Accept-Language: fr\r\nAccept: */*\r\n\r\n" in second
    assert third.endswith("\r\nAccept: */*\r\n\r\n")
    assert "\r\naccept: text/plain\r\nX-Id-0: 1\r\n" in fourth and "*/*" not in fourth


async def test_an_idle_connection_is_closed_after_keepalive() -> None:
    async def run(pool: Pool, base: str, up: Upstream) -> None:
        pool.keepalive_s = 0.1
        assert await body_of(pool, "GET", base + "/") == (200, b"{}")
        await asyncio.sleep(0.35)  # the sweeper closed it
        assert not any(pool.idle.values())
        assert await body_of(pool, "GET", base + "/") == (200, b"{}")
        assert up.connections == 2

    await with_upstream([OK, OK], run)


async def _chunks(resp: Response) -> AsyncIterator[bytes]:
    async for c in resp.chunks():
        yield c


async def test_streamed_chunks_arrive_as_sent() -> None:
    gate = asyncio.Event()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nfirst\r\n")
        await writer.drain()
        await gate.wait()
        writer.write(b"6\r\nsecond\r\n0\r\n\r\n")
        await writer.drain()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    pool = Pool(4)
    resp = await pool.request("GET", f"http://127.0.0.1:{port}/", [], b"", 5, 5)
    it = _chunks(resp).__aiter__()
    assert await it.__anext__() == b"first"  # before the rest was sent
    gate.set()
    assert await it.__anext__() == b"second"
    resp.release()
    await pool.close()
    server.close()
