"""What the broker's core asks its I/O layer to send: one action per message, to one peer.

The core (``broker.core``) decides; ``broker.server`` encodes and sends. An action holds a
typed header (``shared.envelope``) and the payload frames exactly as they came in (audio
from a gateway, JPEG from a worker): the server passes them to ZeroMQ untouched, so the
broker never copies or parses a payload.

A send can fail (a peer gone: ``EHOSTUNREACH``; a peer not reading: ``EAGAIN``). The
server then hands the action back to the core as an ``Undelivered``, and the core decides
what that means (a dead worker, an answer nobody got).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from broker.records import GatewayRecord, WorkerRecord
from broker.stats import Totals
from shared.envelope import Error, Header, Reply
from shared.errors import ErrorCode


__all__ = ["Action", "Outbox", "ToGateway", "ToWorker", "Undelivered"]

logger = logging.getLogger("broker")


@dataclass(slots=True)
class ToGateway:
    """Send ``header`` + ``payload`` to the gateway whose ROUTER routing id is ``identity``."""

    identity: bytes
    header: Header
    payload: Sequence[Any] = ()


@dataclass(slots=True)
class ToWorker:
    """Send ``header`` + ``payload`` to the worker whose ROUTER routing id is ``identity``."""

    identity: bytes
    header: Header
    payload: Sequence[Any] = ()


Action = ToGateway | ToWorker


@dataclass(slots=True)
class Undelivered:
    """An action the server could not send, and why ("unreachable", "not reading")."""

    action: Action
    why: str


class Outbox:
    """The actions of the event being handled, in order, plus the bookkeeping every send
    does: answers counted by outcome (``Totals.answered``), and each peer's ``last_sent``
    (a peer that hears from us needs no heartbeat).

    ``now`` is the time of the event being handled; the core sets it at each entry point.
    """

    def __init__(
        self, totals: Totals, gateways: dict[bytes, GatewayRecord], *, debug: bool = False
    ) -> None:
        self.totals = totals
        self.gateways = gateways
        self.now = 0.0
        self._debug = debug
        self._actions: list[Action] = []

    def take(self) -> Sequence[Action]:
        """The actions so far, in order; the outbox is empty afterwards."""
        actions = self._actions
        if not actions:
            return ()  # most events send nothing: no new list for them
        self._actions = []
        return actions

    def to_worker(self, record: WorkerRecord, header: Header, payload: Sequence[Any] = ()) -> None:
        self._actions.append(ToWorker(record.identity, header, payload))
        record.last_sent = self.now

    def to_identity(self, identity: bytes, header: Header) -> None:
        """To a worker connection that is not registered (told to register again)."""
        self._actions.append(ToWorker(identity, header))

    def answer(
        self, identity: bytes, header: Reply | Error, payload: Sequence[Any], outcome: str
    ) -> None:
        """An answer to a gateway, counted under ``outcome`` ("ok" or an error code)."""
        answered = self.totals.answered
        answered[outcome] = answered.get(outcome, 0) + 1
        self._actions.append(ToGateway(identity, header, payload))  # as to_gateway, inline
        gateway = self.gateways.get(identity)
        if gateway is not None:
            gateway.last_sent = self.now

    def to_gateway(self, identity: bytes, header: Header, payload: Sequence[Any] = ()) -> None:
        self._actions.append(ToGateway(identity, header, payload))
        gateway = self.gateways.get(identity)
        if gateway is not None:
            gateway.last_sent = self.now

    def error(self, identity: bytes, gid: int, code: ErrorCode, message: str) -> None:
        if self._debug:
            logger.debug("> error %s/%d %s: %s", identity.hex(), gid, code.value, message)
        self.answer(identity, Error(id=gid, code=code.value, message=message), (), code.value)

    def reply(self, identity: bytes, gid: int, result: Any) -> None:
        self.answer(identity, Reply(id=gid, worker="broker", result=result), (), "ok")
