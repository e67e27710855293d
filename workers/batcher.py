"""What the worker computes next: its queued jobs per model, batched by size and deadline.

Sans-I/O, in the manner of python-websockets' ``Protocol``: jobs and cancels in
(``add``, ``cancel``), the current time in (``timeout``, ``next_batch``), decisions out: the
next batch to run, and the jobs to answer without computing them (``refusals``), each with
its error code and message. No threads, no sockets, no clock of its own, so every rule
here is tested from a table of jobs and times (tests/test_batcher.py); the compute thread
(``workers.loops``) does the waiting and the sending.

The rules, in the order ``next_batch`` applies them:

1. A job of an old session is dropped silently: the broker that sent it forgot us
   (it was counted ``dropped`` when the session ended).
2. A job whose deadline has passed is refused, ``deadline_exceeded`` (rule 5 of the
   internal protocol: nobody computes a frame no one will see).
3. A batch is taken from a model whose queue holds ``max_batch`` jobs (the oldest such
   model first), else from the model whose first job has waited ``max_delay`` (the one
   waiting longest); of at most ``max_batch`` jobs, as many as ``workers.batchsize`` says
   answers the most of them by their deadlines (all of them with sizing "fixed").
4. Of that batch, the jobs that would be ready after their deadlines even so are refused,
   ``deadline_exceeded`` (``too_late``), unless that refuses all of them and the model's
   last measured batch is older than ``PROBE_AFTER_S``: then the batch runs, so that it is
   measured again.
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Mapping
from typing import Literal, NamedTuple, Protocol

from shared.errors import ErrorCode
from workers.batchsize import batch_time, choose_batch_size, in_time
from workers.jobs import Job
from workers.servicetime import PROBE_AFTER_S


__all__ = ["SIZINGS", "Batch", "Batcher", "Estimates", "Refusal"]

SIZINGS = ("deadline", "fixed")
"""``batch_sizing`` modes: sized to the deadlines (``workers.batchsize``), or always as
many as queued up to ``max_batch`` (the behaviour before deadline sizing)."""

EXPIRED_MESSAGE = "deadline passed before compute"


class Estimates(Protocol):
    """Measured batch times (``workers.servicetime.ServiceTimes`` is one)."""

    def table(self, model: str) -> Mapping[int, float]:
        """Seconds a batch of each measured size takes."""
        ...

    def age(self, model: str) -> float:
        """Seconds since the model's last measured batch (infinite if none)."""
        ...


Batch = tuple[str, list[Job]]
"""A model and its jobs to compute together, in queue order; a plain tuple, as cheap to
make as can be, since the compute loop makes one per batch."""


class Refusal(NamedTuple):
    """A job to answer with an error, not compute. ``reason`` names the worker counter it
    counts in (``too_late`` counts in ``expired`` too)."""

    job: Job
    code: ErrorCode
    message: str
    reason: Literal["cancelled", "expired", "too_late"]


