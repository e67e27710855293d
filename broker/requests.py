"""The requests the broker holds, by broker id and by gateway id, its per-model queues, and
the deadline timers (bookkeeping only: ``broker.scheduler`` decides)."""

from __future__ import annotations

import heapq
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from broker.records import Group, Pending
from shared.envelope import Request


__all__ = ["MAX_ATTEMPTS", "PendingRequests", "Timers"]

MAX_ATTEMPTS = 2
"""A request goes to a worker at most twice: once, and once more if that worker dies
(rule 4). A request that kills workers does not get to kill them all."""


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


class PendingRequests:
    """Every request from acceptance to its end: by broker id (``by_bid``), by the
    gateway's (identity, id) while the gateway waits for it (duplicate ids, cancels), and
    in its model's queue while it waits for a credit.

    ``by_bid`` keeps a request until its worker answers, even after its gateway had its
    answer (cancelled, or past its deadline): until then the worker's credit stays taken.
    """

    def __init__(self) -> None:
        self.by_bid: dict[int, Pending] = {}
        self.by_gateway: dict[tuple[bytes, int], Pending] = {}
        self.queues: dict[str, deque[Pending]] = {}
        self.timers = Timers()
        self._next_bid = 1

    def __len__(self) -> int:
        return len(self.by_bid)

    def __iter__(self) -> Iterator[Pending]:
        return iter(list(self.by_bid.values()))

    def get(self, bid: int) -> Pending | None:
        return self.by_bid.get(bid)

    def accept(
        self,
        identity: bytes,
        header: Request,
        payload: list[Any],
        deadline: float,
        *,
        group: Group | None = None,
    ) -> Pending:
        """A new request; a fan-out's child passes its ``group`` (its id is its index)."""
        bid = self._next_bid
        self._next_bid += 1
        p = Pending(bid, identity, header.id, header, payload, deadline)
        self.by_bid[bid] = p
        if group is None:
            self.by_gateway[(identity, p.gid)] = p
        else:
            p.group = group
        return p

    def pop_gateway_id(self, identity: bytes, gid: int) -> Pending | None:
        return self.by_gateway.pop((identity, gid), None)

    def release_id(self, p: Pending) -> None:
        """The gateway has its answer: its id may be used again."""
        if p.group is None:
            self.by_gateway.pop((p.gateway, p.gid), None)

    def forget(self, p: Pending) -> None:
        self.by_bid.pop(p.bid, None)
        if not p.orphan and p.group is None:  # as release_id, one call less on the hot path
            self.by_gateway.pop((p.gateway, p.gid), None)

    def enqueue(self, p: Pending, *, front: bool = False) -> None:
        queue = self.queues.get(p.header.model)
        if queue is None:
            queue = self.queues[p.header.model] = deque()
        if front:
            queue.appendleft(p)
        else:
            queue.append(p)
        p.queued = True
        self.timers.push(p.deadline, p.bid)

    def unqueue(self, p: Pending) -> None:
        queue = self.queues.get(p.header.model)
        if queue is not None and p.queued:
            try:
                queue.remove(p)  # at most queue_limit long
            except ValueError:
                pass
            if not queue:
                del self.queues[p.header.model]
        p.queued = False

    def queued(self) -> int:
        return sum(len(q) for q in self.queues.values())
