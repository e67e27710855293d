"""What a connection has to say, waiting for its socket: a bounded queue that drops the oldest
frame when the client cannot keep up, and the sequencer that puts layout A answers back in
request order.

Why drop rather than wait: a lip-sync frame that arrives late is worth nothing, and a client
that does not read must never grow the gateway's memory (DESIGN.md section 4). JSON answers
are dropped only when nothing else is left to drop, so a slow client still gets its model
list; frames (A, C, D) go first, oldest first.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass


__all__ = ["Outbox", "Sequencer"]

Data = bytes | str


@dataclass(slots=True)
class _Item:
    data: Data
    kind: str  # "a", "c", "d", "json": a metrics label
    droppable: bool
    size: int


class Outbox:
    """A bounded FIFO of messages for one connection, emptied by :meth:`run`.

    Bounds: ``max_items`` messages and ``max_bytes`` bytes waiting (beyond what the socket
    already buffers, which ``write_limit`` bounds). ``on_drop(kind)`` is called for every
    message dropped to stay within them.
    """

    def __init__(
        self,
        *,
        max_items: int,
        max_bytes: int,
        on_drop: Callable[[str], None] = lambda kind: None,
    ) -> None:
        if max_items < 1 or max_bytes < 1:
            raise ValueError("outbox limits must be >= 1")
        self.max_items = max_items
        self.max_bytes = max_bytes
        self.on_drop = on_drop
        self.dropped = 0
        self._items: deque[_Item] = deque()
        self._bytes = 0
        self._wakeup = asyncio.Event()
        self._empty = asyncio.Event()
        self._empty.set()

    def __len__(self) -> int:
        return len(self._items)

    @property
    def queued_bytes(self) -> int:
        return self._bytes

    def put(self, data: Data, kind: str, *, droppable: bool = True) -> None:
        """Queue ``data``, dropping the oldest frames (then, if need be, the oldest of
        anything) until it fits."""
        item = _Item(data, kind, droppable, len(data))
        while self._items and (
            len(self._items) >= self.max_items or self._bytes + item.size > self.max_bytes
        ):
            self._drop_one()
        self._items.append(item)
        self._bytes += item.size
        self._empty.clear()
        self._wakeup.set()

    def _drop_one(self) -> None:
        victim = next((i for i in self._items if i.droppable), self._items[0])
        self._items.remove(victim)
        self._bytes -= victim.size
        self.dropped += 1
        self.on_drop(victim.kind)

    async def run(self, send: Callable[[Data, str], Awaitable[None]]) -> None:
        """Send queued messages one at a time until cancelled (or ``send`` raises). ``send``
        is the socket's send (data, kind): it returns once the socket has room again."""
        while True:
            while not self._items:
                self._empty.set()
                self._wakeup.clear()
                await self._wakeup.wait()
            item = self._items.popleft()
            self._bytes -= item.size
            await send(item.data, item.kind)

    async def flushed(self) -> None:
        """Return once everything queued so far has been handed to the socket."""
        await self._empty.wait()


class Sequencer:
    """Puts one connection's layout A answers back in request order.

    Each request takes a ticket when it arrives; :meth:`complete` returns the answers that
    may go out now, in order. At most ``max_waiting`` finished answers wait behind an
    unfinished one: past that, the oldest waiting answer is dropped (the A client cannot
    tell a dropped answer from a skipped one; it matches answers by order only).
    """

    def __init__(self, max_waiting: int) -> None:
        if max_waiting < 1:
            raise ValueError("max_waiting must be >= 1")
        self.max_waiting = max_waiting
        self.reordered = 0  # answers that finished before an earlier request's
        self.dropped = 0
        self._next = 0
        self._head = 0
        self._done: dict[int, bytes | None] = {}  # None: dropped, skip it
        self._waiting = 0  # entries of _done that hold an answer

    @property
    def pending(self) -> int:
        """Tickets handed out and not yet released."""
        return self._next - self._head

    @property
    def waiting(self) -> int:
        """Finished answers held back by an earlier unfinished request."""
        return self._waiting

    def ticket(self) -> int:
        ticket = self._next
        self._next += 1
        return ticket

    def complete(self, ticket: int, answer: bytes) -> list[bytes]:
        """Record ``ticket``'s answer; the answers now releasable, oldest first."""
        if not self._head <= ticket < self._next or ticket in self._done:
            raise ValueError(f"ticket {ticket} is not pending")
        if ticket != self._head:
            self.reordered += 1
        self._done[ticket] = answer
        self._waiting += 1
        out: list[bytes] = []
        while self._head in self._done:
            released = self._done.pop(self._head)
            self._head += 1
            if released is not None:
                self._waiting -= 1
                out.append(released)
        while self._waiting > self.max_waiting:
            oldest = min(t for t, a in self._done.items() if a is not None)
            self._done[oldest] = None
            self._waiting -= 1
            self.dropped += 1
        return out
