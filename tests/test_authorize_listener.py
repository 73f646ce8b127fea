"""The authorize listener (`quota-gw serve --authorize-port`, sidecar/listener.py): the same answers
as the app's /v1/authorize route (status, every header in order but Date, body), over real TCP;
and HTTP/1.1 as nginx and a hostile client use it: keep-alive, pipelining, a request in pieces,
garbage and oversize input answered 400/413/431 and closed without hurting other connections."""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import AsyncIterator
from typing import Any

import httpx
import orjson
import pytest

from conftest import RUN, Admin
from quota_gw import embedded
from quota_gw.app import create_app
from quota_gw.events import entries
from quota_gw.layout import Layout
from quota_gw.sidecar.listener import Listener
from test_direct_routes import authorize_config, normalized


@contextlib.asynccontextmanager
async def gateway(redis_url: str, database_url: str, prefix: str, spool: str) -> AsyncIterator[tuple[Any, str]]:
    """The app with its authorize listener on a free port: (app, the listener's base URL)."""
    port = embedded.free_port()
    app = create_app(authorize_config("http://127.0.0.1:9", spool), redis_url, database_url, prefix,
                     authorize_listen=f"127.0.0.1:{port}")
    async with app.router.lifespan_context(app):
        assert app.state.authorize_listener.port == port
        yield app, f"http://127.0.0.1:{port}"


def without_date(a: tuple[int, list[tuple[str, str]], str]) -> tuple[int, list[tuple[str, str]], str]:
    return a[0], [(k, v) for k, v in a[1] if k != "date"], a[2]


async def test_the_listener_answers_as_the_asgi_route(redis_url: str, database_url: str, prefix: str, tenant: Any,
                                                      admin: Any, tmp_path: Any) -> None:
    async with gateway(redis_url, database_url, prefix, str(tmp_path)) as (app, base), \
            httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw") as asgi, \
            httpx.AsyncClient(base_url=base) as tcp:

        async def ask(method: str, path: str, headers: dict[str, str], again: dict[str, str] | None = None,
                      names: tuple[str, ...] = ()) -> tuple[Any, Any]:
            a = await tcp.request(method, path, headers=headers)
            assert a.headers["date"] and "server" not in a.headers
            b = await asgi.request(method, path, headers=again or headers)
            return tuple(without_date(normalized(r, names[i::2] if again else names)) for i, r in enumerate((a, b)))

        org, h = await tenant("pro")
        org2, h2 = await tenant("pro")
        uri = {"X-Original-URI": "/ai/goals/x?y=1", "X-Original-Method": "POST"}
        # 200: a fixed route (charged; each org once), an LLM route, a `none` route, Envoy's path form
        a, b = await ask("GET", "/v1/authorize", {**h, **uri, "X-Quota-User": "bob"},
                         again={**h2, **uri, "X-Quota-User": "bob"}, names=(org, org2))
        assert a == b and a[0] == 200 and ("x-quota-remaining", "17") in a[1], a
        for u in ("/v1/chat/completions", "/ai/free/x"):
            a, b = await ask("GET", "/v1/authorize", {**h, "X-Original-URI": u})
            assert a == b and a[0] == 200, (u, a)
        a, b = await ask("PUT", "/v1/authorize/ai/goals/y", h, again=h2, names=(org, org2))
        assert a == b and a[0] == 200, a
        # HEAD, as nginx asks: the same head, no body
        head = await tcp.head("/v1/authorize", headers={**h, "X-Original-URI": "/ai/free"})
        get = await tcp.get("/v1/authorize", headers={**h, "X-Original-URI": "/ai/free"})
        assert head.status_code == 200 and head.content == b""
        assert head.headers["content-length"] == get.headers["content-length"] == str(len(get.content))
        # refusals: 400 (no URI), 401, 403 (scope; another user), 404 (no route), 422
        read_key = await admin.key(org, scopes=["read"])
        _, bound = await tenant("pro", user_id="bob")
        for headers, status in [(h, 400), (uri, 401), ({"Authorization": "Bearer qgw_unknown", **uri}, 401),
                                ({"Authorization": f"Bearer {read_key}", **uri}, 403),
                                ({**bound, **uri, "X-Quota-User": "admin"}, 403),
                                ({**h, "X-Original-URI": "/nowhere"}, 404), ({"X-Original-URI": "/nowhere"}, 401),
                                ({**h, **uri, "X-Quota-User": "not a name"}, 422)]:
            a, b = await ask("GET", "/v1/authorize", headers)
            assert a == b and a[0] == status, (headers, a)
            assert headers is h or ("x-quota-status", str(status)) in a[1], a  # (no URI: before any decision)
        # 402: goal_generation (20) spent, 3 a call
        for _ in range(10):
            a, b = await ask("GET", "/v1/authorize", {**h, **uri})
            if a[0] == 402:
                break
        assert a == b and a[0] == 402 and ("x-quota-status", "402") in a[1], a
        # 429: pro allows a user 5 calls a minute (the ASGI call from the other org: both the sixth)
        rl = {"X-Original-URI": "/ai/ins", "X-Quota-User": "rl"}
        for _ in range(5):
            await ask("GET", "/v1/authorize", {**h2, **rl}, again={**h, **rl})
        a, b = await ask("GET", "/v1/authorize", {**h2, **rl}, again={**h, **rl}, names=(org2, org))
        assert a[0] == b[0] == 429 and ("x-quota-status", "429") in a[1], a
        assert dict(a[1])["retry-after"] and [k for k, _ in a[1]] == [k for k, _ in b[1]], a
        assert re.sub(r"\d+", "N", str(a)) == re.sub(r"\d+", "N", str(b))
        # the listener's own: a method the route does not take (405, as the router), another path (404)
        a, b = await ask("DELETE", "/v1/authorize", h)
        assert a == b and a[0] == 405, a
        r = await tcp.get("/v1/consume", headers=h)
        assert r.status_code == 404 and r.json()["code"] == "not_found"


