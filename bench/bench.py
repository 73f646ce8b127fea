"""Side-by-side benchmarks of the decision path (issue 5) and the sidecar, printed as ratios.

    .venv/bin/python bench/bench.py [--duration 10] [--connections 64] [--rounds 2] [--write]
        [--sections decision,proxy,llm,nginx,litellm]

Starts its own Valkey (embedded, on a free port, so `INFO commandstats` counts only this run)
and the gateway on 127.0.0.1, then runs wrk against a hello-world route and POST /v1/consume
on the same server, alternating, several rounds. The machine is shared and noisy: compare the
ratios, not the absolute numbers. --write appends the table to docs/benchmarks.md.

Sections: `decision` (consume vs hello), `proxy` (fixed and pass-through routes vs the upstream
direct), `llm` (an `openai` route, JSON and streamed, vs the upstream direct), `nginx`
(examples/nginx.conf with auth_request, to the authorize listener and to the main port, vs the
same nginx without it, a fixed route; `--before-src DIR` adds another tree's gateway, both ports), `litellm`
(LiteLLM's proxy beside the `llm` rows: `--litellm PATH` to its `litellm` executable, or
$LITELLM_BIN; skipped when absent).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import httpx
import redis
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from quota_gw import embedded  # noqa: E402
from quota_gw.auth import hash_key, new_key  # noqa: E402
from quota_gw.layout import Layout  # noqa: E402

CONSUME_LUA = """
wrk.method = "POST"
wrk.body = '{"feature":"generate_insight","user_id":"bench"}'
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer %s"
"""

# The same small JSON call for every proxy path (direct, pass-through, quota).
PROXY_LUA = """
wrk.method = "POST"
wrk.body = '{"input":"hello"}'
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer %s"
"""


# An LLM call as the issue measures it: non-streamed (or streamed), max_tokens 16.
LLM_LUA = """
wrk.method = "POST"
wrk.body = '{"model":"demo-1","max_tokens":16,%s"messages":[{"role":"user","content":"Say something about quotas."}]}'
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer %s"
"""


def wrk(url: str, duration: int, connections: int, script: Path | None = None) -> dict[str, float]:
    cmd = ["wrk", "-t1", f"-c{connections}", f"-d{duration}s", "--latency"]
    if script:
        cmd += ["-s", str(script)]
    out = subprocess.run(cmd + [url], capture_output=True, text=True, check=True).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)

    def pct(p: str) -> float:
        m = re.search(rf"\s{p}%\s+([\d.]+)(us|ms|s)", out)
        v = float(m.group(1))
        return v / 1000 if m.group(2) == "us" else v * 1000 if m.group(2) == "s" else v

    return {"rps": rps, "p50": pct("50"), "p99": pct("99"), "errors": int(non2xx.group(1)) if non2xx else 0}


def config_file(tmp: Path, upstream: str) -> Path:
    data = yaml.safe_load((ROOT / "examples" / "quota-gw.yaml").read_text())
    data["plans"]["bench"] = {"allocations": {"general": 10**12, "tokens": 10**12}}
    data["routes"] = [
        {"prefix": "/plain", "upstream": upstream, "metering": "none"},
        {"prefix": "/quota", "upstream": upstream, "feature": "generate_insight", "metering": "fixed"},
        {"prefix": "/v1/chat/completions", "upstream": upstream, "feature": "chat", "metering": "openai"},
    ]
    p = tmp / "bench.yaml"
    p.write_text(yaml.safe_dump(data))
    return p


def seed(redis_url: str, prefix: str, shards: int) -> str:
    """An org on the bench plan and a key, written as the admin API writes them."""
    r = redis.Redis.from_url(redis_url, decode_responses=True)
    layout = Layout(prefix, shards)
    key_id, key = new_key()
    r.hset(layout.org("bench-org"), mapping={"plan": "bench", "name": "bench"})
    r.hset(layout.api_key(hash_key(key)), mapping={"key_id": key_id, "org": "bench-org", "user": "",
                                                   "scopes": "consume,read"})
    return key


# uvicorn as `quota-gw serve` runs it: its httptools protocol with the head bounded, an
# answer's writes sent together (quota_gw/limits.py), the access log off.
HTTP_PROTOCOL = "quota_gw.limits:BoundedHttpToolsProtocol"


def start_server(kind: str, port: int, env: dict[str, str]) -> subprocess.Popen:
    if kind == "uvicorn":
        cmd = [sys.executable, "-m", "uvicorn", "serve_app:factory", "--factory", "--app-dir", str(ROOT / "bench"),
               "--port", str(port), "--host", "127.0.0.1", "--loop", "uvloop", "--http", HTTP_PROTOCOL,
               "--no-access-log", "--log-level", "warning"]
    else:
        cmd = [str(Path(sys.executable).parent / "granian"), "--interface", "asgi", "--factory", "--host",
               "127.0.0.1", "--port", str(port), "--workers", "1", "--loop", "uvloop", "--log-level", "warning",
               "--no-ws", "serve_app:factory"]
        env = {**env, "PYTHONPATH": str(ROOT / "bench")}
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT / "bench")
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                return proc
        except httpx.TransportError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError(f"{kind} did not start")


def scrape(port: int, name: str) -> float:
    text = httpx.get(f"http://127.0.0.1:{port}/metrics").text
    m = re.search(rf"^{name} ([\d.e+]+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


def evalsha_calls(r: redis.Redis) -> int:
    """Script calls the server ran, EVALSHA or FCALL (commands inside count under their own names)."""
    stats = r.info("commandstats")
    return sum(stats.get(f"cmdstat_{c}", {}).get("calls", 0) for c in ("evalsha", "fcall", "fcall_ro"))


async def paced(url: str, rate: int, duration: int, headers: dict[str, str]) -> dict[str, float]:
    """Open loop: request i starts at i/rate s whatever the answers do; latency counts from then."""
    import aiohttp

    lat: list[float] = []
    errors = 0
    async with aiohttp.ClientSession(headers=headers) as session:
        loop = asyncio.get_running_loop()
        t0 = loop.time() + 0.1

        async def one(i: int) -> None:
            nonlocal errors
            start = t0 + i / rate
            await asyncio.sleep(max(0.0, start - loop.time()))
            async with session.post(url, json={"input": "hello"}) as resp:
                await resp.read()
                if resp.status >= 300:
                    errors += 1
            lat.append((loop.time() - start) * 1000)

        await asyncio.gather(*(one(i) for i in range(rate * duration)))
    lat.sort()
    return {"rps": len(lat) / duration, "p50": lat[len(lat) // 2], "p99": lat[int(len(lat) * 0.99)], "errors": errors}


def proxy_section(args: argparse.Namespace, tmp: Path, cfg: Path, redis_url: str, up_port: int) -> list[dict]:
    """Direct to the demo upstream, through a pass-through route, through a quota route."""
    prefix = "benchproxy"
    key = seed(redis_url, prefix, 16)
    lua = tmp / "proxy.lua"
    lua.write_text(PROXY_LUA % key)
    port = embedded.free_port()
    env = {**os.environ, "QUOTA_GW_CONFIG": str(cfg), "REDIS_URL": redis_url, "QUOTA_GW_PREFIX": prefix}
    env.pop("DATABASE_URL", None)
    proc = start_server("uvicorn", port, env)
    try:
        urls = [f"http://127.0.0.1:{up_port}/bench", f"http://127.0.0.1:{port}/plain/bench",
                f"http://127.0.0.1:{port}/quota/bench"]
        for u in urls:
            wrk(u, 2, args.connections, lua)
        runs: list[list[dict[str, float]]] = [[], [], []]
        for _ in range(args.rounds):
            for i, u in enumerate(urls):
                runs[i].append(wrk(u, args.duration, args.connections, lua))
        out = [{"rps": statistics.median(x["rps"] for x in rs), "p50": statistics.median(x["p50"] for x in rs),
                "p99": statistics.median(x["p99"] for x in rs), "errors": sum(x["errors"] for x in rs)} for rs in runs]
        # Added latency at half of the quota route's max load: both routes at the same fixed rate
        # (Debian's wrk has no fixed-rate mode, so an open-loop paced client does it).
        rate = int(out[2]["rps"] / 2)
        for u in urls[1:]:
            x = asyncio.run(paced(u, rate, args.duration, {"Authorization": f"Bearer {key}"}))
            x["rate"] = rate
            out.append(x)
        return out
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def cpu_s(pid: int) -> float:
    """User + system CPU seconds a process has used so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def medians(rs: list[dict[str, float]]) -> dict[str, float]:
    return {"rps": statistics.median(x["rps"] for x in rs), "p50": statistics.median(x["p50"] for x in rs),
            "p99": statistics.median(x["p99"] for x in rs), "errors": sum(x["errors"] for x in rs)}


