"""Helpers for the sync-worker tests: a real `quota-gw worker` subprocess, mixed traffic through
the Decider, and "has the group drained" checks. Each test uses its own key prefix, so the
worker sees exactly the events the test made."""

from __future__ import annotations

import asyncio
import os
import random
import secrets
import signal
import sys
from pathlib import Path
from typing import Any

import asyncpg
import redis.asyncio as aioredis
import yaml

from quota_gw.decisions import Decider, Identity
from quota_gw.layout import Layout, meter_field
from quota_gw.events import entries
from sync_worker.worker import GROUP

SOAK = os.environ.get("QUOTA_GW_SOAK") == "1"
QUOTA_GW = str(Path(sys.executable).with_name("quota-gw"))
FAULTY_WORKER = Path(__file__).with_name("faulty_worker.py")


def write_config(tmp: Path, data: dict[str, Any]) -> str:
    path = tmp / "quota-gw.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


class WorkerProc:
    """One `quota-gw worker` process; logs go to a file shown when a test fails. `faults`
    ('commit:1', 'copy:0.05,commit:0.05') runs it through tests/faulty_worker.py instead, which
    SIGKILLs it at those points; set it before each start."""

    def __init__(self, config_path: str, redis_url: str, database_url: str, prefix: str, consumer: str,
                 log_dir: Path, *extra: str, faults: str = "") -> None:
        self.args = ["--config", config_path, "--consumer", consumer, *extra]
        self.faults = faults
        self.env = {**os.environ, "REDIS_URL": redis_url, "DATABASE_URL": database_url, "QUOTA_GW_PREFIX": prefix}
        self.log = log_dir / f"worker-{consumer}.log"
        self.proc: asyncio.subprocess.Process | None = None
        self.starts = 0

    async def start(self) -> None:
        self.starts += 1
        argv = [sys.executable, str(FAULTY_WORKER), self.faults] if self.faults else [QUOTA_GW, "worker"]
        out = open(self.log, "ab")
        self.proc = await asyncio.create_subprocess_exec(*argv, *self.args, env=self.env, stdout=out, stderr=out)
        out.close()

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    async def kill(self) -> None:
        if self.alive:
            assert self.proc is not None
            self.proc.send_signal(signal.SIGKILL)
        if self.proc is not None:
            await self.proc.wait()

    async def stop(self, timeout: float = 20) -> int:
        """SIGTERM: the worker finishes its batch and exits 0."""
        assert self.proc is not None
        if self.alive:
            self.proc.send_signal(signal.SIGTERM)
        return await asyncio.wait_for(self.proc.wait(), timeout)

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


async def drained(r: aioredis.Redis, layout: Layout, group: str = GROUP) -> bool:
    """Every stream's group has read up to the last entry and holds nothing unacked."""
    for s in layout.streams():
        if not await r.exists(s):
            continue
        last = (await r.xinfo_stream(s))["last-generated-id"]
        g = next((g for g in await r.xinfo_groups(s) if g["name"] == group), None)
        if g is None or g["pending"] or g["last-delivered-id"] != last:
            return False
    return True


async def wait_drained(r: aioredis.Redis, layout: Layout, timeout: float, proc: WorkerProc | None = None) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not await drained(r, layout):
        if proc is not None and not proc.alive:
            raise AssertionError(f"worker exited:\n{proc.output()[-3000:]}")
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"not drained in {timeout}s" + (f":\n{proc.output()[-3000:]}" if proc else ""))
        await asyncio.sleep(0.05)


async def stream_events(r: aioredis.Redis, layout: Layout) -> list[dict[str, str]]:
    """Every entry still in the streams (tests keep them with an idle extra group)."""
    out = []
    for s in layout.streams():
        out += entries(await r.xrange(s))
    return out


async def hold_streams(r: aioredis.Redis, layout: Layout, group: str = "test-audit") -> None:
    """A group that never reads: trimming must keep every entry for it."""
    for s in layout.streams():
        await r.xgroup_create(s, group, id="0", mkstream=True)