async def test_each_charge_names_its_route_and_method_in_its_event(redis_url: str, database_url: str, prefix: str,
                                                                   tenant: Any, redis: Any, tmp_path: Any) -> None:
    """The charge's metadata is made once per (route, method) and kept: each call's event
    still names its own."""
    async with gateway(redis_url, database_url, prefix, str(tmp_path)) as (app, base), \
            httpx.AsyncClient(base_url=base) as tcp:
        org, h = await tenant("pro")
        asked = [("/ai/goals/a", "POST"), ("/ai/ins", "GET"), ("/ai/goals/b", "GET"), ("/ai/goals", "POST")]
        for uri, method in asked:
            r = await tcp.head("/v1/authorize", headers={**h, "X-Original-URI": uri, "X-Original-Method": method})
            assert r.status_code == 200, r.headers
        stream = Layout(prefix, app.state.ctx.config.shards).stream(org)
        metas = [orjson.loads(f["meta"]) for f in entries(await redis.xrange(stream)) if f["org"] == org and f["kind"] == "consume"]
        assert metas == [{"route": "/ai/goals", "method": "POST", "via": "authorize"},
                         {"route": "/ai/ins", "method": "GET", "via": "authorize"},
                         {"route": "/ai/goals", "method": "GET", "via": "authorize"},
                         {"route": "/ai/goals", "method": "POST", "via": "authorize"}]


async def test_redis_down_is_503_with_retry_after_on_the_listener(database_url: str, tmp_path: Any) -> None:
    rs = await asyncio.to_thread(embedded.start_redis, tmp_path / "redis")
    try:
        async with gateway(rs.url, database_url, f"azl{RUN}", str(tmp_path / "spool")) as (app, base), \
                httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw") as asgi, \
                httpx.AsyncClient(base_url=base) as tcp:
            admin = Admin(asgi)
            org = await admin.org("pro", f"authzl-{RUN}")
            h = {"Authorization": f"Bearer {await admin.key(org)}"}
            await asyncio.to_thread(rs.stop)
            for method, uri, status in (("HEAD", "/ai/goals", 503), ("GET", "/ai/goals", 503),
                                        ("GET", "/ai/open/x", 200)):  # fail: open
                a = without_date(normalized(await tcp.request(method, "/v1/authorize", headers={
                    **h, "X-Original-URI": uri}), ()))
                b = without_date(normalized(await asgi.request(method, "/v1/authorize", headers={
                    **h, "X-Original-URI": uri}), ()))
                assert a == b and a[0] == status, a
                if status == 503:
                    assert ("retry-after", "1") in a[1] and ("x-quota-status", "503") in a[1]
    finally:
        await asyncio.to_thread(rs.stop)


# --- HTTP/1.1 on the wire (a stand-in app: the listener's own behaviour) -----------------------------