def measure(args: argparse.Namespace, targets: list[tuple[str, str, Path | None, list[int]]],
            chain: list[list[int]] | None = None) -> list[dict]:
    """wrk against each (name, url, script, pids) in turn, `rounds` times, alternating; the
    median of each, and the CPU the listed processes spent per request while it ran. `chain`
    (one list of pids per target): also `chain_us`, the CPU per request of every process the
    request went through, wrk's own included."""
    for _, url, script, _ in targets:
        wrk(url, 2, args.connections, script)  # warm up
    runs: list[list[dict[str, float]]] = [[] for _ in targets]
    cpu = [[0.0] * len(t[3]) for t in targets]
    whole = [0.0] * len(targets)
    n = [0.0] * len(targets)
    for _ in range(args.rounds):
        for i, (_, url, script, pids) in enumerate(targets):
            before = [cpu_s(p) for p in pids]
            others = [cpu_s(p) for p in chain[i]] if chain else []
            t0 = os.times()
            res = wrk(url, args.duration, args.connections, script)
            t1 = os.times()
            for j, p in enumerate(pids):
                cpu[i][j] += cpu_s(p) - before[j]
            if chain:
                whole[i] += sum(cpu_s(p) - c for p, c in zip(chain[i], others))
                whole[i] += t1.children_user + t1.children_system - t0.children_user - t0.children_system  # wrk
            n[i] += res["rps"] * args.duration
            runs[i].append(res)
    return [{"name": t[0], **medians(runs[i]), "cpu_us": [c / max(n[i], 1) * 1e6 for c in cpu[i]],
             **({"chain_us": whole[i] / max(n[i], 1) * 1e6} if chain else {})}
            for i, t in enumerate(targets)]


