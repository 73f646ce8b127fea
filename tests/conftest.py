"""Test harness: a real Redis and a real Postgres, never mocks.

Uses REDIS_URL / DATABASE_URL when set, else 127.0.0.1:6379 / :5432 when they answer, else
starts embedded servers (pip packages that ship the binaries) in a temp folder. Each run gets
its own Postgres database and its own Redis key prefix, so runs never collide.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
import redis.asyncio as aioredis
import yaml

from quota_gw import config as config_mod
from quota_gw import db, embedded
from quota_gw.app import create_app

ROOT = Path(__file__).resolve().parent.parent
ADMIN_TOKEN = "test-admin-" + secrets.token_hex(8)
os.environ["QUOTA_GW_ADMIN_TOKEN"] = ADMIN_TOKEN
RUN = secrets.token_hex(4)


@contextlib.contextmanager
def served(folder: Path, data: dict[str, Any], env: dict[str, str], *args: str) -> Iterator[tuple[str, httpx.Response]]:
    """`quota-gw serve` as users run it, on a free port, with config `data` and environment
    `env` (over this process's): yields the base URL and its first /readyz answer (any status);
    terminated afterwards."""
    import subprocess
    import sys
    import time

    cfg = folder / "gw.yaml"
    cfg.write_text(yaml.safe_dump(data))
    port = embedded.free_port()
    proc = subprocess.Popen([sys.executable, "-m", "quota_gw.cli", "serve", "--config", str(cfg), "--port",
                             str(port), "--log-level", "warning", *args],
                            env={**os.environ, "QUOTA_GW_ADMIN_TOKEN": ADMIN_TOKEN, **env})
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                ready = httpx.get(f"{base}/readyz", timeout=5)
                break
            except httpx.TransportError:
                pass
            assert proc.poll() is None, "serve exited"
            assert time.monotonic() < deadline, "serve did not start"
            time.sleep(0.1)
        yield base, ready
    finally:
        proc.terminate()
        # 0, or -15 with one process (uvicorn re-raises the SIGTERM it handled)
        assert proc.wait(timeout=20) in (0, -15)


@pytest.fixture(scope="session")
def servers() -> Any:
    redis_url, pg_url, started = embedded.servers(Path(tempfile.mkdtemp(prefix="qgw-test-")))
    yield redis_url, pg_url
    for s in started:
        s.stop()


@pytest.fixture(scope="session")
def redis_cluster() -> Any:
    """A real Redis Cluster (3 primaries, 3 replicas; tests/cluster_support.py), started on first
    use and shared by the session."""
    from cluster_support import start

    cluster = start(Path(tempfile.mkdtemp(prefix="qgw-cluster-")))
    yield cluster
    cluster.stop()


@pytest.fixture(scope="session")
def redis_url(servers: tuple[str, str]) -> str:
    return servers[0]


@pytest.fixture(scope="session")
async def database_url(servers: tuple[str, str]) -> AsyncIterator[str]:
    """A fresh database for this run, migrated; dropped afterwards."""
    url = await fresh_database(servers, "")
    yield url
    await drop_database(servers, url)


async def fresh_database(servers: tuple[str, str], suffix: str) -> str:
    """A database of its own, migrated: for commands (reconcile, rebuild) that look at every org
    of a database, which the session's shared database fills with other tests' orgs."""
    admin_url = servers[1]
    name = f"qgw_test_{RUN}_{suffix}" if suffix else f"qgw_test_{RUN}"
    conn = await asyncpg.connect(admin_url)
    await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    await conn.execute(f'CREATE DATABASE "{name}"')
    await conn.close()
    url = admin_url.rsplit("/", 1)[0] + "/" + name
    conn = await asyncpg.connect(url)
    await db.migrate(conn)
    await conn.close()
    return url


async def drop_database(servers: tuple[str, str], url: str) -> None:
    conn = await asyncpg.connect(servers[1])
    await conn.execute(f'DROP DATABASE IF EXISTS "{url.rsplit("/", 1)[1]}" WITH (FORCE)')
    await conn.close()


@pytest.fixture(scope="module")
async def own_database_url(servers: tuple[str, str], request: pytest.FixtureRequest) -> AsyncIterator[str]:
    """A migrated database for this test module alone (see fresh_database)."""
    url = await fresh_database(servers, request.module.__name__.rsplit(".", 1)[-1].lower())
    yield url
    await drop_database(servers, url)


@pytest.fixture
def pg_dir() -> Any:
    """A data folder for an embedded Postgres of a test's own, outside pytest's tmp root: pytest
    resets /tmp/pytest-of-<user> to 0700 at every session start, and the postgres system user
    must be able to reach its data folder for as long as the server runs."""
    import shutil

    d = Path(tempfile.mkdtemp(prefix="qgw-pg-"))
    yield d / "pg"
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="session")
def prefix() -> str:
    return f"qgwt{RUN}"


@pytest.fixture(scope="session")
async def redis(redis_url: str, prefix: str) -> AsyncIterator[aioredis.Redis]:
    r = aioredis.from_url(redis_url, decode_responses=True)
    yield r
    async for k in r.scan_iter(match=f"{prefix}:*", count=1000):
        await r.delete(k)
    await r.aclose()


def test_meters() -> list[str]:
    """The meters of test_config_data() (reconcile and repair are told which meters to read)."""
    meters = test_config_data()["meters"]
    return list(meters)


def test_config_data() -> dict[str, Any]:
    """The shipped example plus plans made for tests (no rate limits, short periods)."""
    data = yaml.safe_load((ROOT / "examples" / "quota-gw.yaml").read_text())
    data["plans"]["bulk"] = {"allocations": {"general": 100, "goal_generation": 100, "tokens": 1000}}
    data["plans"]["hourly"] = {"period": "3600s", "allocations": {"general": 10}}
    data["routes"] = []
    return data


test_config_data.__test__ = False  # type: ignore[attr-defined]


@pytest.fixture(scope="session")
def config() -> config_mod.Config:
    return config_mod.parse(test_config_data(), "tests/conftest.py")


@pytest.fixture(scope="session")
async def app(config: config_mod.Config, redis_url: str, database_url: str, prefix: str, redis: aioredis.Redis) -> AsyncIterator[Any]:
    application = create_app(config, redis_url, database_url, prefix)
    async with application.router.lifespan_context(application):
        yield application


@pytest.fixture(scope="session")
async def client(app: Any) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://gw") as c:
        yield c


class Admin:
    """Thin helper over the admin API, as an operator would use it."""

    def __init__(self, client: httpx.AsyncClient) -> None:
        self.c = client
        self.h = {"Authorization": f"Bearer {ADMIN_TOKEN}"}

    async def org(self, plan: str = "pro", org_id: str | None = None) -> str:
        org_id = org_id or f"org-{secrets.token_hex(6)}"
        r = await self.c.post("/v1/admin/orgs", json={"org_id": org_id, "plan": plan}, headers=self.h)
        assert r.status_code == 201, r.text
        return org_id

    async def key(self, org_id: str, user_id: str | None = None, scopes: list[str] | None = None) -> str:
        body: dict[str, Any] = {"scopes": scopes or ["consume", "read"]}
        if user_id:
            body["user_id"] = user_id
        r = await self.c.post(f"/v1/admin/orgs/{org_id}/keys", json=body, headers=self.h)
        assert r.status_code == 201, r.text
        return r.json()["key"]

    async def grant(self, org_id: str, meter: str, amount: int, **kw: Any) -> httpx.Response:
        r = await self.c.post(f"/v1/admin/orgs/{org_id}/grants",
                              json={"meter": meter, "amount": amount, "reason": "test", **kw}, headers=self.h)
        assert r.status_code == 201, r.text
        return r

    async def user(self, org_id: str, user_id: str, team: str | None = None) -> None:
        r = await self.c.post(f"/v1/admin/orgs/{org_id}/users", json={"user_id": user_id, "team": team},
                              headers=self.h)
        assert r.status_code in (200, 201), r.text

    async def quota(self, org_id: str, meter: str, limit: int, **who: str) -> None:
        r = await self.c.put(f"/v1/admin/orgs/{org_id}/quotas", json={"meter": meter, "limit": limit, **who},
                             headers=self.h)
        assert r.status_code == 200, r.text


@pytest.fixture(scope="session")
def admin(client: httpx.AsyncClient) -> Admin:
    return Admin(client)


Tenant = tuple[str, dict[str, str]]


@pytest.fixture
def tenant(admin: Admin) -> Callable[..., Awaitable[Tenant]]:
    """Makes an org on a plan with one key; returns (org_id, auth headers)."""

    async def make(plan: str = "pro", user_id: str | None = None, **grants: int) -> Tenant:
        org = await admin.org(plan)
        key = await admin.key(org, user_id)
        for meter, amount in grants.items():
            await admin.grant(org, meter, amount)
        return org, {"Authorization": f"Bearer {key}"}

    return make


async def gather_limited(n: int, fn: Callable[[int], Awaitable[Any]]) -> list[Any]:
    return await asyncio.gather(*(fn(i) for i in range(n)))


@pytest.fixture(scope="session")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The package as `pip wheel` builds it, once a run: what `pip install quota-gw` (and the
    Dockerfile) installs."""
    out = tmp_path_factory.mktemp("wheel")
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                        str(out), str(ROOT)], capture_output=True, text=True, timeout=300)
    if r.returncode != 0 and "No module named" in r.stderr:
        pytest.skip(f"cannot build a wheel here: {r.stderr.strip()[-200:]}")
    assert r.returncode == 0, r.stderr
    (built,) = out.glob("quota_gw-*.whl")
    return built


async def hang_up_mid_body(app: Any, path: str, authorization: str, part: bytes) -> list[int]:
    """POSTs `part` of a 100-byte JSON body to `app` (ASGI, no server), then the client is gone;
    the statuses the app answered (to nobody)."""
    incoming = iter([{"type": "http.request", "body": part, "more_body": True}, {"type": "http.disconnect"}])

    async def receive() -> dict[str, Any]:
        return next(incoming, {"type": "http.disconnect"})

    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
             "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "",
             "headers": [(b"host", b"gw"), (b"authorization", authorization.encode()),
                         (b"content-type", b"application/json"), (b"content-length", b"100")],
             "client": ("127.0.0.1", 40000), "server": ("127.0.0.1", 80)}
    await app(scope, receive, send)
    return [m["status"] for m in sent if m["type"] == "http.response.start"]
