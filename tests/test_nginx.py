"""Decision-service mode through a real nginx (auth_request): examples/nginx.conf as shipped,
in front of the demo upstream, with `quota-gw serve --authorize-port` (a real process) deciding:
nginx asks the authorize listener, as the file does, or the main (uvicorn) port."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import yaml

from conftest import ADMIN_TOKEN, ROOT, test_config_data
from quota_gw.demo import create_demo_app
from quota_gw.dev import serve
from quota_gw.embedded import free_port

NGINX = shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if os.path.exists(p)), None)
pytestmark = pytest.mark.skipif(NGINX is None, reason="nginx is not installed (Debian: apt-get install nginx; "
                                                      "`make venv` does it when run as root with apt-get)")


async def wait_http(url: str, proc: subprocess.Popen[bytes], timeout: float = 30) -> None:
    async with asyncio.timeout(timeout), httpx.AsyncClient(timeout=1) as c:
        while True:
            assert proc.poll() is None, f"{proc.args[0]} exited with {proc.returncode}"
            try:
                await c.get(url)
                return
            except httpx.TransportError:
                await asyncio.sleep(0.05)


def stop(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM) -> int:
    if proc.poll() is None:
        proc.send_signal(sig)
    try:
        return proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait()


@pytest.mark.parametrize("asks", ["authorize listener", "main port"])
async def test_nginx_auth_request_allowed_402_and_429(tmp_path: Path, redis_url, database_url, prefix, tenant,
                                                      asks: str):
    demo_app = create_demo_app()
    stats = demo_app.state.demo.stats
    async with serve(demo_app, lifespan="off") as up:
        gw_port, authorize_port, nginx_port = free_port(), free_port(), free_port()
        data = test_config_data()
        data["routes"] = [
            {"prefix": "/ai/goals", "upstream": f"http://127.0.0.1:{up.port}", "feature": "generate_goal"},
            {"prefix": "/v1", "upstream": f"http://127.0.0.1:{up.port}", "feature": "chat", "metering": "openai"},
        ]
        (tmp_path / "gw.yaml").write_text(yaml.safe_dump(data))
        env = {**os.environ, "REDIS_URL": redis_url, "DATABASE_URL": database_url, "QUOTA_GW_PREFIX": prefix,
               "QUOTA_GW_ADMIN_TOKEN": ADMIN_TOKEN}
        gw = subprocess.Popen([sys.executable, "-m", "quota_gw.cli", "serve", "--config", str(tmp_path / "gw.yaml"),
                               "--port", str(gw_port), "--authorize-port", str(authorize_port),
                               "--log-level", "warning"], env=env)
        conf = (ROOT / "examples" / "nginx.conf").read_text()
        asked = authorize_port if asks == "authorize listener" else gw_port
        conf = (conf.replace("127.0.0.1:8081", f"127.0.0.1:{asked}")
                .replace("127.0.0.1:9100", f"127.0.0.1:{up.port}")
                .replace("127.0.0.1:8000", f"127.0.0.1:{nginx_port}"))
        temps = "".join(f"    {d}_temp_path {tmp_path / d};\n" for d in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
        conf = conf.replace("http {\n", "http {\n" + temps, 1)
        (tmp_path / "nginx.conf").write_text(conf)
        directives = f"daemon off; pid {tmp_path / 'nginx.pid'};" + (" user root;" if os.geteuid() == 0 else "")
        nginx = subprocess.Popen([NGINX, "-p", str(tmp_path), "-c", str(tmp_path / "nginx.conf"), "-e", "stderr",
                                  "-g", directives])
        try:
            await wait_http(f"http://127.0.0.1:{gw_port}/healthz", gw)
            await wait_http(f"http://127.0.0.1:{nginx_port}/", nginx)
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{nginx_port}", timeout=10) as c:
                # allowed: charged once, forwarded with the org and without the key
                org, h = await tenant("pro")
                r = await c.post("/ai/goals/plan?q=1", headers=h, content=b"{}")
                assert r.status_code == 200, r.text
                assert r.json()["path"] == "/ai/goals/plan" and r.headers["X-Quota-Remaining"] == "17"
                seen = stats.requests[-1]["headers"]
                assert seen["x-quota-org"] == org and "authorization" not in seen

                # exhausted: 402 problem+json, not forwarded
                for _ in range(5):
                    assert (await c.post("/ai/goals", headers=h)).status_code == 200
                n = stats.count
                r = await c.post("/ai/goals", headers=h)
                assert r.status_code == 402, r.text
                assert r.headers["content-type"] == "application/problem+json"
                assert r.json()["code"] == "insufficient_balance"
                assert stats.count == n

                # rate limited: 429 with Retry-After (pro: 5 calls a minute per user)
                org2, h2 = await tenant("pro")
                hu = {**h2, "X-Quota-User": "alice"}
                for _ in range(5):
                    assert (await c.post("/ai/goals", headers=hu)).status_code == 200
                assert stats.requests[-1]["headers"]["x-quota-user"] == "alice"
                r = await c.post("/ai/goals", headers=hu)
                assert r.status_code == 429 and r.json()["code"] == "rate_limited"
                assert int(r.headers["Retry-After"]) >= 1

                # no key: 401 problem; an LLM route: checked, streamed through, not charged
                r = await c.post("/ai/goals")
                assert r.status_code == 401 and r.json()["code"] == "unauthorized"
                r = await c.post("/v1/chat/completions", headers=h2, json={
                    "model": "demo-1", "stream": True, "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]})
                assert r.status_code == 200 and r.text.endswith("data: [DONE]\n\n")
        finally:
            nginx_rc = stop(nginx, signal.SIGQUIT)
            gw_rc = stop(gw)
        assert nginx_rc == 0
        assert gw_rc in (0, -signal.SIGTERM)  # uvicorn re-raises the signal it shut down on
