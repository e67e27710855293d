"""The broker: a ROUTER facing gateways, a ROUTER facing workers, and a loop between them.

Shaped like zguide's Majordomo broker: one thread, one poller, and a class of small verbs
(``process_client``, ``process_worker``, ``dispatch``, ``purge``, ``send_heartbeats``). The
broker reads only the small msgpack header of each message; payload frames (audio in, JPEG
out) are forwarded as the same ``zmq.Frame`` objects, never copied or parsed.

What it promises (DESIGN.md section 3):

- rule 1, exactly one answer: every accepted request ends in exactly one REPLY or ERROR to
  its gateway; answers from workers that no longer own a request are dropped;
- rule 2, credits: see ``broker.registry``;
- rule 3, heartbeats: every peer hears from the broker at least once an interval, and a peer
  silent for ``liveness`` intervals is dead;
- rule 4, worker death: its in-flight requests go once more to another holder of the model
  if their deadline allows, else they are answered ``worker_lost``;
- rule 5, deadlines: ``ttl_ms`` becomes a deadline on the broker's clock; queued requests
  that pass it are answered ``deadline_exceeded``; a worker gets only the time left. A
  request a worker holds past its deadline plus a grace is answered here too, while its
  credit stays taken until the worker answers, so a hung worker stops getting work;
- rule 6, bounded memory: one queue per model, ``queue_limit`` long, ``overloaded`` beyond.

A broker that has just started knows no worker yet: for its first ``warmup_s`` (two liveness
periods by default: a worker notices a restart within one, and its reconnect back-off lasts
at most one more) a request for a model nobody holds waits in that model's queue (a
metadata request in a list as bounded) instead of failing ``unknown_model``; a restart is
then a pause for the streams going through it, not an error.

Nothing a peer sends can crash it: bad messages are counted, logged at a limited rate and
answered ``bad_request`` when they carry a usable request id.
"""

from __future__ import annotations

import errno
import logging
import secrets
import signal
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

import zmq

from broker.fanout import Fanouts
from broker.registry import GatewayRecord, Registry, WorkerRecord
from broker.requests import MAX_ATTEMPTS, Pending, Timers
from shared.config import BrokerConfig
from shared.envelope import (
    Cancel,
    Disconnect,
    EnvelopeError,
    Error,
    Heartbeat,
    Message,
    Op,
    Ready,
    Reply,
    Request,
    decode,
    encode,
    peek_id,
)
from shared.errors import ErrorCode
from shared.logs import setup_logging


__all__ = ["Broker", "run"]

logger = logging.getLogger("broker")

INFLIGHT_GRACE_S = 0.5
"""How long past its deadline a request may sit at a worker before the broker answers it
``deadline_exceeded`` itself (a worker finishing a batch just late still gets through)."""
MAX_TTL_MS = 60_000
"""Longer ttls are clamped: a frame nobody sees within a minute is worth nothing."""
MAX_REQUEST_PAYLOAD = 16 << 20
MAX_FRAME_BYTES = 64 << 20  # ZMQ_MAXMSGSIZE: a peer sending more is disconnected
MAX_CAPACITY = 100_000
GATEWAY_FORGET_S = 60.0
DRAIN_BATCH = 512
"""Messages read from one socket before looking at the other (fairness, and timers)."""
MALFORMED_LOG_EVERY_S = 5.0
CLOSING_S = 0.3
"""How long a stopping broker keeps its connections open after its last answers."""


