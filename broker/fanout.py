"""Admin ops fanned out to several workers, answered once with every worker's outcome.

``load_package`` / ``unload_package`` with ``opts["workers"]`` (``"all"``, a count, or a
worker id) go to each chosen worker as an ordinary request (one per worker, never re-sent
elsewhere: it was meant for that worker), and the gateway gets one REPLY when the last of
them has ended, whatever way it ended (answer, error, worker death, deadline, broker
shutdown). That keeps rule 1 (exactly one answer) for the gateway, and the per-worker
outcomes say exactly where a package failed to load and why.

How: each child is an ordinary pending request (``broker.records.Pending``) that carries
its ``Group``; every path that ends a request ends a child too, and the child's ending is
recorded in its group instead of being sent to a gateway (``Group.record``). The group
answers its gateway once, when the last child has ended.

Choice of workers (``reload`` asks to reload where the package is already loaded):

- ``load_package``: ``"all"`` = every live worker that takes work; ``N`` = N of them,
  those not holding the model first, then the most free credits;
- ``unload_package``, and ``load_package`` with ``reload``: among the holders of the model;
- a worker id: that worker, whatever it holds.
"""

from __future__ import annotations

from typing import Any

from broker.records import Group, WorkerRecord
from broker.registry import Registry
from shared.envelope import Op, Request
from shared.errors import ErrorCode, ServiceError
from shared.opts import AdminOpts


__all__ = ["MAX_FANOUT", "children", "choose_targets"]

MAX_FANOUT = 10_000
_CHILD_OPTS_DROPPED = frozenset({"workers", "worker", "reload"})


def choose_targets(registry: Registry, header: Request, opts: AdminOpts) -> list[WorkerRecord]:
    """The workers an admin op goes to (see the module docstring). Raises ServiceError."""
    if not header.model:
        raise ServiceError(ErrorCode.BAD_REQUEST, "model is required")
    op, model, spec, reload = header.op, header.model, opts.workers, opts.reload
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


def children(
    identity: bytes, header: Request, targets: list[WorkerRecord]
) -> tuple[Group, list[Request]]:
    """The group for ``header`` from gateway ``identity``, and one child request per target
    (the fan-out's own options dropped: each child is meant for its one worker)."""
    n = len(targets)
    group = Group(
        identity, header.id, header.op, header.model, [r.id for r in targets], [None] * n, n
    )
    opts: dict[str, Any] = {k: v for k, v in header.opts.items() if k not in _CHILD_OPTS_DROPPED}
    requests = [
        Request(id=k, op=header.op, model=header.model, ttl_ms=header.ttl_ms, opts=opts)
        for k in range(n)
    ]
    return group, requests
