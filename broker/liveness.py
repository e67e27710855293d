"""Rule 3, heartbeats: every peer hears from the broker at least once an interval, and a
peer silent for ``liveness`` intervals is dead.

Any message counts as a sign of life (the core stamps ``last_seen``), and any message
sent as one from us (the ``Outbox`` stamps ``last_sent``), so heartbeats only flow on
idle connections. Gateways are only heartbeated, never relied on: a gateway that goes
silent is forgotten late, after ``GATEWAY_FORGET_S``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from broker.actions import Outbox
from broker.records import GatewayRecord, WorkerRecord
from broker.registry import Registry
from shared.envelope import Disconnect, Heartbeat


__all__ = ["GATEWAY_FORGET_S", "Liveness"]

logger = logging.getLogger("broker")

GATEWAY_FORGET_S = 60.0
"""A gateway with a slower heartbeat than ours must not be forgotten and re-greeted every
interval."""


class Liveness:
    """Who is alive: gateways by identity, workers (through the registry), and the
    unregistered worker connections told to register again. ``worker_gone`` ends a worker
    (``Scheduler.worker_gone``: its requests are re-sent or answered)."""

    def __init__(
        self,
        heartbeat_s: float,
        liveness: int,
        registry: Registry,
        gateways: dict[bytes, GatewayRecord],
        out: Outbox,
        heartbeat: Heartbeat,
        worker_gone: Callable[[WorkerRecord, str, float], None],
    ) -> None:
        self.heartbeat_s = heartbeat_s
        self.dead_after_s = heartbeat_s * liveness
        self.registry = registry
        self.gateways = gateways
        self.out = out
        self.heartbeat = heartbeat
        self._worker_gone = worker_gone
        self._told_to_leave: dict[bytes, float] = {}  # zombies sent DISCONNECT, rate limit
        self.next_check = 0.0  # the next purge and heartbeat round

    def gateway_seen(self, identity: bytes, now: float) -> None:
        gateway = self.gateways.get(identity)
        if gateway is None:
            gateway = self.gateways[identity] = GatewayRecord(identity, now)
            logger.info("gateway %s connected", identity.hex())
        gateway.last_seen = now

    def tell_to_leave(self, identity: bytes, now: float) -> None:
        """A connection that is not registered (declared dead, or a broker restart it has
        not noticed): tell it to register again, at most once an interval."""
        last = self._told_to_leave.get(identity)
        if last is not None and now - last < self.heartbeat_s:
            return
        self._told_to_leave[identity] = now
        self.out.to_identity(identity, Disconnect(reason="not registered: send ready"))
        logger.info("unregistered worker %s told to register again", identity.hex())

    def registered(self, identity: bytes) -> None:
        self._told_to_leave.pop(identity, None)

    def check(self, now: float) -> None:
        """A few times an interval: declare silent peers dead, heartbeat idle ones."""
        if now < self.next_check:
            return
        self.next_check = now + self.heartbeat_s / 4
        self._purge(now)
        self._send_heartbeats(now)

    def _purge(self, now: float) -> None:
        for record in self.registry:
            silent = now - record.last_seen
            if silent > self.dead_after_s:
                self._worker_gone(record, f"dead (silent for {silent:.1f} s)", now)
        for identity, gateway in list(self.gateways.items()):
            if now - gateway.last_seen > max(self.dead_after_s, GATEWAY_FORGET_S):
                del self.gateways[identity]
                logger.info("gateway %s gone silent; forgotten", identity.hex())
        if self._told_to_leave:
            self._told_to_leave = {
                i: t for i, t in self._told_to_leave.items() if now - t < self.dead_after_s
            }

    def _send_heartbeats(self, now: float) -> None:
        for record in self.registry:
            if now - record.last_sent >= self.heartbeat_s:
                self.out.to_worker(record, self.heartbeat)
        for gateway in list(self.gateways.values()):
            if now - gateway.last_sent >= self.heartbeat_s:
                self.out.to_gateway(gateway.identity, self.heartbeat)

    def unreachable_gateway(self, identity: bytes) -> None:
        """A heartbeat to ``identity`` could not be sent: forget it."""
        if self.gateways.pop(identity, None) is not None:
            logger.info("gateway %s unreachable; forgotten", identity.hex())
