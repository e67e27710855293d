"""The compute and encode threads: the busy loops of the vllm pattern, never a socket to
the broker (their answers go through ``workers.outbox`` to the I/O thread).

- **compute** (``ComputeLoop``): takes the jobs the I/O thread queues, lets the
  ``workers.batcher.Batcher`` decide what to run (and what to refuse), runs
  ``backend.forward`` and hands the batch to the encode thread; runs admin ops
  (``load_package``, ``unload_package``) between batches.
- **encode** (``EncodeLoop``): ``backend.encode`` (composite + JPEG), so that the JPEG work of
  batch k overlaps the forward pass of batch k+1, and the answers; also serves
  ``video_frame``.

Both drop work of an ended session: the broker that sent it forgot us.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from shared.envelope import Error, Op, Reply
from shared.errors import ErrorCode, ServiceError
from shared.logs import RateLimitedLog
from shared.modelstats import ModelStatsBook
from shared.opts import VideoFrameOpts
from workers.backend import Backend, ForwardBatch, InferResult
from workers.batcher import EXPIRED_MESSAGE, Batch, Batcher
from workers.jobs import Job
from workers.outbox import Outbox
from workers.servicetime import ServiceTimes
from workers.telemetry import Counters


__all__ = ["ENCODE_DEPTH", "ComputeLoop", "EncodeLoop", "LoopContext", "Replies"]

logger = logging.getLogger("worker")

ENCODE_DEPTH = 2
"""Batches handed to the encode thread and not yet encoded: enough to overlap, no more."""

Item = tuple[str, Any]
"""What a loop's queue holds: ("jobs", [Job, ...]), ("cancel", (session, rid)), ("batch", ...),
("video", Job), ("stop", None)."""


@dataclass(frozen=True, slots=True)
class LoopContext:
    """What both loops share with the rest of the worker."""

    backend: Backend
    worker_id: str
    counters: Counters
    model_stats: ModelStatsBook
    service_times: ServiceTimes
    log: RateLimitedLog
    session: Callable[[], int]  # the current session (the I/O thread moves it on)
    outbox: Callable[[], Outbox]  # a new outbox, for the calling thread alone


class Replies:
    """One thread's way to answer jobs with errors, counting them."""

    def __init__(self, ctx: LoopContext, out: Outbox) -> None:
        self.ctx = ctx
        self.out = out

    def error(self, job: Job, code: ErrorCode, message: str) -> None:
        ctx = self.ctx
        ctx.counters.add("errors")
        if job.op == Op.INFER:
            ctx.model_stats.failed(job.model, code.value, time.monotonic())
        self.out.answer(
            job.session, Error(id=job.rid, code=code.value, message=message, worker=ctx.worker_id)
        )

    def fail(self, jobs: list[Job], exc: BaseException) -> None:
        """Each of ``jobs`` answered with ``exc``: its own code if a ServiceError, else
        ``internal`` (and a warning: a backend bug, not a bad request)."""
        if isinstance(exc, ServiceError):
            code, message = exc.code, exc.message
        else:
            code, message = ErrorCode.INTERNAL, f"{type(exc).__name__}: {exc}"[:200]
            self.ctx.log.warning("request failed: %s", message, exc_info=exc)
        for job in jobs:
            self.error(job, code, message)


