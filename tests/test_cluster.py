"""The gateway on a real Redis Cluster (3 primaries, 3 replicas; tests/cluster_support.py), with
REDIS_URL naming one node: admin writes and decisions for orgs on every primary, the no-overspend
invariant, redirects followed, scripts reloaded per node, Redis errors as 503."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from redis.asyncio.cluster import RedisCluster
from redis.crc import key_slot

from cluster_support import command, orgs_on_every_primary, owner_port
from conftest import Admin, test_meters
from quota_gw import metrics
from quota_gw.app import create_app

pytestmark = pytest.mark.cluster


@pytest.fixture(scope="module")
def cprefix() -> str:
    return f"qgwc{secrets.token_hex(3)}"


@pytest.fixture(scope="module")
async def capp(config, redis_cluster, own_database_url, cprefix) -> AsyncIterator[Any]:
    # The URL names one primary, which owns a third of the slots; a database of this module's own
    # so reconcile sees only this module's orgs.
    application = create_app(config, redis_cluster.url, own_database_url, cprefix)
    application.state.url_port = int(redis_cluster.url.rsplit(":", 1)[1].split("/")[0])
    async with application.router.lifespan_context(application):
        yield application


@pytest.fixture(scope="module")
async def cclient(capp) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=capp), base_url="http://gw") as c:
        yield c


@pytest.fixture(scope="module")
def cadmin(cclient) -> Admin:
    return Admin(cclient)


def redirects(kind: str) -> float:
    return metrics.REDIS_REDIRECTS.labels(kind)._value.get()


async def test_cluster_client_detected_from_one_node_url(capp):
    assert isinstance(capp.state.ctx.decider.redis, RedisCluster)


async def test_admin_writes_and_decisions_for_orgs_on_every_primary(cclient, cadmin, capp, redis_cluster, cprefix):
    layout = capp.state.ctx.decider.layout
    orgs = orgs_on_every_primary(redis_cluster, layout, 6)
    assert {owner_port(redis_cluster, layout.balances(o)) for o in orgs} == set(redis_cluster.primaries())
    for org in orgs:  # 4 of 5 answered 500 MovedError before the gateway knew the cluster
        await cadmin.org("starter", org)
        key = await cadmin.key(org)
        await cadmin.grant(org, "general", 5)
        h = {"Authorization": f"Bearer {key}"}
        r = await cclient.post("/v1/consume", json={"feature": "generate_insight"}, headers=h)
        assert r.status_code == 200, r.text
        r = await cclient.get("/v1/balance", headers=h)
        assert r.json()["meters"]["general"]["balance"] == 4
    # one decision lane (one connection) per primary, not per call
    lanes = capp.state.ctx.decider._coalescer._lanes
    assert {int(n.rsplit(":", 1)[1]) for n in lanes} == set(redis_cluster.primaries())


async def test_no_overspend_1000_concurrent_consumes_on_every_primary(cclient, cadmin, capp, redis_cluster):
    layout = capp.state.ctx.decider.layout
    orgs = orgs_on_every_primary(redis_cluster, layout, 3)
    heads = []
    for org in orgs:
        await cadmin.org("starter", org)
        heads.append({"Authorization": f"Bearer {await cadmin.key(org)}"})
        await cadmin.grant(org, "general", 100)

    async def one(i: int) -> tuple[int, int]:
        r = await cclient.post("/v1/consume", json={"feature": "generate_insight"}, headers=heads[i % 3])
        return i % 3, r.status_code

    results = await asyncio.gather(*(one(i) for i in range(3000)))
    for k in range(3):
        codes = [s for o, s in results if o == k]
        assert codes.count(200) == 100 and codes.count(402) == 900, (k, set(codes))
        r = await cclient.get("/v1/balance", headers=heads[k])
        b = r.json()["meters"]["general"]
        assert b["balance"] == 0 and b["used"] == 100


async def test_scripts_reloaded_on_the_node_that_lost_them(cclient, cadmin, capp, redis_cluster):
    layout = capp.state.ctx.decider.layout
    org = orgs_on_every_primary(redis_cluster, layout, 3)[1]
    await cadmin.org("starter", org)
    h = {"Authorization": f"Bearer {await cadmin.key(org)}"}
    await cadmin.grant(org, "general", 10)
    command(owner_port(redis_cluster, layout.balances(org)), "SCRIPT", "FLUSH")
    rs = await asyncio.gather(*(cclient.post("/v1/consume", json={"feature": "generate_insight"}, headers=h)
                                for _ in range(5)))
    assert [r.status_code for r in rs] == [200] * 5
    r = await cclient.get("/v1/balance", headers=h)
    assert r.json()["meters"]["general"]["balance"] == 5


async def test_a_stale_slot_map_is_followed_not_failed(cclient, cadmin, capp, redis_cluster):
    """MOVED means the script did not run: it is resent to the node named, exactly once charged."""
    layout = capp.state.ctx.decider.layout
    org = orgs_on_every_primary(redis_cluster, layout, 3)[0]
    await cadmin.org("starter", org)
    h = {"Authorization": f"Bearer {await cadmin.key(org)}"}
    await cadmin.grant(org, "general", 10)
    nm = capp.state.ctx.decider.redis.nodes_manager
    slot = key_slot(layout.balances(org).encode())
    right = nm.slots_cache[slot]
    wrong = next(n for n in nm.get_nodes_by_server_type("primary") if n.name != right[0].name)
    nm.slots_cache[slot] = [wrong]  # as after a reshard the gateway has not heard of yet
    try:
        r = await cclient.post("/v1/consume", json={"feature": "generate_insight"}, headers=h)
        assert r.status_code == 200, r.text
        r = await cclient.get("/v1/balance", headers=h)
        assert r.json()["meters"]["general"]["balance"] == 9
    finally:
        await asyncio.sleep(0.6)
        await capp.state.ctx.decider._coalescer.refresh_now()
    assert nm.slots_cache[slot][0].name == right[0].name


async def test_reconcile_reads_every_primary(cclient, cadmin, capp, redis_cluster, own_database_url):
    """Balances on three primaries, events still in their streams: no drift, every one counted."""
    import asyncpg

    from sync_worker.recovery import reconcile

    layout = capp.state.ctx.decider.layout
    for org in orgs_on_every_primary(redis_cluster, layout, 3):
        await cadmin.org("starter", org)
        await cadmin.grant(org, "general", 7)
    pg = await asyncpg.connect(own_database_url)
    try:
        drift, stats = await reconcile(capp.state.ctx.decider.redis, pg, layout, meters=test_meters())
    finally:
        await pg.close()
    assert drift == [] and stats["pairs"] >= 3 and stats["undrained"] >= 3
    # and a balance changed behind the ledger's back is seen, on whichever primary it lives
    org = orgs_on_every_primary(redis_cluster, layout, 3)[2]
    await cadmin.org("starter", org)
    await capp.state.ctx.decider.redis.hset(layout.balances(org), "general:p", 3)
    pg = await asyncpg.connect(own_database_url)
    try:
        drift, _ = await reconcile(capp.state.ctx.decider.redis, pg, layout, meters=test_meters())
    finally:
        await pg.close()
    assert [(d.org, d.field, d.redis, d.ledger) for d in drift] == [(org, "p", 3, 0)]
    # rebuild --org: the field set back from the ledger, while the gateway runs
    from sync_worker.recovery import repair

    pg = await asyncpg.connect(own_database_url)
    try:
        fixed, left = await repair(capp.state.ctx.decider.redis, pg, layout, org, meters=test_meters())
        assert [(d.field, d.ledger) for d in fixed] == [("p", 0)] and left == []
        assert (await reconcile(capp.state.ctx.decider.redis, pg, layout, meters=test_meters()))[0] == []
    finally:
        await pg.close()


async def test_redis_errors_are_503_never_500(config, database_url, tmp_path):
    """A cluster node that serves no slot (a cluster not formed yet, or every primary down):
    the gateway starts, and every answer that needs Redis is 503 with Retry-After."""
    from quota_gw import embedded

    lone = embedded.start_redis(tmp_path / "lone", args=(
        "--cluster-enabled", "yes", "--cluster-port", str(embedded.free_port())))
    try:
        application = create_app(config, lone.url, database_url, f"qgwl{secrets.token_hex(3)}")
        async with application.router.lifespan_context(application):
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=application), base_url="http://gw") as c:
                r = await c.post("/v1/admin/orgs", json={"org_id": f"org-{secrets.token_hex(4)}", "plan": "pro"},
                                 headers=Admin(c).h)
                assert r.status_code == 503 and r.headers["Retry-After"] == "1", r.text
                assert r.json()["code"] == "unavailable"
                r = await c.post("/v1/consume", json={"feature": "generate_insight"},
                                 headers={"Authorization": "Bearer qgw_" + "x" * 40})
                assert r.status_code == 503, r.text
                assert (await c.get("/readyz")).status_code == 503
    finally:
        lone.stop()


async def test_a_slot_moved_under_traffic_fails_no_decision(cclient, cadmin, capp, redis_cluster):
    """A slot migrating (redis-cli --cluster reshard, by hand): decisions for its org meet ASK or
    TRYAGAIN (not run: resent) and then MOVED (not run: resent); none fails, each charged once."""
    layout = capp.state.ctx.decider.layout
    org = orgs_on_every_primary(redis_cluster, layout, 3)[0]
    await cadmin.org("starter", org)
    h = {"Authorization": f"Bearer {await cadmin.key(org)}"}
    await cadmin.grant(org, "general", 30)
    r = await cclient.post("/v1/consume", json={"feature": "generate_insight"}, headers=h)
    assert r.status_code == 200
    slot = key_slot(layout.balances(org).encode())
    src = owner_port(redis_cluster, layout.balances(org))
    dst = next(p for p in redis_cluster.primaries() if p != src)
    src_id, dst_id = command(src, "CLUSTER", "MYID").strip(), command(dst, "CLUSTER", "MYID").strip()
    assert "OK" in command(dst, "CLUSTER", "SETSLOT", str(slot), "IMPORTING", src_id)
    assert "OK" in command(src, "CLUSTER", "SETSLOT", str(slot), "MIGRATING", dst_id)
    keys = command(src, "CLUSTER", "GETKEYSINSLOT", str(slot), "1000").split()
    assert keys
    assert "OK" in command(src, "MIGRATE", "127.0.0.1", str(dst), "", "0", "5000", "KEYS", *keys)
    before = redirects("ask") + redirects("tryagain")
    during = [asyncio.ensure_future(cclient.post("/v1/consume", json={"feature": "generate_insight"}, headers=h))
              for _ in range(10)]
    # wait until the source has turned some away (ASK or TRYAGAIN): they met the migration
    while redirects("ask") + redirects("tryagain") == before and not all(d.done() for d in during):
        await asyncio.sleep(0.01)
    assert redirects("ask") + redirects("tryagain") > before
    for port in redis_cluster.primaries():
        command(port, "CLUSTER", "SETSLOT", str(slot), "NODE", dst_id)
    codes = [r.status_code for r in await asyncio.gather(*during)]
    assert codes == [200] * 10, codes
    r = await cclient.get("/v1/balance", headers=h)
    assert r.json()["meters"]["general"]["balance"] == 30 - 11
    assert owner_port(redis_cluster, layout.balances(org)) == dst


async def test_failover_503_then_flows_again_without_restart(cclient, cadmin, capp, redis_cluster):
    """A primary SIGKILLed: its orgs' decisions answer 503 (nothing charged) until its replica is
    promoted, then succeed again, on the same gateway. Every 200 is charged exactly once."""
    layout = capp.state.ctx.decider.layout
    url_port = capp.state.url_port  # the node the gateway's URL names, if it is still a primary
    if url_port not in redis_cluster.primaries():
        url_port = redis_cluster.primaries()[0]
    org = next(o for o in orgs_on_every_primary(redis_cluster, layout, 6)
               if owner_port(redis_cluster, layout.balances(o)) == url_port)
    await cadmin.org("starter", org)
    h = {"Authorization": f"Bearer {await cadmin.key(org)}"}
    await cadmin.grant(org, "general", 1000)
    ok = 0
    for _ in range(5):
        r = await cclient.post("/v1/consume", json={"feature": "generate_insight"}, headers=h)
        assert r.status_code == 200
        ok += 1
    promoted = redis_cluster.replica_of(url_port)
    redis_cluster.sync_replicas()  # what was acked is on the replica: the test counts exactly
    redis_cluster.kill(url_port)
    try:
        codes: list[int] = []
        deadline = asyncio.get_running_loop().time() + 30
        while not codes or codes[-1] != 200:
            assert asyncio.get_running_loop().time() < deadline, f"no promotion in 30 s: {codes[-5:]}"
            r = await cclient.post("/v1/consume", json={"feature": "generate_insight"}, headers=h)
            assert r.status_code in (200, 503), r.text
            if r.status_code == 503:
                assert r.headers["Retry-After"] and r.json()["code"] == "unavailable"
            codes.append(r.status_code)
            if r.status_code == 503:
                await asyncio.sleep(0.05)  # a client honouring Retry-After, sooner
        assert 503 in codes
        ok += codes.count(200)
        assert owner_port(redis_cluster, layout.balances(org)) == promoted
        rs = await asyncio.gather(*(cclient.post("/v1/consume", json={"feature": "generate_insight"}, headers=h)
                                    for _ in range(20)))
        assert [r.status_code for r in rs] == [200] * 20
        ok += 20
        r = await cclient.get("/readyz")  # the dead node is not a primary any more: ready
        assert r.status_code == 200, r.text
        r = await cclient.get("/v1/balance", headers=h)
        assert r.json()["meters"]["general"]["used"] == ok
    finally:
        redis_cluster.restart(url_port)  # rejoins as a replica of the promoted node
        redis_cluster.wait_ok()


def waited_config(config, ms: int):
    from quota_gw import config as config_mod
    from conftest import test_config_data

    data = test_config_data()
    data.setdefault("behaviour", {})["replica_wait_ms"] = ms
    return config_mod.parse(data, "test_cluster")


async def _one_consume(application) -> tuple[int, float]:
    import time

    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=application), base_url="http://gw") as c:
        adm = Admin(c)
        org = await adm.org("starter")
        h = {"Authorization": f"Bearer {await adm.key(org)}"}
        await adm.grant(org, "general", 10)
        t0 = time.perf_counter()
        codes = [r.status_code for r in await asyncio.gather(*(
            c.post("/v1/consume", json={"feature": "generate_insight"}, headers=h) for _ in range(5)))]
        dt = time.perf_counter() - t0
        r = await c.get("/v1/balance", headers=h)
        assert r.json()["meters"]["general"]["used"] == 5
        assert codes == [200] * 5
        return codes.count(200), dt


async def test_replica_wait_holds_answers_until_a_replica_has_them(config, redis_cluster, redis_url, database_url):
    """behaviour.replica_wait_ms: on the cluster each batch is acknowledged by a replica before the
    answer; on a Redis with no replica the wait runs out (counted) and the answer still comes."""
    short = metrics.REPLICA_WAIT_SHORT._value.get
    application = create_app(waited_config(config, 1000), redis_cluster.url, database_url, f"qgww{secrets.token_hex(3)}")
    async with application.router.lifespan_context(application):
        before = short()
        await _one_consume(application)
        assert short() == before  # every batch reached a replica well within the second
    application = create_app(waited_config(config, 300), redis_url, database_url, f"qgww{secrets.token_hex(3)}")
    async with application.router.lifespan_context(application):
        before = short()
        _, dt = await _one_consume(application)
        assert short() > before and dt >= 0.3  # no replica: each batch waited its 300 ms out


async def test_a_refund_waits_out_its_slot_unserved_like_decisions(cclient, cadmin, capp, redis_cluster):
    """A refund first reads its charge from the org's stream: on the slot's primary through the
    decision lanes, which wait out CLUSTERDOWN (and follow MOVED/ASK/TRYAGAIN) for up to
    cluster.SETTLE_S, as decisions do. Its slot unserved for 3 s (longer than redis-py's cluster
    client retries, which answered 503): the refund answers 200, once."""
    layout = capp.state.ctx.decider.layout
    org = orgs_on_every_primary(redis_cluster, layout, 3)[2]
    await cadmin.org("starter", org)
    h = {"Authorization": f"Bearer {await cadmin.key(org)}"}
    await cadmin.grant(org, "general", 10)
    r = await cclient.post("/v1/consume", json={"feature": "generate_insight", "units": 3}, headers=h)
    assert r.status_code == 200, r.text
    eid = r.json()["event_id"]
    slot = key_slot(layout.stream(org).encode())
    owner = owner_port(redis_cluster, layout.stream(org))
    before = redirects("clusterdown")
    assert "OK" in command(owner, "CLUSTER", "DELSLOTS", str(slot))  # the owner stops serving it
    try:
        refund = asyncio.ensure_future(cclient.post("/v1/refunds", json={"event_id": eid}, headers=h))
        await asyncio.sleep(3.0)  # the outage: past redis-py's cluster client retries (~2.5 s: 503), within SETTLE_S
        assert not refund.done()
    finally:
        assert "OK" in command(owner, "CLUSTER", "ADDSLOTS", str(slot))
    r = await refund
    assert r.status_code == 200, r.text
    assert redirects("clusterdown") > before  # it met the unserved slot and waited
    r = await cclient.post("/v1/refunds", json={"event_id": eid}, headers=h)
    assert r.status_code == 200, r.text  # the same refund again: answered, not applied twice
    r = await cclient.get("/v1/balance", headers=h)
    assert r.json()["meters"]["general"]["balance"] == 10



async def test_fail_open_route_spools_while_its_slot_is_unserved_and_replays_once(config, redis_cluster,
                                                                                  database_url, tmp_path):
    """An org's slot unserved for longer than the lanes wait (cluster.SETTLE_S): the decision ends
    in CLUSTERDOWN, which means it did not run, so a fail-open route serves and spools (not 503);
    once the slot is served again the replayer charges it, exactly once."""
    from conftest import test_config_data
    from quota_gw import config as config_mod
    from quota_gw.demo import create_demo_app
    from quota_gw.dev import serve

    demo_app = create_demo_app()
    async with serve(demo_app, lifespan="off") as up:
        data = test_config_data()
        data["routes"] = [{"prefix": "/ai/goals", "upstream": f"http://127.0.0.1:{up.port}",
                           "feature": "generate_goal", "fail": "open"}]
        data["behaviour"] = {"fail": "closed", "spool_dir": str(tmp_path / "spool")}
        application = create_app(config_mod.parse(data), redis_cluster.url, database_url,
                                 f"qgwf{secrets.token_hex(3)}")
        async with serve(application) as gw, httpx.AsyncClient(base_url=f"http://127.0.0.1:{gw.port}", timeout=30,
                                                               limits=httpx.Limits(max_keepalive_connections=0)) as c:
            adm = Admin(c)
            layout = application.state.ctx.decider.layout
            org = orgs_on_every_primary(redis_cluster, layout, 3)[1]
            await adm.org("pro", org)
            h = {"Authorization": f"Bearer {await adm.key(org)}"}
            r = await c.post("/ai/goals", headers=h)
            assert r.status_code == 200 and "X-Quota-Degraded" not in r.headers
            used = (await c.get("/v1/balance", headers=h)).json()["meters"]["goal_generation"]["used"]
            slot = key_slot(layout.balances(org).encode())
            owner = owner_port(redis_cluster, layout.balances(org))
            spool = application.state.sidecar.spool
            assert "OK" in command(owner, "CLUSTER", "DELSLOTS", str(slot))
            try:
                r = await c.post("/ai/goals", headers=h)  # waits SETTLE_S out, then serves and spools
                assert r.status_code == 200, r.text
                assert r.headers["X-Quota-Degraded"] == "fail-open"
                assert spool.pending() == 1
            finally:
                assert "OK" in command(owner, "CLUSTER", "ADDSLOTS", str(slot))
            async with asyncio.timeout(30):
                while spool.files():
                    await asyncio.sleep(0.05)
            assert spool.replayed == 1
            m = (await c.get("/v1/balance", headers=h)).json()["meters"]["goal_generation"]
            assert m["used"] == 2 * used  # the spooled call charged once, like the first


async def test_a_node_down_at_start_is_checked_when_it_answers(config, database_url, tmp_path):
    """Detection runs at start: a URL whose node did not answer then is used as a single Redis.
    When it answers and is a cluster node, /readyz says so (503, restart) instead of ready; a
    single Redis is ready."""
    from quota_gw import embedded

    port = embedded.free_port()
    application = create_app(config, f"redis://127.0.0.1:{port}", database_url, f"qgwd{secrets.token_hex(3)}")
    async with application.router.lifespan_context(application):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=application), base_url="http://gw") as c:
            assert (await c.get("/readyz")).status_code == 503  # down
            late = await asyncio.to_thread(embedded.start_redis, tmp_path / "late", port, args=(
                "--cluster-enabled", "yes", "--cluster-port", str(embedded.free_port())))
            try:
                r = await c.get("/readyz")
                assert r.status_code == 503 and "restart" in r.json()["redis"], r.text
            finally:
                await asyncio.to_thread(late.stop)
    # a single Redis that was down at start: the guess was right, ready once it answers
    port = embedded.free_port()
    application = create_app(config, f"redis://127.0.0.1:{port}", database_url, f"qgwd{secrets.token_hex(3)}")
    async with application.router.lifespan_context(application):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=application), base_url="http://gw") as c:
            late = await asyncio.to_thread(embedded.start_redis, tmp_path / "single", port)
            try:
                r = await c.get("/readyz")
                assert r.status_code == 200, r.text
                assert (await c.get("/readyz")).status_code == 200
            finally:
                await asyncio.to_thread(late.stop)
