"""`quota-gw dev`: the whole product on one machine, in one command.

Redis and Postgres come from REDIS_URL / DATABASE_URL, or are embedded servers started in
`--data-dir` (default ./.quota-gw, kept between runs) on free ports (`embedded.choose()` makes
that choice; the embedded servers come with the `dev` extra, and without it `dev` says so and
exits 2 unless both variables are set); migrations run; a demo
org on the pro plan gets a key (printed, and reused next time while it is valid); the demo
upstream, the gateway and the sync worker start. Ctrl-C or SIGTERM stops everything, in
reverse order, and waits for each part to exit.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import uvicorn

from .config import Config

LOOPBACK = {"127.0.0.1", "localhost", "::1"}
DEMO_ORG = "demo"
DEV_LINK_TTL_S = 12 * 3600  # the dashboard link `dev` prints


class LoopServer(uvicorn.Server):
    """A uvicorn server that shares the caller's event loop and leaves signals to the caller
    (several servers run side by side in `dev` and in tests)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Any:
        yield

    @property
    def port(self) -> int:
        return int(self.servers[0].sockets[0].getsockname()[1])


@contextlib.asynccontextmanager
async def serve(app: Any, host: str = "127.0.0.1", port: int = 0, lifespan: Literal["auto", "on", "off"] = "on",
                log_level: str = "warning", timeout_keep_alive: float = 5) -> AsyncIterator[LoopServer]:
    """Runs `app` on host:port (0: a free port, see `.port`) until the block ends."""
    server = LoopServer(uvicorn.Config(app, host=host, port=port, lifespan=lifespan, log_level=log_level,
                                       access_log=False, timeout_graceful_shutdown=5,
                                       # typed int, used as a loop timer's delay: a float works (test_keepalive)
                                       timeout_keep_alive=timeout_keep_alive))  # type: ignore[arg-type]
    task = asyncio.create_task(server.serve())
    while not server.started:
        if task.done():
            task.result()
            raise RuntimeError(f"server on {host}:{port} did not start")
        await asyncio.sleep(0.01)
    try:
        yield server
    finally:
        server.should_exit = True
        await task


def _say(msg: str = "") -> None:
    print(msg, flush=True)


def _demo_upstreams(config: Config) -> list[tuple[str, int]]:
    """Loopback upstreams the config routes to: where the demo upstream should listen."""
    out = []
    for r in config.routes:
        u = urlsplit(r.upstream)
        if u.hostname in LOOPBACK:
            addr = ("127.0.0.1", u.port or 80)
            if addr not in out:
                out.append(addr)
    return out


