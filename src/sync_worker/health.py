"""What the worker tells the outside: Prometheus metrics, /healthz and /readyz, its report.

The metrics live in a registry of their own (not the gateway's) and are served, with the two
probes, on --metrics-port by a small asyncio server: three fixed routes do not need a web
framework in the worker's process. /healthz answers while the process runs; /readyz answers 200
only while both stores are connected. The report (GET /v1/admin/worker reads it) is this
consumer's counters and last batch, written to Redis with the maintenance; its times are on
Redis's clock (ms), so reports of workers on different hosts compare.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import orjson
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from .stream import Lag

REGISTRY = CollectorRegistry(auto_describe=True)
LAG_ENTRIES = Gauge("qgw_worker_stream_lag_entries", "Entries not yet acked by the group (undelivered + pending)",
                    ["stream"], registry=REGISTRY)
LAG_SECONDS = Gauge("qgw_worker_stream_lag_seconds", "Age of the oldest entry the group has not acked",
                    ["stream"], registry=REGISTRY)
BATCH_SIZE = Histogram("qgw_worker_batch_size", "Entries per batch", registry=REGISTRY,
                       buckets=(1, 10, 50, 100, 500, 1000, 5000, 10000, 50000))
BATCH_SECONDS = Histogram("qgw_worker_batch_seconds", "Time to write and ack one batch", registry=REGISTRY)
ROWS = Counter("qgw_worker_rows_total", "Stream entries handled, by outcome (inserted, duplicate, dead)",
               ["outcome"], registry=REGISTRY)
ROWS_PER_S = Gauge("qgw_worker_rows_per_second", "Rows written per second (last batch)", registry=REGISTRY)
DEAD = Gauge("qgw_worker_dead_letters", "Entries in the dead-letter streams", registry=REGISTRY)
ERRORS = Counter("qgw_worker_errors_total", "Rounds that failed, by the store that failed (redis, postgres, other); "
                 "retried", ["kind"], registry=REGISTRY)
REDELIVERED = Counter("qgw_worker_redelivered_total", "Entries read again from the pending list (after a crash, "
                      "a failed write or a claim from a dead consumer)", registry=REGISTRY)
TRIMMED = Counter("qgw_worker_trimmed_total", "Entries trimmed from the streams", registry=REGISTRY)


@dataclass
class Stats:
    """This worker's counters since it started; recording a batch or a failure moves the metrics too."""

    batches: int = 0
    inserted: int = 0
    duplicates: int = 0
    dead: int = 0
    errors: int = 0
    started: float = field(default_factory=time.monotonic)
    last_batch: tuple[float, int, float] | None = None  # (monotonic time, entries, seconds)

    def batch_done(self, size: int, inserted: int, duplicates: int, dead: int, seconds: float) -> None:
        self.batches += 1
        self.inserted += inserted
        self.duplicates += duplicates
        self.dead += dead
        self.last_batch = (time.monotonic(), size, seconds)
        ROWS.labels("inserted").inc(inserted)
        ROWS.labels("duplicate").inc(duplicates)
        ROWS.labels("dead").inc(dead)
        BATCH_SIZE.observe(size)
        BATCH_SECONDS.observe(seconds)
        ROWS_PER_S.set(size / seconds if seconds > 0 else 0)

    def failed(self, store: str) -> None:
        self.errors += 1
        ERRORS.labels(store).inc()

    def report(self, consumer: str, now_ms: int) -> bytes:
        """The JSON GET /v1/admin/worker shows for this consumer; `now_ms` is Redis's clock."""
        last = self.last_batch
        return orjson.dumps({
            "consumer": consumer, "reported_at_ms": now_ms, "batches": self.batches, "inserted": self.inserted,
            "duplicates": self.duplicates, "dead_letters": self.dead, "errors": self.errors,
            "last_batch": None if last is None else {
                "at_ms": now_ms - int((time.monotonic() - last[0]) * 1000), "entries": last[1],
                "seconds": round(last[2], 4)}})


def record_lag(lags: list[Lag], dead_letters: int) -> None:
    for lag in lags:
        LAG_ENTRIES.labels(lag.stream).set(lag.entries)
        LAG_SECONDS.labels(lag.stream).set(lag.seconds)
        TRIMMED.inc(lag.trimmed)
    DEAD.set(dead_letters)


async def serve(ready: Callable[[], bool], consumer: str, host: str, port: int) -> asyncio.AbstractServer:
    """GET /metrics, /healthz, /readyz on host:port (one request per connection)."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = await asyncio.wait_for(reader.readline(), 5)
            while (await asyncio.wait_for(reader.readline(), 5)) not in (b"\r\n", b"\n", b""):
                pass
            path = line.split(b" ")[1] if line.count(b" ") >= 2 else b"/"
            if path.startswith(b"/metrics"):
                status, ctype, body = b"200 OK", CONTENT_TYPE_LATEST.encode(), generate_latest(REGISTRY)
            elif path.startswith(b"/healthz"):
                status, ctype, body = b"200 OK", b"text/plain", b"ok"
            elif path.startswith(b"/readyz"):
                ok = ready()
                status = b"200 OK" if ok else b"503 Service Unavailable"
                ctype, body = b"application/json", orjson.dumps({"ready": ok, "consumer": consumer})
            else:
                status, ctype, body = b"404 Not Found", b"text/plain", b"not found"
            writer.write(b"HTTP/1.1 " + status + b"\r\nContent-Type: " + ctype + b"\r\nContent-Length: "
                         + str(len(body)).encode() + b"\r\nConnection: close\r\n\r\n" + body)
            await writer.drain()
        except (TimeoutError, ConnectionError, IndexError):
            pass
        finally:
            writer.close()

    return await asyncio.start_server(handle, host, port)