def identities(n: int, plan: str = "bulk") -> list[Identity]:
    return [Identity("key_" + secrets.token_hex(4), f"org-w{secrets.token_hex(5)}", None,
                     frozenset({"consume", "read"}), plan) for _ in range(n)]


async def traffic(decider: Decider, orgs: list[Identity], n_ops: int, seed: int, concurrency: int = 32,
                  refunded: list[tuple[str, int]] | None = None) -> list[str]:
    """Mixed decisions: consume, refund, reserve, commit, release, grant and refusals (denied).
    Returns the event ids the gateway answered with; `refunded` collects each refund asked for:
    (the charge's event id, the refund's status)."""
    rng = random.Random(seed)
    consumed: list[tuple[Identity, str]] = []
    held: list[tuple[Identity, str, int]] = []
    ids: list[str] = []
    sem = asyncio.Semaphore(concurrency)

    async def op() -> None:
        ident = rng.choice(orgs)
        user = f"u{rng.randrange(6)}"
        r = rng.random()
        async with sem:
            if r < 0.40:
                d = await decider.consume(ident, "generate_insight", rng.randint(1, 3), user)
                if d.ok:
                    consumed.append((ident, d.event_id))
            elif r < 0.50 and consumed:
                who, eid = consumed.pop(rng.randrange(len(consumed)))
                d = await decider.refund(who, eid)
                if refunded is not None:
                    refunded.append((eid, d.status))
            elif r < 0.65:
                units = rng.randint(1, 4)
                d = await decider.reserve(ident, "generate_goal", units, user, 60)
                if d.ok:
                    held.append((ident, d.event_id, units))
            elif r < 0.82 and held:
                who, rid, units = held.pop(rng.randrange(len(held)))
                if rng.random() < 0.6:
                    d = await decider.commit(who, rid, rng.randint(0, units))
                else:
                    d = await decider.release(who, rid)
            elif r < 0.88:
                d = await decider.grant(ident.org_id, "general", rng.randint(1, 50))
            elif r < 0.94:
                d = await decider.consume(ident, "generate_leads", 1, user)  # bulk allocates none: 403
            else:
                d = await decider.consume(ident, "generate_insight", 900_000, user)  # 402
        if d.event_id:
            ids.append(d.event_id)

    await asyncio.gather(*(op() for _ in range(n_ops)))
    return ids


async def seed_orgs(decider: Decider, orgs: list[Identity]) -> None:
    for o in orgs:
        await decider.grant(o.org_id, "general", 100_000)
        await decider.grant(o.org_id, "goal_generation", 100_000)


async def ledger_vs_redis(conn: asyncpg.Connection, r: aioredis.Redis, layout: Layout,
                          orgs: list[Identity], meters: list[str]) -> list[str]:
    """Per (org, meter): sum(delta - dp) == allocated and sum(dp) == purchased in Redis."""
    rows = await conn.fetch(
        """SELECT org_id, meter, sum(delta - delta_purchased)::bigint AS a, sum(delta_purchased)::bigint AS p
           FROM usage_events WHERE org_id = ANY($1) AND meter IS NOT NULL GROUP BY 1, 2""",
        [o.org_id for o in orgs])
    ledger = {(x["org_id"], x["meter"]): (x["a"], x["p"]) for x in rows}
    diffs = []
    for o in orgs:
        h = await r.hgetall(layout.balances(o.org_id))
        for m in meters:
            redis_ap = (int(h.get(meter_field(m, "allocated"), 0)), int(h.get(meter_field(m, "purchased"), 0)))
            if ledger.get((o.org_id, m), (0, 0)) != redis_ap:
                diffs.append(f"{o.org_id}/{m}: ledger {ledger.get((o.org_id, m))} redis {redis_ap}")
    return diffs
