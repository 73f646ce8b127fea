"""The soak (make test-long): Locust at half the measured capacity for 10 minutes while the sync
worker is SIGKILLed and Redis (AOF on) restarted, in turn, six times. The gateway's memory stays
flat (RSS sampled), every invariant of loadtests/run.py holds and reconcile finds no drift.
QUOTA_GW_SOAK_S sets the length (the figures in the closing note came from a 60 s run)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

from worker_support import SOAK

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.soak
@pytest.mark.skipif(not SOAK, reason="long: make test-long (QUOTA_GW_SOAK=1)")
def test_soak_at_half_capacity_with_worker_kills_and_redis_restarts(servers, capsys):
    if importlib.util.find_spec("locust") is None:
        pytest.skip("locust is not installed (pip install -e '.[test]')")
    duration = int(os.environ.get("QUOTA_GW_SOAK_S", "600"))
    env = {**os.environ, "DATABASE_URL": servers[1]}
    env.pop("REDIS_URL", None)  # the soak restarts a Redis of its own
    r = subprocess.run([sys.executable, str(ROOT / "loadtests" / "run.py"), "--users", "30", "--rate-fraction", "0.5",
                        "--measure", "20", "--faults", "6", "--duration", str(duration), "--via", "http"],
                       env=env, capture_output=True, text=True, timeout=duration + 600)
    out = r.stdout + r.stderr
    with capsys.disabled():
        keep = ("capacity:", "Locust:", "faults:", "gateway RSS:", "Aggregated", "ledger:", "exactly once:",
                "reconcile:", "invariants:", "INVARIANT", "- ")
        print("\n" + "\n".join(line for line in r.stdout.splitlines() if line.startswith(keep)))
    assert r.returncode == 0, out[-4000:]
    assert "invariants: 0 violations" in out and "reconcile: exit 0" in out
    assert out.count("worker SIGKILL") == 3 and out.count("redis restart") == 3
