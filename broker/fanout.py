"""Admin ops fanned out to several workers, answered once with every worker's outcome.

``load_package`` / ``unload_package`` with ``opts["workers"]`` (``"all"``, a count, or a
worker id) go to each chosen worker as an ordinary request (one per worker, never re-sent
elsewhere: it was meant for that worker), and the gateway gets one REPLY when the last of
them has ended, whatever way it ended (answer, error, worker death, deadline, broker
shutdown). That keeps rule 1 (exactly one answer) for the gateway, and the per-worker
outcomes say exactly where a package failed to load and why.

How: each child request is accepted under a private "gateway" identity that no ZeroMQ peer
can have (a routing id of ours starting with a zero byte, longer than ZeroMQ's generated
ones), so every path that ends a request already ends a child too; the broker hands
answers for such identities to :meth:`Fanouts.answer` instead of its frontend socket.

Choice of workers (``reload`` asks to reload where the package is already loaded):

- ``load_package``: ``"all"`` = every live worker that takes work; ``N`` = N of them,
  those not holding the model first, then the most free credits;
- ``unload_package``, and ``load_package`` with ``reload``: among the holders of the model;
- a worker id: that worker, whatever it holds.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from broker.requests import MAX_ATTEMPTS
from shared.envelope import EnvelopeError, Error, Op, Reply, Request, decode
from shared.errors import ErrorCode, ServiceError


if TYPE_CHECKING:
    from broker.registry import Registry, WorkerRecord
    from broker.server import Broker

__all__ = ["MAX_FANOUT", "PREFIX", "Fanouts", "choose_targets"]

PREFIX = b"\x00lipsync-fanout:"
MAX_FANOUT = 10_000
_CHILD_OPTS_DROPPED = frozenset({"workers", "worker", "reload"})


@dataclass(eq=False, slots=True)
class _Group:
    gateway: bytes
    gid: int
    op: str
    model: str
    workers: list[str]
    outcomes: list[dict[str, Any] | None] = field(default_factory=list)
    remaining: int = 0


def choose_targets(registry: Registry, op: str, model: str, spec: Any, reload: bool) -> list[Any]:
    """The workers an admin op goes to (see the module docstring). Raises ServiceError."""
    if isinstance(spec, bool) or not isinstance(spec, str | int):
        raise ServiceError(ErrorCode.BAD_REQUEST, "workers must be all, a count or a worker id")
    if isinstance(spec, int) and not 1 <= spec <= MAX_FANOUT:
        raise ServiceError(ErrorCode.BAD_REQUEST, f"workers must be 1..{MAX_FANOUT}")
    if isinstance(spec, str) and spec != "all":
        if not 0 < len(spec) <= 256:
            raise ServiceError(ErrorCode.BAD_REQUEST, "bad worker id")
        record = registry.by_id(spec)
        if record is None:
            raise ServiceError(ErrorCode.BAD_REQUEST, f"no worker named {spec!r}")
        return [record]
    pool: list[WorkerRecord]
    if op == Op.LOAD_PACKAGE and not reload:
        pool = [r for r in registry if r.capacity > 0]
        if not pool:
            raise ServiceError(ErrorCode.BAD_REQUEST, "no worker connected")
        pool.sort(key=lambda r: (model in r.models, -r.free, r.last_assigned))
    else:
        pool = list(registry.holders(model))
        if not pool:
            raise ServiceError(ErrorCode.UNKNOWN_MODEL, f"no worker holds model {model!r}")
        pool.sort(key=lambda r: (-r.free, r.last_assigned))
    return pool if spec == "all" else pool[: int(spec)]


class Fanouts:
    """The broker's fanned-out admin ops in progress."""

    def __init__(self, broker: Broker) -> None:
        self.broker = broker
        self._groups: dict[bytes, _Group] = {}
        self._ids = itertools.count(1)

    def __len__(self) -> int:
        return len(self._groups)

    @staticmethod
    def owns(identity: bytes) -> bool:
        return identity.startswith(PREFIX)

    def start(self, identity: bytes, header: Request, payload: list[Any], deadline: float) -> None:
        b = self.broker
        opts = header.opts
        model = header.model
        try:
            if not model:
                raise ServiceError(ErrorCode.BAD_REQUEST, "model is required")
            targets = choose_targets(
                b.registry, header.op, model, opts.get("workers"), opts.get("reload") is True
            )
        except ServiceError as exc:
            b._error_to_gateway(identity, header.id, exc.code, exc.message)
            return
        key = PREFIX + str(next(self._ids)).encode()
        group = _Group(
            identity,
            header.id,
            header.op,
            model,
            [r.id for r in targets],
            [None] * len(targets),
            len(targets),
        )
        self._groups[key] = group
        child_opts = {k: v for k, v in opts.items() if k not in _CHILD_OPTS_DROPPED}
        now = time.monotonic()
        for k, worker in enumerate(targets):
            child = Request(id=k, op=header.op, model=model, ttl_ms=header.ttl_ms, opts=child_opts)
            p = b._accept(key, child, payload, deadline)
            p.attempts = MAX_ATTEMPTS - 1  # never re-sent to another worker
            if not b._send_request(worker, p, now):
                b._answer_error(p, ErrorCode.WORKER_LOST, "worker unreachable")

    def answer(self, identity: bytes, frames: Any) -> None:
        """An answer the broker would have sent to ``identity``: one worker's outcome."""
        group = self._groups.get(bytes(identity))
        if group is None:
            return
        try:
            header = decode(list(frames)[:2]).header
        except EnvelopeError:
            return
        if not isinstance(header, Reply | Error):
            return
        k = header.id
        if not 0 <= k < len(group.outcomes) or group.outcomes[k] is not None:
            return
        worker = group.workers[k]
        if isinstance(header, Reply):
            result = header.result if isinstance(header.result, dict) else {}
            outcome: dict[str, Any] = {"worker": worker, "ok": True}
            outcome.update((key, v) for key, v in result.items() if key != "model")
        else:
            outcome = {"worker": worker, "ok": False, "code": header.code, "error": header.message}
        group.outcomes[k] = outcome
        group.remaining -= 1
        if group.remaining == 0:
            del self._groups[bytes(identity)]
            result = {"op": group.op, "model": group.model, "workers": group.outcomes}
            self.broker._reply_to_gateway(group.gateway, group.gid, result)