def _worker_available() -> bool:
    exe = shutil.which("quota-gw") or ""
    cmd = [exe] if exe else [sys.executable, "-m", "quota_gw.cli"]
    try:
        return subprocess.run([*cmd, "worker", "--help"], capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


async def _database(admin_url: str, name: str) -> str:
    """A database of its own on the embedded server (created once), migrated."""
    from . import db

    url = admin_url.rsplit("/", 1)[0] + "/" + name
    await db.create_database(url)
    applied = await db.migrate_url(url)
    _say(f"  migrations: {', '.join(applied) if applied else 'up to date'}")
    return url


async def _demo_key(base: str, admin_token: str, plan: str, data_dir: Path) -> str:
    """The demo org (created once) and a consume+read key, reused while it still works."""
    import httpx

    h = {"Authorization": f"Bearer {admin_token}"}
    key_file = data_dir / "demo-key"
    async with httpx.AsyncClient(base_url=base, timeout=30) as c:
        r = await c.post("/v1/admin/orgs", json={"org_id": DEMO_ORG, "name": "Demo Org", "plan": plan}, headers=h)
        if r.status_code not in (201, 409):
            raise RuntimeError(f"creating the demo org failed: {r.status_code} {r.text}")
        if key_file.exists():
            key = key_file.read_text().strip()
            r = await c.get("/v1/balance", headers={"Authorization": f"Bearer {key}"})
            if r.status_code == 200:
                return key
        r = await c.post(f"/v1/admin/orgs/{DEMO_ORG}/keys", json={"scopes": ["consume", "read"]}, headers=h)
        if r.status_code != 201:
            raise RuntimeError(f"creating the demo key failed: {r.status_code} {r.text}")
        key = r.json()["key"]
        key_file.write_text(key + "\n")
        key_file.chmod(0o600)
        return key


def _admin_token(data_dir: Path) -> str:
    token = os.environ.get("QUOTA_GW_ADMIN_TOKEN")
    if token:
        return token
    f = data_dir / "admin-token"
    if f.exists():
        token = f.read_text().strip()
    else:
        token = "qgw_admin_" + secrets.token_urlsafe(24)
        f.write_text(token + "\n")
        f.chmod(0o600)
    os.environ["QUOTA_GW_ADMIN_TOKEN"] = token
    return token


async def run(config: Config, config_path: str | None, host: str, port: int, data_dir: Path,
              redis_port: int | None, pg_port: int | None, worker: bool = True,
              authorize_port: int | None = None) -> int:
    """`authorize_port`: the gateway also answers `/v1/authorize` alone there (sidecar/listener.py),
    where examples/nginx.conf asks (8081, which `make dev` passes)."""
    from . import embedded
    from . import pages
    from .app import create_app
    from .demo import create_demo_app

    data_dir = data_dir.resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)

    # Never the local default ports: dev's data lives in its own directory.
    stores = embedded.choose(local_defaults=False)
    worker_proc: subprocess.Popen[bytes] | None = None
    try:
        _say("quota-gw dev")
        if stores.redis_url:
            from .cli_support import reach_redis

            await reach_redis(stores.redis_url)  # unreachable: one line and exit 3, before anything starts
        await asyncio.to_thread(embedded.start_missing, stores, data_dir, persist=True, redis_port=redis_port,
                                pg_port=pg_port)
        assert stores.redis_url is not None and stores.pg_url is not None
        redis_url = stores.redis_url
        if stores.redis_from == "embedded":
            _say(f"  redis:      {redis_url} (embedded, data in {data_dir / 'redis'})")
        else:
            _say(f"  redis:      {redis_url} ({stores.redis_from})")
        if stores.pg_from == "embedded":
            database_url = await _database(stores.pg_url, "quota_gw")
            _say(f"  postgres:   {database_url} (embedded, data in {data_dir / 'postgres'})")
        else:
            _say(f"  postgres:   {stores.pg_url} ({stores.pg_from})")
            database_url = await _database_direct(stores.pg_url)
        admin_token = _admin_token(data_dir)
        os.environ["REDIS_URL"], os.environ["DATABASE_URL"] = redis_url, database_url
        if config_path:
            os.environ["QUOTA_GW_CONFIG"] = str(Path(config_path).resolve())
        os.environ.setdefault("QUOTA_GW_SPOOL_DIR", str(data_dir / "spool"))

        async with contextlib.AsyncExitStack() as stack:
            for up_host, up_port in _demo_upstreams(config):
                await stack.enter_async_context(serve(create_demo_app(latency_ms=20, token_delay_ms=10),
                                                      up_host, up_port))
                _say(f"  upstream:   http://{up_host}:{up_port} (demo OpenAI-compatible model)")
            authorize = f"{host}:{authorize_port}" if authorize_port else None
            gw = await stack.enter_async_context(serve(create_app(config, redis_url, database_url,
                                                                  authorize_listen=authorize), host, port,
                                                       log_level="info"))
            base = f"http://{host}:{gw.port}"
            plan = "pro" if "pro" in config.plans else (config.default_plan or next(iter(config.plans)))
            key = await _demo_key(base, admin_token, plan, data_dir)
            metrics_url = None
            if worker and config_path and _worker_available():
                metrics_port = embedded.free_port()
                worker_proc = subprocess.Popen([sys.executable, "-m", "quota_gw.cli", "worker", "--metrics-port",
                                                str(metrics_port)], stdin=subprocess.DEVNULL, start_new_session=True)
                metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
                if await _listening(worker_proc, metrics_port):
                    _say(f"  worker:     pid {worker_proc.pid} (draining events into Postgres), metrics {metrics_url}")
                else:
                    _say(f"  worker:     exited with {worker_proc.returncode} (see its message above)")
                    metrics_url = None
            else:
                _say("  worker:     not started (`quota-gw worker` is unavailable or no --config was given); "
                     "events stay in the Redis streams until a worker runs")
            _say(f"  gateway:    {base}")
            if authorize:
                _say(f"  authorize:  http://{authorize}/v1/authorize   (nginx auth_request: examples/nginx.conf)")
            _say(f"  dashboard:  {pages.dashboard_url(base, DEMO_ORG, int(time.time()) + DEV_LINK_TTL_S)}")
            _say(f"              (signed read-only link for {DEMO_ORG!r}, 12 h; "
                 f"or open {base}/dashboard and enter the key)")
            _say(f"  ops:        {base}/ops   (enter the admin token)")
            _say(f"  admin token: {admin_token}")
            _say(f"  API key:    {key}   (org {DEMO_ORG!r}, plan {plan!r})")
            _say("")
            for line in examples(config, base, key, admin_token, plan, metrics_url):
                _say(line)
            _say("")
            _say("  the CLI on these stores (quota-gw orgs list, keys create, grant, worker-status, reconcile):")
            _say(f"    export REDIS_URL={redis_url} DATABASE_URL={database_url} "
                 f"QUOTA_GW_CONFIG={os.environ.get('QUOTA_GW_CONFIG', '')}")
            _say("  Ctrl-C stops everything.")
            _say("ready", )
            await stop.wait()
            _say("stopping...")
        return 0
    finally:
        if worker_proc is not None and worker_proc.poll() is None:
            worker_proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.to_thread(worker_proc.wait, 15)
            except subprocess.TimeoutExpired:
                worker_proc.kill()
                worker_proc.wait()
        for s in reversed(stores.started):
            await asyncio.to_thread(s.stop)
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        _say("stopped")


