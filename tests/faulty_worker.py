"""`quota-gw worker` that SIGKILLs itself at a crash point (sync_worker/faults.py), for the
exactly-once tests. The production command has no such switch; this script passes the worker an
object that crashes, then runs the real command.

    python tests/faulty_worker.py commit:1 --config ... --consumer ...   # point:probability,...
"""

from __future__ import annotations

import functools
import os
import random
import signal
import sys

from quota_gw import cli
from sync_worker import worker


class KillAt:
    """SIGKILLs this process at the named points, each with its probability ('copy:0.05,commit:1')."""

    def __init__(self, spec: str) -> None:
        self.odds = {name: float(p or 1) for name, _, p in (part.partition(":") for part in spec.split(",") if part)}

    def reached(self, point: str) -> None:
        if point in self.odds and random.random() < self.odds[point]:
            os.kill(os.getpid(), signal.SIGKILL)


if __name__ == "__main__":
    spec, argv = sys.argv[1], sys.argv[2:]
    worker.main = functools.partial(worker.main, faults=KillAt(spec))  # what `quota-gw worker` runs
    raise SystemExit(cli.main(["worker", *argv]))
