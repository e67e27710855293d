"""The broker's plain records: a worker's registration, a gateway, a request, a fan-out.

Data only, with the few methods that read or update one record; who holds them and decides
with them is ``broker.registry`` (workers), ``broker.requests`` (requests) and
``broker.scheduler`` (where a request goes, how it ends).

Ids: the broker gives every accepted request its own id (``bid``), unique for the broker's
lifetime, and maps it back to the gateway's (identity, id) when the answer comes. Workers
only ever see broker ids, so two gateways using the same ids never collide, and a reply can
be checked against the worker registration it was actually assigned to (stale replies from
a worker declared dead are dropped, rule 1).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from shared.envelope import Error, Ready, Reply, Request


__all__ = ["GatewayRecord", "Group", "Pending", "WorkerRecord"]


@dataclass(eq=False, slots=True)
class WorkerRecord:
    """One registration of one worker connection. A worker that re-registers after being
    declared dead gets a new record, so a stale reply can be told from a current one by
    identity of the record, not just of the socket."""

    identity: bytes  # ROUTER routing id of the worker's DEALER
    id: str  # the worker's own name (host:pid by default)
    capacity: int
    host: str
    pid: int
    device: str
    backend: str
    models: dict[str, dict[str, Any]]
    joined: float
    last_seen: float
    last_sent: float = 0.0
    last_assigned: int = -1  # registry tick of the last request sent: least recently used
    in_flight: dict[int, Pending] = field(default_factory=dict)  # by bid
    served: int = 0
    errors: int = 0
    reported_in_flight: int = 0  # what the worker says it holds (heartbeat)
    counters: dict[str, Any] = field(default_factory=dict)  # the worker's own (heartbeat)

    @classmethod
    def from_ready(cls, identity: bytes, header: Ready, now: float) -> WorkerRecord:
        return cls(
            identity=identity,
            id=header.worker,
            capacity=header.capacity,
            host=header.host,
            pid=header.pid,
            device=header.device,
            backend=header.backend,
            models=header.models,
            joined=now,
            last_seen=now,
        )

    @property
    def free(self) -> int:
        """Credits left (rule 2): never below zero while the broker keeps its rules."""
        return self.capacity - len(self.in_flight)


@dataclass(eq=False, slots=True)
class GatewayRecord:
    identity: bytes
    last_seen: float
    last_sent: float = 0.0


@dataclass(eq=False, slots=True)
class Pending:
    """A request the broker holds: queued for a worker, or in flight at one.

    A fan-out's child (``group`` set) answers its group, not a gateway: ``gid`` is then its
    index in the group, and it has no entry under (gateway, gid)."""

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
    pinned: bool = False  # meant for one worker (admin ops): never re-sent to another
    group: Group | None = None

    def stream(self) -> tuple[bytes, str] | None:
        """The affinity key of a stream frame's request (docs/streams.md), else None."""
        key = self.header.opts.get("stream")
        return (self.gateway, key) if isinstance(key, str) and key else None


@dataclass(eq=False, slots=True)
class Group:
    """An admin op fanned out to several workers (``broker.fanout``): one child request
    per worker, and one answer to the gateway once every child has ended."""

    gateway: bytes
    gid: int
    op: str
    model: str
    workers: list[str]  # ids, in the children's order
    outcomes: list[dict[str, Any] | None]
    remaining: int

    def record(self, index: int, header: Reply | Error) -> bool:
        """Child ``index`` ended with ``header``; True when it was the last to end."""
        if not 0 <= index < len(self.outcomes) or self.outcomes[index] is not None:
            return False
        worker = self.workers[index]
        outcome: dict[str, Any]
        if isinstance(header, Reply):
            result = header.result if isinstance(header.result, dict) else {}
            outcome = {"worker": worker, "ok": True}
            outcome.update((k, v) for k, v in result.items() if k != "model")
        else:
            outcome = {"worker": worker, "ok": False, "code": header.code, "error": header.message}
        self.outcomes[index] = outcome
        self.remaining -= 1
        return self.remaining == 0

    def result(self) -> dict[str, Any]:
        return {"op": self.op, "model": self.model, "workers": self.outcomes}
