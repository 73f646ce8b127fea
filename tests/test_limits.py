"""Request limits on a real `quota-gw serve` (uvicorn, httptools): a head past
`behaviour.max_header_bytes` or with more than `behaviour.max_headers` headers is 431, a body
past `behaviour.max_body_bytes` is 413 without the server waiting for (or holding) the rest.
Raw sockets, so the test controls exactly what is sent and when."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Iterator

import httpx
import pytest

from conftest import ADMIN_TOKEN, served, test_config_data
from quota_gw.limits import _Corked

MAX_HEADER_BYTES = 8192
MAX_HEADERS = 40


@pytest.fixture(scope="module")
def gateway(tmp_path_factory, redis_url, database_url, prefix) -> Iterator[tuple[int, str]]:
    """(port, a consume key) of a `quota-gw serve` with small head limits and a 4 KiB body limit."""
    data = test_config_data()
    data["behaviour"] = {"max_header_bytes": MAX_HEADER_BYTES, "max_headers": MAX_HEADERS, "max_body_bytes": 4096}
    env = {"REDIS_URL": redis_url, "DATABASE_URL": database_url, "QUOTA_GW_PREFIX": prefix}
    with served(tmp_path_factory.mktemp("limits"), data, env) as (base, ready):
        assert ready.status_code == 200, ready.text
        port = int(base.rsplit(":", 1)[1])
        admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
        with httpx.Client(base_url=base, timeout=10) as c:
            org = f"limits-{port}"
            assert c.post("/v1/admin/orgs", json={"org_id": org, "plan": "bulk"}, headers=admin).status_code == 201
            key = c.post(f"/v1/admin/orgs/{org}/keys", json={"scopes": ["consume", "read"]}, headers=admin).json()["key"]
        yield port, key


def exchange(port: int, head: bytes, body_parts: list[bytes] = (), timeout: float = 10) -> tuple[int, bytes]:
    """Sends `head` then each body part (stopping early once an answer is in), reads the answer
    (status, raw). A server that waited for more would make this time out, not pass."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(head)
        for part in body_parts:
            try:
                s.sendall(part)
            except (BrokenPipeError, ConnectionResetError):
                break
        raw = b""
        while not _complete(raw):
            chunk = s.recv(65536)
            if not chunk:
                break
            raw += chunk
    assert raw.startswith(b"HTTP/1.1 "), raw[:200]
    return int(raw[9:12]), raw


def _complete(raw: bytes) -> bool:
    head, sep, body = raw.partition(b"\r\n\r\n")
    if not sep:
        return False
    for line in head.lower().split(b"\r\n"):
        if line.startswith(b"content-length:"):
            return len(body) >= int(line.split(b":")[1])
    return False


def request_head(port: int, key: str, extra: list[bytes] = (), body: bytes | None = None, chunked: bool = False) -> bytes:
    lines = [b"POST /v1/check HTTP/1.1", b"Host: 127.0.0.1:%d" % port, b"Authorization: Bearer " + key.encode(),
             b"Content-Type: application/json", *extra]
    if chunked:
        lines.append(b"Transfer-Encoding: chunked")
    elif body is not None:
        lines.append(b"Content-Length: %d" % len(body))
    return b"\r\n".join(lines) + b"\r\n\r\n"


def test_a_request_within_the_limits_is_answered(gateway):
    port, key = gateway
    body = b'{"feature": "generate_insight"}'
    extra = [b"X-Pad-%d: %s" % (i, b"v" * 50) for i in range(MAX_HEADERS - 10)]
    status, raw = exchange(port, request_head(port, key, extra, body) + body)
    assert status == 200, raw


def test_too_many_headers_is_431(gateway):
    port, key = gateway
    body = b'{"feature": "generate_insight"}'
    extra = [b"X-Pad-%d: v" % i for i in range(MAX_HEADERS + 1)]
    status, raw = exchange(port, request_head(port, key, extra, body) + body)
    assert status == 431 and b"application/problem+json" in raw and b"invalid_request" in raw, raw


