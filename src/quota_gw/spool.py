"""The fail-open spool: usage of calls that went through while Redis was down.

A route with `fail: open` keeps serving when Redis is unreachable; what those calls cost is
written here, one JSON line per call, fsynced before the response completes, so a crash of
the gateway cannot lose it. When Redis answers again the entries are replayed through the
Decider (one Lua script each, as for any call) under an idempotency key of their own, so
an entry replayed twice (a crash mid-replay, two replicas) still lands once, and its event
reaches the stream and from there Postgres.

Files: `<spool_dir>/spool-<pid>-<ns>.jsonl`. A writer holds an exclusive flock on its open
file; a replayer only takes files it can lock, so it never deletes a file someone still
appends to. A torn last line (power loss mid-write) is skipped.
"""

from __future__ import annotations

import asyncio
import fcntl
import logging
import os
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import orjson
from . import cluster, metrics
from .decisions import Decider, Identity
from .redis_errors import REDIS_DOWN

log = logging.getLogger("quota_gw.spool")


def entry(op: str, ident: Identity, **fields: Any) -> dict[str, Any]:
    """A spool line: the operation, who made the call, and a unique idempotency key."""
    return {"v": 1, "id": uuid.uuid4().hex, "op": op, "ts": time.time(), "org": ident.org_id,
            "key_id": ident.key_id, "key_user": ident.user_id, "plan": ident.plan,
            "ent": ident.entitlements, "scopes": sorted(ident.scopes), **fields}


def identity(e: dict[str, Any]) -> Identity:
    return Identity(e["key_id"], e["org"], e.get("key_user"), frozenset(e.get("scopes") or ()), e["plan"],
                    e.get("ent") or "")


class Spool:
    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.dir = Path(directory)
        self._fd: int | None = None
        self._lock = threading.Lock()
        self.appended = asyncio.Event()
        self.replayed = 0
        self.refused = 0

    # -- writing (any thread)

    def _open(self) -> int:
        self.dir.mkdir(parents=True, exist_ok=True)
        path = self.dir / f"spool-{os.getpid()}-{time.time_ns()}.jsonl"
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX)
        dfd = os.open(self.dir, os.O_RDONLY)  # the new name must survive a crash too
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
        return fd

    def write(self, e: dict[str, Any]) -> None:
        line = orjson.dumps(e) + b"\n"
        with self._lock:
            if self._fd is None:
                self._fd = self._open()
            os.write(self._fd, line)
            os.fsync(self._fd)

    async def append(self, e: dict[str, Any]) -> None:
        """Writes one entry durably (fsync off the event loop)."""
        await asyncio.to_thread(self.write, e)
        self.appended.set()

    def rotate(self) -> None:
        """Closes the file being written (the next entry starts a new one), releasing its lock."""
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None

    # -- reading

    def files(self) -> list[Path]:
        try:
            return sorted(self.dir.glob("spool-*.jsonl"))
        except OSError:
            return []

    def pending(self) -> int:
        """Entries waiting for replay (all files, this process's and others')."""
        n = 0
        for f in self.files():
            try:
                n += sum(1 for line in f.read_bytes().splitlines() if line.strip())
            except OSError:
                continue
        return n

    async def replay(self, decider: Decider) -> int:
        """Replays every file no one is writing; returns entries applied. Raises on Redis errors
        (the rest stays on disk for the next try)."""
        self.rotate()
        applied = 0
        for path in self.files():
            try:
                fd = os.open(path, os.O_RDWR)
            except FileNotFoundError:
                continue  # another replayer finished it
            try:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue  # a live writer (another process) still appends to it
                if not path.exists():
                    continue
                with open(fd, "rb", closefd=False) as f:  # noqa: ASYNC230 - a local file, read once per replay
                    lines = f.read().splitlines()
                for line in lines:
                    try:
                        e = orjson.loads(line)
                    except orjson.JSONDecodeError:
                        log.warning("spool %s: skipping a torn line", path.name)
                        continue
                    await self._apply(decider, e)
                    applied += 1
                path.unlink()
            finally:
                os.close(fd)
        self.replayed += applied
        return applied

    async def _apply(self, decider: Decider, e: dict[str, Any]) -> None:
        ident = identity(e)
        meta = orjson.dumps({**(e.get("metadata") or {}), "spooled": True, "spool_id": e["id"], "at": e["ts"]})
        if e["op"] == "refund":
            d = await decider.refund(ident, e["event_id"], meta)
            if not d.ok:
                log.warning("spool: refund of %s refused: %s", e["event_id"], d.detail)
            return
        if e["op"] == "commit":
            # only the sidecar spools commits: usage the upstream reported, beyond the hold too
            d = await decider.commit(ident, e["rid"], e["units"], meta, beyond_hold=True)
            if d.ok or d.status != 404:
                return
            # The hold expired (or Redis lost it): charge the usage as a plain consume.
        d = await consume_unlimited(decider, ident, e["feature"], e["units"], e.get("user") or "", f"spool:{e['id']}", meta)
        if not d.ok:
            self.refused += 1
            log.warning("spool: %s of %s for org %s refused on replay (%s); recorded as denied",
                        e["op"], e["feature"], e["org"], d.code)


async def consume_unlimited(decider: Decider, ident: Identity, feature: str, units: int, user: str, idem: str,
                            meta: bytes) -> Any:
    """A consume for a call that has already happened: rate limits do not apply to the past."""
    return await decider.consume(ident, feature, units, user, idem, meta, rate_limit=False)


async def replay_forever(spool: Spool, decider: Decider, interval_s: float = 0.5) -> None:
    """Replays whenever there is something on disk and Redis answers."""
    while True:
        files = spool.files()
        metrics.SPOOL_ENTRIES.set(spool.pending() if files else 0)
        if files:
            try:
                await cluster.ping(decider.redis)  # every primary of a cluster
                n = await spool.replay(decider)
                if n:
                    log.info("spool: replayed %d entries", n)
            except REDIS_DOWN:
                pass
            except Exception:
                log.exception("spool: replay failed")
            if spool.files():  # Redis still down, or another process's file: try again soon
                await asyncio.sleep(interval_s)
        else:
            spool.appended.clear()
            try:
                await asyncio.wait_for(spool.appended.wait(), timeout=5)
            except TimeoutError:
                pass