class Batcher:
    """The worker's queued ``infer`` jobs, per model, and the choice of what to run next.

    Not thread-safe: one thread (the compute thread) calls it.
    """

    def __init__(
        self, max_batch: int, max_delay_s: float, estimates: Estimates, sizing: str = "deadline"
    ) -> None:
        if max_batch < 1:
            raise ValueError("max_batch must be >= 1")
        if sizing not in SIZINGS:
            raise ValueError(f"batch_sizing must be deadline or fixed, not {sizing!r}")
        self.max_batch = max_batch
        self.max_delay_s = max_delay_s
        self.estimates = estimates
        self.fixed = sizing == "fixed"
        self._queues: dict[str, deque[Job]] = {}  # only non-empty queues
        self._refused: list[Refusal] = []

    def __len__(self) -> int:
        return sum(len(q) for q in self._queues.values())

    # -- events in ---------------------------------------------------------------------

    def add(self, job: Job) -> None:
        """Queue an ``infer`` job behind the others of its model."""
        q = self._queues.get(job.model)
        if q is None:
            q = self._queues[job.model] = deque()
        q.append(job)

    def cancel(self, session: int, rid: int) -> bool:
        """Take request ``rid`` of ``session`` out of its queue and refuse it
        (``cancelled``). False when it is not queued (not received, or already in a batch,
        which answers it)."""
        for model, q in self._queues.items():
            for job in q:
                if job.rid == rid and job.session == session:
                    q.remove(job)
                    if not q:
                        del self._queues[model]
                    refusal = Refusal(job, ErrorCode.CANCELLED, "cancelled", "cancelled")
                    self._refused.append(refusal)
                    return True
        return False

    # -- decisions out -----------------------------------------------------------------

    def timeout(self, now: float) -> float | None:
        """Seconds the caller may wait for new jobs before calling ``next_batch``: None
        (for ever) when nothing is queued, 0 when a batch is ready, else until the oldest
        job has waited ``max_delay``."""
        queues = self._queues
        if not queues:
            return None
        oldest = min(q[0].received for q in queues.values())
        if any(len(q) >= self.max_batch for q in queues.values()):
            return 0
        return max(0.0, oldest + self.max_delay_s - now)

    def next_batch(self, now: float, session: int) -> Batch | None:
        """The batch to run at ``now``, jobs of ``session`` only (rules 1-4 of the module's
        docstring), or None. Jobs it refuses on the way wait in ``refusals()``."""
        self._expire(now, session)
        picked = self._pick(now)
        if picked is None:
            return None
        jobs = self._refuse_too_late(picked, now)
        if jobs is picked[1]:
            return picked
        return (picked[0], jobs) if jobs else None

    def refusals(self) -> list[Refusal]:
        """The jobs refused since the last call, in the order refused: answer each."""
        refused = self._refused
        if refused:
            self._refused = []
        return refused

    # -- rules -------------------------------------------------------------------------

    def _expire(self, now: float, session: int) -> None:
        """Drop what nobody will see: expired jobs (refused), old sessions (silently)."""
        queues = self._queues
        for model in list(queues):
            q = queues[model]
            if any(j.deadline <= now or j.session != session for j in q):
                keep: deque[Job] = deque()
                for job in q:
                    if job.session != session:
                        continue  # counted as dropped when the session ended
                    if job.deadline <= now:
                        code = ErrorCode.DEADLINE_EXCEEDED
                        self._refused.append(Refusal(job, code, EXPIRED_MESSAGE, "expired"))
                    else:
                        keep.append(job)
                if keep:
                    queues[model] = keep
                else:
                    del queues[model]

    def _pick(self, now: float) -> Batch | None:
        """Rule 3: the model and the jobs taken from the head of its queue."""
        queues = self._queues
        if not queues:
            return None
        order = sorted(queues, key=lambda m: queues[m][0].received)
        chosen = next((m for m in order if len(queues[m]) >= self.max_batch), None)
        if chosen is None and now - queues[order[0]][0].received >= self.max_delay_s:
            chosen = order[0]
        if chosen is None:
            return None
        q = queues[chosen]
        head = list(itertools.islice(q, self.max_batch))
        size = self._size(chosen, head, now)
        jobs = [q.popleft() for _ in range(max(1, size))]
        if not q:
            del queues[chosen]
        return chosen, jobs

    def _size(self, model: str, head: list[Job], now: float) -> int:
        """How many of ``head`` (the first jobs of ``model``'s queue) the batch takes."""
        if self.fixed:
            return len(head)
        times = self.estimates.table(model)
        return choose_batch_size([j.deadline for j in head], now, times, len(head))

    def _refuse_too_late(self, batch: Batch, now: float) -> list[Job]:
        """Rule 4: the batch's jobs that can be ready in time (``workers.batchsize.in_time``);
        the others refused. A stream's frame that would arrive after its slot is work
        nobody sees, and the time goes to the others."""
        model, jobs = batch
        times = self.estimates.table(model)
        if not times:
            return jobs
        deadlines = [job.deadline for job in jobs]
        if self.fixed:  # as before deadline sizing: the whole batch's time
            ready_at = now + (batch_time(times, len(jobs)) or 0.0)
            keep_mask = [d >= ready_at for d in deadlines]
        else:
            keep_mask = in_time(deadlines, now, times)
        keep = [job for job, k in zip(jobs, keep_mask, strict=True) if k]
        if len(keep) == len(jobs):
            return jobs
        if not keep and self.estimates.age(model) > PROBE_AFTER_S:
            return jobs  # refusing all for a while: run this batch, so it is measured again
        took = batch_time(times, max(1, len(keep))) or 0.0
        why = f"would be ready after its deadline (a batch takes ~{took * 1000:.0f} ms)"
        for job, k in zip(jobs, keep_mask, strict=True):
            if not k:
                self._refused.append(Refusal(job, ErrorCode.DEADLINE_EXCEEDED, why, "too_late"))
        return keep
