"""The ops a broker does not simply queue for a worker: ``metadata``, answered here from
the holders' READY (and parked while the broker warms up, whose end is here too), and the
admin ops
``load_package`` / ``unload_package``, sent to one worker whatever its credits or fanned
out to several (``broker.fanout``)."""

from __future__ import annotations

import logging
from typing import Any

from broker.actions import Outbox
from broker.fanout import children, choose_targets
from broker.registry import Registry
from broker.scheduler import Scheduler
from broker.stats import Totals
from broker.warmup import Parked, Warmup
from shared.envelope import Request
from shared.errors import ErrorCode, ServiceError
from shared.opts import AdminOpts


__all__ = ["Ops"]

logger = logging.getLogger("broker")


class Ops:
    """Shares the registry, scheduler, outbox, totals and warm-up with the core."""

    def __init__(
        self,
        queue_limit: int,
        registry: Registry,
        scheduler: Scheduler,
        out: Outbox,
        totals: Totals,
        warmup: Warmup,
    ) -> None:
        self.queue_limit = queue_limit
        self.registry = registry
        self.scheduler = scheduler
        self.out = out
        self.totals = totals
        self.warmup = warmup

    def metadata(self, m: Parked, *, park: bool = True) -> None:
        """A metadata request: answered from the first holder's READY; while warming up,
        parked (as bounded as a queue) until a holder registers."""
        holders = self.registry.holders(m.model)
        warmup = self.warmup
        if not holders:
            if park and warmup.warming and m.model and len(warmup.parked) < self.queue_limit:
                self.totals.waited_for_workers += 1
                warmup.parked.append(m)
            else:
                why = f"no worker holds model {m.model!r}"
                self.out.error(m.gateway, m.gid, ErrorCode.UNKNOWN_MODEL, why)
            return
        result = dict(holders[0].models[m.model])
        result["model_name"] = m.model
        # what a pipelining client may keep in flight without its requests queueing here
        result["workers"] = len(holders)
        result["capacity"] = sum(h.capacity for h in holders)
        self.out.reply(m.gateway, m.gid, result)

    def answer_parked(self, now: float) -> None:
        """Metadata requests that waited for workers: answer those whose model is now held,
        whose deadline came, or all of them once the warm-up is over."""
        warmup = self.warmup
        for m in warmup.take_parked():
            if self.registry.holds(m.model) or not warmup.warming or m.deadline <= now:
                self.metadata(m, park=False)
            else:
                warmup.parked.append(m)

    def end_warmup(self, after_s: float) -> None:
        """The workers have had their time to register: from now on a model nobody holds
        is unknown, and what waited for one is answered so (parked metadata requests at
        the next ``answer_parked``)."""
        self.warmup.warming = False
        holds = self.registry.holds
        queues = self.scheduler.requests.queues
        waiting = sum(len(q) for m, q in queues.items() if not holds(m))
        waiting += sum(1 for k in self.warmup.parked if not holds(k.model))
        logger.info(
            "warm-up over after %.1f s: %d workers, models %s%s",
            after_s,
            len(self.registry),
            ",".join(self.registry.models()) or "-",
            f"; {waiting} requests for models nobody holds answered unknown_model"
            if waiting
            else "",
        )
        self.scheduler.fail_unheld_queues(ErrorCode.UNKNOWN_MODEL, "")

    def admin(
        self, identity: bytes, header: Request, payload: list[Any], deadline: float, now: float
    ) -> None:
        """load_package / unload_package: to the named worker (opts "worker") or to the
        least busy one, regardless of credits (rare, operator-driven). The worker
        re-announces itself with READY when its model set changes. With opts "workers"
        (all, a count, a worker id): one child per chosen worker, see ``broker.fanout``."""
        try:
            opts = AdminOpts.from_map(header.opts)
        except ServiceError as exc:
            self.out.error(identity, header.id, exc.code, exc.message)
            return
        if opts.workers is not None:
            try:
                targets = choose_targets(self.registry, header, opts)
            except ServiceError as exc:
                self.out.error(identity, header.id, exc.code, exc.message)
                return
            group, requests = children(identity, header, targets)
            for target, child in zip(targets, requests, strict=True):
                self.scheduler.send_pinned(
                    target, identity, child, payload, deadline, now, group=group
                )
            return
        name = opts.worker
        worker = self.registry.by_id(name) if name else self.registry.choose_any()
        if worker is None:
            message = f"no worker named {name!r}" if name else "no worker connected"
            self.out.error(identity, header.id, ErrorCode.BAD_REQUEST, message)
            return
        self.scheduler.send_pinned(worker, identity, header, payload, deadline, now)