@pytest.mark.parametrize("size", [MAX_HEADER_BYTES + 100, 1024 * 1024])
def test_a_header_larger_than_the_limit_is_431(gateway, size):
    port, key = gateway
    # The head is never finished: the server must answer without waiting for its end.
    head = request_head(port, key).removesuffix(b"\r\n") + b"X-Big: "
    status, raw = exchange(port, head, [b"v" * 4096] * (size // 4096 + 1))
    assert status == 431 and b"invalid_request" in raw, raw


def test_a_body_announced_larger_than_the_limit_is_413_before_it_is_sent(gateway):
    port, key = gateway
    head = request_head(port, key).removesuffix(b"\r\n\r\n") + b"\r\nContent-Length: 10000000\r\n\r\n"
    status, raw = exchange(port, head + b'{"feature": ')  # 10 MB announced, 12 bytes sent
    assert status == 413 and b"invalid_request" in raw, raw


def test_a_chunked_body_is_413_once_it_passes_the_limit(gateway):
    port, key = gateway
    chunk = b"%x\r\n%s\r\n" % (1024, b" " * 1024)
    # 5 KiB then the limit is passed; the client would go on for 10 MB and never ends the body.
    status, raw = exchange(port, request_head(port, key, chunked=True), [chunk] * 5 + [chunk] * 10_000)
    assert status == 413 and b"invalid_request" in raw, raw


class _Recording:
    """A transport that records what it is asked to do."""

    def __init__(self) -> None:
        self.calls: list[object] = []

    def write(self, data: bytes) -> None:
        self.calls.append(data)

    def is_closing(self) -> bool:
        return "close" in self.calls

    def close(self) -> None:
        self.calls.append("close")

    def get_extra_info(self, name: str) -> object:
        return ("127.0.0.1", 8000) if name == "sockname" else None


async def test_what_one_loop_pass_writes_to_a_connection_leaves_in_one_write_in_order_before_a_close() -> None:
    """uvicorn writes an answer's head and body separately; served, they leave as one write."""
    t = _Recording()
    corked = _Corked(t)  # type: ignore[arg-type]
    corked.write(b"HTTP/1.1 200 OK\r\n\r\n")
    corked.write(b"body")
    assert t.calls == []
    await asyncio.sleep(0)
    assert t.calls == [b"HTTP/1.1 200 OK\r\n\r\nbody"]
    assert corked.get_extra_info("sockname") == ("127.0.0.1", 8000)  # the rest is the transport's
    corked.write(b"last")
    corked.close()
    assert t.calls[1:] == [b"last", "close"]
    corked.write(b"after the close")
    await asyncio.sleep(0)
    assert t.calls[1:] == [b"last", "close"]


def test_a_connection_closes_keep_alive_after_its_last_answer_not_its_first(tmp_path, redis_url, database_url, prefix):
    """The keep-alive timer stays armed while a connection is used: a connection asked again
    before the timeout stays open until the timeout has passed since its last answer."""
    env = {"REDIS_URL": redis_url, "DATABASE_URL": database_url, "QUOTA_GW_PREFIX": prefix}
    with served(tmp_path, test_config_data(), env, "--timeout-keep-alive", "1") as (base, _):
        port = int(base.rsplit(":", 1)[1])
        ask = b"GET /healthz HTTP/1.1\r\nHost: gw\r\n\r\n"
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            for pause in (0.0, 0.6):
                time.sleep(pause)
                s.sendall(ask)
                raw = b""
                while not _complete(raw):
                    raw += s.recv(65536)
                assert raw.startswith(b"HTTP/1.1 200 "), raw
            time.sleep(0.6)  # 1.2 s after the first answer, 0.6 s after the last: open
            s.setblocking(False)
            with pytest.raises(BlockingIOError):
                s.recv(1)
            s.setblocking(True)
            time.sleep(0.7)  # 1.3 s after the last answer: closed
            assert s.recv(1) == b""
