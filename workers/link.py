"""The worker's link to the broker: the I/O thread of the vllm pattern, and the only one that
touches the DEALER socket.

It registers (READY, sent as soon as the socket exists: the broker learns of us whenever it
is up), takes requests and hands them on through queues (``infer`` and admin ops to the
compute thread, ``video_frame`` to the encode thread), forwards the answers the other
threads push to it (``workers.outbox``), heartbeats every interval whatever the compute
thread is doing (rule 7 of the internal protocol), and when the broker goes silent for
``liveness`` intervals (rule 3) closes the socket and reconnects with a growing back-off
(``reconnect_backoff``).

Sessions. Everything the worker holds belongs to one registration with one broker. When
the broker says DISCONNECT (it forgot us) or goes silent (it died), the session number goes
up: what the worker holds is counted ``dropped``, queued work of the old session is dropped
where it waits, and answers of it that finish later are not sent, since the broker that
would understand them is gone (a restarted broker reuses request ids).

Stopping. ``stop()`` starts a drain: READY with capacity 0 (no new work), the answers of
what is held, then DISCONNECT; a second ``stop()`` or the drain timeout cuts it short.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import zmq

from shared.config import WorkerConfig
from shared.envelope import (
    Cancel,
    Disconnect,
    EnvelopeError,
    Error,
    Heartbeat,
    Kind,
    Op,
    Ready,
    Request,
    decode,
    encode,
    peek_id,
)
from shared.errors import ErrorCode, ServiceError
from shared.logs import RateLimitedLog
from shared.modelstats import ModelStatsBook
from shared.zmqwire import recv_parts, send_parts
from workers.jobs import Job, job_from_request
from workers.outbox import ANSWER, CONTROL, Mailbox
from workers.telemetry import Counters


__all__ = ["BrokerLink", "reconnect_backoff"]

logger = logging.getLogger("worker")

_REPLY = bytes((Kind.REPLY,))


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


class BrokerLink:
    """The I/O thread's socket work (``run()``, on the calling thread, until drained).

    ``to_compute`` and ``to_encode`` hand items to the other threads' queues: ("jobs", [Job, ...])
    and ("cancel", (session, rid)) to compute, ("video", Job) to encode. ``session`` is the
    current session number: written here only, read by the other threads.
    """

    def __init__(
        self,
        config: WorkerConfig,
        context: zmq.Context[Any],
        *,
        worker_id: str,
        capacity: int,
        device: str,
        backend: str,
        models: dict[str, dict[str, Any]],
        counters: Counters,
        model_stats: ModelStatsBook,
        log: RateLimitedLog,
        to_compute: Callable[[tuple[str, Any]], None],
        to_encode: Callable[[tuple[str, Any]], None],
        drain_timeout_s: float,
    ) -> None:
        self.config = config
        self.worker_id = worker_id
        self.capacity = capacity
        self.device = device
        self.backend = backend
        self.heartbeat_s = config.heartbeat_s
        self.dead_after_s = config.heartbeat_s * config.liveness
        self.drain_timeout_s = drain_timeout_s
        self.counters = counters
        self.model_stats = model_stats
        self.log = log
        self._to_compute = to_compute
        self._to_encode = to_encode
        self._context = context
        self.outbox_address = f"inproc://worker-out-{id(self):x}"
        self._pull: zmq.Socket[Any] = context.socket(zmq.PULL)
        self._pull.setsockopt(zmq.LINGER, 0)
        self._pull.setsockopt(zmq.RCVHWM, 0)
        self._pull.bind(self.outbox_address)
        self.mailbox = Mailbox()  # answers of the other threads (workers.outbox)
        self._jobs: list[Job] = []  # taken while draining the socket, handed over at once
        self.session = 0
        self._held = 0  # requests of the current session not yet answered
        self._models = models  # as announced; replaced whole
        self._stopping = threading.Event()
        self._force = threading.Event()

    def stop(self) -> None:
        """Drain and leave (thread-safe). A second call stops waiting for the drain."""
        if self._stopping.is_set():
            self._force.set()
        self._stopping.set()

    def close(self) -> None:
        """After ``run()`` and after the other threads closed their outboxes."""
        self._pull.close(linger=0)

    def run(self) -> None:
        """Serve the broker until a drain ends."""
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
                        frames = [f.bytes for f in recv_parts(sock)]
                    except zmq.Again:
                        break
                    last_seen = time.monotonic()
                    backoff = self.heartbeat_s
                    self._from_broker(sock, frames)
                self._hand_over_jobs()
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
            device=self.device,
            backend=self.backend,
            models=self._models,
        )

    def _new_session(self) -> None:
        """Forget what we hold: counted once here as ``dropped``; queued jobs of the old
        session are skipped later, answers of it that still finish are not sent."""
        self.session += 1
        if self._held:
            self.counters.add("dropped", self._held)
        self._held = 0

    def _from_broker(self, sock: zmq.Socket[Any], frames: list[bytes]) -> None:
        try:
            message = decode(frames)
        except EnvelopeError as exc:
            self.log.warning("bad message from broker: %s", exc)
            rid = peek_id(frames) if len(frames) >= 2 else None
            if rid is not None:  # an answer frees the broker's credit
                self._answer_error(sock, rid, ErrorCode.BAD_REQUEST, str(exc))
            return
        header = message.header
        if isinstance(header, Request):
            self._take(sock, header, message.payload)
        elif isinstance(header, Cancel):
            self._hand_over_jobs()  # the job it cancels may be among them
            self._to_compute(("cancel", (self.session, header.id)))
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
            self.log.warning("unexpected %s from broker", message.kind.name.lower())

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
            fps = _fps(self._models.get(h.model))
            job = job_from_request(h, payload, now, self.session, self.config.jpeg_quality, fps)
        except ServiceError as exc:
            self.counters.add("errors")
            self._answer_error(sock, h.id, exc.code, exc.message)
            return
        self._held += 1
        if h.op == Op.VIDEO_FRAME:
            self._to_encode(("video", job))
        else:
            self._jobs.append(job)

    def _hand_over_jobs(self) -> None:
        """The jobs taken since the last hand-over, to the compute thread in one item:
        one queue operation (and one wake-up of that thread) per drain, not per job."""
        if self._jobs:
            jobs, self._jobs = self._jobs, []
            self._to_compute(("jobs", jobs))

    def _answer_error(self, sock: zmq.Socket[Any], rid: int, code: ErrorCode, message: str) -> None:
        _send(sock, encode(Error(id=rid, code=code.value, message=message, worker=self.worker_id)))

    def _drain_outbox(self, sock: zmq.Socket[Any] | None) -> None:
        while True:  # the doorbells: their count means nothing, the mailbox says what came
            try:
                self._pull.recv(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                break
        mailbox = self.mailbox
        mailbox.rung = False  # before draining: a put after this rings again
        entries = mailbox.entries
        while entries:
            tag, session, frames = entries.popleft()
            if tag == ANSWER:
                if session != self.session:
                    # An answer for a broker that forgot us: nobody to give it to. Its
                    # request was counted ``dropped`` when the session ended, and ``served``
                    # or ``errors`` when it finished: take the latter back, so that each
                    # request counts once (received = served + errors + dropped).
                    served = frames[0] == _REPLY
                    self.counters.add("served" if served else "errors", -1)
                    continue
                self._held -= 1
            elif tag == CONTROL:
                message = decode(frames)
                if isinstance(message.header, Ready):  # models changed: re-announce
                    self._models = message.header.models
                    frames = encode(self._ready(0 if self._stopping.is_set() else None))
            if sock is not None:
                _send(sock, frames)


def _send(sock: zmq.Socket[Any], frames: Sequence[Any]) -> None:
    """Send without blocking the I/O thread; a full queue means the broker is not reading,
    which heartbeats will notice."""
    try:
        send_parts(sock, frames)
    except zmq.Again:
        logger.debug("send to broker would block; message dropped")


def _fps(meta: dict[str, Any] | None) -> float:
    """A loaded model's frame rate, as READY announces it (25 when it does not say)."""
    fps = meta.get("fps") if meta else None
    return float(fps) if isinstance(fps, int | float) and fps > 0 else 25.0
