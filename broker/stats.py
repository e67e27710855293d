"""The broker's counters, and the ``stats`` op's result built from them.

The names of ``Totals``' fields are a contract: they are the keys of ``stats["broker"]``
(docs/broker.md, "stats result"), which every gateway turns into ``lipsync_broker_*``
series on its /metrics (``gateway.modelmetrics``: ``requests``, ``answered`` by outcome,
the other counters as ``lipsync_broker_events_total{event}``).
"""

from __future__ import annotations

import dataclasses
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from broker.registry import Registry


__all__ = ["Totals", "snapshot"]


@dataclass(slots=True)
class Totals:
    """What the broker has done since it started (counters only grow)."""

    requests: int = 0  # requests received from gateways, good or bad
    answered: dict[str, int] = field(default_factory=dict)  # answers sent, by outcome
    overloaded: int = 0  # refused: the model's queue was full
    expired: int = 0  # deadline passed in the queue or at a worker (plus ttl <= 0)
    redispatched: int = 0  # a dead worker's request sent to another
    malformed: int = 0  # messages that were not valid envelopes, or unexpected
    cancelled: int = 0  # requests the gateway gave up on
    stale: int = 0  # answers from a worker that no longer owned the request
    undeliverable: int = 0  # answers to a gateway that had gone
    waited_for_workers: int = 0  # held during the warm-up for a model nobody held yet
    discarded: int = 0  # a worker's answer to a request already cancelled or answered

    def to_map(self) -> dict[str, Any]:
        """The counters as the ``stats`` op shows them (a copy)."""
        return dataclasses.asdict(self)


def snapshot(
    totals: Totals,
    registry: Registry,
    queues: Mapping[str, deque[Any]],
    *,
    now: float,
    started: float,
    warming: bool,
    pending: int,
    gateways: int,
) -> dict[str, Any]:
    """The ``stats`` op's result: broker totals, per worker, per model."""
    workers = [
        {
            "id": r.id,
            "host": r.host,
            "pid": r.pid,
            "device": r.device,
            "backend": r.backend,
            "capacity": r.capacity,
            "in_flight": len(r.in_flight),
            "served": r.served,
            "errors": r.errors,
            "last_seen_s": round(now - r.last_seen, 3),
            "joined_s": round(now - r.joined, 3),
            "models": sorted(r.models),
            "counters": r.counters,
        }
        for r in registry
    ]
    models = {
        m: {"queue": len(queues.get(m, ())), "workers": [r.id for r in registry.holders(m)]}
        for m in registry.models()
    }
    broker = totals.to_map()
    broker.update(
        warming_up=warming,
        uptime_s=round(now - started, 3),
        pending=pending,
        queued=sum(len(q) for q in queues.values()),
        gateways=gateways,
    )
    return {"broker": broker, "workers": workers, "models": models}
