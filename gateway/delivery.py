"""Everything one connection has to say, on its way to the socket: the order of layout A
answers, the outbox, the counts of images given up, and the bound past which a connection
that holds too many undelivered answers is closed (docs/protocol.md section 5).

``gateway.outbox`` holds the sans-I/O queues; this puts the connection's rules around them
(which fallback each layout gets, what is counted where, when to close), so that the
connection only says "answer this".
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from gateway.context import GatewayTotals
from gateway.metrics import GatewayMetrics
from gateway.outbox import KEEP, Data, Fallback, Outbox, Sequencer
from shared.config import GatewayConfig


__all__ = ["CLOSE_OVERFLOW", "Delivery"]

logger = logging.getLogger("gateway.connection")

CLOSE_OVERFLOW = 1008  # policy violation: more undelivered answers than allowed


class Delivery:
    """One connection's answers until the socket takes them. ``close(code, reason)`` is
    called once if the connection holds more than ``max_undelivered`` answers."""

    def __init__(
        self,
        config: GatewayConfig,
        metrics: GatewayMetrics,
        totals: GatewayTotals,
        peer: str,
        close: Callable[[int, str], None],
    ) -> None:
        self.config = config
        self.metrics = metrics
        self.totals = totals
        self.peer = peer
        self.close = close
        held_bytes = int(config.max_undelivered_mb * 1024 * 1024)
        self.outbox = Outbox(
            max_bytes=held_bytes, max_age_s=config.slow_client_ms / 1000, on_drop=self._on_drop
        )
        self.sequencer = Sequencer(max_bytes=held_bytes)
        self.overflowed = False  # closed for holding too many undelivered answers

    @property
    def dropped(self) -> int:
        """Answers whose image this client never got because it did not read in time."""
        return self.outbox.dropped + self.sequencer.dropped

    def put(self, data: Data, kind: str, fallback: Fallback = KEEP) -> None:
        """Queue an answer for the socket (``fallback``: see ``gateway.outbox``)."""
        self.outbox.put(data, kind, fallback)
        self._check()

    def put_json(self, text: str) -> None:
        self.put(text, "json")

    def ticket(self) -> int:
        """A layout A request's place in the order of answers."""
        return self.sequencer.ticket()

    def release_a(self, ticket: int, image: bytes) -> None:
        """A layout A answer (empty: its error shape); it goes out after those before it."""
        seq = self.sequencer
        reordered, dropped = seq.reordered, seq.dropped
        for answer in seq.complete(ticket, image):
            self.outbox.put(answer, "a", b"" if answer else KEEP)
        if seq.reordered > reordered:
            self.metrics.reordered.inc(seq.reordered - reordered)
        for _ in range(seq.dropped - dropped):
            self._on_drop("a")
        self._check()

    async def run(self, send: Callable[[Data, str], Awaitable[None]]) -> None:
        await self.outbox.run(send)

    async def flushed(self) -> None:
        await self.outbox.flushed()

    def _check(self) -> None:
        """Close a connection that holds more undelivered answers than allowed: it pipelines
        without limit against a stall, or does not read at all. Each answer it holds costs
        only a few bytes once its image is given up, but the count must end somewhere."""
        held = len(self.outbox) + self.sequencer.waiting
        if held <= self.config.max_undelivered or self.overflowed:
            return
        self.overflowed = True
        self.metrics.overflow_closes.inc()
        reason = f"more than {self.config.max_undelivered} answers undelivered"
        logger.warning(
            "%s: %s (%d waiting for order, %d for the socket); closing with %d",
            self.peer,
            reason,
            self.sequencer.waiting,
            len(self.outbox),
            CLOSE_OVERFLOW,
        )
        self.close(CLOSE_OVERFLOW, reason)

    def _on_drop(self, kind: str) -> None:
        self.metrics.dropped.labels(kind).inc()
        self.totals.dropped_frames += 1
