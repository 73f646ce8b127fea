"""/metrics as Prometheus sees it from `quota-gw serve --workers 2`: every scrape reports every
process's decisions (not the one process the scrape happened to reach), and every metric the
gateway declares moves. Uses its own embedded Redis, so it can be stopped (Redis errors, the
fail-open spool)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import yaml
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.parser import text_string_to_metric_families

from conftest import ADMIN_TOKEN, RUN, test_config_data
from quota_gw import embedded, metrics, sidecar  # noqa: F401 - the sidecar declares its metrics on import
from quota_gw.demo import create_demo_app
from quota_gw.dev import serve
from quota_gw.embedded import free_port


def scrape(text: str) -> dict[str, list[tuple[str, dict[str, str], float]]]:
    """family name -> [(sample name, labels, value)], `_created` samples left out."""
    return {f.name: [(s.name, s.labels, s.value) for s in f.samples if not s.name.endswith("_created")]
            for f in text_string_to_metric_families(text)}


def declared() -> dict[str, str]:
    """Every family the gateway registers: name -> type."""
    return {m.name: m.type for m in metrics.REGISTRY.collect()}


async def wait_for(cond, timeout: float = 20.0) -> None:
    async with asyncio.timeout(timeout):
        while not await cond():
            await asyncio.sleep(0.1)


async def test_two_worker_processes_report_every_decision_and_every_metric_moves(tmp_path: Path, database_url: str):
    rs = await asyncio.to_thread(embedded.start_redis, tmp_path / "redis", None)
    proc = None
    try:
        async with serve(create_demo_app(), lifespan="off") as up:
            data = test_config_data()
            data["routes"] = [{"prefix": "/ai/goals", "upstream": f"http://127.0.0.1:{up.port}",
                               "feature": "generate_goal", "fail": "open"}]
            data["behaviour"] = {"spool_dir": str(tmp_path / "spool")}
            cfg = tmp_path / "gw.yaml"
            cfg.write_text(yaml.safe_dump(data))
            port = free_port()
            env = {**os.environ, "REDIS_URL": rs.url, "DATABASE_URL": database_url, "QUOTA_GW_PREFIX": f"m{RUN}",
                   "QUOTA_GW_ADMIN_TOKEN": ADMIN_TOKEN}
            env.pop("PROMETHEUS_MULTIPROC_DIR", None)
            proc = subprocess.Popen([sys.executable, "-m", "quota_gw.cli", "serve", "--config", str(cfg),
                                     "--port", str(port), "--workers", "2", "--log-level", "warning"], env=env)
            # No keep-alive: each request opens a connection, so the kernel spreads them over both processes.
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10,
                                         limits=httpx.Limits(max_keepalive_connections=0)) as c:
                async def ready() -> bool:
                    assert proc.poll() is None, "serve exited"
                    try:
                        return (await c.get("/readyz")).status_code == 200
                    except httpx.TransportError:
                        return False

                await wait_for(ready, 30)
                adm = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
                org = f"metrics-{RUN}"
                assert (await c.post("/v1/admin/orgs", json={"org_id": org, "plan": "bulk"},
                                     headers=adm)).status_code == 201
                key = (await c.post(f"/v1/admin/orgs/{org}/keys", json={"scopes": ["consume", "read"]},
                                    headers=adm)).json()["key"]
                h = {"Authorization": f"Bearer {key}"}
                # 10 decisions: 8 tokens each of the 100 allocated; the 10th leaves 20, under 25 %.
                for _ in range(10):
                    r = await c.post("/v1/consume", json={"feature": "generate_insight", "units": 8}, headers=h)
                    assert r.status_code == 200, r.text
                # (a process writes a turn's tallies as the turn ends, just after the answers it
                # wrote: wait for the last one, then every scrape, whichever process serves it, has all)
                async def all_ten() -> bool:
                    fams = scrape((await c.get("/metrics")).text)
                    return sum(v for name, labels, v in fams["quota_gw_decisions"]
                               if labels["op"] == "consume" and labels["outcome"] == "ok") == 10

                await wait_for(all_ten)
                seen = []
                for _ in range(8):
                    fams = scrape((await c.get("/metrics")).text)
                    seen.append(sum(v for name, labels, v in fams["quota_gw_decisions"]
                                    if labels["op"] == "consume" and labels["outcome"] == "ok"))
                assert seen == [10] * 8
                assert [(labels["feature"], v) for _, labels, v in fams["quota_gw_near_limit_decisions"]] == [
                    ("generate_insight", 1)]
                assert [(labels["meter"], v) for _, labels, v in fams["quota_gw_tokens_charged"]] == [("general", 80)]
                assert (await c.post("/v1/consume", json={"feature": "generate_leads"}, headers=h)).status_code == 403
                assert (await c.post("/ai/goals", headers=h)).status_code == 200  # proxied

                # Redis goes away: the fail-open route forwards and spools; the API answers 503.
                await asyncio.to_thread(rs.stop)
                assert (await c.post("/v1/consume", json={"feature": "generate_insight"},
                                     headers=h)).status_code == 503
                r = await c.post("/ai/goals", headers=h)
                assert r.status_code == 200 and r.headers["X-Quota-Degraded"] == "fail-open"

                async def spool_reported() -> bool:
                    fams = scrape((await c.get("/metrics")).text)
                    return any(v >= 1 for _, _, v in fams.get("quota_gw_spool_entries", []))

                await wait_for(spool_reported)
                fams = scrape((await c.get("/metrics")).text)
                outcomes = {(labels["op"], labels["outcome"]) for _, labels, v in fams["quota_gw_decisions"] if v}
                assert ("consume", "plan_forbids") in outcomes
                families = declared()
                assert len(families) >= 11
                # Moved, and asserted, where a real upstream can be made to misbehave: usage past the
                # balance (test_proxy: overage), a pooled connection closed under the gateway
                # (test_keepalive: idle dropped); a Redis Cluster's redirects, a replica wait
                # that ran out (test_cluster).
                elsewhere = {"quota_gw_overage_tokens", "quota_gw_upstream_idle_dropped", "quota_gw_redis_redirects",
                             "quota_gw_replica_wait_short"}
                still = [name for name, kind in families.items() if name not in elsewhere
                         and not any(v > 0 for sample, _, v in fams.get(name, [])
                                    if kind != "histogram" or sample.endswith("_count"))]
                assert still == [], f"declared but never moved: {still}"
    finally:
        if proc is not None:
            proc.terminate()
            assert proc.wait(timeout=20) == 0
        rs.stop()


class _Decided:
    """What metrics.observe reads of a decision."""

    status, code, would, cost, remaining = 200, "", "", 3, 50


async def test_a_scrape_includes_what_the_current_turn_recorded() -> None:
    """Decisions are tallied and written as the loop turn ends; /metrics writes them first."""
    def consumed(text: str) -> float:
        return sum(v for _, labels, v in scrape(text)["quota_gw_decisions"]
                   if labels == {"op": "consume", "outcome": "ok", "feature": "tally_test"})

    before = consumed((await metrics.endpoint(None)).body.decode())  # type: ignore[arg-type]
    metrics.observe("consume", "tally_test", "general", 100, _Decided(), 0.0)
    metrics.observe("consume", "tally_test", "general", 100, _Decided(), 0.0)
    assert consumed((await metrics.endpoint(None)).body.decode()) == before + 2  # type: ignore[arg-type]


def test_a_tally_left_by_a_loop_that_closed_is_written_by_the_next_record() -> None:
    registry = CollectorRegistry()
    counter = Counter("tally_test", "a counter of this test", registry=registry)

    async def record_then_stop() -> None:
        metrics.count(counter)
        asyncio.get_running_loop().stop()  # before the turn that would write it

    loop = asyncio.new_event_loop()
    loop.create_task(record_then_stop())
    loop.run_forever()
    loop.close()
    assert registry.get_sample_value("tally_test_total") == 0

    async def record() -> None:
        metrics.count(counter, 2)

    asyncio.run(record())
    assert registry.get_sample_value("tally_test_total") == 3


def test_durations_tallied_in_one_write_land_in_the_buckets_and_sum_that_observe_gives_them() -> None:
    registry = CollectorRegistry()
    bounds = (0.001, 0.01, 0.1)
    one_by_one = Histogram("one_by_one", "observe() per amount", registry=registry, buckets=bounds)
    tallied = Histogram("tallied", "the same amounts, tallied", registry=registry, buckets=bounds)
    amounts = [0.0, 0.0005, 0.001, 0.001000001, 0.01, 0.05, 0.1, 0.2, 30.0, 0.001]  # on, under, over each bound
    for a in amounts:
        one_by_one.observe(a)
    metrics._observe_all(tallied, amounts)
    for le in ("0.001", "0.01", "0.1", "+Inf"):
        assert registry.get_sample_value("tallied_bucket", {"le": le}) == \
            registry.get_sample_value("one_by_one_bucket", {"le": le})
    assert registry.get_sample_value("tallied_count") == registry.get_sample_value("one_by_one_count") == 10
    assert registry.get_sample_value("tallied_sum") == pytest.approx(registry.get_sample_value("one_by_one_sum"))