def children(pid: int) -> list[int]:
    """The processes whose parent is `pid` (an nginx master's workers)."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(stat.parent.name))
        except (OSError, ValueError, IndexError):
            continue
    return out


def llm_section(args: argparse.Namespace, tmp: Path, cfg: Path, redis_url: str, up_port: int, up_pid: int,
                litellm: Path | None) -> list[dict]:
    """An `openai` route (non-streamed and streamed, max_tokens 16) vs the demo upstream
    direct, and LiteLLM's proxy in front of the same upstream when it is installed."""
    prefix = "benchllm"
    key = seed(redis_url, prefix, 16)
    scripts = {}
    for mode, extra in (("json", ""), ("sse", '"stream":true,')):
        scripts[mode] = tmp / f"llm-{mode}.lua"
        scripts[mode].write_text(LLM_LUA % (extra, key))
    port = embedded.free_port()
    env = {**os.environ, "QUOTA_GW_CONFIG": str(cfg), "REDIS_URL": redis_url, "QUOTA_GW_PREFIX": prefix}
    env.pop("DATABASE_URL", None)
    proc = start_server("uvicorn", port, env)
    lite = None
    try:
        lite = start_litellm(litellm, tmp, up_port) if litellm else None
        chat = "/v1/chat/completions"
        targets = []
        for mode, extra, label in (("json", "", "JSON"), ("sse", '"stream":true,', "streamed")):
            targets.append((f"upstream direct, {label}", f"http://127.0.0.1:{up_port}{chat}", scripts[mode], [up_pid]))
            targets.append((f"quota-gw openai route, {label}", f"http://127.0.0.1:{port}{chat}", scripts[mode],
                            [proc.pid, up_pid]))
            if lite is not None:
                script = tmp / f"litellm-{mode}.lua"
                script.write_text(LLM_LUA % (extra, lite[2]))
                targets.append((f"LiteLLM proxy, {label}", f"http://127.0.0.1:{lite[1]}{chat}", script,
                                [lite[0].pid, up_pid]))
        return measure(args, targets)
    finally:
        for p in (proc, lite[0] if lite else None):
            if p is not None:
                p.terminate()
                p.wait(timeout=20)


