"""The commands fail like a tool: one line on stderr saying what is wrong and what to do, the
exit code their --help documents (2 usage/config, 3 a store unreachable, 1 refused/drift), and
never a traceback. Each runs the real `quota-gw` as a subprocess against a closed port or a
database that does not exist."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys

import asyncpg
import httpx
import pytest
import yaml

from conftest import ROOT, RUN, test_config_data
from quota_gw.embedded import free_port

OUR_VARS = ("REDIS_URL", "DATABASE_URL", "QUOTA_GW_CONFIG", "QUOTA_GW_PREFIX", "QUOTA_GW_ADMIN_TOKEN",
            "QUOTA_GW_DEBUG", "QUOTA_GW_WORKER_METRICS_PORT")


@pytest.fixture(scope="module")
def config_file(tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("cli") / "quota-gw.yaml"
    path.write_text(yaml.safe_dump(test_config_data()))
    return str(path)


def qgw(*args: str, timeout: float = 90, **env: str) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if k not in OUR_VARS}
    return subprocess.run([sys.executable, "-m", "quota_gw.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env={**base, **env})


def fails_in_one_line(r: subprocess.CompletedProcess[str], code: int, *words: str) -> str:
    err = r.stderr.strip()
    assert r.returncode == code, f"exit {r.returncode}, wanted {code}:\n{r.stderr}"
    assert "Traceback" not in r.stderr and len(err.splitlines()) == 1, r.stderr
    assert err.startswith("quota-gw"), err
    for w in words:
        assert w in err, err
    return err


def closed_port() -> int:
    return free_port()  # bound, then released: nothing listens there


def pg_url_at(servers: tuple[str, str], database: str) -> str:
    return servers[1].rsplit("/", 1)[0] + "/" + database


async def _drop(servers: tuple[str, str], name: str) -> None:
    conn = await asyncpg.connect(servers[1])
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


async def test_migrate_creates_a_missing_database_and_migrates_it(servers):
    name = f"qgw_cli_new_{RUN}"
    url = pg_url_at(servers, name)
    try:
        r = await asyncio.to_thread(qgw, "migrate", DATABASE_URL=url)
        assert r.returncode == 0, r.stderr
        assert f"created database {name!r}" in r.stdout and "applied: 001_core" in r.stdout
        conn = await asyncpg.connect(url)
        assert await conn.fetchval("SELECT count(*) FROM schema_migrations") >= 2
        await conn.close()
        again = await asyncio.to_thread(qgw, "migrate", DATABASE_URL=url)
        assert again.returncode == 0 and again.stdout.strip() == "up to date", again.stdout + again.stderr
    finally:
        await _drop(servers, name)


async def test_migrate_says_the_createdb_command_when_the_login_may_not_create(servers):
    role, name = f"qgw_nocreate_{RUN}", f"qgw_cli_nope_{RUN}"
    admin = await asyncpg.connect(servers[1])
    await admin.execute(f'CREATE ROLE "{role}" LOGIN NOCREATEDB')
    try:
        host_port = servers[1].split("@", 1)[-1].split("/", 1)[0]
        url = f"postgresql://{role}@{host_port}/{name}"
        r = await asyncio.to_thread(qgw, "migrate", DATABASE_URL=url)
        err = fails_in_one_line(r, 3, f"database {name!r} does not exist", "createdb ", f"-O {role} {name}")
        assert "quota-gw migrate" in err
        assert not await admin.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name)
    finally:
        await admin.execute(f'DROP ROLE IF EXISTS "{role}"')
        await admin.close()


@pytest.mark.parametrize("argv", [["migrate"], ["reconcile"], ["rebuild"], ["worker"], ["orgs", "list"],
                                  ["orgs", "create", "acme"], ["keys", "create", "acme"], ["keys", "revoke", "key_x"],
                                  ["grant", "acme", "general", "5", "--reason", "r"], ["worker-status"],
                                  ["orgs", "entitlements", "acme", "--clear"]])
def test_postgres_unreachable_is_one_line_and_exit_3(argv, config_file, redis_url):
    url = f"postgresql://postgres@127.0.0.1:{closed_port()}/quota_gw"
    r = qgw(*argv, DATABASE_URL=url, REDIS_URL=redis_url, QUOTA_GW_CONFIG=config_file)
    fails_in_one_line(r, 3, "cannot reach Postgres at 127.0.0.1:", "DATABASE_URL")


@pytest.mark.parametrize("argv", [["reconcile"], ["rebuild"], ["worker"], ["orgs", "list"],
                                  ["grant", "acme", "general", "5", "--reason", "r"], ["worker-status"],
                                  ["orgs", "entitlements", "acme"]])
def test_redis_unreachable_is_one_line_and_exit_3(argv, config_file, database_url):
    r = qgw(*argv, DATABASE_URL=database_url, REDIS_URL=f"redis://127.0.0.1:{closed_port()}/0",
            QUOTA_GW_CONFIG=config_file)
    fails_in_one_line(r, 3, "cannot reach Redis at 127.0.0.1:", "REDIS_URL")


def test_dev_with_redis_unreachable_stops_before_starting_anything(tmp_path):
    r = qgw("dev", "--data-dir", str(tmp_path / "dev"), "--no-worker", REDIS_URL=f"redis://127.0.0.1:{closed_port()}/0",
            QUOTA_GW_CONFIG=str(ROOT / "examples" / "quota-gw.yaml"))
    fails_in_one_line(r, 3, "cannot reach Redis at 127.0.0.1:", "REDIS_URL")


@pytest.mark.parametrize("argv", [["reconcile"], ["worker"], ["orgs", "list"]])
def test_a_database_that_does_not_exist_points_to_migrate(argv, config_file, redis_url, servers):
    url = pg_url_at(servers, f"qgw_missing_{RUN}")
    r = qgw(*argv, DATABASE_URL=url, REDIS_URL=redis_url, QUOTA_GW_CONFIG=config_file)
    fails_in_one_line(r, 3, f"'qgw_missing_{RUN}' does not exist", "quota-gw migrate", "createdb")


@pytest.mark.parametrize("argv", [["migrate"], ["reconcile"], ["worker"], ["orgs", "list"]])
def test_missing_database_url_is_a_usage_error(argv, config_file, redis_url):
    r = qgw(*argv, REDIS_URL=redis_url, QUOTA_GW_CONFIG=config_file)
    fails_in_one_line(r, 2, "DATABASE_URL is not set")


@pytest.mark.parametrize("argv", [["reconcile"], ["orgs", "list"], ["worker-status"]])
def test_missing_config_is_a_usage_error(argv, redis_url, database_url):
    r = qgw(*argv, REDIS_URL=redis_url, DATABASE_URL=database_url)
    fails_in_one_line(r, 2, "no config file", "QUOTA_GW_CONFIG")


@pytest.mark.parametrize("argv, words", [
    (["grant", "acme", "general", "lots", "--reason", "r"], "invalid int value"),
    (["grant", "acme", "general", "5"], "--reason"),
    (["orgs"], "SUBCOMMAND"),
    (["serve", "--port", "x"], "--port"),
    (["nope"], "invalid choice"),
])
def test_bad_arguments_are_one_line_and_exit_2(argv, words):
    fails_in_one_line(qgw(*argv), 2, words, "--help")


def test_reconcile_exits_0_when_clean(config_file, redis_url, own_database_url):
    r = qgw("reconcile", DATABASE_URL=own_database_url, REDIS_URL=redis_url, QUOTA_GW_CONFIG=config_file,
            QUOTA_GW_PREFIX=f"qgwclean{RUN}")
    assert r.returncode == 0 and "0 differ" in r.stdout, r.stdout + r.stderr


COMMANDS = [["serve"], ["migrate"], ["worker"], ["rebuild"], ["reconcile"], ["dev"], ["orgs", "create"],
            ["orgs", "list"], ["keys", "create"], ["keys", "revoke"], ["grant"], ["worker-status"], ["orgs", "entitlements"]]


@pytest.mark.parametrize("argv", COMMANDS)
def test_help_names_the_environment_and_the_exit_codes(argv):
    r = qgw(*argv, "--help")
    assert r.returncode == 0, r.stderr
    assert "environment:" in r.stdout and "exit codes" in r.stdout, r.stdout
    assert "DATABASE_URL" in r.stdout
    if argv != ["migrate"]:
        assert "REDIS_URL" in r.stdout and "QUOTA_GW_CONFIG" in r.stdout, r.stdout
    codes = r.stdout.split("exit codes", 1)[1]
    for code in ("0 ", "2 "):
        assert f"\n  {code}" in codes, codes
    assert "\n  3 " in codes, codes
    if argv != ["serve"]:
        assert "unreachable" in codes, codes
    if argv == ["serve"]:
        assert "--host" in r.stdout and "0.0.0.0" in r.stdout and "default 8080" in r.stdout


def test_serve_on_a_port_in_use_exits_3_saying_so(config_file):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        r = qgw("serve", "--port", str(s.getsockname()[1]), QUOTA_GW_CONFIG=config_file)
    assert r.returncode == 3 and "address already in use" in r.stderr and "Traceback" not in r.stderr, r.stderr


async def test_serve_starts_with_redis_unreachable_and_says_so_on_readyz(config_file):
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in OUR_VARS}
    env.update(REDIS_URL=f"redis://127.0.0.1:{closed_port()}/0", QUOTA_GW_CONFIG=config_file)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "quota_gw.cli", "serve", "--port", str(port), "--log-level", "warning", env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as c:
            async with asyncio.timeout(60):
                while True:
                    assert proc.returncode is None, (await proc.stderr.read()).decode()
                    try:
                        r = await c.get("/healthz")
                        break
                    except httpx.TransportError:
                        await asyncio.sleep(0.1)
            assert r.status_code == 200
            ready = await c.get("/readyz")
            assert ready.status_code == 503 and ready.json()["redis"].startswith("down")
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(30):
            _, err = await proc.communicate()
    assert proc.returncode in (0, -signal.SIGTERM), err.decode()  # uvicorn re-raises the signal it stopped on
    assert b"Traceback" not in err
