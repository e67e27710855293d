"""What a connection has to say, waiting for its socket: the outbox that holds answers until
the socket takes them, and the sequencer that puts layout A answers back in request order.

Every request gets exactly one answer in its own shape (DESIGN.md section 4), so an answer
is never dropped in silence. What a client that does not read costs is bounded instead by
**giving up images, not slots**: an answer that has to go is replaced by its *fallback*,
the error shape of its layout (an empty message for A, a C error naming the frame for B, the
JSON error of a video frame), which costs a few bytes and keeps the count and order a
client matches answers by. Only tagged stream frames, whose sequence numbers already show
a gap, are left out altogether; JSON answers are never given up (they are small and carry
what a client needs to carry on, such as its model list).

When the outbox gives an image up:
- **the client is not reading**: the answer at the head has waited longer than
  ``max_age_s`` since the gateway released it. That is the transport's verdict (the
  socket's write buffer stayed above its high-water mark, so nothing moved), never the
  gateway's own: a burst the sequencer releases all at once to a reading client goes out
  whole, however many answers it holds;
- **memory**: more than ``max_bytes`` wait; the oldest images go first.

The sequencer is bounded the same way: past ``max_bytes`` of finished answers waiting
behind an unfinished one, the oldest become empty A answers, in their slots. Neither
bounds the *number* of entries (an empty slot costs a few bytes); the connection does
that, and closes a client that pipelines without limit against a stall
(``gateway.connection``).
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass


__all__ = ["KEEP", "Data", "Fallback", "Outbox", "Sequencer"]

Data = bytes | str


class _Keep:
    """The fallback of an answer that is never given up (JSON, error answers)."""

    def __repr__(self) -> str:
        return "KEEP"


KEEP = _Keep()
Fallback = Data | None | _Keep
"""What replaces an answer the outbox gives up: its error shape, None to leave it out
altogether (tagged stream frames), or ``KEEP`` (never given up)."""


@dataclass(slots=True)
class _Item:
    data: Data
    kind: str  # "a", "c", "d", "json", "tagged": a metrics label
    fallback: Fallback
    size: int
    queued_at: float


class Outbox:
    """A FIFO of messages for one connection, emptied by :meth:`run` (see the module
    docstring for when it gives an image up). ``on_drop(kind)`` is called for every answer
    replaced by its fallback or left out."""

    def __init__(
        self,
        *,
        max_bytes: int,
        max_age_s: float,
        on_drop: Callable[[str], None] = lambda kind: None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_bytes < 1 or not max_age_s > 0:
            raise ValueError("outbox limits must be > 0")
        self.max_bytes = max_bytes
        self.max_age_s = max_age_s
        self.on_drop = on_drop
        self.clock = clock
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

    def put(self, data: Data, kind: str, fallback: Fallback = KEEP) -> None:
        """Queue ``data``; past ``max_bytes``, give up the oldest images until it fits
        (answers that cannot be given up are kept whatever they weigh)."""
        item = _Item(data, kind, fallback, len(data), self.clock())
        self._items.append(item)
        self._bytes += item.size
        if self._bytes > self.max_bytes:
            self._shed()
        self._empty.clear()
        self._wakeup.set()

    def _shed(self) -> None:
        kept: deque[_Item] = deque()
        for item in self._items:
            if self._bytes > self.max_bytes and item.fallback is not KEEP:
                self._bytes -= item.size
                if not self._give_up(item):
                    continue
                self._bytes += item.size
            kept.append(item)
        self._items = kept

    def _give_up(self, item: _Item) -> bool:
        """Replace ``item``'s data by its fallback; False when it is to be left out."""
        self.dropped += 1
        self.on_drop(item.kind)
        fallback = item.fallback
        if fallback is None or isinstance(fallback, _Keep):
            return False
        item.data, item.size, item.fallback = fallback, len(fallback), KEEP
        return True

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
            if (
                item.fallback is not KEEP
                and self.clock() - item.queued_at > self.max_age_s
                and not self._give_up(item)
            ):
                continue
            await send(item.data, item.kind)

    async def flushed(self) -> None:
        """Return once everything queued so far has been handed to the socket."""
        await self._empty.wait()


class Sequencer:
    """Puts one connection's layout A answers back in request order.

    Each request takes a ticket when it arrives; :meth:`complete` returns the answers that
    may go out now, in order. Finished answers waiting behind an unfinished one hold at
    most ``max_bytes``: past that, the oldest waiting images become empty answers (the A
    error shape), in their own slots, so the client's count and order stay right.
    """

    def __init__(self, max_bytes: int) -> None:
        if max_bytes < 1:
            raise ValueError("max_bytes must be >= 1")
        self.max_bytes = max_bytes
        self.reordered = 0  # answers that finished before an earlier request's
        self.dropped = 0  # images replaced by an empty answer
        self._next = 0
        self._head = 0
        self._done: dict[int, bytes] = {}
        self._bytes = 0

    @property
    def pending(self) -> int:
        """Tickets handed out and not yet released."""
        return self._next - self._head

    @property
    def waiting(self) -> int:
        """Finished answers held back by an earlier unfinished request."""
        return len(self._done)

    @property
    def waiting_bytes(self) -> int:
        return self._bytes

    def ticket(self) -> int:
        ticket = self._next
        self._next += 1
        return ticket

    def complete(self, ticket: int, answer: bytes) -> list[bytes]:
        """Record ``ticket``'s answer; the answers now releasable, oldest first."""
        if not self._head <= ticket < self._next or ticket in self._done:
            raise ValueError(f"ticket {ticket} is not pending")
        if ticket == self._head:  # the common case: nothing waits, nothing to store
            out = [answer]
            self._head += 1
        else:
            self.reordered += 1
            self._done[ticket] = answer
            self._bytes += len(answer)
            out = []
        while self._head in self._done:
            released = self._done.pop(self._head)
            self._bytes -= len(released)
            self._head += 1
            out.append(released)
        if self._bytes > self.max_bytes:
            for t in sorted(self._done):
                if self._bytes <= self.max_bytes:
                    break
                if self._done[t]:
                    self._bytes -= len(self._done[t])
                    self._done[t] = b""
                    self.dropped += 1
        return out