def start_litellm(litellm: Path, tmp: Path, up_port: int) -> tuple[subprocess.Popen, int, str]:
    """LiteLLM's proxy, one worker, forwarding model demo-1 to the demo upstream: its lightest
    setup (no database, so no per-key budgets; the master key is the only credential)."""
    master = "sk-bench-" + new_key()[1]
    conf = tmp / "litellm.yaml"
    conf.write_text(yaml.safe_dump({"model_list": [{"model_name": "demo-1", "litellm_params": {
        "model": "openai/demo-1", "api_base": f"http://127.0.0.1:{up_port}/v1", "api_key": "none"}}],
        "litellm_settings": {"drop_params": True, "telemetry": False},
        "general_settings": {"master_key": master}}))
    port = embedded.free_port()
    env = {**os.environ, "LITELLM_LOG": "ERROR", "LITELLM_TELEMETRY": "False", "DISABLE_SCHEMA_UPDATE": "True"}
    env.pop("DATABASE_URL", None)
    proc = subprocess.Popen([str(litellm), "--config", str(conf), "--host", "127.0.0.1", "--port", str(port),
                             "--num_workers", "1"], env=env, cwd=tmp, stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health/liveliness", timeout=1).status_code == 200:
                return proc, port, master
        except httpx.TransportError:
            time.sleep(0.25)
    proc.kill()
    raise RuntimeError("litellm did not start")


def nginx_conf(tmp: Path, name: str, port: int, gw_port: int, up_port: int, auth: bool) -> Path:
    """examples/nginx.conf on these ports (`gw_port`: where it asks quota-gw, the authorize
    listener or the main port); without `auth`, the same file less its auth_request."""
    conf = (ROOT / "examples" / "nginx.conf").read_text()
    conf = (conf.replace("127.0.0.1:8081", f"127.0.0.1:{gw_port}").replace("127.0.0.1:9100", f"127.0.0.1:{up_port}")
            .replace("127.0.0.1:8000", f"127.0.0.1:{port}"))
    if not auth:  # nothing else changes: the auth_request_set variables stay empty
        conf = conf.replace("auth_request /_quota;", "")
    d = tmp / name
    d.mkdir()
    temps = "".join(f"    {t}_temp_path {d / t};\n" for t in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    (d / "nginx.conf").write_text(conf.replace("http {\n", "http {\n" + temps, 1))
    return d


def nginx_section(args: argparse.Namespace, tmp: Path, cfg: Path, redis_url: str, up_port: int,
                  up_pid: int, redis_pid: int) -> list[dict]:
    """examples/nginx.conf (auth_request -> /v1/authorize, a fixed route) vs the same nginx
    without auth_request, both in front of the demo upstream; auth_request to quota-gw's
    authorize listener (`serve --authorize-port`) and to its main (uvicorn) port, one process.
    Each row also has the CPU per request of the whole chain (wrk, nginx, the gateway, Valkey,
    the upstream): on a shared machine the req/s ratio follows the neighbours' load, the ratio
    of these does not (it is the req/s ratio the chains would have on the machine alone)."""
    binary = shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx")
                                            if os.path.exists(p)), None)
    if binary is None:
        print("nginx section skipped: nginx is not installed", file=sys.stderr)
        return []
    prefix = "benchnginx"
    key = seed(redis_url, prefix, 16)
    lua = tmp / "nginx.lua"
    lua.write_text(PROXY_LUA % key)
    port, listen_port = embedded.free_port(), embedded.free_port()
    env = {**os.environ, "QUOTA_GW_CONFIG": str(cfg), "REDIS_URL": redis_url, "QUOTA_GW_PREFIX": prefix,
           "QUOTA_GW_AUTHORIZE_LISTEN": f"127.0.0.1:{listen_port}"}  # what `serve --authorize-port` sets
    env.pop("DATABASE_URL", None)
    proc = start_server("uvicorn", port, env)
    procs: list[subprocess.Popen] = []
    before = None
    try:
        variants = [("plain", False, listen_port), ("auth", True, listen_port), ("uvicorn", True, port)]
        if args.before_src:  # the same nginx in front of another tree's gateway, measured in the same rounds
            before_port, before_listen = embedded.free_port(), embedded.free_port()
            before = start_server("uvicorn", before_port, {**env, "PYTHONPATH": args.before_src,
                                                           "QUOTA_GW_AUTHORIZE_LISTEN": f"127.0.0.1:{before_listen}"})
            variants += [("before-listener", True, before_listen), ("before", True, before_port)]
        ports = {}
        for name, auth, gw in variants:
            ports[name] = embedded.free_port()
            d = nginx_conf(tmp, f"nginx-{name}", ports[name], gw, up_port, auth)
            directives = f"daemon off; pid {d / 'nginx.pid'};" + (" user root;" if os.geteuid() == 0 else "")
            procs.append(subprocess.Popen([binary, "-p", str(d), "-c", str(d / "nginx.conf"), "-e", "stderr",
                                           "-g", directives]))
        for name in ports:
            deadline = time.monotonic() + 20
            while True:
                try:
                    httpx.get(f"http://127.0.0.1:{ports[name]}/", timeout=1)
                    break
                except httpx.TransportError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.05)
        workers = {name: children(p.pid) for name, p in zip(ports, procs)}
        gateway = {"plain": [], "auth": [proc.pid], "uvicorn": [proc.pid],
                   "before-listener": [before.pid] if before else [], "before": [before.pid] if before else []}
        chain = [[up_pid, redis_pid, *workers[name], *gateway[name]] for name in ports]
        return measure(args, [
            ("nginx, no auth_request", f"http://127.0.0.1:{ports['plain']}/quota/bench", lua, [up_pid]),
            ("nginx + auth_request to quota-gw, authorize listener", f"http://127.0.0.1:{ports['auth']}/quota/bench",
             lua, [proc.pid, up_pid]),
            ("nginx + auth_request to quota-gw, main port (uvicorn)",
             f"http://127.0.0.1:{ports['uvicorn']}/quota/bench", lua, [proc.pid, up_pid]),
            *([(f"nginx + auth_request to quota-gw of {args.before_src}, authorize listener",
                f"http://127.0.0.1:{ports['before-listener']}/quota/bench", lua, [before.pid, up_pid]),
               (f"nginx + auth_request to quota-gw of {args.before_src}, main port",
                f"http://127.0.0.1:{ports['before']}/quota/bench", lua, [before.pid, up_pid])] if before else [])],
            chain)
    finally:
        for p in procs:
            p.send_signal(signal.SIGQUIT)
            p.wait(timeout=20)
        for p in (proc, before):
            if p is not None:
                p.terminate()
                p.wait(timeout=20)


