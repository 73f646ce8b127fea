"""`quota-gw notifier`: delivers low-balance alerts to each org's webhook.

The rule: at least once, signed, in the ledger's words. The decision scripts record an `alert`
event (lua/_lib.lua Meter:alerts); the worker drains it into Postgres; this loop queues every
alert of an org that has a webhook into `webhook_outbox` (its body fixed then, keyed by the
event id, so a retry sends the same id and bytes) and POSTs what is due:

    {"id", "type": "balance.low", "org_id", "meter", "threshold", "balance", "allocated",
     "purchased", "period_end"}
    X-Quota-Signature: t=<unix>,v1=<hex HMAC-SHA256(secret, "<t>.<body>")>

Anything but a 2xx is tried again after `alerts.retry_initial_s`, doubling up to
`alerts.retry_max_s`, without end; every attempt is a row of `webhook_deliveries`. Several
notifiers may run: rows are claimed with FOR UPDATE SKIP LOCKED.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import time

import asyncpg
import httpx
import orjson

from .config import Config

log = logging.getLogger("quota_gw.notifier")

# Alerts of the last day not queued yet (an org's webhook set later gets only what came after it).
ENQUEUE = """
INSERT INTO webhook_outbox (event_id, org_id, event_ts, body)
SELECT e.event_id, e.org_id, e.ts, jsonb_build_object(
         'id', replace(e.event_id::text, '-', ''), 'type', 'balance.low', 'org_id', e.org_id, 'meter', e.meter,
         'threshold', (e.metadata ->> 'threshold')::int, 'balance', (e.metadata ->> 'balance')::bigint,
         'allocated', (e.metadata ->> 'allocated')::bigint, 'purchased', (e.metadata ->> 'purchased')::bigint,
         'period_end', to_char(to_timestamp((e.metadata ->> 'period_end')::bigint) AT TIME ZONE 'UTC',
                               'YYYY-MM-DD"T"HH24:MI:SS"Z"'))
FROM usage_events e
JOIN org_webhooks w ON w.org_id = e.org_id
WHERE e.kind = 'alert' AND e.ts > now() - interval '1 day' AND e.ts >= w.created_at
ON CONFLICT (event_id) DO NOTHING
"""

DUE = """
SELECT o.event_id, o.org_id, o.body, o.attempts, w.url, w.secret
FROM webhook_outbox o JOIN org_webhooks w USING (org_id)
WHERE o.delivered_at IS NULL AND o.next_attempt_at <= now()
ORDER BY o.next_attempt_at, o.event_ts, o.event_id
LIMIT $1
FOR UPDATE OF o SKIP LOCKED
"""


def sign(secret: str, body: bytes, t: int | None = None) -> str:
    t = int(time.time()) if t is None else t
    mac = hmac.new(secret.encode(), f"{t}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={t},v1={mac}"


def backoff_s(cfg: Config, attempts: int) -> float:
    return min(cfg.alerts.retry_initial_s * 2 ** max(attempts - 1, 0), cfg.alerts.retry_max_s)


async def deliver_due(pg: asyncpg.Pool, cfg: Config, http: httpx.AsyncClient, batch: int = 50) -> int:
    """Queues new alerts and makes one attempt at each due delivery; returns the attempts made."""
    await pg.execute(ENQUEUE)
    made = 0
    async with pg.acquire() as conn, conn.transaction():
        for row in await conn.fetch(DUE, batch):
            body = orjson.dumps(orjson.loads(row["body"]), option=orjson.OPT_SORT_KEYS)
            attempt = row["attempts"] + 1
            status, error, started = None, None, time.monotonic()
            try:
                r = await http.post(row["url"], content=body, headers={
                    "Content-Type": "application/json", "X-Quota-Signature": sign(row["secret"], body),
                    "User-Agent": "quota-gw-notifier"})
                status = r.status_code
            except httpx.HTTPError as e:
                error = f"{type(e).__name__}: {e}"[:500]
            ms = int((time.monotonic() - started) * 1000)
            await conn.execute(
                """INSERT INTO webhook_deliveries (event_id, org_id, url, attempt, status, error, duration_ms)
                   VALUES ($1, $2, $3, $4, $5, $6, $7)""",
                row["event_id"], row["org_id"], row["url"], attempt, status, error, ms)
            if status is not None and 200 <= status < 300:
                await conn.execute("UPDATE webhook_outbox SET attempts = $2, delivered_at = now() WHERE event_id = $1",
                                   row["event_id"], attempt)
            else:
                await conn.execute(
                    """UPDATE webhook_outbox SET attempts = $2, next_attempt_at = now() + $3 * interval '1 second'
                       WHERE event_id = $1""", row["event_id"], attempt, backoff_s(cfg, attempt))
                log.info("webhook %s for %s: attempt %d failed (%s)", row["url"], row["org_id"], attempt,
                         status or error)
            made += 1
    return made


async def run(dsn: str, cfg: Config, interval_s: float = 1.0, stop: asyncio.Event | None = None) -> None:
    """Delivers until `stop` is set (or forever); a database error waits and tries again."""
    stop = stop or asyncio.Event()
    pg = await asyncpg.create_pool(dsn, min_size=1, max_size=2,
                                   server_settings={"application_name": "quota-gw-notifier"})
    try:
        async with httpx.AsyncClient(timeout=cfg.alerts.timeout_s, follow_redirects=False) as http:
            while not stop.is_set():
                try:
                    await deliver_due(pg, cfg, http)
                except (asyncpg.PostgresError, OSError) as e:
                    log.warning("notifier: %s: %s", type(e).__name__, e)
                try:
                    await asyncio.wait_for(stop.wait(), interval_s)
                except TimeoutError:
                    pass
    finally:
        await pg.close()