async def stand_in(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["path"] == "/v1/authorize/boom":
        raise RuntimeError("boom")
    body = b'{"path":"%s","n":"%s"}' % (scope["path"].encode(), dict(scope["headers"]).get(b"x-n", b""))
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-length", b"%d" % len(body)), (b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": body})


@pytest.fixture
async def listener() -> AsyncIterator[Listener]:
    server = Listener(stand_in, max_head_bytes=4096, max_headers=20, max_body_bytes=1024, keepalive_s=0.5)
    await server.start("127.0.0.1", 0)
    yield server
    await server.close()


async def read_answer(reader: asyncio.StreamReader, head_only: bool = False) -> tuple[int, dict[str, str], bytes]:
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:] if line)
    body = b"" if head_only else await reader.readexactly(int(headers["content-length"]))
    return int(lines[0].split()[1]), headers, body


def get(n: int | str, path: str = "/v1/authorize", method: str = "GET", extra: str = "") -> bytes:
    return f"{method} {path} HTTP/1.1\r\nHost: gw\r\nX-N: {n}\r\n{extra}\r\n".encode()


async def test_keep_alive_serves_many_requests_on_one_connection(listener: Listener) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", listener.port)
    for i in range(300):
        writer.write(get(i, method="HEAD" if i % 3 == 0 else "GET"))
        status, headers, body = await read_answer(reader, head_only=i % 3 == 0)
        assert status == 200 and "connection" not in headers and "date" in headers
        assert body == (b"" if i % 3 == 0 else b'{"path":"/v1/authorize","n":"%d"}' % i)
    assert len(listener.connections) == 1
    writer.close()


async def test_pipelined_requests_are_answered_in_order(listener: Listener) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", listener.port)
    n = 100  # more than PIPELINE_MAX: reading pauses and resumes
    writer.write(b"".join(get(i, f"/v1/authorize/p{i}", "HEAD" if i % 2 else "GET") for i in range(n)))
    for i in range(n):
        status, _, body = await read_answer(reader, head_only=bool(i % 2))
        assert status == 200 and body == (b"" if i % 2 else b'{"path":"/v1/authorize/p%d","n":"%d"}' % (i, i))
    writer.write(get("last", extra="Connection: close\r\n"))
    status, headers, _ = await read_answer(reader)
    assert status == 200 and headers["connection"] == "close"
    assert await asyncio.wait_for(reader.read(), 5) == b""


async def test_requests_before_a_half_close_are_answered(listener: Listener) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", listener.port)
    writer.write(get(1) + get(2))
    writer.write_eof()
    assert [(await read_answer(reader))[2] for _ in range(2)] == [
        b'{"path":"/v1/authorize","n":"1"}', b'{"path":"/v1/authorize","n":"2"}']
    assert await asyncio.wait_for(reader.read(), 5) == b""


async def test_a_request_split_across_packets(listener: Listener) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", listener.port)
    data = get("split", "/v1/authorize/a%20b?x=1") + get("whole")
    for i in range(len(data)):
        writer.write(data[i:i + 1])
        await writer.drain()
        if i % 7 == 0:
            await asyncio.sleep(0.001)
    status, _, body = await read_answer(reader)
    assert status == 200 and body == b'{"path":"/v1/authorize/a b","n":"split"}'
    status, _, body = await read_answer(reader)
    assert status == 200 and body == b'{"path":"/v1/authorize","n":"whole"}'


