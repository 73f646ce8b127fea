"""The Grafana dashboards (deploy/grafana): every Postgres panel's SQL runs, with Grafana's macros
expanded, against the migrated test database seeded with a ledger, and returns the columns the
panel shows; every Prometheus expression names a metric the gateway or the worker declares; the
provisioning files parse and provide every data source the dashboards use."""

from __future__ import annotations

import json
import re
import secrets
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import yaml

from conftest import ROOT
from quota_gw import metrics, sidecar  # noqa: F401 - the sidecar declares its metrics on import
from sync_worker import health

GRAFANA = ROOT / "deploy" / "grafana"
DASHBOARDS = sorted((GRAFANA / "dashboards").glob("*.json"))


def panels() -> list[tuple[str, dict[str, Any]]]:
    out = []
    for path in DASHBOARDS:
        for p in json.loads(path.read_text())["panels"]:
            out.append((f"{path.stem}: {p['title']}", p))
    return out


def pg_panels() -> list[tuple[str, dict[str, Any]]]:
    return [(n, p) for n, p in panels() if p["datasource"]["uid"] == "qgw-postgres"]


def expand(sql: str, start: datetime, end: datetime, interval: str) -> str:
    """Grafana's Postgres macros, as Grafana expands them."""
    f, t = (x.strftime("%Y-%m-%dT%H:%M:%SZ") for x in (start, end))
    sql = re.sub(r"\$__timeFilter\(([^)]+)\)", lambda m: f"{m.group(1).strip()} BETWEEN '{f}' AND '{t}'", sql)
    sql = sql.replace("$__timeFrom()", f"'{f}'").replace("$__timeTo()", f"'{t}'").replace("$__interval", interval)
    assert "$__" not in sql, f"a macro the test does not expand: {sql}"
    return sql


@pytest.fixture(scope="module")
async def seeded(database_url: str) -> Any:
    """An org with a period (allocation 100), spend over a week, a refund, refusals and a purchase."""
    org = f"graf-{secrets.token_hex(4)}"
    now = datetime.now(timezone.utc)
    period_end = int((now + timedelta(days=20)).timestamp())
    conn = await asyncpg.connect(database_url)
    await conn.execute("INSERT INTO orgs (org_id, name, plan) VALUES ($1, 'Grafana Test', 'pro')", org)
    rows = [(uuid.uuid4(), now - timedelta(days=6), "reset", org, "general", None, 100, 0,
             json.dumps({"allocation": 100, "period_end": period_end}))]
    for i in range(6):  # 6 x 14 tokens over the week: 16 left, under 25 %
        rows.append((uuid.uuid4(), now - timedelta(days=5 - i, hours=1), "consume", org, "general",
                     "generate_insight", -14, 14, None))
    rows.append((uuid.uuid4(), now - timedelta(hours=2), "refund", org, "general", "generate_insight", 2, -2, None))
    rows.append((uuid.uuid4(), now - timedelta(hours=2), "consume", org, "general", "generate_insight", -2, 2, None))
    for code in ("insufficient_balance", "rate_limited", "insufficient_balance"):
        rows.append((uuid.uuid4(), now - timedelta(hours=3), "denied", org, "general", "generate_insight", 0, 0,
                     json.dumps({"code": code})))
    await conn.executemany(
        """INSERT INTO usage_events (event_id, ts, kind, org_id, meter, feature, delta, cost, metadata)
           VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9::jsonb)""", rows)
    await conn.execute(
        """INSERT INTO purchases (purchase_id, org_id, pack, meter, tokens, amount_cents, currency, status, paid_at)
           VALUES ($1, $2, 'general_500', 'general', 500, 1900, 'usd', 'paid', now() - interval '1 day')""",
        f"pur-{org}", org)
    yield conn, org, now
    await conn.close()