class ComputeLoop:
    """The compute thread: batches (``Batcher``), forward passes, admin ops."""

    def __init__(
        self,
        ctx: LoopContext,
        inbox: queue.Queue[Item],
        batcher: Batcher,
        encode_q: queue.Queue[Item],
        encode_slots: threading.Semaphore,
    ) -> None:
        self.ctx = ctx
        self.inbox = inbox
        self.batcher = batcher
        self.encode_q = encode_q
        self.encode_slots = encode_slots

    def run(self) -> None:
        """Until a ("stop", None) item."""
        inbox, batcher, session = self.inbox, self.batcher, self.ctx.session
        out = self.ctx.outbox()
        replies = Replies(self.ctx, out)
        try:
            while True:
                timeout = batcher.timeout(time.monotonic())
                try:
                    kind, value = inbox.get(timeout=timeout) if timeout != 0 else inbox.get_nowait()
                except queue.Empty:
                    kind, value = "", None
                while kind:
                    if kind == "stop":
                        return
                    self._item(replies, kind, value)
                    try:
                        kind, value = inbox.get_nowait()
                    except queue.Empty:
                        kind = ""
                batch = batcher.next_batch(time.monotonic(), session())
                self._refuse(replies)
                if batch is not None:
                    self._run_batch(replies, batch)
        finally:
            out.close()

    def _item(self, replies: Replies, kind: str, value: Any) -> None:
        if kind == "jobs":  # what the I/O thread took in one drain of its socket
            for job in value:
                if job.op == Op.INFER:
                    self.batcher.add(job)
                else:
                    self._admin(replies, job)
        elif kind == "cancel":
            session, rid = value
            if self.batcher.cancel(session, rid):
                self._refuse(replies)

    def _refuse(self, replies: Replies) -> None:
        """Answer what the batcher refused, counting each under its reason."""
        counters = self.ctx.counters
        for job, code, message, reason in self.batcher.refusals():
            if reason == "too_late":
                counters.add("expired")
            counters.add(reason)
            replies.error(job, code, message)

    def _run_batch(self, replies: Replies, batch: Batch) -> None:
        ctx = self.ctx
        model, jobs = batch
        started = time.monotonic()
        items = [item for job in jobs for item in job.items]
        try:
            forwarded = ctx.backend.forward(model, items)
        except Exception as exc:
            replies.fail(jobs, exc)
            return
        ctx.counters.add("computed", len(items))
        ctx.counters.add("batches")
        ctx.model_stats.batch(model, len(items), time.monotonic())
        self.encode_slots.acquire()
        self.encode_q.put(("batch", (forwarded, jobs, model, started)))

    def _admin(self, replies: Replies, job: Job) -> None:
        """load_package / unload_package, between batches on the compute thread (the
        backend only promises that forward and encode may overlap)."""
        ctx = self.ctx
        name = job.model or job.opts.get("name", "")
        started = time.monotonic()
        try:
            if not isinstance(name, str) or not name:
                raise ServiceError(ErrorCode.BAD_REQUEST, "model name is required")
            if job.op == Op.LOAD_PACKAGE:
                info = ctx.backend.load(name)
                result: dict[str, Any] = {"model": name, "metadata": info.to_map()}
            else:
                ctx.backend.unload(name)
                ctx.model_stats.drop(name)
                ctx.service_times.forget(name)
                result = {"model": name, "unloaded": True}
        except Exception as exc:
            replies.fail([job], exc)
            return
        result["time_ms"] = round((time.monotonic() - started) * 1000, 3)
        logger.info("%s %s done in %.0f ms", job.op, name, result["time_ms"])
        # READY first: whoever reads the answer then finds the new model set registered.
        replies.out.models_changed(ctx.backend.models())
        replies.out.answer(job.session, Reply(id=job.rid, worker=ctx.worker_id, result=result))
        ctx.counters.add("served")


class EncodeLoop:
    """The encode thread: JPEGs and answers of computed batches, and ``video_frame``."""

    def __init__(
        self,
        ctx: LoopContext,
        encode_q: queue.Queue[Item],
        encode_slots: threading.Semaphore,
        jpeg_quality: int,
    ) -> None:
        self.ctx = ctx
        self.encode_q = encode_q
        self.encode_slots = encode_slots
        self.jpeg_quality = jpeg_quality

    def run(self) -> None:
        """Until a ("stop", None) item."""
        out = self.ctx.outbox()
        replies = Replies(self.ctx, out)
        try:
            while True:
                kind, value = self.encode_q.get()
                if kind == "stop":
                    return
                if kind == "batch":
                    try:
                        self._encode_batch(replies, *value)
                    finally:
                        self.encode_slots.release()
                elif kind == "video":
                    self._video_frame(replies, value)
        finally:
            out.close()

    def _encode_batch(
        self, replies: Replies, batch: ForwardBatch, jobs: list[Job], model: str, started: float
    ) -> None:
        ctx = self.ctx
        try:
            results: list[InferResult | BaseException] = ctx.backend.encode(batch)
        except Exception as exc:
            replies.fail(jobs, exc)
            return
        now = time.monotonic()
        ctx.service_times.record(model, len(jobs), now - started)
        out, worker_id = replies.out, ctx.worker_id
        at = 0
        for job in jobs:
            # one result per frame; a job asked for 1 + len(job.more) frames, in order
            mine = results[at : at + 1 + len(job.more)]
            at += len(mine)
            failed = next((r for r in mine if isinstance(r, BaseException)), None)
            if failed is not None or not mine:
                replies.fail([job], failed or RuntimeError("no result"))
                continue
            done = [r for r in mine if not isinstance(r, BaseException)]
            first = done[0]
            timings = {**batch.timings, **first.timings}
            timings["worker"] = round((now - job.received) * 1000, 3)
            timings["batch"] = len(jobs)
            reply = Reply(
                id=job.rid,
                worker=worker_id,
                timings=timings,
                bounds=[float(b) for r in done for b in r.bounds],  # 4 per frame
                result={"shape": first.shape},
            )
            out.answer(job.session, reply, [r.jpeg for r in done])
            ctx.counters.add("served")
            ctx.model_stats.served(job.model, timings["worker"], now)

    def _video_frame(self, replies: Replies, job: Job) -> None:
        ctx = self.ctx
        if job.session != ctx.session():
            return  # counted as dropped when the session ended
        if job.deadline <= time.monotonic():
            ctx.counters.add("expired")
            replies.error(job, ErrorCode.DEADLINE_EXCEEDED, EXPIRED_MESSAGE)
            return
        try:
            opts = VideoFrameOpts.from_map(job.opts)
            quality = self.jpeg_quality if opts.quality is None else opts.quality
            jpeg = ctx.backend.video_frame(job.model, job.frame, opts.video_type, quality)
        except Exception as exc:
            replies.fail([job], exc)
            return
        ctx.counters.add("video_frames")
        ctx.counters.add("served")
        replies.out.answer(job.session, Reply(id=job.rid, worker=ctx.worker_id), [jpeg])
