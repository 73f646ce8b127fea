"""Writes the Grafana dashboards (deploy/grafana/dashboards/*.json) from the panel lists below.

The JSON files are committed (Grafana's provisioning reads them); edit this file and rerun
`python deploy/grafana/make_dashboards.py` to change them. tests/test_grafana.py runs every
Postgres panel's SQL against a migrated, seeded database and checks its columns, and checks
every Prometheus expression names a metric the gateway or the worker declares.

Postgres panels read the rollups and the views over them (migration 003), never raw
usage_events scans across orgs, so they stay fast as the ledger grows. Table panels list the
columns they show in an "organize" transformation (the test checks the query returns exactly those).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

PG = {"type": "grafana-postgresql-datasource", "uid": "qgw-postgres"}
PROM = {"type": "prometheus", "uid": "qgw-prometheus"}
OUT = Path(__file__).resolve().parent / "dashboards"


class Layout:
    """Places panels left to right, 24 columns wide."""

    def __init__(self) -> None:
        self.x = self.y = self.row_h = 0
        self.next_id = 1

    def place(self, w: int, h: int) -> dict[str, int]:
        if self.x + w > 24:
            self.x, self.y, self.row_h = 0, self.y + self.row_h, 0
        pos = {"x": self.x, "y": self.y, "w": w, "h": h}
        self.x += w
        self.row_h = max(self.row_h, h)
        return pos


def sql_target(sql: str, fmt: str) -> dict[str, Any]:
    return {"refId": "A", "datasource": PG, "editorMode": "code", "format": fmt, "rawQuery": True,
            "rawSql": " ".join(sql.split())}


def prom_target(expr: str, legend: str, ref: str = "A") -> dict[str, Any]:
    return {"refId": ref, "datasource": PROM, "editorMode": "code", "expr": expr, "legendFormat": legend,
            "range": True}


def panel(lay: Layout, kind: str, title: str, targets: list[dict[str, Any]], ds: dict[str, str], w: int = 12,
          h: int = 8, unit: str = "short", description: str = "", **extra: Any) -> dict[str, Any]:
    p = {"id": lay.next_id, "type": kind, "title": title, "description": description, "datasource": ds,
         "gridPos": lay.place(w, h), "targets": targets,
         "fieldConfig": {"defaults": {"unit": unit}, "overrides": []}, "options": {}}
    lay.next_id += 1
    p.update(extra)
    return p


def table(lay: Layout, title: str, sql: str, columns: list[str], **kw: Any) -> dict[str, Any]:
    return panel(lay, "table", title, [sql_target(sql, "table")], PG, transformations=[
        {"id": "organize", "options": {"indexByName": {c: i for i, c in enumerate(columns)},
                                       "excludeByName": {}, "renameByName": {}}}], **kw)


def pg_series(lay: Layout, title: str, sql: str, **kw: Any) -> dict[str, Any]:
    return panel(lay, "timeseries", title, [sql_target(sql, "time_series")], PG, **kw)


def pg_stat(lay: Layout, title: str, sql: str, **kw: Any) -> dict[str, Any]:
    return panel(lay, "stat", title, [sql_target(sql, "table")], PG, w=6, h=4, **kw)


def prom(lay: Layout, title: str, exprs: list[tuple[str, str]], kind: str = "timeseries", **kw: Any) -> dict[str, Any]:
    targets = [prom_target(e, legend, chr(ord("A") + i)) for i, (e, legend) in enumerate(exprs)]
    return panel(lay, kind, title, targets, PROM, **kw)


def dashboard(uid: str, title: str, panels: list[dict[str, Any]], time_from: str, refresh: str,
              description: str) -> dict[str, Any]:
    return {"uid": uid, "title": title, "description": description, "tags": ["quota-gw"], "timezone": "utc",
            "schemaVersion": 39, "version": 1, "editable": True, "refresh": refresh,
            "time": {"from": time_from, "to": "now"}, "panels": panels, "templating": {"list": []},
            "annotations": {"list": []}}


def ops() -> dict[str, Any]:
    lay = Layout()
    panels = [
        pg_stat(lay, "Tokens used, last 24 h",
                "SELECT coalesce(sum(tokens), 0)::bigint AS value FROM qgw_usage_since(now() - interval '24 hours')"),
        pg_stat(lay, "Calls, last 24 h",
                "SELECT coalesce(sum(calls), 0)::bigint AS value FROM qgw_usage_since(now() - interval '24 hours')"),
        pg_stat(lay, "Meters under the low-balance mark", "SELECT count(*) AS value FROM low_balances"),
        pg_stat(lay, "Meters at zero", "SELECT count(*) AS value FROM ledger_balances "
                                       "WHERE balance <= 0 AND allocation >= 0"),
        pg_series(lay, "Tokens by feature per day",
                  """SELECT (day::timestamp AT TIME ZONE 'UTC') AS time, coalesce(feature, '-') AS metric,
                            sum(tokens)::bigint AS value
                     FROM usage_by_feature_day WHERE $__timeFilter(day)
                     GROUP BY 1, 2 ORDER BY 1""", w=12, description="usage_by_feature_day (daily rollup)"),
        pg_series(lay, "Calls, tokens and refusals",
                  """SELECT date_bin(greatest('$__interval'::interval, interval '1 hour'), hour,
                                     timestamptz 'epoch') AS time,
                            sum(calls)::bigint AS calls, sum(tokens)::bigint AS tokens,
                            sum(denied)::bigint AS denied
                     FROM usage_hourly WHERE hour >= $__timeFrom() AND hour < $__timeTo()
                     GROUP BY 1 ORDER BY 1""", w=12, description="usage_hourly, all orgs"),
        table(lay, "Top spenders (30 days)",
              "SELECT rank, org_id, name, plan, tokens_30d, calls_30d FROM top_spenders ORDER BY rank, org_id LIMIT 20",
              ["rank", "org_id", "name", "plan", "tokens_30d", "calls_30d"], w=12, h=10),
        table(lay, "Orgs near or at zero",
              """SELECT org_id, meter, balance, allocation, purchased, percent_left, period_end
                 FROM low_balances ORDER BY percent_left, org_id, meter LIMIT 50""",
              ["org_id", "meter", "balance", "allocation", "purchased", "percent_left", "period_end"], w=12, h=10),
        table(lay, "Burn rate and projected exhaustion",
              """SELECT org_id, meter, balance, used_7d, burn_per_day, projected_exhaustion, period_end,
                        exhausts_before_reset
                 FROM burn_rates WHERE used_7d > 0
                 ORDER BY exhausts_before_reset DESC, projected_exhaustion NULLS LAST, org_id LIMIT 50""",
              ["org_id", "meter", "balance", "used_7d", "burn_per_day", "projected_exhaustion", "period_end",
               "exhausts_before_reset"], w=24, h=10),
        pg_series(lay, "Refusals by reason",
                  """SELECT date_bin(greatest('$__interval'::interval, interval '1 hour'), hour,
                                     timestamptz 'epoch') AS time, reason AS metric,
                            sum(denials)::bigint AS value
                     FROM denials_hourly WHERE hour >= $__timeFrom() AND hour < $__timeTo()
                     GROUP BY 1, 2 ORDER BY 1""", w=12),
        table(lay, "Purchases paid",
              """SELECT paid_at, org_id, pack, meter, tokens, amount_cents, currency FROM purchases
                 WHERE paid_at IS NOT NULL AND $__timeFilter(paid_at) ORDER BY paid_at DESC LIMIT 50""",
              ["paid_at", "org_id", "pack", "meter", "tokens", "amount_cents", "currency"], w=12),
    ]
    return dashboard("qgw-ops", "quota-gw: ops (Postgres)", panels, "now-30d", "1m",
                     "Spend, balances, burn rate and refusals from the ledger's rollups (migration 003).")


def gateway() -> dict[str, Any]:
    lay = Layout()
    r = "$__rate_interval"
    panels = [
        prom(lay, "Decisions/s by outcome", [(f"sum by (outcome) (rate(quota_gw_decisions_total[{r}]))",
                                             "{{outcome}}")], unit="reqps"),
        prom(lay, "Decisions/s by feature", [(f"sum by (feature) (rate(quota_gw_decisions_total[{r}]))",
                                             "{{feature}}")], unit="reqps"),
        prom(lay, "Decision latency", [
            (f"histogram_quantile({q}, sum by (le) (rate(quota_gw_decision_seconds_bucket[{r}])))", f"p{int(q * 100)}")
            for q in (0.5, 0.95, 0.99)], unit="s"),
        prom(lay, "Near-limit decisions/s (under 25 % left)",
             [(f"sum by (feature) (rate(quota_gw_near_limit_decisions_total[{r}]))", "{{feature}}")], unit="reqps"),
        prom(lay, "Tokens charged/s by meter",
             [(f"sum by (meter) (rate(quota_gw_tokens_charged_total[{r}]))", "{{meter}}")]),
        prom(lay, "Redis: errors/s and scripts per round trip", [
            (f"sum(rate(quota_gw_redis_errors_total[{r}]))", "errors/s"),
            (f"sum(rate(quota_gw_redis_script_calls_total[{r}])) / sum(rate(quota_gw_redis_round_trips_total[{r}]))",
             "scripts per round trip")]),
        prom(lay, "Fail-open spool (entries waiting)", [("max(quota_gw_spool_entries)", "entries")], w=8),
        prom(lay, "Key cache hit ratio", [
            (f"sum(rate(quota_gw_key_cache_total{{result=\"hit\"}}[{r}])) / sum(rate(quota_gw_key_cache_total[{r}]))",
             "hit ratio")], w=8, unit="percentunit"),
        prom(lay, "Proxied calls/s", [
            (f"sum by (outcome) (rate(quota_gw_proxied_total[{r}]))", "{{outcome}}"),
            (f"sum by (op) (rate(quota_gw_spooled_total[{r}]))", "spooled {{op}}")], w=8, unit="reqps"),
    ]
    return dashboard("qgw-gateway", "quota-gw: gateway (Prometheus)", panels, "now-1h", "10s",
                     "Decisions, latency, Redis and the fail-open spool, summed over every gateway process.")


def worker() -> dict[str, Any]:
    lay = Layout()
    r = "$__rate_interval"
    panels = [
        prom(lay, "Rows/s by outcome", [(f"sum by (outcome) (rate(qgw_worker_rows_total[{r}]))", "{{outcome}}")],
             unit="rowsps"),
        prom(lay, "Batch latency", [
            (f"histogram_quantile({q}, sum by (le) (rate(qgw_worker_batch_seconds_bucket[{r}])))", f"p{int(q * 100)}")
            for q in (0.5, 0.95, 0.99)], unit="s"),
        prom(lay, "Stream lag per shard (entries)", [("qgw_worker_stream_lag_entries", "{{stream}}")]),
        prom(lay, "Oldest unacked entry per shard", [("qgw_worker_stream_lag_seconds", "{{stream}}")], unit="s"),
        prom(lay, "Dead letters", [("max(qgw_worker_dead_letters)", "dead letters")], w=8),
        prom(lay, "Redeliveries/s", [(f"sum(rate(qgw_worker_redelivered_total[{r}]))", "redelivered")], w=8),
        prom(lay, "Errors/s by store", [(f"sum by (kind) (rate(qgw_worker_errors_total[{r}]))", "{{kind}}")], w=8),
        prom(lay, "Batch size", [(f"sum(rate(qgw_worker_batch_size_sum[{r}])) / sum(rate(qgw_worker_batch_size_count[{r}]))",
                                  "entries per batch")], w=8),
        prom(lay, "Rows/s (last batch)", [("sum(qgw_worker_rows_per_second)", "rows/s")], w=8),
        prom(lay, "Trimmed/s", [(f"sum(rate(qgw_worker_trimmed_total[{r}]))", "trimmed")], w=8),
    ]
    return dashboard("qgw-worker", "quota-gw: sync worker (Prometheus)", panels, "now-1h", "10s",
                     "The drain from the Redis streams into the Postgres ledger.")


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    for name, build in (("ops", ops), ("gateway", gateway), ("worker", worker)):
        (OUT / f"quota-gw-{name}.json").write_text(json.dumps(build(), indent=2) + "\n")


if __name__ == "__main__":
    main()