@pytest.mark.parametrize("name,panel", pg_panels(), ids=[n for n, _ in pg_panels()])
@pytest.mark.parametrize("interval", ["15s", "1h", "1d"])
async def test_every_postgres_panel_returns_its_columns(seeded, name: str, panel: dict[str, Any], interval: str):
    conn, org, now = seeded
    (target,) = panel["targets"]
    sql = expand(target["rawSql"], now - timedelta(days=30), now, interval)
    stmt = await conn.prepare(sql)
    cols = [a.name for a in stmt.get_attributes()]
    types = {a.name: a.type.name for a in stmt.get_attributes()}
    rows = await stmt.fetch()
    assert rows, f"{name}: no rows from a seeded ledger"
    if panel["type"] == "table":
        organize = next(t for t in panel["transformations"] if t["id"] == "organize")
        assert cols == list(organize["options"]["indexByName"]), name
    elif panel["type"] == "stat":
        assert cols == ["value"] and types["value"] in ("int8", "int4", "numeric"), name
    else:
        assert panel["type"] == "timeseries" and target["format"] == "time_series"
        assert cols[0] == "time" and types["time"] == "timestamptz", name
        if "metric" in cols:
            assert cols == ["time", "metric", "value"], name
        assert all(types[c] in ("int8", "int4", "numeric", "float8") for c in cols[1:] if c != "metric"), types
        times = [r["time"] for r in rows]
        assert times == sorted(times), f"{name}: not in time order"


async def test_ops_panels_show_the_seeded_org(seeded):
    """The numbers the panels read are the ledger's: the seeded org's spend, balance and refusals."""
    conn, org, now = seeded
    by_title = {p["title"]: p for _, p in pg_panels()}

    async def run(title: str) -> list[Any]:
        sql = expand(by_title[title]["targets"][0]["rawSql"], now - timedelta(days=30), now, "1h")
        return await conn.fetch(sql.replace("LIMIT 20", "LIMIT 100000").replace("LIMIT 50", "LIMIT 100000"))

    top = {r["org_id"]: r for r in await run("Top spenders (30 days)")}
    assert (top[org]["tokens_30d"], top[org]["calls_30d"]) == (6 * 14 + 2 - 2, 7)
    low = [r for r in await run("Orgs near or at zero") if r["org_id"] == org]
    assert [(r["meter"], r["balance"], r["allocation"]) for r in low] == [("general", 16, 100)]
    burn = [r for r in await run("Burn rate and projected exhaustion") if r["org_id"] == org]
    assert burn and burn[0]["used_7d"] == 84
    reasons = {}
    for r in await run("Refusals by reason"):
        reasons[r["metric"]] = reasons.get(r["metric"], 0) + r["value"]
    assert reasons.get("insufficient_balance", 0) >= 2 and reasons.get("rate_limited", 0) >= 1


def declared_metric_names() -> set[str]:
    names = set()
    for registry in (metrics.REGISTRY, health.REGISTRY):
        for fam in registry.collect():
            if fam.type == "counter":
                names.add(fam.name + "_total")
            elif fam.type == "histogram":
                names |= {fam.name + s for s in ("_bucket", "_sum", "_count")}
            else:
                names.add(fam.name)
    return names


def test_every_prometheus_expression_names_declared_metrics():
    known = declared_metric_names()
    used = set()
    for name, p in panels():
        if p["datasource"]["uid"] != "qgw-prometheus":
            continue
        for t in p["targets"]:
            found = set(re.findall(r"\b(?:quota_gw|qgw_worker)_[a-z_]+\b", t["expr"]))
            assert found, f"{name}: no quota-gw metric in {t['expr']}"
            assert found <= known, f"{name}: unknown metrics {found - known}"
            used |= found
    assert {"quota_gw_decisions_total", "quota_gw_decision_seconds_bucket", "qgw_worker_stream_lag_entries",
            "qgw_worker_dead_letters", "qgw_worker_errors_total"} <= used


def test_provisioning_parses_and_provides_every_data_source():
    ds = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "quota-gw.yaml").read_text())
    uids = {d["uid"]: d["type"] for d in ds["datasources"]}
    assert set(uids) == {"qgw-postgres", "qgw-prometheus"}
    for name, p in panels():
        assert uids.get(p["datasource"]["uid"]) == p["datasource"]["type"], name
        for t in p["targets"]:
            assert t["datasource"] == p["datasource"], name
    providers = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" / "quota-gw.yaml").read_text())["providers"]
    assert [p["options"]["path"] for p in providers] == ["/var/lib/grafana/dashboards"]
    assert len(DASHBOARDS) == 3 and len({json.loads(p.read_text())["uid"] for p in DASHBOARDS}) == 3


def test_committed_dashboards_are_what_the_generator_writes(tmp_path: Path, monkeypatch):
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_dashboards", GRAFANA / "make_dashboards.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    monkeypatch.setattr(mod, "OUT", tmp_path)
    mod.main()
    for path in DASHBOARDS:
        assert (tmp_path / path.name).read_text() == path.read_text(), f"{path.name}: rerun make_dashboards.py"
