"""Where each request goes and how it ends: credits, queues, deadlines, re-dispatch.

The broker's rules (DESIGN.md section 3) as decisions on plain data; every send is an
action in the ``Outbox`` (no socket here, and no clock: times are passed in).

- rule 1, exactly one answer: every accepted request ends in exactly one REPLY or ERROR to
  its gateway (``respond``: or to its fan-out group); answers from workers that no longer
  own a request are dropped (``stale``);
- rule 2, credits: a worker never holds more than its capacity (``Registry.choose`` only
  picks a worker with a free credit; the credit is taken in ``send`` and given back when the
  worker answers or is declared dead);
- rule 4, worker death: its in-flight requests go once more to another holder of the model
  if their deadline allows, else they are answered ``worker_lost`` (``worker_gone``);
- rule 5, deadlines: queued requests that pass their deadline are answered
  ``deadline_exceeded``; a worker gets only the time left. A request a worker holds past
  its deadline plus ``INFLIGHT_GRACE_S`` is answered here too, while its credit stays
  taken until the worker answers, so a hung worker stops getting work (``expire_due``);
- rule 6, bounded memory: one queue per model, ``queue_limit`` long, ``overloaded`` beyond.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from broker.actions import Outbox
from broker.records import Group, Pending, WorkerRecord
from broker.registry import Registry
from broker.requests import MAX_ATTEMPTS, PendingRequests
from broker.stats import Totals
from broker.warmup import Warmup
from shared.envelope import Cancel, Error, Header, Reply, Request
from shared.errors import ErrorCode


__all__ = ["INFLIGHT_GRACE_S", "Scheduler"]

logger = logging.getLogger("broker")

INFLIGHT_GRACE_S = 0.5
"""How long past its deadline a request may sit at a worker before the broker answers it
``deadline_exceeded`` itself (a worker finishing a batch just late still gets through)."""


class Scheduler:
    """The requests' side of the broker core: shares the registry, the pending requests,
    the outbox, the totals and the warm-up state with ``broker.core.BrokerCore``, which
    feeds it validated requests and worker events."""

    def __init__(
        self,
        queue_limit: int,
        registry: Registry,
        requests: PendingRequests,
        out: Outbox,
        totals: Totals,
        warmup: Warmup,
        *,
        debug: bool = False,
    ) -> None:
        self.queue_limit = queue_limit
        self.registry = registry
        self.requests = requests
        self.out = out
        self.totals = totals
        self.warmup = warmup
        self._debug = debug

    # -- requests in ---------------------------------------------------------------------

    def submit(
        self, identity: bytes, header: Request, payload: list[Any], deadline: float, now: float
    ) -> None:
        """An ``infer`` or ``video_frame`` request (already checked): to the best worker at
        once if nothing waits before it, else to the back of its model's queue."""
        gid, model = header.id, header.model
        held = self.registry.holds(model)
        if not held and not self.warmup.warming:
            self.out.error(
                identity, gid, ErrorCode.UNKNOWN_MODEL, f"no worker holds model {model!r}"
            )
            return
        queue = self.requests.queues.get(model)
        if queue and len(queue) >= self.queue_limit:
            self.totals.overloaded += 1
            self.out.error(
                identity, gid, ErrorCode.OVERLOADED, f"queue for model {model!r} is full"
            )
            return
        p = self.requests.accept(identity, header, payload, deadline)
        if not held:  # warming up: wait for a worker that holds it to register
            self.totals.waited_for_workers += 1
        elif not queue:
            worker = self.registry.choose(model, p.stream())
            if worker is not None:
                self.send(worker, p, now)
                return
        self.requests.enqueue(p)

    def send_pinned(
        self,
        worker: WorkerRecord,
        identity: bytes,
        header: Request,
        payload: list[Any],
        deadline: float,
        now: float,
        *,
        group: Group | None = None,
    ) -> None:
        """An admin op for ``worker`` alone, whatever its credits (rare, operator-driven);
        never re-sent to another worker if this one dies: it was meant for this one."""
        p = self.requests.accept(identity, header, payload, deadline, group=group)
        p.pinned = True
        self.send(worker, p, now)

    def send(self, worker: WorkerRecord, p: Pending, now: float) -> None:
        """``p`` to ``worker``, with the time it has left; takes one of its credits."""
        h = p.header
        ttl_ms = max(1, int((p.deadline - now) * 1000))
        header = Request(
            id=p.bid, op=h.op, model=h.model, frame=h.frame, ttl_ms=ttl_ms, opts=h.opts
        )
        self.out.to_worker(worker, header, p.payload)
        p.worker = worker
        p.attempts += 1
        worker.in_flight[p.bid] = p
        self.registry.assigned(worker, p.stream())
        self.requests.timers.push(p.deadline + INFLIGHT_GRACE_S, p.bid)
        if self._debug:
            logger.debug("> request %d to %s (ttl %d ms)", p.bid, worker.id, ttl_ms)

    def cancel(self, identity: bytes, gid: int) -> bool:
        """The gateway gave up: drop a queued request, or tell its worker. The worker still
        answers (that frees the credit), and that answer is then dropped. False if the
        gateway has no such request here."""
        p = self.requests.pop_gateway_id(identity, gid)
        if p is None:
            return False
        self.totals.cancelled += 1
        p.orphan = True
        if p.queued:
            self.requests.unqueue(p)
            self.requests.forget(p)
        elif p.worker is not None:
            self.out.to_worker(p.worker, Cancel(id=p.bid))
        return True

    # -- dispatch ------------------------------------------------------------------------

    def dispatch_all(self, now: float) -> None:
        for model in list(self.requests.queues):
            self.dispatch(model, now)

    def dispatch(self, model: str, now: float) -> None:
        """Hand queued requests of ``model`` to workers while any has a free credit."""
        queues = self.requests.queues
        queue = queues.get(model)
        while queue:
            worker = self.registry.choose(model, queue[0].stream())
            if worker is None:
                break
            p = queue.popleft()
            p.queued = False
            if p.deadline <= now:
                self.expire(p)
                continue
            self.send(worker, p, now)
        if queue is not None and not queue and queues.get(model) is queue:
            del queues[model]

    def expire(self, p: Pending) -> None:
        """``p`` waited in its queue past its deadline."""
        model = p.header.model
        if not self.registry.holds(model):  # waited for workers (warm-up) in vain
            self.fail(p, ErrorCode.UNKNOWN_MODEL, f"no worker holds model {model!r}")
            return
        self.totals.expired += 1
        self.fail(p, ErrorCode.DEADLINE_EXCEEDED, "deadline passed while queued")

    def expire_due(self, now: float) -> None:
        """Deadlines: expire queued requests; answer requests a worker holds too long."""
        requests = self.requests
        for bid in requests.timers.pop_due(now):
            p = requests.get(bid)
            if p is None or p.orphan:
                continue
            if p.queued:
                if p.deadline <= now:
                    requests.unqueue(p)
                    self.expire(p)
            elif p.worker is not None and now >= p.deadline + INFLIGHT_GRACE_S:
                # Keep the credit taken (the worker still holds it) but answer the gateway.
                self.totals.expired += 1
                requests.release_id(p)
                p.orphan = True
                why = f"no answer from worker {p.worker.id} by the deadline"
                self.respond_error(p, ErrorCode.DEADLINE_EXCEEDED, why)
        requests.timers.compact(requests.by_bid)

    # -- answers -------------------------------------------------------------------------

    def answer(self, record: WorkerRecord, header: Reply | Error, payload: Sequence[Any]) -> None:
        """A REPLY or ERROR from registered worker ``record``: to its requester, once."""
        p = record.in_flight.pop(header.id, None)
        if p is None:
            # Not (or no longer) this worker's: e.g. re-dispatched after it was declared
            # dead, then it came back. The request already has, or will get, its answer.
            self.totals.stale += 1
            if self._debug:
                logger.debug("stale answer %d from worker %s dropped", header.id, record.id)
            return
        if isinstance(header, Reply):
            record.served += 1
        else:
            record.errors += 1
        self.requests.forget(p)
        if p.orphan:  # cancelled, or answered here at its deadline: nobody waits for it
            if not (isinstance(header, Error) and header.code == ErrorCode.CANCELLED.value):
                self.totals.discarded += 1  # computed (or failed) for nobody
            return
        header.id = p.gid
        if not header.worker:
            header.worker = record.id
        outcome = "ok" if isinstance(header, Reply) else header.code
        if p.group is None:  # as respond, one call less on the hot path
            self.out.answer(p.gateway, header, payload, outcome)
        else:
            self.respond(p, header, payload, outcome)

    def fail(self, p: Pending, code: ErrorCode, message: str) -> None:
        """End ``p`` with an error (once: it is forgotten and orphaned here)."""
        if p.queued:
            self.requests.unqueue(p)
        self.requests.forget(p)
        if p.orphan:
            return
        p.orphan = True
        self.respond_error(p, code, message)

    def respond_error(self, p: Pending, code: ErrorCode, message: str) -> None:
        if p.group is None:
            self.out.error(p.gateway, p.gid, code, message)
        else:
            self.respond(p, Error(id=p.gid, code=code.value, message=message), (), code.value)

    def respond(
        self, p: Pending, header: Reply | Error, payload: Sequence[Any], outcome: str
    ) -> None:
        """``p``'s answer to its gateway; a fan-out child's to its group, which answers its
        gateway once the last child has ended."""
        group = p.group
        if group is None:
            self.out.answer(p.gateway, header, payload, outcome)
        elif group.record(p.gid, header):
            self.out.reply(group.gateway, group.gid, group.result())

    # -- workers gone ----------------------------------------------------------------------

    def worker_gone(self, record: WorkerRecord, reason: str, now: float) -> None:
        """Forget a worker (it left, went silent, or became unreachable) and deal with what
        it held: re-dispatch once where the deadline allows (rule 4), else ``worker_lost``."""
        self.registry.remove(record)
        held = sorted(record.in_flight.values(), key=lambda p: p.bid, reverse=True)
        record.in_flight.clear()
        log = logger.info if reason.startswith("left") and not held else logger.warning
        log("worker %s %s; %d requests were in flight", record.id, reason, len(held))
        for p in held:  # newest first, so a front enqueue keeps the original order
            p.worker = None
            if p.orphan:
                self.requests.forget(p)
            elif (
                not p.pinned
                and p.attempts < MAX_ATTEMPTS
                and p.deadline > now
                and self.registry.holds(p.header.model)
            ):
                self.totals.redispatched += 1
                self.requests.enqueue(p, front=True)
            else:
                self.fail(p, ErrorCode.WORKER_LOST, f"worker {record.id} lost")
        self.fail_unheld_queues()

    def fail_unheld_queues(
        self, code: ErrorCode = ErrorCode.WORKER_LOST, why: str = " any more"
    ) -> None:
        """Queued requests for a model nobody holds (any more) would only wait for their
        deadline: answer them now. While warming up they wait for workers to register."""
        if self.warmup.warming:
            return
        queues = self.requests.queues
        for model in [m for m in queues if not self.registry.holds(m)]:
            for p in queues.pop(model):
                p.queued = False
                if not p.orphan:
                    self.fail(p, code, f"no worker holds model {model!r}{why}")

    def undelivered(self, identity: bytes, headers: list[Header], why: str, now: float) -> None:
        """Messages to worker connection ``identity`` that could not be sent: the worker is
        dead. Requests among them never reached it: they go back to the front of their
        queue as if never sent (an admin op meant for it is answered ``worker_lost``)."""
        unsent: list[Pending] = []
        for h in headers:
            p = self.requests.get(h.id) if isinstance(h, Request) else None
            if p is None or p.worker is None or p.worker.identity != identity:
                continue  # not a request, or not (any more) in flight there
            del p.worker.in_flight[p.bid]
            p.worker = None
            p.attempts -= 1
            unsent.append(p)
        record = self.registry.get(identity)
        if record is not None:
            self.worker_gone(record, f"dead ({why})", now)
        for p in unsent:
            if p.pinned:
                self.fail(p, ErrorCode.WORKER_LOST, "worker unreachable")
        for p in reversed(unsent):  # the first unsent ends up first in its queue
            if not p.pinned:
                self._requeue(p)

    def _requeue(self, p: Pending) -> None:
        """Put back a request whose worker turned out to be gone, unless nobody is left
        who holds its model."""
        if self.registry.holds(p.header.model):
            self.requests.enqueue(p, front=True)
        else:
            self.fail(p, ErrorCode.WORKER_LOST, f"no worker holds model {p.header.model!r}")
