"""The worker's runtime: three threads around one backend, joined by queues.

Shaped like vllm's ``EngineCoreProc``: I/O threads around a busy loop.

- **I/O thread** (``workers.link.BrokerLink``, on the thread that calls ``run()``): the only
  one that touches the socket to the broker. Registers, takes requests, forwards answers,
  heartbeats while a batch runs (rule 7: I/O never waits for compute), reconnects with
  back-off when the broker goes silent, and keeps the session (what a forgotten
  registration held is dropped).
- **compute thread** (``workers.loops.ComputeLoop``): asks the ``workers.batcher.Batcher``
  what to run (batches per model, sized to their deadlines; expired, cancelled and
  too-late jobs refused), runs ``backend.forward`` and hands the batch on.
- **encode thread** (``workers.loops.EncodeLoop``): ``backend.encode`` (composite + JPEG), so
  that the JPEG work of batch k overlaps the forward pass of batch k+1; also serves
  ``video_frame``.

Requests go I/O -> compute -> encode through ``queue.Queue``s; answers come back to the I/O
thread through inproc sockets (``workers.outbox``).
"""

from __future__ import annotations

import logging
import os
import queue
import socket
import threading
from typing import Any

import zmq

from shared.config import WorkerConfig
from shared.logs import RateLimitedLog
from shared.modelstats import ModelStatsBook
from workers.backend import Backend
from workers.batcher import Batcher
from workers.jobs import Job
from workers.link import BrokerLink, reconnect_backoff
from workers.loops import ENCODE_DEPTH, ComputeLoop, EncodeLoop, Item, LoopContext
from workers.outbox import Outbox, model_map
from workers.servicetime import ServiceTimes
from workers.telemetry import LOG_EVERY_S, Counters


__all__ = ["ENCODE_DEPTH", "Job", "WorkerRuntime", "reconnect_backoff", "warm_up"]

logger = logging.getLogger("worker")

DRAIN_TIMEOUT_S = 5.0
"""How long a worker told to stop keeps serving what it holds (supervisord waits 20 s)."""


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
        self.service_times = ServiceTimes()  # batch start to answers ready, per model and size
        # First: it checks max_batch and batch_sizing before any socket exists.
        batcher = Batcher(
            config.max_batch, config.max_delay_ms / 1000, self.service_times, config.batch_sizing
        )
        self.config = config
        self.backend = backend
        self.worker_id = config.worker_id or f"{socket.gethostname()}:{os.getpid()}"
        self.capacity = config.capacity or 2 * config.max_batch
        self.heartbeat_s = config.heartbeat_s
        self.dead_after_s = config.heartbeat_s * config.liveness
        self.drain_timeout_s = drain_timeout_s
        self.counters = Counters()
        self.model_stats = ModelStatsBook()  # per model, sent in heartbeats (get_stats)
        self._own_context = context is None
        self._context: zmq.Context[Any] = context if context is not None else zmq.Context()
        self._inbox: queue.Queue[Item] = queue.Queue()
        self._encode_q: queue.Queue[Item] = queue.Queue()
        encode_slots = threading.Semaphore(ENCODE_DEPTH)
        log = RateLimitedLog(logger, every_s=LOG_EVERY_S)
        self._link = BrokerLink(
            config,
            self._context,
            worker_id=self.worker_id,
            capacity=self.capacity,
            device=str(backend.device),
            backend=str(backend.name),
            models=model_map(backend.models()),
            counters=self.counters,
            model_stats=self.model_stats,
            log=log,
            to_compute=self._inbox.put,
            to_encode=self._encode_q.put,
            drain_timeout_s=drain_timeout_s,
        )
        link, address = self._link, self._link.outbox_address
        ctx = LoopContext(
            backend=backend,
            worker_id=self.worker_id,
            counters=self.counters,
            model_stats=self.model_stats,
            service_times=self.service_times,
            log=log,
            session=lambda: link.session,
            outbox=lambda: Outbox(self._context, address, link.mailbox),
        )
        self._compute = ComputeLoop(ctx, self._inbox, batcher, self._encode_q, encode_slots)
        self._encode = EncodeLoop(ctx, self._encode_q, encode_slots, config.jpeg_quality)
        self._done = threading.Event()

    def stop(self) -> None:
        """Drain and leave (thread-safe; call it from a signal handler). A second call
        stops waiting for the drain."""
        self._link.stop()

    def run(self) -> int:
        threads = [
            threading.Thread(target=self._compute.run, name="compute", daemon=True),
            threading.Thread(target=self._encode.run, name="encode", daemon=True),
        ]
        for t in threads:
            t.start()
        try:
            self._link.run()
        finally:
            self._inbox.put(("stop", None))
            self._encode_q.put(("stop", None))
            for t in threads:
                t.join(timeout=10)
            self._link.close()
            if self._own_context:
                self._context.term()
            self._done.set()
        return 0


def warm_up(backend: Backend) -> None:
    """Call the backend's ``warmup()`` if it has one (the torch engine compiles and runs a
    first batch there), so that READY means ready."""
    warmup = getattr(backend, "warmup", None)
    if callable(warmup):
        warmup()