async def _listening(proc: subprocess.Popen[bytes], port: int, timeout: float = 60) -> bool:
    """Waits until the worker's metrics port answers (so `ready` means every example works);
    False if the worker exited first."""
    from .embedded import reachable

    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        if proc.poll() is not None:
            return False
        if await asyncio.to_thread(reachable, "127.0.0.1", port):
            return True
        await asyncio.sleep(0.1)
    return proc.poll() is None


def _q(body: dict[str, Any]) -> str:
    """A JSON body as one single-quoted shell word."""
    return "'" + json.dumps(body, separators=(",", ":")).replace("'", "'\\''") + "'"


def route_body(route: Any) -> dict[str, Any]:
    """The body an OpenAI-compatible upstream accepts on this route: chat routes take
    `messages`, /completions a `prompt`, /embeddings an `input`."""
    p = route.prefix.rstrip("/")
    if p.endswith("/embeddings"):
        return {"model": "demo-1", "input": "hello"}
    if p.endswith("/completions") and not p.endswith("/chat/completions"):
        return {"model": "demo-1", "prompt": "hello", "max_tokens": 20}
    return {"model": "demo-1", "stream": True, "max_tokens": 20, "messages": [{"role": "user", "content": "hello"}]}


def examples(config: Config, base: str, key: str, admin_token: str, plan: str, metrics_url: str | None) -> list[str]:
    """The banner's `try:` lines: one curl per configured route with a body its upstream accepts,
    the decision API (/v1/consume, /v1/balance) and the admin API (a grant, a key)."""
    auth = f"-H 'Authorization: Bearer {key}'"
    admin = f"-H 'Authorization: Bearer {admin_token}'"
    js = "-H 'Content-Type: application/json'"
    lines = ["  try:", "    # the decision API: charge a feature, then read the balance"]
    allocated = [f for f, spec in config.features.items() if config.plans[plan].allocation(spec.meter) != 0]
    feature = allocated[0] if allocated else next(iter(config.features))
    lines.append(f"    curl -s -X POST {base}/v1/consume {auth} {js} "
                 f"-d {_q({'feature': feature, 'units': 1, 'idempotency_key': 'try-1'})}")
    lines.append(f"    curl -s {base}/v1/balance {auth}")
    if config.routes:
        lines.append("    # the proxy: each route with a body its upstream accepts")
    for r in config.routes:
        if r.metering == "openai":
            body = route_body(r)
            flags = "-sN" if body and body.get("stream") else "-s"
            lines.append(f"    curl {flags} {base}{r.prefix} {auth} {js} -d {_q(body)}")
        elif r.metering == "fixed":
            lines.append(f"    curl -s -X POST {base}{r.prefix} {auth}")
        else:
            lines.append(f"    curl -s {base}{r.prefix} {auth}")
    meter = config.features[feature].meter
    lines.append("    # the admin API: credit for the demo org, another key")
    lines.append(f"    curl -s -X POST {base}/v1/admin/orgs/{DEMO_ORG}/grants {admin} {js} "
                 f"-d {_q({'meter': meter, 'amount': 100, 'reason': 'welcome credit'})}")
    lines.append(f"    curl -s -X POST {base}/v1/admin/orgs/{DEMO_ORG}/keys {admin} {js} "
                 f"-d {_q({'scopes': ['consume', 'read']})}")
    if metrics_url:
        lines.append("    # the worker's metrics (lag, batches, dead letters)")
        lines.append(f"    curl -s {metrics_url}")
    return lines


async def _database_direct(url: str) -> str:
    """DATABASE_URL given: created when missing (as `quota-gw migrate` does), migrated."""
    from . import db

    if await db.ensure_database(url):
        _say(f"  created database {url.rsplit('/', 1)[-1]}")
    applied = await db.migrate_url(url)
    _say(f"  migrations: {', '.join(applied) if applied else 'up to date'}")
    return url
