"""The worker's socket runtime: I/O thread, compute loop, encode thread.

Shaped like vllm's ``EngineCoreProc``: threads around a busy loop, joined by queues.

- **I/O thread** (``_io_loop``): the only thread that touches the DEALER to the broker. It
  receives requests and hands them to the compute loop through a ``queue.Queue``, sends
  answers that the other threads push to it over inproc sockets, heartbeats every interval
  (rule 7: heartbeats flow while a batch runs), and reconnects with backoff when the broker
  goes silent (rule 3).
- **compute thread** (``_compute_loop``): forms batches per model (up to ``max_batch``,
  waiting at most ``max_delay_ms`` for more, of the size that answers the most jobs by
  their deadlines: ``workers.batchsize``), drops requests whose deadline has passed
  before computing them (rule 5), or would pass before the batch is ready
  (``workers.servicetime``), runs ``backend.forward``, and hands the batch on.
- **encode thread** (``_encode_loop``): ``backend.encode`` (composite + JPEG), so that the
  JPEG work of batch k overlaps the forward pass of batch k+1; also serves ``video_frame``.

Sessions. Everything the worker holds belongs to one registration with one broker. When
the broker says DISCONNECT (it forgot us) or goes silent (it died), the session number goes
up: queued work of the old session is dropped, and answers of the old session that finish
later are not sent, since the broker that would understand them is gone (a restarted
broker reuses request ids).
"""

from __future__ import annotations

import itertools
import logging
import os
import queue
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import zmq

from shared.config import WorkerConfig
from shared.envelope import (
    Cancel,
    Disconnect,
    EnvelopeError,
    Error,
    Header,
    Heartbeat,
    Kind,
    Op,
    Ready,
    Reply,
    Request,
    decode,
    encode,
    peek_id,
)
from shared.errors import ErrorCode, ServiceError
from shared.modelstats import ModelStatsBook
from workers.backend import Backend, ForwardBatch, InferItem, InferResult, ModelInfo
from workers.batchsize import batch_time, choose_batch_size, in_time
from workers.servicetime import PROBE_AFTER_S, ServiceTimes


__all__ = ["Job", "WorkerRuntime", "reconnect_backoff"]

logger = logging.getLogger("worker")

DRAIN_TIMEOUT_S = 5.0
"""How long a worker told to stop keeps serving what it holds (supervisord waits 20 s)."""


def reconnect_backoff(previous_s: float, heartbeat_s: float, liveness: int) -> float:
    """The wait before the next reconnect: doubles from one heartbeat, up to one liveness
    period (at least 1 s).

    Why so short a cap: a restarted broker knows no worker until each one registers again,
    and answers ``unknown_model`` for their models until then; every second a worker sleeps
    in back-off is a second of that. A reconnect costs one TCP handshake. (With a 16 s cap
    a worker re-registered 14.7 s after a broker came back from a 30 s outage; RELIABILITY.md
    finding 2.)
    """
    return min(previous_s * 2, max(heartbeat_s * liveness, 1.0))


ENCODE_DEPTH = 2
"""Batches handed to the encode thread and not yet encoded: enough to overlap, no more."""
LOG_EVERY_S = 5.0


class _Warmable(Protocol):
    def warmup(self) -> None: ...


@dataclass(eq=False, slots=True)
class Job:
    """One request the worker holds."""

    rid: int
    op: str
    model: str
    frame: int
    opts: dict[str, Any]
    deadline: float  # worker monotonic clock
    received: float
    session: int
    item: InferItem | None = None
    payload: list[bytes] = field(default_factory=list)


class _Counters:
    """The worker's own counters (sent to the broker in heartbeats). Written from several
    threads, hence the lock; read as a snapshot."""

    NAMES = (
        "received",
        "computed",
        "batches",
        "served",
        "errors",
        "expired",
        "too_late",  # of "expired": refused because its batch would be ready too late
        "cancelled",
        "dropped",
        "video_frames",
        "reconnects",
    )

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._values = dict.fromkeys(self.NAMES, 0)

    def add(self, name: str, n: int = 1) -> None:
        with self._lock:
            self._values[name] += n

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self._values)


