"""What one connection may use of the gateway, and nothing more.

A connection used to hold the whole ``Gateway`` and reach into it (config, metrics, the
broker client, health, streams, totals: 17 places), which made the two modules import each
other and every connection able to touch everything. It now gets this small context,
built once by the gateway; tests can build one from plain parts.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

from gateway.brokerclient import Answer
from gateway.metrics import GatewayMetrics
from shared.config import GatewayConfig


__all__ = ["ConnectionContext", "GatewayTotals", "Health", "Request", "StreamHub"]

Request = Callable[..., Awaitable[Answer]]
"""``BrokerClient.request(op, *, model, frame, opts, payload, ttl_ms)``: one internal
request, answered or raising ``ServiceError``."""


class Health(Protocol):
    """``gateway.health.HealthCache``: the broker's view, cached."""

    async def status(self) -> Any: ...

    def invalidate(self) -> None: ...


class StreamHub(Protocol):
    """``gateway.streams.StreamHub``: makes a connection's set of streams."""

    def connection(
        self, *, request: Request, send: Callable[[bytes | str], Awaitable[None]]
    ) -> Any: ...


@dataclass(slots=True)
class GatewayTotals:
    """Counters ``get_stats`` reports under the original server's names."""

    json_requests: int = 0
    binary_requests: int = 0
    answered: int = 0
    time_ms: float = 0.0
    dropped_frames: int = 0


@dataclass(frozen=True, slots=True)
class ConnectionContext:
    config: GatewayConfig
    metrics: GatewayMetrics
    request: Request
    health: Health
    streams: StreamHub
    totals: GatewayTotals
    shutting_down: Callable[[], bool]
    stats_fields: Callable[[], dict[str, Any]]
