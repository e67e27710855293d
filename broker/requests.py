"""Requests the broker holds: queued for a worker, or in flight at one.

The broker gives every accepted request its own id (``bid``), unique for the broker's
lifetime, and maps it back to the gateway's (identity, id) when the answer comes. Workers
only ever see broker ids, so two gateways using the same ids never collide, and a reply can
be checked against the worker it was actually assigned to (stale replies from a worker
declared dead are dropped, rule 1).
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from shared.envelope import Request


if TYPE_CHECKING:
    from broker.registry import WorkerRecord

__all__ = ["MAX_ATTEMPTS", "Pending", "Timers"]

MAX_ATTEMPTS = 2
"""A request goes to a worker at most twice: once, and once more if that worker dies
(rule 4). A request that kills workers does not get to kill them all."""


@dataclass(eq=False, slots=True)
class Pending:
    bid: int
    gateway: bytes
    gid: int
    header: Request  # as received from the gateway
    payload: list[Any]  # zmq.Frames, forwarded untouched (kept for a re-dispatch)
    deadline: float  # broker monotonic clock
    worker: WorkerRecord | None = None  # the record it is in flight at, if any
    attempts: int = 0
    orphan: bool = False  # the gateway needs no answer any more (cancelled, or answered)
    queued: bool = False


@dataclass(slots=True)
class Timers:
    """A heap of (when, bid) wake-ups with lazy deletion: entries for requests that are
    gone are skipped when popped, and the heap is rebuilt when mostly stale, so it stays
    bounded by the live requests."""

    _heap: list[tuple[float, int]] = field(default_factory=list)

    def push(self, when: float, bid: int) -> None:
        heapq.heappush(self._heap, (when, bid))

    def next_time(self) -> float | None:
        return self._heap[0][0] if self._heap else None

    def pop_due(self, now: float) -> list[int]:
        due: list[int] = []
        while self._heap and self._heap[0][0] <= now:
            due.append(heapq.heappop(self._heap)[1])
        return due

    def compact(self, live: dict[int, Pending]) -> None:
        if len(self._heap) > 4 * len(live) + 1024:
            self._heap = [(w, b) for (w, b) in self._heap if b in live]
            heapq.heapify(self._heap)

    def __len__(self) -> int:
        return len(self._heap)
