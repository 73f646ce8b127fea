"""Gateway CPU per decision round trip: the coalescer's replies read by a protocol vs a reader task.

    .venv/bin/python bench/coalescer_replies.py [--calls 5000] [--rounds 3]

One process, one embedded Valkey. A consume's script call (as /v1/authorize makes it) is sent
through the Decider's coalescer `calls` times, one at a time (every call its own round trip,
as under light load) and 16 at a time; the coalescer's connection is made again before each
run, its replies read either by coalesce._Replies (the default) or by redis-py's reader in a
task (what _Replies replaced). Rounds alternate the two; the table has the median CPU µs of
this process per call (Valkey's own time is not in it).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
import bench as B  # noqa: E402

from quota_gw import coalesce, embedded  # noqa: E402
from quota_gw import config as config_mod  # noqa: E402
from quota_gw.app import create_app  # noqa: E402
from quota_gw.sidecar.authorize import authorize  # noqa: E402


async def run(args: argparse.Namespace, redis_url: str, tmp: Path) -> dict[tuple[str, int], list[float]]:
    cfg = B.config_file(tmp, "http://127.0.0.1:9")
    data = yaml.safe_load(cfg.read_text())
    key = B.seed(redis_url, "benchco", data["shards"])
    app = create_app(config_mod.parse(data), redis_url, None, "benchco")
    out: dict[tuple[str, int], list[float]] = {}
    async with app.router.lifespan_context(app):
        decider = app.state.ctx.decider
        calls: list[Any] = []
        sent = decider._run

        async def capture(script: Any, keys: list[str], argv: list[Any]) -> Any:
            calls.append((script, keys, argv))
            return await sent(script, keys, argv)

        decider._run = capture
        scope = {"type": "http", "method": "HEAD", "path": "/v1/authorize", "headers": [
            (b"x-original-uri", b"/quota/bench"), (b"authorization", b"Bearer " + key.encode())]}
        status, _, _ = await authorize(app.state.sidecar, scope, None)
        assert status == 200 and calls
        decider._run = sent
        script, keys, argv = calls[0]
        co = decider._coalescer
        take_over = coalesce._Replies.take_over
        for _ in range(args.rounds):
            for mode in ("protocol", "reader task"):
                coalesce._Replies.take_over = take_over if mode == "protocol" else (lambda c, conn: False)  # type: ignore[method-assign,assignment]
                if co._conn is not None:
                    old, co._conn = co._conn, None
                    await old.disconnect()
                await co.run(script, keys, argv)  # connects
                for at_once in (1, 16):
                    t = time.process_time()
                    for _ in range(args.calls // at_once):
                        await asyncio.gather(*(co.run(script, keys, argv) for _ in range(at_once)))
                    out.setdefault((mode, at_once), []).append((time.process_time() - t) / args.calls * 1e6)
        coalesce._Replies.take_over = take_over  # type: ignore[method-assign]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=5000)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="qgw-bench-co-"))
    rsrv = embedded.start_redis(tmp / "redis")
    try:
        import uvloop

        out = uvloop.run(run(args, rsrv.url, tmp))
    finally:
        rsrv.stop()
    print("| calls at once | reader task, µs/call | protocol, µs/call | ratio |\n|---|---|---|---|")
    for at_once in (1, 16):
        old, new = (statistics.median(out[(m, at_once)]) for m in ("reader task", "protocol"))
        print(f"| {at_once} | {old:.1f} | {new:.1f} | **{new / old:.2f}×** |")


if __name__ == "__main__":
    main()