def side_by_side(rows: list[dict], pairs: list[tuple[int, int]]) -> str:
    """Each row with its ratio to its baseline row and the CPU per request of the processes
    (and of the whole chain, with its baseline's over it, when measured)."""
    whole = all("chain_us" in x for x in rows)
    out = ["| what | req/s | ratio | p50 ms | p99 ms | non-2xx | CPU µs/req (proxy, upstream) |"
           + (" chain CPU µs/req | CPU-bound ratio |" if whole else ""),
           "|---|---|---|---|---|---|---|" + ("---|---|" if whole else "")]
    base = dict(pairs)
    for i, x in enumerate(rows):
        ratio = f"**{x['rps'] / rows[base[i]]['rps']:.2f}×**" if i in base else "1.00×"
        cpu = ", ".join(f"{c:,.0f}" for c in x["cpu_us"])
        line = f"| {x['name']} | {x['rps']:,.0f} | {ratio} | {x['p50']:.2f} | {x['p99']:.2f} | {x['errors']} | {cpu} |"
        if whole:
            bound = f"**{rows[base[i]]['chain_us'] / x['chain_us']:.2f}×**" if i in base else "1.00×"
            line += f" {x['chain_us']:,.0f} | {bound} |"
        out.append(line)
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--duration", type=int, default=8)
    ap.add_argument("--connections", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--servers", default="uvicorn,granian")
    ap.add_argument("--sections", default="decision,proxy", help="decision,proxy,llm,nginx,litellm")
    ap.add_argument("--litellm", default=os.environ.get("LITELLM_BIN"),
                    help="the litellm executable (a scratch venv's bin/litellm) for the litellm section")
    ap.add_argument("--before-src", metavar="DIR", help="nginx section: also measure the gateway of another "
                    "tree (its src/ folder, e.g. from `git archive`; its authorize listener and its main port) "
                    "in the same rounds")
    ap.add_argument("--write", action="store_true", help="append the results to docs/benchmarks.md")
    args = ap.parse_args()
    if not shutil.which("wrk"):
        sys.exit("wrk is not installed (apt-get install wrk)")

    tmp = Path(tempfile.mkdtemp(prefix="qgw-bench-"))
    rsrv = embedded.start_redis(tmp / "redis")
    r = redis.Redis.from_url(rsrv.url, decode_responses=True)
    up_port = embedded.free_port()
    upstream = subprocess.Popen([str(Path(sys.executable).parent / "quota-gw"), "demo-upstream", "--port",
                                 str(up_port), "--log-level", "warning"])
    cfg = config_file(tmp, f"http://127.0.0.1:{up_port}")
    rows, proxy_rows, llm_rows, nginx_rows = [], [], [], []
    litellm = None
    if "litellm" in args.sections:
        litellm = Path(args.litellm) if args.litellm and Path(args.litellm).exists() else None
        if litellm is None:
            print("litellm section skipped: pass --litellm PATH (or $LITELLM_BIN) to a litellm executable",
                  file=sys.stderr)
    try:
        if "proxy" in args.sections:
            proxy_rows = proxy_section(args, tmp, cfg, rsrv.url, up_port)
        if "llm" in args.sections or litellm is not None:
            llm_rows = llm_section(args, tmp, cfg, rsrv.url, up_port, upstream.pid, litellm)
        if "nginx" in args.sections:
            nginx_rows = nginx_section(args, tmp, cfg, rsrv.url, up_port, upstream.pid, rsrv.pid)
        for server in (args.servers.split(",") if "decision" in args.sections else []):
            for coalesce in (True, False):
                data = yaml.safe_load(cfg.read_text())
                data["behaviour"] = {**data.get("behaviour", {}), "coalesce": coalesce}
                variant = tmp / f"bench-{coalesce}.yaml"
                variant.write_text(yaml.safe_dump(data))
                prefix = f"bench{int(coalesce)}{server[0]}"
                key = seed(rsrv.url, prefix, data["shards"])
                lua = tmp / "consume.lua"
                lua.write_text(CONSUME_LUA % key)
                port = embedded.free_port()
                env = {**os.environ, "QUOTA_GW_CONFIG": str(variant), "REDIS_URL": rsrv.url, "QUOTA_GW_PREFIX": prefix}
                env.pop("DATABASE_URL", None)
                proc = start_server(server, port, env)
                try:
                    base = f"http://127.0.0.1:{port}"
                    wrk(f"{base}/hello", 2, args.connections)  # warm up
                    wrk(f"{base}/v1/consume", 2, args.connections, lua)
                    hello, consume = [], []
                    cmds = trips = calls = 0.0
                    for _ in range(args.rounds):
                        hello.append(wrk(f"{base}/hello", args.duration, args.connections))
                        c0, t0, s0 = evalsha_calls(r), scrape(port, "quota_gw_redis_round_trips_total"), \
                            scrape(port, "quota_gw_redis_script_calls_total")
                        res = wrk(f"{base}/v1/consume", args.duration, args.connections, lua)
                        consume.append(res)
                        cmds += evalsha_calls(r) - c0
                        trips += scrape(port, "quota_gw_redis_round_trips_total") - t0
                        calls += scrape(port, "quota_gw_redis_script_calls_total") - s0
                    h = statistics.median(x["rps"] for x in hello)
                    c = statistics.median(x["rps"] for x in consume)
                    n = sum(x["rps"] for x in consume) * args.duration
                    rows.append({
                        "server": server, "coalesce": coalesce, "hello": h, "consume": c, "ratio": c / h,
                        "p50": statistics.median(x["p50"] for x in consume),
                        "p99": statistics.median(x["p99"] for x in consume),
                        "errors": sum(x["errors"] for x in consume),
                        "cmds_per_decision": cmds / max(calls, 1), "trips_per_decision": trips / max(calls, 1),
                        "decisions": int(calls), "requests": int(n)})
                finally:
                    proc.terminate()
                    proc.wait(timeout=20)
    finally:
        upstream.terminate()
        upstream.wait(timeout=20)
        rsrv.stop()

    head = ("| server | coalesce | hello req/s | consume req/s | ratio | consume p50 ms | p99 ms | non-2xx |"
            " EVALSHA/decision | round trips/decision |")
    lines = [head, "|" + "---|" * 10]
    for x in rows:
        lines.append(f"| {x['server']} | {'on' if x['coalesce'] else 'off'} | {x['hello']:,.0f} | {x['consume']:,.0f} |"
                     f" **{x['ratio']:.2f}×** | {x['p50']:.2f} | {x['p99']:.2f} | {x['errors']} |"
                     f" {x['cmds_per_decision']:.2f} | {x['trips_per_decision']:.3f} |")
    table = "\n".join(lines) if rows else ""
    if proxy_rows:
        plain = proxy_rows[1]
        ptable = ["| path | req/s | vs pass-through | p50 ms | p99 ms | added p50 ms | added p99 ms | non-2xx |",
                  "|---|---|---|---|---|---|---|---|"]
        for name, x in zip(("direct to the upstream", "pass-through route (no quota)", "quota route (consume + forward)"),
                           proxy_rows):
            ptable.append(f"| {name} | {x['rps']:,.0f} | **{x['rps'] / plain['rps']:.2f}×** | {x['p50']:.2f} |"
                          f" {x['p99']:.2f} | {x['p50'] - plain['p50']:+.2f} | {x['p99'] - plain['p99']:+.2f} |"
                          f" {x['errors']} |")
        half = proxy_rows[3:]
        if half:
            ptable.append(f"| at half load ({half[0]['rate']:.0f} req/s): pass-through | {half[0]['rps']:,.0f} | |"
                          f" {half[0]['p50']:.2f} | {half[0]['p99']:.2f} | | | {half[0]['errors']} |")
            ptable.append(f"| at half load: quota route | {half[1]['rps']:,.0f} | | {half[1]['p50']:.2f} |"
                          f" {half[1]['p99']:.2f} | {half[1]['p50'] - half[0]['p50']:+.2f} |"
                          f" {half[1]['p99'] - half[0]['p99']:+.2f} | {half[1]['errors']} |")
        table = "\n".join(ptable) + ("\n\n" + table if table else "")
    if llm_rows:
        # every row against the upstream direct of its kind (JSON rows first, then streamed)
        first_sse = next(i for i, x in enumerate(llm_rows) if "streamed" in x["name"])
        pairs = [(i, 0 if i < first_sse else first_sse) for i in range(len(llm_rows)) if i not in (0, first_sse)]
        table = side_by_side(llm_rows, pairs) + ("\n\n" + table if table else "")
    if nginx_rows:
        table = side_by_side(nginx_rows, [(i, 0) for i in range(1, len(nginx_rows))]) + ("\n\n" + table if table else "")
    print(table)
    if args.write:
        stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        cmd = "python bench/bench.py " + " ".join(sys.argv[1:])
        section = (f"\n### {args.sections} — {stamp}\n\n`{cmd}` on {platform.node()} "
                   f"({os.cpu_count()} cores), wrk -t1 -c{args.connections}, {args.duration}s × {args.rounds} rounds "
                   f"(median), one server worker, embedded Valkey.\n\n{table}\n")
        docs = ROOT / "docs" / "benchmarks.md"
        with docs.open("a") as f:
            f.write(section)
        print(f"appended to {docs}")


if __name__ == "__main__":
    main()