class _Outbox:
    """A thread's way to send through the I/O thread: its own PUSH socket to the I/O
    thread's inproc PULL. The first frame says what it is: ``a`` + session (an answer to a
    request, which the I/O thread counts off), or ``c`` (a control message)."""

    def __init__(self, context: zmq.Context[Any], address: str) -> None:
        self._sock: zmq.Socket[Any] = context.socket(zmq.PUSH)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.setsockopt(zmq.SNDHWM, 0)  # bounded by capacity, never block compute
        self._sock.connect(address)

    def answer(self, session: int, header: Header, payload: Sequence[Any] = ()) -> None:
        self._sock.send_multipart(
            [b"a" + session.to_bytes(8, "big"), *encode(header, payload)], copy=False
        )

    def control(self, header: Header) -> None:
        self._sock.send_multipart([b"c", *encode(header)])

    def close(self) -> None:
        self._sock.close(linger=0)


class WorkerRuntime:
    """Serves one backend to one broker until ``stop()``.

    ``run()`` blocks: it starts the threads, registers with the broker (READY, only now
    that the backend is loaded and warm), serves, and on ``stop()`` drains: announces
    capacity 0, finishes what it holds (at most ``drain_timeout_s``), says DISCONNECT and
    returns 0.
    """

    def __init__(
        self,
        config: WorkerConfig,
        backend: Backend,
        *,
        context: zmq.Context[Any] | None = None,
        drain_timeout_s: float = DRAIN_TIMEOUT_S,
    ) -> None:
        if config.max_batch < 1:
            raise ValueError("max_batch must be >= 1")
        if config.batch_sizing not in ("deadline", "fixed"):
            raise ValueError(f"batch_sizing must be deadline or fixed, not {config.batch_sizing!r}")
        self.config = config
        self.backend = backend
        self.worker_id = config.worker_id or f"{socket.gethostname()}:{os.getpid()}"
        self.capacity = config.capacity or 2 * config.max_batch
        self.heartbeat_s = config.heartbeat_s
        self.dead_after_s = config.heartbeat_s * config.liveness
        self.drain_timeout_s = drain_timeout_s
        self.counters = _Counters()
        self.model_stats = ModelStatsBook()  # per model, sent in heartbeats (get_stats)
        self.service_times = ServiceTimes()  # batch start to answers ready, per model and size
        self._own_context = context is None
        self._context: zmq.Context[Any] = context if context is not None else zmq.Context()
        self._out_address = f"inproc://worker-out-{id(self):x}"
        self._pull: zmq.Socket[Any] = self._context.socket(zmq.PULL)
        self._pull.setsockopt(zmq.LINGER, 0)
        self._pull.setsockopt(zmq.RCVHWM, 0)
        self._pull.bind(self._out_address)
        self._inbox: queue.Queue[tuple[str, Any]] = queue.Queue()
        self._encode_q: queue.Queue[tuple[str, Any]] = queue.Queue()
        self._encode_slots = threading.Semaphore(ENCODE_DEPTH)
        self._session = 0  # bumped by the I/O thread only; read anywhere
        self._held = 0  # requests of the current session not yet answered (I/O thread)
        self._models = _model_map(backend.models())  # snapshot, replaced whole
        self._stopping = threading.Event()
        self._force = threading.Event()
        self._done = threading.Event()
        self._error_logged_at = -LOG_EVERY_S

    # -- lifecycle ---------------------------------------------------------------------

    def stop(self) -> None:
        """Drain and leave (thread-safe; call it from a signal handler). A second call
        stops waiting for the drain."""
        if self._stopping.is_set():
            self._force.set()
        self._stopping.set()

    def run(self) -> int:
        threads = [
            threading.Thread(target=self._compute_loop, name="compute", daemon=True),
            threading.Thread(target=self._encode_loop, name="encode", daemon=True),
        ]
        for t in threads:
            t.start()
        try:
            self._io_loop()
        finally:
            self._inbox.put(("stop", None))
            self._encode_q.put(("stop", None))
            for t in threads:
                t.join(timeout=10)
            self._pull.close(linger=0)
            if self._own_context:
                self._context.term()
            self._done.set()
        return 0

    # -- I/O thread --------------------------------------------------------------------

    def _io_loop(self) -> None:
        sock: zmq.Socket[Any] | None = self._connect()
        backoff = self.heartbeat_s
        reconnect_at = 0.0
        last_seen = time.monotonic()
        next_beat = 0.0
        drain_deadline: float | None = None
        poller = self._poller(sock)
        while True:
            now = time.monotonic()
            if sock is None and now >= reconnect_at:
                sock = self._connect()
                poller = self._poller(sock)
                last_seen = now
            wake = min(next_beat, reconnect_at if sock is None else next_beat, now + 0.1)
            events = dict(poller.poll(max(0, int((wake - now) * 1000)) + 1))
            if sock is not None and sock in events:
                while True:
                    try:
                        frames = sock.recv_multipart(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    last_seen = time.monotonic()
                    backoff = self.heartbeat_s
                    self._from_broker(sock, frames)
            if self._pull in events:
                self._drain_outbox(sock)
            now = time.monotonic()
            # Draining: stop taking work, finish what we hold, then leave.
            if self._stopping.is_set() and drain_deadline is None:
                drain_deadline = now + self.drain_timeout_s
                logger.info(
                    "stopping: draining %d requests (at most %.0f s)",
                    self._held,
                    self.drain_timeout_s,
                )
                if sock is not None:
                    _send(sock, encode(self._ready(capacity=0)))
            if drain_deadline is not None and (
                self._held == 0 or now >= drain_deadline or self._force.is_set() or sock is None
            ):
                if self._held:
                    logger.warning("drain timed out with %d requests held", self._held)
                if sock is not None:
                    _send(sock, encode(Disconnect(reason="shutting down")))
                    sock.close(linger=500)
                logger.info("worker %s left", self.worker_id)
                return
            if sock is not None and now - last_seen > self.dead_after_s:
                logger.warning(
                    "broker silent for %.1f s: reconnecting in %.1f s (dropping %d requests)",
                    now - last_seen,
                    backoff,
                    self._held,
                )
                sock.close(linger=0)
                sock = None
                poller = self._poller(None)
                self._new_session()
                self.counters.add("reconnects")
                reconnect_at = now + backoff
                backoff = reconnect_backoff(backoff, self.heartbeat_s, self.config.liveness)
            if sock is not None and now >= next_beat:
                next_beat = now + self.heartbeat_s
                stats: dict[str, Any] = dict(self.counters.snapshot())
                stats["models"] = self.model_stats.snapshot(now)
                beat = Heartbeat(in_flight=self._held, stats=stats)
                _send(sock, encode(beat))

    def _connect(self) -> zmq.Socket[Any]:
        sock: zmq.Socket[Any] = self._context.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDHWM, 10_000)
        sock.setsockopt(zmq.RCVHWM, 10_000)
        if self.config.curve_server_key:
            public, secret = zmq.curve_keypair()
            sock.setsockopt(zmq.CURVE_SERVERKEY, self.config.curve_server_key.encode())
            sock.setsockopt(zmq.CURVE_PUBLICKEY, public)
            sock.setsockopt(zmq.CURVE_SECRETKEY, secret)
        sock.connect(self.config.broker)
        # Sent at once, delivered when the connection is up: the broker learns of us as soon
        # as it can, whether it is already running or starts later.
        _send(sock, encode(self._ready()))
        logger.info(
            "worker %s registering with %s: capacity %d, models %s",
            self.worker_id,
            self.config.broker,
            self.capacity,
            ",".join(self._models) or "-",
        )
        return sock

    def _poller(self, sock: zmq.Socket[Any] | None) -> zmq.Poller:
        poller = zmq.Poller()
        poller.register(self._pull, zmq.POLLIN)
        if sock is not None:
            poller.register(sock, zmq.POLLIN)
        return poller

    def _ready(self, capacity: int | None = None) -> Ready:
        return Ready(
            worker=self.worker_id,
            capacity=self.capacity if capacity is None else capacity,
            host=socket.gethostname(),
            pid=os.getpid(),
            device=str(self.backend.device),
            backend=str(self.backend.name),
            models=self._models,
        )

    def _new_session(self) -> None:
        """Forget what we hold: counted once here as ``dropped``; queued jobs of the old
        session are skipped later, answers of it that still finish are not sent."""
        self._session += 1
        if self._held:
            self.counters.add("dropped", self._held)
        self._held = 0

    def _from_broker(self, sock: zmq.Socket[Any], frames: list[bytes]) -> None:
        try:
            message = decode(frames)
        except EnvelopeError as exc:
            self._log_limited("bad message from broker: %s", exc)
            rid = peek_id(frames) if len(frames) >= 2 else None
            if rid is not None:  # an answer frees the broker's credit
                err = Error(
                    id=rid,
                    code=ErrorCode.BAD_REQUEST.value,
                    message=str(exc),
                    worker=self.worker_id,
                )
                _send(sock, encode(err))
            return
        header = message.header
        if isinstance(header, Request):
            self._take(sock, header, message.payload)
        elif isinstance(header, Cancel):
            self._inbox.put(("cancel", (self._session, header.id)))
        elif isinstance(header, Heartbeat):
            pass
        elif isinstance(header, Disconnect):
            # The broker does not know us (it restarted, or declared us dead while we were
            # stalled): whatever we hold is someone else's now. Register again.
            logger.info(
                "broker says %r: registering again (dropping %d requests)",
                header.reason,
                self._held,
            )
            self._new_session()
            capacity = 0 if self._stopping.is_set() else None
            _send(sock, encode(self._ready(capacity)))
        else:
            self._log_limited("unexpected %s from broker", message.kind.name.lower())

    def _take(self, sock: zmq.Socket[Any], h: Request, payload: list[bytes]) -> None:
        """Accept one request, or answer it at once when it cannot be served."""
        now = time.monotonic()
        self.counters.add("received")
        try:
            if h.op not in Op.WORKER_OPS:
                raise ServiceError(ErrorCode.BAD_REQUEST, f"op {h.op!r} is not served by workers")
            if h.op in (Op.INFER, Op.VIDEO_FRAME) and h.model not in self._models:
                raise ServiceError(ErrorCode.UNKNOWN_MODEL, f"model {h.model!r} is not loaded here")
            if self._held >= 2 * self.capacity + 8:  # the broker keeps to capacity; be safe
                raise ServiceError(ErrorCode.OVERLOADED, "worker is full")
            job = Job(
                h.id,
                h.op,
                h.model,
                h.frame,
                h.opts,
                now + h.ttl_ms / 1000,
                now,
                self._session,
                payload=payload,
            )
            if h.op == Op.INFER:
                job.item = self._infer_item(h, payload)
        except ServiceError as exc:
            self.counters.add("errors")
            _send(
                sock,
                encode(
                    Error(id=h.id, code=exc.code.value, message=exc.message, worker=self.worker_id)
                ),
            )
            return
        self._held += 1
        if h.op == Op.VIDEO_FRAME:
            self._encode_q.put(("video", job))
        else:
            self._inbox.put(("job", job))

    def _infer_item(self, h: Request, payload: list[bytes]) -> InferItem:
        opts = h.opts
        mode = opts.get("mode", "composite")
        quality = opts.get("quality", self.config.jpeg_quality)
        audio_sr = opts.get("audio_sr", 24000)
        if mode not in ("crop", "composite"):
            raise ServiceError(ErrorCode.BAD_REQUEST, "mode must be crop or composite")
        if not isinstance(quality, int) or isinstance(quality, bool) or not 1 <= quality <= 100:
            raise ServiceError(ErrorCode.BAD_REQUEST, "quality must be an int in 1..100")
        if not isinstance(audio_sr, int) or not 8000 <= audio_sr <= 192_000:
            raise ServiceError(ErrorCode.BAD_REQUEST, "audio_sr must be an int in 8000..192000")
        audio = payload[0] if payload else None
        item = InferItem(
            frame_id=h.frame, mode=mode, quality=quality, audio=audio, audio_sr=audio_sr, tag=h.id
        )
        if "audio_t0_ms" in opts:  # a stream frame (docs/streams.md)
            t0, stream, j = opts["audio_t0_ms"], opts.get("stream"), opts.get("stream_frame")
            if audio is None:
                raise ServiceError(ErrorCode.BAD_REQUEST, "audio_t0_ms without audio")
            if not isinstance(t0, int | float) or isinstance(t0, bool):
                raise ServiceError(ErrorCode.BAD_REQUEST, "audio_t0_ms must be a number")
            if stream is not None and (not isinstance(stream, str) or len(stream) > 128):
                raise ServiceError(ErrorCode.BAD_REQUEST, "stream must be a short string")
            if not isinstance(j, int) or isinstance(j, bool) or j < 0:
                raise ServiceError(ErrorCode.BAD_REQUEST, "stream_frame must be an int >= 0")
            item.audio_t0_ms, item.stream, item.stream_frame = float(t0), stream, j
        return item

    def _drain_outbox(self, sock: zmq.Socket[Any] | None) -> None:
        while True:
            try:
                frames = self._pull.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            tag = frames[0].bytes
            if tag[:1] == b"a":
                if int.from_bytes(tag[1:], "big") != self._session:
                    # An answer for a broker that forgot us: nobody to give it to. Its
                    # request was counted ``dropped`` when the session ended, and ``served``
                    # or ``errors`` when it finished: take the latter back, so that each
                    # request counts once (received = served + errors + dropped).
                    served = frames[1].bytes == bytes((Kind.REPLY,))
                    self.counters.add("served" if served else "errors", -1)
                    continue
                self._held -= 1
            elif tag[:1] == b"c":
                message = decode(frames[1:])
                if isinstance(message.header, Ready):  # models changed: re-announce
                    self._models = message.header.models
                    frames = [
                        frames[0],
                        *encode(self._ready(0 if self._stopping.is_set() else None)),
                    ]
            if sock is not None:
                _send(sock, frames[1:])

    # -- compute thread ----------------------------------------------------------------

    def _compute_loop(self) -> None:
        out = _Outbox(self._context, self._out_address)
        queues: dict[str, deque[Job]] = {}
        max_delay = self.config.max_delay_ms / 1000
        try:
            while True:
                timeout = _batch_wait(queues, self.config.max_batch, max_delay, time.monotonic())
                try:
                    kind, value = (
                        self._inbox.get(timeout=timeout)
                        if timeout != 0
                        else self._inbox.get_nowait()
                    )
                except queue.Empty:
                    kind, value = "", None
                while kind:
                    if kind == "stop":
                        return
                    self._compute_item(out, queues, kind, value)
                    try:
                        kind, value = self._inbox.get_nowait()
                    except queue.Empty:
                        kind = ""
                now = time.monotonic()
                self._expire(out, queues, now)
                picked = _pick_batch(queues, self.config.max_batch, max_delay, now, self._size_for)
                if picked is not None:
                    model, jobs = picked
                    jobs = self._refuse_too_late(out, model, jobs, now)
                    if jobs:
                        self._run_batch(out, model, jobs)
        finally:
            out.close()

    def _compute_item(
        self, out: _Outbox, queues: dict[str, deque[Job]], kind: str, value: Any
    ) -> None:
        if kind == "job":
            job: Job = value
            if job.op == Op.INFER:
                queues.setdefault(job.model, deque()).append(job)
            else:
                self._admin(out, job)
        elif kind == "cancel":
            session, rid = value
            for q in queues.values():
                for job in q:
                    if job.rid == rid and job.session == session:
                        q.remove(job)
                        self.counters.add("cancelled")
                        self._error(out, job, ErrorCode.CANCELLED, "cancelled")
                        return

    def _expire(self, out: _Outbox, queues: dict[str, deque[Job]], now: float) -> None:
        """Drop what nobody will see: expired jobs (answered), old sessions (silently)."""
        session = self._session
        for model in list(queues):
            q = queues[model]
            if any(j.deadline <= now or j.session != session for j in q):
                keep: deque[Job] = deque()
                for job in q:
                    if job.session != session:
                        continue  # counted as dropped when the session ended
                    if job.deadline <= now:
                        self.counters.add("expired")
                        self._error(
                            out, job, ErrorCode.DEADLINE_EXCEEDED, "deadline passed before compute"
                        )
                    else:
                        keep.append(job)
                queues[model] = keep
            if not queues[model]:
                del queues[model]

    def _size_for(self, model: str, head: list[Job], now: float) -> int:
        """How many of ``head`` (the first jobs of ``model``'s queue) the next batch takes:
        with ``batch_sizing`` "deadline", the size that answers the most of them by their
        deadlines (``workers.batchsize``); "fixed", all of them."""
        if self.config.batch_sizing == "fixed":
            return len(head)
        times = self.service_times.table(model)
        return choose_batch_size([j.deadline for j in head], now, times, len(head))

    def _refuse_too_late(self, out: _Outbox, model: str, jobs: list[Job], now: float) -> list[Job]:
        """Answer ``deadline_exceeded`` now, without computing it, a job whose deadline comes
        before this batch could be ready (``workers.batchsize.in_time``): a stream's frame
        that would arrive after its slot is work nobody sees, and the time goes to the
        others."""
        times = self.service_times.table(model)
        if not times:
            return jobs
        deadlines = [job.deadline for job in jobs]
        if self.config.batch_sizing == "fixed":  # as before: the whole batch's time
            ready_at = now + (batch_time(times, len(jobs)) or 0.0)
            keep_mask = [d >= ready_at for d in deadlines]
        else:
            keep_mask = in_time(deadlines, now, times)
        keep = [job for job, k in zip(jobs, keep_mask, strict=True) if k]
        if len(keep) == len(jobs):
            return jobs
        if not keep and self.service_times.age(model) > PROBE_AFTER_S:
            return jobs  # refusing all for a while: run this batch, so it is measured again
        took = batch_time(times, max(1, len(keep))) or 0.0
        why = f"would be ready after its deadline (a batch takes ~{took * 1000:.0f} ms)"
        for job, k in zip(jobs, keep_mask, strict=True):
            if not k:
                self.counters.add("expired")
                self.counters.add("too_late")
                self._error(out, job, ErrorCode.DEADLINE_EXCEEDED, why)
        return keep

    def _run_batch(self, out: _Outbox, model: str, jobs: list[Job]) -> None:
        started = time.monotonic()
        items = [job.item for job in jobs if job.item is not None]
        try:
            batch = self.backend.forward(model, items)
        except Exception as exc:
            self._fail_jobs(out, jobs, exc)
            return
        self.counters.add("computed", len(items))
        self.counters.add("batches")
        self.model_stats.batch(model, len(items), time.monotonic())
        self._encode_slots.acquire()
        self._encode_q.put(("batch", (batch, jobs, model, started)))

    def _admin(self, out: _Outbox, job: Job) -> None:
        """load_package / unload_package, between batches on the compute thread (the
        backend only promises that forward and encode may overlap)."""
        name = job.model or job.opts.get("name", "")
        started = time.monotonic()
        try:
            if not isinstance(name, str) or not name:
                raise ServiceError(ErrorCode.BAD_REQUEST, "model name is required")
            if job.op == Op.LOAD_PACKAGE:
                info = self.backend.load(name)
                result: dict[str, Any] = {"model": name, "metadata": info.to_map()}
            else:
                self.backend.unload(name)
                self.model_stats.drop(name)
                self.service_times.forget(name)
                result = {"model": name, "unloaded": True}
        except Exception as exc:
            self._fail_jobs(out, [job], exc)
            return
        result["time_ms"] = round((time.monotonic() - started) * 1000, 3)
        logger.info("%s %s done in %.0f ms", job.op, name, result["time_ms"])
        # READY first: whoever reads the answer then finds the new model set registered.
        out.control(self._ready_for(self.backend.models()))
        out.answer(job.session, Reply(id=job.rid, worker=self.worker_id, result=result))
        self.counters.add("served")

    def _ready_for(self, models: dict[str, ModelInfo]) -> Ready:
        ready = self._ready()
        ready.models = _model_map(models)
        return ready

    # -- encode thread -----------------------------------------------------------------

    def _encode_loop(self) -> None:
        out = _Outbox(self._context, self._out_address)
        try:
            while True:
                kind, value = self._encode_q.get()
                if kind == "stop":
                    return
                if kind == "batch":
                    try:
                        self._encode_batch(out, *value)
                    finally:
                        self._encode_slots.release()
                elif kind == "video":
                    self._video_frame(out, value)
        finally:
            out.close()

    def _encode_batch(
        self, out: _Outbox, batch: ForwardBatch, jobs: list[Job], model: str, started: float
    ) -> None:
        try:
            results: list[InferResult | BaseException] = self.backend.encode(batch)
        except Exception as exc:
            self._fail_jobs(out, jobs, exc)
            return
        now = time.monotonic()
        self.service_times.record(model, len(jobs), now - started)
        for job, result in zip(jobs, results, strict=True):
            if isinstance(result, BaseException):
                self._fail_jobs(out, [job], result)
                continue
            timings = {**batch.timings, **result.timings}
            timings["worker"] = round((now - job.received) * 1000, 3)
            timings["batch"] = len(jobs)
            reply = Reply(
                id=job.rid,
                worker=self.worker_id,
                timings=timings,
                bounds=[float(b) for b in result.bounds],
                result={"shape": result.shape},
            )
            out.answer(job.session, reply, [result.jpeg])
            self.counters.add("served")
            self.model_stats.served(job.model, timings["worker"], now)

    def _video_frame(self, out: _Outbox, job: Job) -> None:
        if job.session != self._session:
            return  # counted as dropped when the session ended
        if job.deadline <= time.monotonic():
            self.counters.add("expired")
            self._error(out, job, ErrorCode.DEADLINE_EXCEEDED, "deadline passed before compute")
            return
        video_type = job.opts.get("video_type", "full_body")
        quality = job.opts.get("quality", self.config.jpeg_quality)
        try:
            if not isinstance(video_type, str) or not isinstance(quality, int):
                raise ServiceError(ErrorCode.BAD_REQUEST, "bad video_type or quality")
            jpeg = self.backend.video_frame(job.model, job.frame, video_type, quality)
        except Exception as exc:
            self._fail_jobs(out, [job], exc)
            return
        self.counters.add("video_frames")
        self.counters.add("served")
        out.answer(job.session, Reply(id=job.rid, worker=self.worker_id), [jpeg])

    # -- answers -----------------------------------------------------------------------

    def _fail_jobs(self, out: _Outbox, jobs: list[Job], exc: BaseException) -> None:
        if isinstance(exc, ServiceError):
            code, message = exc.code, exc.message
        else:
            code, message = ErrorCode.INTERNAL, f"{type(exc).__name__}: {exc}"[:200]
            self._log_limited("request failed: %s", message, exc_info=exc)
        for job in jobs:
            self._error(out, job, code, message)

    def _error(self, out: _Outbox, job: Job, code: ErrorCode, message: str) -> None:
        self.counters.add("errors")
        if job.op == Op.INFER:
            self.model_stats.failed(job.model, code.value, time.monotonic())
        out.answer(
            job.session, Error(id=job.rid, code=code.value, message=message, worker=self.worker_id)
        )

    def _log_limited(self, fmt: str, *args: Any, exc_info: BaseException | None = None) -> None:
        now = time.monotonic()
        if now - self._error_logged_at >= LOG_EVERY_S:
            self._error_logged_at = now
            logger.warning(fmt, *args, exc_info=exc_info)