@pytest.mark.parametrize("data, status", [
    (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 40, 400),  # a TLS hello
    (b"GET /v1/authorize HTTP/1.1\r\nHost gw\r\n\r\n", 400),
    (b"NOT HTTP AT ALL\r\n\r\n", 400),
    (b"GET /v1/authorize HTTP/1.1\r\nX-Big: " + b"a" * 5000 + b"\r\n\r\n", 431),
    (b"GET /v1/authorize HTTP/1.1\r\nX-Big: " + b"a" * 5000, 431),  # a head that does not end
    (b"GET /v1/authorize HTTP/1.1\r\nX-Big: " + b"a" * 1000, 431),  # ... and another 4000 bytes of it, later
    (b"GET /v1/authorize HTTP/1.1\r\n" + b"X-H: 1\r\n" * 21 + b"\r\n", 431),
    (b"POST /v1/authorize HTTP/1.1\r\nContent-Length: 2000\r\n\r\n" + b"x" * 2000, 413),
    (b"POST /v1/authorize HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n" + b"800\r\n" + b"x" * 2048 + b"\r\n" * 2, 413),
])
async def test_garbage_and_oversize_input_is_refused_and_closed(listener: Listener, data: bytes, status: int) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", listener.port)
    # Pipelined after a request, whose answer is still given; a head that does not end comes
    # alone (the head is counted from the packet after the previous request's last one).
    partial = data.endswith(b"a" * 1000)
    writer.write(get("first") + (b"" if partial else data))
    assert (await read_answer(reader))[0] == 200
    if partial:
        writer.write(data)
    if data.endswith(b"a" * 1000) and len(data) < 2000:  # the rest of the head, in later packets
        for _ in range(4):
            writer.write(b"a" * 1000)
            await asyncio.sleep(0.01)
    got, headers, body = await read_answer(reader)
    assert got == status and headers["connection"] == "close" and b'"code":"invalid_request"' in body
    assert await asyncio.wait_for(reader.read(), 5) == b""
    writer.close()
    # the server still serves
    reader, writer = await asyncio.open_connection("127.0.0.1", listener.port)
    writer.write(get("after"))
    assert (await read_answer(reader))[2] == b'{"path":"/v1/authorize","n":"after"}'
    writer.close()


async def test_an_upgrade_is_answered_as_a_plain_request_then_closed(listener: Listener) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", listener.port)
    writer.write(get("up", extra="Upgrade: websocket\r\nConnection: Upgrade\r\n") + b"\x81\x85 not http")
    status, headers, _ = await read_answer(reader)
    assert status == 200 and headers["connection"] == "close"
    assert await asyncio.wait_for(reader.read(), 5) == b""


async def test_small_bodies_are_dropped_and_other_paths_are_404(listener: Listener) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", listener.port)
    writer.write(b"POST /v1/authorize HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello" + get("next", "/v1/authorizex")
                 + get("head", "/other", "HEAD") + get("ok"))
    assert (await read_answer(reader))[0] == 200
    status, headers, body = await read_answer(reader)
    assert status == 404 and b"not_found" in body and "connection" not in headers
    status, headers, body = await read_answer(reader, head_only=True)
    assert status == 404 and int(headers["content-length"]) > 0
    assert (await read_answer(reader))[2] == b'{"path":"/v1/authorize","n":"ok"}'
    writer.close()


async def test_an_app_error_is_a_500_and_the_server_goes_on(listener: Listener) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", listener.port)
    writer.write(get("x", "/v1/authorize/boom"))
    status, headers, _ = await read_answer(reader)
    assert status == 500 and headers["connection"] == "close"
    reader, writer = await asyncio.open_connection("127.0.0.1", listener.port)
    writer.write(get("y"))
    assert (await read_answer(reader))[0] == 200


async def test_http_1_0_and_idle_connections_are_closed(listener: Listener) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", listener.port)
    writer.write(b"GET /v1/authorize HTTP/1.0\r\n\r\n")
    status, headers, _ = await read_answer(reader)
    assert status == 200 and headers["connection"] == "close"
    assert await asyncio.wait_for(reader.read(), 5) == b""
    reader, writer = await asyncio.open_connection("127.0.0.1", listener.port)
    writer.write(get(1))
    await read_answer(reader)
    assert await asyncio.wait_for(reader.read(), 5) == b""  # keepalive_s (0.5 s) later
    assert not listener.connections


async def test_a_connection_in_use_stays_open_and_closes_keepalive_s_after_its_last_answer(listener: Listener) -> None:
    loop = asyncio.get_running_loop()
    reader, writer = await asyncio.open_connection("127.0.0.1", listener.port)
    for i in range(6):  # asked every 0.2 s for 1.2 s: well past keepalive_s (0.5 s) after the first answer
        writer.write(get(i))
        assert (await read_answer(reader))[2] == b'{"path":"/v1/authorize","n":"%d"}' % i
        last = loop.time()
        await asyncio.sleep(0.2)
    assert await asyncio.wait_for(reader.read(), 5) == b""
    assert loop.time() - last >= 0.45  # keepalive_s after the last answer (timers may fire a little early)
    assert not listener.connections


async def test_a_port_in_use_is_an_error_unless_shared(listener: Listener) -> None:
    with pytest.raises(OSError):
        await Listener(stand_in, max_head_bytes=4096, max_headers=20, max_body_bytes=1024,
                       keepalive_s=1).start("127.0.0.1", listener.port)
