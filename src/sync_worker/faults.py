"""Crash points: where the exactly-once tests make the worker die, passed in as an object.

The worker calls `faults.reached(point)` at each point below. `quota-gw worker` passes
`NO_FAULTS`, which does nothing: production code reads no switch for this. Tests pass an object
of their own (tests/faulty_worker.py SIGKILLs the process there), to prove a crash at the worst
moment loses and duplicates nothing.

- "copy": the first piece of a COPY is sent; the transaction is open, nothing committed.
- "commit": the batch is committed in Postgres and not yet acked in Redis.
"""

from __future__ import annotations

from typing import Literal, Protocol

Point = Literal["copy", "commit"]


class Faults(Protocol):
    def reached(self, point: Point) -> None: ...


class NoFaults:
    def reached(self, point: Point) -> None:
        return None


NO_FAULTS: Faults = NoFaults()
