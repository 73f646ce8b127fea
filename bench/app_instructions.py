"""Instructions the app executes per request, hello world vs consume, counted by callgrind.

    .venv/bin/python bench/app_instructions.py [--requests 1024] [--src DIR] [--multiproc-metrics]
        [--paths /hello,/v1/consume,/v1/authorize,listener:/v1/authorize,/v1/chat/completions]
    (needs valgrind)

On a shared machine, CPU time moves with the neighbours' load; instruction counts do not. Each
path runs in its own process under `valgrind --tool=callgrind`: the real app (serve_app) with
an embedded Valkey, driven in process through ASGI (64 requests at a time, no HTTP server), and
only the measured phase is counted (it runs inside `sorted()`, the toggle); the key cache does
not expire during the run (steady()). So this is the app's own Python, without uvicorn or the
kernel: compare the rows, and one tree against another. `/v1/authorize` is nginx's subrequest (HEAD, X-Original-URI on a fixed route);
`/v1/chat/completions` an `openai` route's call (max_tokens 16) to the demo upstream, which
runs in its own process (not counted; the gateway's aiohttp client is).

`listener:/v1/authorize` is the same subrequest through the authorize listener (`serve
--authorize-port`, sidecar/listener.py) over loopback TCP: its HTTP parsing, scope and answer
bytes are counted too, with the socket calls' user-space part, as nginx asks it (64
keep-alive connections, one request at a time on each). The client is a bare asyncio protocol
in the same process and is counted as well (the same few thousand instructions a call for
every tree). `--src DIR` runs another tree's gateway (its src/ folder, e.g. from
`git archive`) under the same driver, for a before/after. `--multiproc-metrics` sets
PROMETHEUS_MULTIPROC_DIR as `quota-gw serve` does (each metric write also goes to a file).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from collections.abc import Awaitable, Callable
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
# (bench and quota_gw are imported in main(): the driven process imports the tree under test)

CONCURRENCY = 64
PATHS = ("/hello", "/v1/consume", "/v1/authorize", "listener:/v1/authorize", "/v1/chat/completions",
         "uvicorn:/v1/chat/completions")
LISTENER = "listener:"
UVICORN = "uvicorn:"
BODY = b'{"feature":"generate_insight","user_id":"bench"}'
LLM_BODY = b'{"model":"demo-1","max_tokens":16,"messages":[{"role":"user","content":"Say something about quotas."}]}'


def drive(path: str, n: int) -> None:
    """Runs under valgrind: warm up, then `n` requests inside sorted() (the counted part)."""
    import serve_app

    key = os.environ["BENCH_KEY"]
    if path.startswith(LISTENER):
        drive_listener(key, n)
        return
    if path.startswith(UVICORN):
        drive_uvicorn(key, n)
        return
    app = serve_app.factory()
    auth = (b"authorization", b"Bearer " + key.encode())
    if path == "/hello":
        method, headers, body = "GET", [(b"host", b"bench")], b""
    elif path == "/v1/authorize":  # as examples/nginx.conf asks
        method, body = "HEAD", b""
        headers = [(b"host", b"quota_gw"), (b"x-original-uri", b"/quota/bench"), (b"x-original-method", b"POST"),
                   auth, (b"content-type", b"application/json")]
    else:
        method, body = "POST", LLM_BODY if path == "/v1/chat/completions" else BODY
        headers = [(b"host", b"bench"), auth, (b"content-type", b"application/json"),
                   (b"content-length", b"%d" % len(body))]
    statuses: list[int] = []

    async def one() -> None:
        sent: list[dict] = []

        received = False

        async def receive() -> dict:
            nonlocal received
            if received:  # the client stays connected: the proxy's watch for a disconnect waits
                await asyncio.Future()
            received = True
            return {"type": "http.request", "body": body, "more_body": False}

        async def send(message: dict) -> None:
            sent.append(message)

        scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
                 "server": ("127.0.0.1", 8000), "client": ("127.0.0.1", 5555), "scheme": "http",
                 "method": method, "root_path": "", "path": path, "raw_path": path.encode(),
                 "query_string": b"", "headers": headers, "state": {}}
        await app(scope, receive, send)
        statuses.append(sent[0]["status"])

    async def batch(count: int) -> None:
        for _ in range(0, count, CONCURRENCY):
            await asyncio.gather(*(one() for _ in range(CONCURRENCY)))

    counted_run(app, batch, n)
    if set(statuses) != {200}:
        sys.exit(f"{path}: statuses {sorted(set(statuses))}")


def counted_run(app: Any, run: Callable[[int], Awaitable[None]], n: int,
                before_shutdown: Callable[[], None] | None = None) -> None:
    """The app started (its lifespan) on a uvloop, `run(512)` to warm it, then `run(n)` inside
    the one call callgrind counts (`sorted`, --toggle-collect), then the app stopped."""
    import uvloop

    loop = uvloop.new_event_loop()
    asyncio.set_event_loop(loop)
    lifespan = app.router.lifespan_context(app)
    loop.run_until_complete(lifespan.__aenter__())
    steady(app)
    loop.run_until_complete(run(512))
    sorted([0], key=lambda _: loop.run_until_complete(run(n)))  # the counted phase
    if before_shutdown:
        before_shutdown()
    loop.run_until_complete(lifespan.__aexit__(None, None, None))


def steady(app: Any) -> None:
    """Under valgrind the app runs ~50 times slower than the clock, so the key cache (live ≤ 1 s)
    would expire every few dozen calls, not every few thousand: a third of the calls then took
    the miss path. Kept for the run, as it is between two refreshes in service."""
    app.state.ctx.keys.ttl = 3600.0


class KeepAliveClient(asyncio.Protocol):
    """One keep-alive connection: asks `left` times, one request at a time; an answer ends at
    `end` (a HEAD answer at its blank line, a chunked one at its last chunk). Answers other than
    200 go to `refused`."""

    def __init__(self, request: bytes, end: bytes, refused: list[bytes]) -> None:
        self.request, self.end, self.refused = request, end, refused
        self.buffer = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: Any = transport

    def ask(self, left: int, done: asyncio.Future[None]) -> None:
        self.left, self.done = left, done
        self.transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while (at := self.buffer.find(self.end)) >= 0:
            answer, self.buffer = self.buffer[:at], self.buffer[at + len(self.end):]
            if not answer.startswith(b"HTTP/1.1 200 "):
                self.refused.append(answer[:200])
            self.left -= 1
            if self.left:
                self.transport.write(self.request)
            else:
                self.done.set_result(None)


async def ask_on_all(clients: list[KeepAliveClient], port: int, request: bytes, end: bytes, refused: list[bytes],
                     count: int) -> None:
    """CONCURRENCY connections to `port` (made once, before the counted phase), each asking
    count // CONCURRENCY times, each again as soon as its answer is in."""
    loop = asyncio.get_running_loop()
    while len(clients) < CONCURRENCY:
        clients.append((await loop.create_connection(lambda: KeepAliveClient(request, end, refused), "127.0.0.1",
                                                     port))[1])
    done = [loop.create_future() for _ in clients]
    for c, f in zip(clients, done):
        c.ask(count // CONCURRENCY, f)
    await asyncio.gather(*done)


def drive_listener(key: str, n: int) -> None:
    """`drive` through the authorize listener: CONCURRENCY connections, each asking again as
    soon as its answer is in (as nginx's keep-alive connections do)."""
    import serve_app

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ["QUOTA_GW_AUTHORIZE_LISTEN"] = f"127.0.0.1:{port}"
    app = serve_app.factory()
    request = (b"HEAD /v1/authorize HTTP/1.1\r\nHost: quota_gw\r\nX-Original-URI: /quota/bench\r\n"
               b"X-Original-Method: POST\r\nContent-Type: application/json\r\nAuthorization: Bearer "
               + key.encode() + b"\r\n\r\n")
    refused: list[bytes] = []
    clients: list[KeepAliveClient] = []

    async def run(count: int) -> None:  # (nginx keeps its connections open)
        await ask_on_all(clients, port, request, b"\r\n\r\n", refused, count)

    def close() -> None:
        for c in clients:
            c.transport.close()

    counted_run(app, run, n, close)
    if refused:
        sys.exit(f"listener: {len(refused)} refused, e.g. {refused[0]!r}")


def drive_uvicorn(key: str, n: int) -> None:
    """`drive`'s LLM call through uvicorn in this process (the protocol `quota-gw serve` uses),
    CONCURRENCY keep-alive connections each asking again as soon as its answer is in."""
    import functools

    import serve_app
    import uvicorn
    from uvicorn.server import ServerState

    app = serve_app.factory()
    config = uvicorn.Config(app=app, http="quota_gw.limits:BoundedHttpToolsProtocol", loop="none", lifespan="off",
                            access_log=False, log_level="warning")
    config.load()  # (wraps the app in the proxy-headers middleware, as `serve` runs it)
    protocol = functools.partial(config.http_protocol_class, config=config, server_state=ServerState(), app_state={})
    request = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: bench\r\nAuthorization: Bearer " + key.encode()
               + b"\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(LLM_BODY) + LLM_BODY)
    refused: list[bytes] = []
    clients: list[KeepAliveClient] = []
    servers: list[asyncio.Server] = []

    async def run(count: int) -> None:
        if not servers:
            servers.append(await asyncio.get_running_loop().create_server(protocol, "127.0.0.1", 0))
        await ask_on_all(clients, servers[0].sockets[0].getsockname()[1], request, b"\r\n0\r\n\r\n", refused, count)

    def close() -> None:
        for c in clients:
            c.transport.close()
        servers[0].close()

    counted_run(app, run, n, close)
    if refused:
        sys.exit(f"uvicorn: {len(refused)} refused, e.g. {refused[0]!r}")


def wait_listening(port: int) -> None:
    deadline = time.monotonic() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def count(path: str, n: int, env: dict[str, str]) -> int:
    out = subprocess.run(
        ["valgrind", "--tool=callgrind", "--collect-atstart=no", "--toggle-collect=builtin_sorted",
         "--callgrind-out-file=/dev/null", sys.executable, __file__, "--drive", path, "--requests", str(n)],
        env=env, capture_output=True, text=True)
    m = re.search(r"Collected : (\d+)", out.stderr)
    if out.returncode != 0 or m is None:
        sys.exit(f"{path}: {out.stderr[-2000:]}")
    return int(m.group(1)) // n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=1024)
    ap.add_argument("--paths", default="/hello,/v1/consume", help="comma-separated, of " + ", ".join(PATHS))
    ap.add_argument("--src", help="another tree's src/ folder: count its gateway instead")
    ap.add_argument("--multiproc-metrics", action="store_true", help="PROMETHEUS_MULTIPROC_DIR set, as `serve` sets it")
    ap.add_argument("--drive", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.drive:
        drive(args.drive, args.requests)
        return
    sys.path.insert(0, str(ROOT / "bench"))
    import bench as B

    from quota_gw import embedded

    if not shutil.which("valgrind"):
        sys.exit("valgrind is not installed (apt-get install valgrind)")
    paths = args.paths.split(",")
    if unknown := set(paths) - set(PATHS):
        sys.exit(f"unknown paths: {sorted(unknown)}")
    tmp = Path(tempfile.mkdtemp(prefix="qgw-ir-"))
    rs = embedded.start_redis(tmp / "redis")
    up_port = embedded.free_port()
    upstream = None
    if any(p.endswith("/v1/chat/completions") for p in paths):
        upstream = subprocess.Popen([str(Path(sys.executable).parent / "quota-gw"), "demo-upstream", "--port",
                                     str(up_port), "--log-level", "warning"])
        wait_listening(up_port)
    counts: dict[str, int] = {}
    try:
        env = {**os.environ, "QUOTA_GW_CONFIG": str(B.config_file(tmp, f"http://127.0.0.1:{up_port}")),
               "REDIS_URL": rs.url, "QUOTA_GW_PREFIX": "ir", "BENCH_KEY": B.seed(rs.url, "ir", 16)}
        env.pop("DATABASE_URL", None)
        env.pop("PROMETHEUS_MULTIPROC_DIR", None)
        if args.multiproc_metrics:
            env["PROMETHEUS_MULTIPROC_DIR"] = str(tmp / "metrics")
        env.pop("QUOTA_GW_AUTHORIZE_LISTEN", None)
        if args.src:
            env["PYTHONPATH"] = str(Path(args.src).resolve())
        for path in paths:
            if args.multiproc_metrics:  # a fresh folder for each process, as `serve` starts with
                shutil.rmtree(tmp / "metrics", ignore_errors=True)
                (tmp / "metrics").mkdir()
            counts[path] = count(path, args.requests, env)
    finally:
        if upstream is not None:
            upstream.terminate()
            upstream.wait(timeout=20)
        rs.stop()
    base = counts.get("/hello")
    for path, n in counts.items():
        ratio = f"   {n / base:.2f}× hello" if base and path != "/hello" else ""
        print(f"{path:<24} {n:>9,} instructions/request{ratio}")


if __name__ == "__main__":
    main()