class Broker:
    """The broker as an object: bind in ``__init__``, ``serve()`` until ``stop()``.

    ``serve`` runs the loop in the calling thread (``run`` uses the main thread; tests may
    use another one). ``stop`` is thread-safe. ``frontend_endpoint`` and
    ``backend_endpoint`` are the resolved addresses (useful with ``tcp://127.0.0.1:*``).
    """

    def __init__(self, config: BrokerConfig, *, context: zmq.Context[Any] | None = None) -> None:
        self.config = config
        self.heartbeat_s = config.heartbeat_s
        self.dead_after_s = config.heartbeat_s * config.liveness
        self._own_context = context is None
        self._context: zmq.Context[Any] = context if context is not None else zmq.Context()
        self.frontend = self._router(config.frontend)
        self.backend = self._router(config.backend, curve_secret_file=config.curve_secret_file)
        self.frontend_endpoint = self.frontend.getsockopt_string(zmq.LAST_ENDPOINT)
        self.backend_endpoint = self.backend.getsockopt_string(zmq.LAST_ENDPOINT)
        self._stop = threading.Event()
        self._closing = False  # stopped serving: new requests are refused shutting_down
        self._debug = logger.isEnabledFor(logging.DEBUG)

        self.registry = Registry()
        self.gateways: dict[bytes, GatewayRecord] = {}
        self.requests: dict[int, Pending] = {}
        self._by_gateway: dict[tuple[bytes, int], Pending] = {}
        self.queues: dict[str, deque[Pending]] = {}
        self._timers = Timers()
        self.fanouts = Fanouts(self)  # admin ops sent to several workers
        self._next_bid = 1
        self._told_to_leave: dict[bytes, float] = {}  # zombies sent DISCONNECT, rate limit
        self._next_housekeeping = 0.0
        self._started = time.monotonic()
        self.warmup_s = config.warmup_s if config.warmup_s >= 0 else 2 * self.dead_after_s
        self._warm_until = self._started + self.warmup_s
        self.warming = self.warmup_s > 0
        # metadata requests for models nobody holds yet, while warming: (gateway, id,
        # model, deadline); answered when a holder registers, at their deadline, or at the
        # end of the warm-up
        self._parked: list[tuple[bytes, int, str, float]] = []
        # Drawn at each start and sent in every heartbeat: a gateway that sees it change
        # knows its requests in flight went down with the previous broker.
        self.instance = secrets.token_hex(8)
        self._heartbeat = encode(Heartbeat(instance=self.instance))
        self._malformed_logged_at = -MALFORMED_LOG_EVERY_S
        self._malformed_suppressed = 0
        self.totals: dict[str, Any] = {
            "requests": 0,
            "answered": {},
            "overloaded": 0,
            "expired": 0,
            "redispatched": 0,
            "malformed": 0,
            "cancelled": 0,
            "stale": 0,
            "undeliverable": 0,
            "waited_for_workers": 0,
            "discarded": 0,
        }

    def _router(self, endpoint: str, *, curve_secret_file: str = "") -> zmq.Socket[Any]:
        sock: zmq.Socket[Any] = self._context.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        # Unroutable sends raise EHOSTUNREACH instead of vanishing: a gone peer is news.
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        sock.setsockopt(zmq.SNDHWM, 50_000)
        sock.setsockopt(zmq.RCVHWM, 50_000)
        sock.setsockopt(zmq.MAXMSGSIZE, MAX_FRAME_BYTES)
        if curve_secret_file:
            sock.setsockopt(zmq.CURVE_SERVER, 1)
            sock.setsockopt(zmq.CURVE_SECRETKEY, _curve_secret(curve_secret_file))
        sock.bind(endpoint)
        return sock

    # -- lifecycle ---------------------------------------------------------------------

    def stop(self) -> None:
        """Ask ``serve`` to return (thread-safe, signal-safe)."""
        self._stop.set()

    def serve(self) -> None:
        """Run the loop until ``stop()``; then answer what is pending and tell workers."""
        logger.info(
            "broker %s listening: gateways on %s, workers on %s (heartbeat %.2fs x %d); "
            "requests for models no worker holds yet wait up to %.1f s for workers to register",
            self.instance,
            self.frontend_endpoint,
            self.backend_endpoint,
            self.heartbeat_s,
            self.config.liveness,
            self.warmup_s,
        )
        poller = zmq.Poller()
        poller.register(self.frontend, zmq.POLLIN)
        poller.register(self.backend, zmq.POLLIN)
        while not self._stop.is_set():
            events = dict(poller.poll(self._poll_timeout_ms()))
            if self.backend in events:
                self._drain(self.backend, self.process_worker)
            if self.frontend in events:
                self._drain(self.frontend, self.process_client)
            now = time.monotonic()
            self.process_timers(now)
            if now >= self._next_housekeeping:
                self._next_housekeeping = now + self.heartbeat_s / 4
                self.purge(now)
                self.send_heartbeats(now)
            self.dispatch_all(now)
        self._shutdown()

    def close(self, *, linger_ms: int = 0) -> None:
        """Close the sockets; ``linger_ms`` lets the last answers and DISCONNECTs out."""
        self.frontend.close(linger=linger_ms)
        self.backend.close(linger=linger_ms)
        if self._own_context:
            self._context.term()

    def _shutdown(self) -> None:
        pending = [p for p in self.requests.values() if not p.orphan]
        for p in pending:
            self._answer_error(p, ErrorCode.SHUTTING_DOWN, "broker shutting down")
        parked, self._parked = self._parked, []
        for identity, gid, _model, _deadline in parked:
            self._error_to_gateway(identity, gid, ErrorCode.SHUTTING_DOWN, "broker shutting down")
        for record in self.registry:
            self._send_worker(record, encode(Disconnect(reason="broker shutting down")))
        logger.info(
            "broker stopping: answered %d pending requests, told %d workers",
            len(pending) + len(parked),
            len(self.registry),
        )
        self._closing = True
        self._keep_answering(CLOSING_S)

    def _keep_answering(self, seconds: float) -> None:
        """Keep the connections open a moment after the last answers, refusing new requests
        ``shutting_down``: a gateway reads those answers before its connection drops (a
        ZeroMQ socket with ``ZMQ_IMMEDIATE``, as BrokerClient's, discards what it has not
        read when the connection goes, and the caller would only hear "connection lost")."""
        end = time.monotonic() + seconds
        while (left := end - time.monotonic()) > 0:
            if self.frontend.poll(max(1, int(left * 1000)), zmq.POLLIN):
                self._drain(self.frontend, self.process_client)

    def _poll_timeout_ms(self) -> int:
        now = time.monotonic()
        wake = self._next_housekeeping
        timer = self._timers.next_time()
        if timer is not None:
            wake = min(wake, timer)
        if self.warming:
            wake = min(wake, self._warm_until)
        # Capped so that stop() (from a signal handler) is noticed promptly.
        return max(0, min(100, int((wake - now) * 1000) + 1))

    def _drain(self, sock: zmq.Socket[Any], handle: Callable[[list[Any]], None]) -> None:
        for _ in range(DRAIN_BATCH):
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            try:
                handle(frames)
            except Exception:  # a bug must not take every client down with it
                logger.exception("error while handling a message; message dropped")

    # -- gateways ----------------------------------------------------------------------

    def process_client(self, frames: list[Any]) -> None:
        """One message from a gateway: REQUEST, CANCEL, HEARTBEAT or DISCONNECT."""
        now = time.monotonic()
        identity = frames[0].bytes
        gateway = self.gateways.get(identity)
        if gateway is None:
            gateway = self.gateways[identity] = GatewayRecord(identity, now)
            logger.info("gateway %s connected", identity.hex())
        gateway.last_seen = now
        body = frames[1:]
        try:
            message = decode(body)
        except EnvelopeError as exc:
            self._malformed("gateway", identity, str(exc))
            rid = peek_id(body) if len(body) >= 2 else None
            if rid is not None:
                self._error_to_gateway(identity, rid, ErrorCode.BAD_REQUEST, str(exc))
            return
        header = message.header
        if isinstance(header, Request):
            self.process_request(identity, header, message.payload, now)
        elif isinstance(header, Cancel):
            self.process_cancel(identity, header.id)
        elif isinstance(header, Heartbeat):
            # Echoed, so a gateway hears from us at its own interval whatever ours is.
            self._heartbeat_gateway(gateway, now)
        elif isinstance(header, Disconnect):
            logger.info("gateway %s disconnected: %s", identity.hex(), header.reason or "-")
            self.gateways.pop(identity, None)
        else:
            why = f"unexpected {message.kind.name.lower()} from a gateway"
            self._malformed("gateway", identity, why)
            rid = getattr(header, "id", None)
            if isinstance(rid, int):
                self._error_to_gateway(identity, rid, ErrorCode.BAD_REQUEST, why)

    def process_request(
        self, identity: bytes, header: Request, payload: list[Any], now: float
    ) -> None:
        self.totals["requests"] += 1
        gid = header.id
        if self._closing:
            self._error_to_gateway(identity, gid, ErrorCode.SHUTTING_DOWN, "broker shutting down")
            return
        if self._debug:
            logger.debug(
                "< request %s/%d %s %s#%d",
                identity.hex(),
                gid,
                header.op,
                header.model,
                header.frame,
            )
        if (identity, gid) in self._by_gateway:
            self._error_to_gateway(identity, gid, ErrorCode.BAD_REQUEST, "request id in use")
            return
        op = header.op
        if op not in Op.ALL:
            self._error_to_gateway(identity, gid, ErrorCode.BAD_REQUEST, f"unknown op {op!r}")
            return
        if op == Op.LIST_MODELS:
            self._reply_to_gateway(identity, gid, {"models": self.registry.models()})
            return
        if op == Op.STATS:
            self._reply_to_gateway(identity, gid, self.stats())
            return
        if op == Op.METADATA:
            ttl_s = min(max(header.ttl_ms, 0), MAX_TTL_MS) / 1000
            self._metadata(identity, gid, header.model, now + ttl_s)
            return
        if sum(_frame_len(f) for f in payload) > MAX_REQUEST_PAYLOAD:
            self._error_to_gateway(identity, gid, ErrorCode.BAD_REQUEST, "payload too large")
            return
        if header.ttl_ms <= 0:
            self.totals["expired"] += 1
            self._error_to_gateway(identity, gid, ErrorCode.DEADLINE_EXCEEDED, "ttl <= 0")
            return
        ttl_ms = min(header.ttl_ms, MAX_TTL_MS)
        if op in (Op.LOAD_PACKAGE, Op.UNLOAD_PACKAGE):
            self._admin(identity, header, payload, now + ttl_ms / 1000)
            return
        model = header.model
        if not model:
            self._error_to_gateway(identity, gid, ErrorCode.BAD_REQUEST, "model is required")
            return
        held = self.registry.holds(model)
        if not held and not self.warming:
            self._error_to_gateway(
                identity, gid, ErrorCode.UNKNOWN_MODEL, f"no worker holds model {model!r}"
            )
            return
        queue = self.queues.get(model)
        if queue and len(queue) >= self.config.queue_limit:
            self.totals["overloaded"] += 1
            self._error_to_gateway(
                identity, gid, ErrorCode.OVERLOADED, f"queue for model {model!r} is full"
            )
            return
        p = self._accept(identity, header, payload, now + ttl_ms / 1000)
        if not held:  # warming up: wait for a worker that holds it to register
            self.totals["waited_for_workers"] += 1
        elif not queue:
            worker = self.registry.choose(model, _stream(p))
            if worker is not None:
                if not self._send_request(worker, p, now):
                    self._requeue(p)
                return
        self._enqueue(p)

    def process_cancel(self, identity: bytes, gid: int) -> None:
        """The gateway gave up: drop a queued request, or tell its worker. The worker still
        answers (that frees the credit), and that answer is then dropped here."""
        p = self._by_gateway.pop((identity, gid), None)
        if p is None:
            kept = [k for k in self._parked if k[:2] != (identity, gid)]
            if len(kept) < len(self._parked):  # a metadata request waiting for workers
                self.totals["cancelled"] += 1
                self._parked = kept
            return
        self.totals["cancelled"] += 1
        p.orphan = True
        if p.queued:
            self._unqueue(p)
            self._forget(p)
        elif p.worker is not None:
            self._send_worker(p.worker, encode(Cancel(id=p.bid)))

    def _metadata(
        self, identity: bytes, gid: int, model: str, deadline: float, *, park: bool = True
    ) -> None:
        holders = self.registry.holders(model)
        if (
            not holders
            and park
            and self.warming
            and model
            and len(self._parked) < self.config.queue_limit
        ):
            self.totals["waited_for_workers"] += 1
            self._parked.append((identity, gid, model, deadline))
            return
        if not holders:
            self._error_to_gateway(
                identity, gid, ErrorCode.UNKNOWN_MODEL, f"no worker holds model {model!r}"
            )
            return
        result = dict(holders[0].models[model])
        result["model_name"] = model
        # what a pipelining client may keep in flight without its requests queueing here
        result["workers"] = len(holders)
        result["capacity"] = sum(h.capacity for h in holders)
        self._reply_to_gateway(identity, gid, result)

    def _admin(self, identity: bytes, header: Request, payload: list[Any], deadline: float) -> None:
        """load_package / unload_package: forwarded as is to the named worker (opts
        "worker") or to the least busy one, regardless of credits (rare, operator-driven).
        The worker re-announces itself with READY when its model set changes. With
        opts "workers" (all, a count, a worker id) see ``broker.fanout``."""
        if "workers" in header.opts:
            self.fanouts.start(identity, header, payload, deadline)
            return
        name = header.opts.get("worker")
        if name is not None and not isinstance(name, str):
            self._error_to_gateway(identity, header.id, ErrorCode.BAD_REQUEST, "bad worker name")
            return
        worker = self.registry.by_id(name) if name else self.registry.choose_any()
        if worker is None:
            message = f"no worker named {name!r}" if name else "no worker connected"
            self._error_to_gateway(identity, header.id, ErrorCode.BAD_REQUEST, message)
            return
        p = self._accept(identity, header, payload, deadline)
        p.attempts = MAX_ATTEMPTS - 1  # never re-sent elsewhere: it was meant for this one
        if not self._send_request(worker, p, time.monotonic()):
            self._answer_error(p, ErrorCode.WORKER_LOST, "worker unreachable")

    # -- workers -----------------------------------------------------------------------

    def process_worker(self, frames: list[Any]) -> None:
        """One message from a worker: READY, HEARTBEAT, REPLY, ERROR or DISCONNECT."""
        now = time.monotonic()
        identity = frames[0].bytes
        record = self.registry.get(identity)
        if record is not None:
            record.last_seen = now
        body = frames[1:]
        try:
            message = decode(body)
        except EnvelopeError as exc:
            self._malformed("worker", identity, str(exc))
            rid = peek_id(body) if len(body) >= 2 else None
            if record is not None and rid is not None and rid in record.in_flight:
                # A reply we cannot read still ends the request: answer it, free the credit.
                p = record.in_flight.pop(rid)
                record.errors += 1
                self._answer_error(p, ErrorCode.INTERNAL, "malformed answer from worker")
            return
        header = message.header
        if isinstance(header, Ready):
            self.process_ready(identity, header, now)
        elif isinstance(header, Disconnect):
            if record is not None:
                self.worker_gone(record, f"left ({header.reason or 'no reason given'})", now)
        elif record is None:
            # Not registered (declared dead, or a broker restart it has not noticed): any
            # reply it sends is stale. Tell it to register again.
            if isinstance(header, Reply | Error):
                self.totals["stale"] += 1
            self._tell_to_leave(identity, now)
        elif isinstance(header, Heartbeat):
            record.reported_in_flight = header.in_flight
            record.counters = header.stats
            self._send_worker(record, self._heartbeat)  # echoed, as for gateways
        elif isinstance(header, Reply | Error):
            self.process_answer(record, message)
        else:
            self._malformed("worker", identity, f"unexpected {message.kind.name.lower()}")

    def process_ready(self, identity: bytes, header: Ready, now: float) -> None:
        """Register a worker, or refresh one (a worker re-announces when its models change,
        and announces capacity 0 when it drains before leaving)."""
        problem = _check_ready(header)
        if problem:
            self._malformed("worker", identity, f"bad ready: {problem}")
            return
        record = self.registry.get(identity)
        if record is not None:
            changed = record.capacity != header.capacity or set(record.models) != set(header.models)
            record.capacity = header.capacity
            record.models = header.models
            record.device, record.backend = header.device, header.backend
            self.registry.reindex()
            if changed:
                logger.info(
                    "worker %s updated: capacity %d, models %s",
                    record.id,
                    record.capacity,
                    ",".join(sorted(record.models)) or "-",
                )
                self._fail_unheld_queues(now)
            return
        previous = self.registry.by_id(header.worker)
        if previous is not None:
            # Same worker on a new connection (it reconnected after losing us): the old
            # connection is gone, and so is anything in flight on it.
            self.worker_gone(previous, "replaced by a new connection", now)
        record = WorkerRecord(
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
        self.registry.add(record)
        self._told_to_leave.pop(identity, None)
        logger.info(
            "worker %s joined: %s backend on %s, capacity %d, models %s (pid %d on %s)",
            record.id,
            record.backend or "?",
            record.device or "?",
            record.capacity,
            ",".join(sorted(record.models)) or "-",
            record.pid,
            record.host or "?",
        )

    def process_answer(self, record: WorkerRecord, message: Message) -> None:
        """A REPLY or ERROR from a registered worker: route it to the gateway, once."""
        header = message.header
        assert isinstance(header, Reply | Error)
        p = record.in_flight.pop(header.id, None)
        if p is None:
            # Not (or no longer) this worker's: e.g. re-dispatched after it was declared
            # dead, then it came back. The request already has, or will get, its answer.
            self.totals["stale"] += 1
            if self._debug:
                logger.debug("stale answer %d from worker %s dropped", header.id, record.id)
            return
        if isinstance(header, Reply):
            record.served += 1
        else:
            record.errors += 1
        self._forget(p)
        if p.orphan:  # cancelled, or answered here at its deadline: nobody waits for it
            if not (isinstance(header, Error) and header.code == ErrorCode.CANCELLED.value):
                self.totals["discarded"] += 1  # computed (or failed) for nobody
            return
        self._by_gateway.pop((p.gateway, p.gid), None)
        header.id = p.gid
        if not header.worker:
            header.worker = record.id
        outcome = "ok" if isinstance(header, Reply) else header.code
        self._to_gateway(p.gateway, encode(header, message.payload), outcome)

    def worker_gone(self, record: WorkerRecord, reason: str, now: float) -> None:
        """Forget a worker (it left, went silent, or became unreachable) and deal with what
        it held: re-dispatch once where the deadline allows (rule 4), else ``worker_lost``."""
        self.registry.remove(record)
        held = sorted(record.in_flight.values(), key=lambda p: p.bid, reverse=True)
        record.in_flight.clear()
        log = logger.info if reason.startswith("left") and not held else logger.warning
        log("worker %s %s; %d requests were in flight", record.id, reason, len(held))
        for p in held:  # newest first, so appendleft keeps the original order
            p.worker = None
            if p.orphan:
                self._forget(p)
            elif (
                p.attempts < MAX_ATTEMPTS
                and p.deadline > now
                and self.registry.holds(p.header.model)
            ):
                self.totals["redispatched"] += 1
                self._enqueue(p, front=True)
            else:
                self._answer_error(p, ErrorCode.WORKER_LOST, f"worker {record.id} lost")
        self._fail_unheld_queues(now)

    def _fail_unheld_queues(
        self, now: float, code: ErrorCode = ErrorCode.WORKER_LOST, why: str = " any more"
    ) -> None:
        """Queued requests for a model nobody holds (any more) would only wait for their
        deadline: answer them now. While warming up they wait for workers to register."""
        if self.warming:
            return
        for model in [m for m in self.queues if not self.registry.holds(m)]:
            for p in self.queues.pop(model):
                p.queued = False
                if not p.orphan:
                    self._answer_error(p, code, f"no worker holds model {model!r}{why}")

    def _tell_to_leave(self, identity: bytes, now: float) -> None:
        last = self._told_to_leave.get(identity)
        if last is not None and now - last < self.heartbeat_s:
            return
        self._told_to_leave[identity] = now
        try:
            self.backend.send_multipart(
                [identity, *encode(Disconnect(reason="not registered: send ready"))],
                zmq.NOBLOCK,
            )
        except zmq.ZMQError:
            pass
        logger.info("unregistered worker %s told to register again", identity.hex())

    # -- dispatch ----------------------------------------------------------------------

    def dispatch_all(self, now: float) -> None:
        for model in list(self.queues):
            self.dispatch(model, now)

    def dispatch(self, model: str, now: float) -> None:
        """Hand queued requests of ``model`` to workers while any has a free credit."""
        queue = self.queues.get(model)
        while queue:
            worker = self.registry.choose(model, _stream(queue[0]))
            if worker is None:
                break
            p = queue.popleft()
            p.queued = False
            if p.deadline <= now:
                self._expire(p)
                continue
            if not self._send_request(worker, p, now):
                self._requeue(p)
                queue = self.queues.get(model)
        if queue is not None and not queue:
            del self.queues[model]

    def _requeue(self, p: Pending) -> None:
        """Put back a request whose worker turned out to be gone, unless nobody is left
        who holds its model."""
        if self.registry.holds(p.header.model):
            self._enqueue(p, front=True)
        else:
            self._answer_error(
                p, ErrorCode.WORKER_LOST, f"no worker holds model {p.header.model!r}"
            )

    def _send_request(self, worker: WorkerRecord, p: Pending, now: float) -> bool:
        """Send ``p`` to ``worker`` with the time it has left. False if the worker turned
        out to be unreachable (it is then declared dead)."""
        h = p.header
        ttl_ms = max(1, int((p.deadline - now) * 1000))
        header = Request(
            id=p.bid, op=h.op, model=h.model, frame=h.frame, ttl_ms=ttl_ms, opts=h.opts
        )
        if not self._send_worker(worker, encode(header, p.payload)):
            return False
        p.worker = worker
        p.attempts += 1
        worker.in_flight[p.bid] = p
        self.registry.assigned(worker, _stream(p))
        self._timers.push(p.deadline + INFLIGHT_GRACE_S, p.bid)
        if self._debug:
            logger.debug("> request %d to %s (ttl %d ms)", p.bid, worker.id, ttl_ms)
        return True

    def _send_worker(self, worker: WorkerRecord, frames: list[Any]) -> bool:
        try:
            self.backend.send_multipart([worker.identity, *frames], zmq.NOBLOCK, copy=False)
        except zmq.ZMQError as exc:
            if exc.errno not in (errno.EHOSTUNREACH, zmq.EAGAIN):
                raise
            why = "unreachable" if exc.errno == errno.EHOSTUNREACH else "not reading"
            if self.registry.get(worker.identity) is worker:
                self.worker_gone(worker, f"dead ({why})", time.monotonic())
            return False
        worker.last_sent = time.monotonic()
        return True

    # -- requests bookkeeping ------------------------------------------------------------

    def _accept(
        self, identity: bytes, header: Request, payload: list[Any], deadline: float
    ) -> Pending:
        bid = self._next_bid
        self._next_bid += 1
        p = Pending(bid, identity, header.id, header, payload, deadline)
        self.requests[bid] = p
        self._by_gateway[(identity, header.id)] = p
        return p

    def _enqueue(self, p: Pending, *, front: bool = False) -> None:
        queue = self.queues.setdefault(p.header.model, deque())
        if front:
            queue.appendleft(p)
        else:
            queue.append(p)
        p.queued = True
        self._timers.push(p.deadline, p.bid)

    def _unqueue(self, p: Pending) -> None:
        queue = self.queues.get(p.header.model)
        if queue is not None and p.queued:
            try:
                queue.remove(p)  # at most queue_limit long
            except ValueError:
                pass
            if not queue:
                del self.queues[p.header.model]
        p.queued = False

    def _forget(self, p: Pending) -> None:
        self.requests.pop(p.bid, None)
        if not p.orphan:
            self._by_gateway.pop((p.gateway, p.gid), None)

    def _expire(self, p: Pending) -> None:
        model = p.header.model
        if not self.registry.holds(model):  # waited for workers (warm-up) in vain
            self._answer_error(p, ErrorCode.UNKNOWN_MODEL, f"no worker holds model {model!r}")
            return
        self.totals["expired"] += 1
        self._answer_error(p, ErrorCode.DEADLINE_EXCEEDED, "deadline passed while queued")

    def _end_warmup(self, now: float) -> None:
        """The workers have had their time to register: from now on a model nobody holds
        is unknown, and what waited for one is answered so."""
        self.warming = False
        waiting = sum(len(q) for m, q in self.queues.items() if not self.registry.holds(m))
        waiting += sum(1 for k in self._parked if not self.registry.holds(k[2]))
        logger.info(
            "warm-up over after %.1f s: %d workers, models %s%s",
            now - self._started,
            len(self.registry),
            ",".join(self.registry.models()) or "-",
            f"; {waiting} requests for models nobody holds answered unknown_model"
            if waiting
            else "",
        )
        self._fail_unheld_queues(now, ErrorCode.UNKNOWN_MODEL, "")

    def _answer_parked(self, now: float) -> None:
        """Metadata requests that waited for workers: answer those whose model is now held,
        whose deadline came, or all of them once the warm-up is over."""
        parked, self._parked = self._parked, []
        for identity, gid, model, deadline in parked:
            if self.registry.holds(model) or not self.warming or deadline <= now:
                self._metadata(identity, gid, model, deadline, park=False)
            else:
                self._parked.append((identity, gid, model, deadline))

    def process_timers(self, now: float) -> None:
        """Deadlines: expire queued requests; answer requests a worker holds too long; end
        the warm-up, and answer the metadata requests that waited in it."""
        if self.warming and now >= self._warm_until:
            self._end_warmup(now)
        if self._parked:
            self._answer_parked(now)
        for bid in self._timers.pop_due(now):
            p = self.requests.get(bid)
            if p is None or p.orphan:
                continue
            if p.queued:
                if p.deadline <= now:
                    self._unqueue(p)
                    self._expire(p)
            elif p.worker is not None and now >= p.deadline + INFLIGHT_GRACE_S:
                # Keep the credit taken (the worker still holds it) but answer the gateway.
                self.totals["expired"] += 1
                self._by_gateway.pop((p.gateway, p.gid), None)
                p.orphan = True
                self._error_to_gateway(
                    p.gateway,
                    p.gid,
                    ErrorCode.DEADLINE_EXCEEDED,
                    f"no answer from worker {p.worker.id} by the deadline",
                )
        self._timers.compact(self.requests)

    # -- answers to gateways ---------------------------------------------------------------

    def _answer_error(self, p: Pending, code: ErrorCode, message: str) -> None:
        """End ``p`` with an error (once: it is forgotten and orphaned here)."""
        if p.queued:
            self._unqueue(p)
        self._forget(p)
        if p.orphan:
            return
        p.orphan = True
        self._error_to_gateway(p.gateway, p.gid, code, message)

    def _error_to_gateway(self, identity: bytes, gid: int, code: ErrorCode, message: str) -> None:
        if self._debug:
            logger.debug("> error %s/%d %s: %s", identity.hex(), gid, code.value, message)
        self._to_gateway(
            identity, encode(Error(id=gid, code=code.value, message=message)), code.value
        )

    def _reply_to_gateway(self, identity: bytes, gid: int, result: Any) -> None:
        self._to_gateway(identity, encode(Reply(id=gid, worker="broker", result=result)), "ok")

    def _to_gateway(self, identity: bytes, frames: Sequence[Any], outcome: str) -> None:
        if self.fanouts.owns(identity):  # one worker's part of a fanned-out admin op
            self.fanouts.answer(identity, frames)
            return
        answered = self.totals["answered"]
        answered[outcome] = answered.get(outcome, 0) + 1
        try:
            self.frontend.send_multipart([identity, *frames], zmq.NOBLOCK, copy=False)
        except zmq.ZMQError as exc:
            if exc.errno not in (errno.EHOSTUNREACH, zmq.EAGAIN):
                raise
            self.totals["undeliverable"] += 1
            if self._debug:
                logger.debug("answer to gateway %s undeliverable: %s", identity.hex(), exc)
            return
        gateway = self.gateways.get(identity)
        if gateway is not None:
            gateway.last_sent = time.monotonic()

    # -- liveness ----------------------------------------------------------------------

    def purge(self, now: float) -> None:
        """Declare silent peers dead (rule 3)."""
        for record in self.registry:
            silent = now - record.last_seen
            if silent > self.dead_after_s:
                self.worker_gone(record, f"dead (silent for {silent:.1f} s)", now)
        # Gateways are only heartbeated, never relied on: forget them late, so that one with
        # a slower heartbeat than ours is not forgotten and re-greeted every interval.
        for identity, gateway in list(self.gateways.items()):
            if now - gateway.last_seen > max(self.dead_after_s, GATEWAY_FORGET_S):
                del self.gateways[identity]
                logger.info("gateway %s gone silent; forgotten", identity.hex())
        if self._told_to_leave:
            self._told_to_leave = {
                i: t for i, t in self._told_to_leave.items() if now - t < self.dead_after_s
            }

    def send_heartbeats(self, now: float) -> None:
        """Every peer hears from us at least once an interval (rule 3)."""
        for record in self.registry:
            if now - record.last_sent >= self.heartbeat_s:
                self._send_worker(record, self._heartbeat)
        for gateway in list(self.gateways.values()):
            if now - gateway.last_sent >= self.heartbeat_s:
                self._heartbeat_gateway(gateway, now)

    def _heartbeat_gateway(self, gateway: GatewayRecord, now: float) -> None:
        try:
            self.frontend.send_multipart([gateway.identity, *self._heartbeat], zmq.NOBLOCK)
            gateway.last_sent = now
        except zmq.ZMQError:
            self.gateways.pop(gateway.identity, None)
            logger.info("gateway %s unreachable; forgotten", gateway.identity.hex())

    # -- stats and bad input -------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        """The ``stats`` op's result: per worker, per model, and broker totals."""
        now = time.monotonic()
        workers = [
            {
                "id": r.id,
                "host": r.host,
                "pid": r.pid,
                "device": r.device,
                "backend": r.backend,
                "capacity": r.capacity,
                "in_flight": len(r.in_flight),
                "served": r.served,
                "errors": r.errors,
                "last_seen_s": round(now - r.last_seen, 3),
                "joined_s": round(now - r.joined, 3),
                "models": sorted(r.models),
                "counters": r.counters,
            }
            for r in self.registry
        ]
        models = {
            m: {
                "queue": len(self.queues.get(m, ())),
                "workers": [r.id for r in self.registry.holders(m)],
            }
            for m in self.registry.models()
        }
        totals = dict(self.totals)
        totals["answered"] = dict(self.totals["answered"])
        totals.update(
            warming_up=self.warming,
            uptime_s=round(now - self._started, 3),
            pending=len(self.requests),
            queued=sum(len(q) for q in self.queues.values()),
            gateways=len(self.gateways),
        )
        return {"broker": totals, "workers": workers, "models": models}

    def _malformed(self, peer: str, identity: bytes, why: str) -> None:
        self.totals["malformed"] += 1
        now = time.monotonic()
        if now - self._malformed_logged_at < MALFORMED_LOG_EVERY_S:
            self._malformed_suppressed += 1
            return
        self._malformed_logged_at = now
        more = (
            f" (+{self._malformed_suppressed} more not logged)"
            if self._malformed_suppressed
            else ""
        )
        self._malformed_suppressed = 0
        logger.warning("bad message from %s %s: %s%s", peer, identity.hex(), why, more)


def _curve_secret(path: str) -> bytes:
    """The CURVE secret key in ``path``: the 40 z85 characters ``zmq.curve_keypair()``
    returns (README), or a ZeroMQ certificate file (``zmq.auth.create_certificates``)."""
    with open(path, "rb") as f:
        raw = f.read()
    if len(raw.strip()) == 40:
        return raw.strip()
    from zmq.auth.certs import load_certificate

    _public, secret = load_certificate(path)
    if secret is None:
        raise ValueError(f"{path}: no curve secret key in this file")
    return secret


def _stream(p: Pending) -> tuple[bytes, str] | None:
    """The affinity key of a stream frame's request (docs/streams.md), else None."""
    key = p.header.opts.get("stream")
    return (p.gateway, key) if isinstance(key, str) and key else None


def _frame_len(frame: Any) -> int:
    buffer = getattr(frame, "buffer", frame)
    return len(buffer)


def _check_ready(h: Ready) -> str:
    if not h.worker or len(h.worker) > 256:
        return "worker id must be 1..256 characters"
    if not 0 <= h.capacity <= MAX_CAPACITY:
        return f"capacity must be 0..{MAX_CAPACITY}"
    for name, meta in h.models.items():
        if not isinstance(name, str) or not 0 < len(name) <= 256 or not isinstance(meta, dict):
            return "models must map names to metadata maps"
    return ""


def run(config: BrokerConfig) -> int:
    """``lipsync broker``: serve until SIGTERM or SIGINT, then exit 0."""
    setup_logging("broker", config.log_level)
    try:
        broker = Broker(config)
    except zmq.ZMQError as exc:
        logger.error("cannot bind %s / %s: %s", config.frontend, config.backend, exc)
        return 1

    def on_signal(signum: int, _frame: object) -> None:
        logger.info("%s received: stopping", signal.Signals(signum).name)
        broker.stop()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        broker.serve()
    finally:
        broker.close(linger_ms=200)
        for s, handler in previous.items():
            signal.signal(s, handler)
    return 0