def warm_up(backend: Backend) -> None:
    """Call the backend's ``warmup()`` if it has one (the torch engine compiles and runs a
    first batch there), so that READY means ready."""
    warmup = getattr(backend, "warmup", None)
    if callable(warmup):
        warmup()


def _model_map(models: dict[str, ModelInfo]) -> dict[str, dict[str, Any]]:
    return {name: info.to_map() for name, info in models.items()}


def _send(sock: zmq.Socket[Any], frames: Sequence[Any]) -> None:
    """Send without blocking the I/O thread; a full queue means the broker is not reading,
    which heartbeats will notice."""
    try:
        sock.send_multipart(frames, zmq.NOBLOCK, copy=False)
    except zmq.Again:
        logger.debug("send to broker would block; message dropped")


def _batch_wait(
    queues: dict[str, deque[Job]], max_batch: int, max_delay: float, now: float
) -> float | None:
    """Seconds the compute loop may block for new work: None (forever) when idle, 0 when a
    batch is ready, else until the oldest job has waited ``max_delay``."""
    if not queues:
        return None
    oldest = min(q[0].received for q in queues.values())
    if any(len(q) >= max_batch for q in queues.values()):
        return 0
    return max(0.0, oldest + max_delay - now)


def _pick_batch(
    queues: dict[str, deque[Job]],
    max_batch: int,
    max_delay: float,
    now: float,
    size_for: Callable[[str, list[Job], float], int] = lambda model, head, now: len(head),
) -> tuple[str, list[Job]] | None:
    """The next batch: from a full queue if any (oldest first), else from the oldest
    model's if its first job has waited ``max_delay``; of at most ``max_batch`` jobs,
    ``size_for(model, head, now)`` of them (head: the first ``max_batch``)."""
    if not queues:
        return None
    order = sorted(queues, key=lambda m: queues[m][0].received)
    chosen = next((m for m in order if len(queues[m]) >= max_batch), None)
    if chosen is None and now - queues[order[0]][0].received >= max_delay:
        chosen = order[0]
    if chosen is None:
        return None
    q = queues[chosen]
    size = size_for(chosen, list(itertools.islice(q, max_batch)), now)
    jobs = [q.popleft() for _ in range(max(1, size))]
    if not q:
        del queues[chosen]
    return chosen, jobs
