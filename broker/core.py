"""The broker's core, sans-I/O: decoded messages and the current time in, actions out.

Shaped like python-websockets' ``Protocol``: ``broker.server`` owns the sockets and the
clock, decodes each message's small header (``shared.envelope``) and calls one of the
event methods below with it and ``time.monotonic()``; each returns the messages to send, as
``ToGateway`` / ``ToWorker`` actions (``broker.actions``) in order. Payload frames ride
along untouched. A send that fails comes back as ``undelivered``.

Events: ``from_gateway`` / ``bad_from_gateway``, ``from_worker`` / ``bad_from_worker``,
``tick`` (timers, liveness, dispatch: call it after every batch of messages, and by
``next_wakeup`` at the latest), ``undelivered``, ``shutdown``.

What the rules are and where they live (DESIGN.md section 3): credits, queues, deadlines
and re-dispatch (rules 1, 2, 4, 5, 6) in ``broker.scheduler``; liveness (rule 3) in
``broker.liveness``; metadata, admin ops and the end of the warm-up in ``broker.ops``;
the warm-up's state in ``broker.warmup``; fan-outs in ``broker.fanout``. Registration
(READY) and the message dispatch are here.

Nothing a peer sends can crash it: bad messages are counted, logged at a limited rate and
answered ``bad_request`` when they carry a usable request id.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from broker.actions import Action, Outbox, ToGateway, Undelivered
from broker.liveness import Liveness
from broker.ops import Ops
from broker.records import GatewayRecord, WorkerRecord
from broker.registry import Registry, check_ready
from broker.requests import PendingRequests
from broker.scheduler import Scheduler
from broker.stats import Totals, snapshot
from broker.warmup import Parked, Warmup
from shared.config import BrokerConfig
from shared.envelope import (
    Cancel,
    Disconnect,
    Error,
    Header,
    Heartbeat,
    Message,
    Op,
    Ready,
    Reply,
    Request,
)
from shared.errors import ErrorCode
from shared.logs import RateLimitedLog


__all__ = ["BrokerCore"]

logger = logging.getLogger("broker")

MAX_TTL_MS = 60_000
"""Longer ttls are clamped: a frame nobody sees within a minute is worth nothing."""
MAX_REQUEST_PAYLOAD = 16 << 20
MALFORMED_LOG_EVERY_S = 5.0


class BrokerCore:
    """The broker's state and decisions. ``now`` is the broker's start on the caller's
    monotonic clock; ``instance`` the id its heartbeats carry (new at each start: a peer
    that sees it change knows its requests in flight went down with the previous broker)."""

    def __init__(
        self, config: BrokerConfig, *, now: float, instance: str, debug: bool = False
    ) -> None:
        self.config = config
        self.heartbeat_s = config.heartbeat_s
        self.dead_after_s = config.heartbeat_s * config.liveness
        self.started = now
        self.instance = instance
        self.heartbeat = Heartbeat(instance=instance)
        """Every heartbeat the broker sends is this one header (the server encodes it once)."""
        self.closing = False  # stopped serving: new requests are refused shutting_down
        self._debug = debug
        self.totals = Totals()
        self.registry = Registry()
        self.gateways: dict[bytes, GatewayRecord] = {}
        self.requests = PendingRequests()
        warmup_s = config.warmup_s if config.warmup_s >= 0 else 2 * self.dead_after_s
        self.warmup = Warmup(warmup_s, now)
        self.out = Outbox(self.totals, self.gateways, debug=debug)
        self.scheduler = Scheduler(
            config.queue_limit,
            self.registry,
            self.requests,
            self.out,
            self.totals,
            self.warmup,
            debug=debug,
        )
        self.ops = Ops(
            config.queue_limit, self.registry, self.scheduler, self.out, self.totals, self.warmup
        )
        self.liveness = Liveness(
            config.heartbeat_s,
            config.liveness,
            self.registry,
            self.gateways,
            self.out,
            self.heartbeat,
            self.scheduler.worker_gone,
        )
        self._malformed_log = RateLimitedLog(logger, MALFORMED_LOG_EVERY_S)

    # -- gateways ----------------------------------------------------------------------

    def from_gateway(self, identity: bytes, message: Message, now: float) -> Sequence[Action]:
        """One message from a gateway: REQUEST, CANCEL, HEARTBEAT or DISCONNECT."""
        self.out.now = now
        gateway = self.gateways.get(identity)
        if gateway is None:
            self.liveness.gateway_seen(identity, now)  # a new one: logged
        else:
            gateway.last_seen = now
        header = message.header
        if isinstance(header, Request):
            self._request(identity, header, message.payload, now)
        elif isinstance(header, Cancel):
            self._cancel(identity, header.id)
        elif isinstance(header, Heartbeat):
            # Echoed, so a gateway hears from us at its own interval whatever ours is.
            self.out.to_gateway(identity, self.heartbeat)
        elif isinstance(header, Disconnect):
            logger.info("gateway %s disconnected: %s", identity.hex(), header.reason or "-")
            self.gateways.pop(identity, None)
        else:
            why = f"unexpected {message.kind.name.lower()} from a gateway"
            self._malformed("gateway", identity, why, now)
            rid = getattr(header, "id", None)
            if isinstance(rid, int):
                self.out.error(identity, rid, ErrorCode.BAD_REQUEST, why)
        return self.out.take()

    def bad_from_gateway(
        self, identity: bytes, why: str, rid: int | None, now: float
    ) -> Sequence[Action]:
        """A gateway's message that did not decode (``why``); ``rid`` its id if readable."""
        self.out.now = now
        self.liveness.gateway_seen(identity, now)
        self._malformed("gateway", identity, why, now)
        if rid is not None:
            self.out.error(identity, rid, ErrorCode.BAD_REQUEST, why)
        return self.out.take()

    def _request(self, identity: bytes, header: Request, payload: list[Any], now: float) -> None:
        self.totals.requests += 1
        gid, op, out = header.id, header.op, self.out
        if self.closing:
            out.error(identity, gid, ErrorCode.SHUTTING_DOWN, "broker shutting down")
            return
        if self._debug:
            logger.debug(
                "< request %s/%d %s %s#%d", identity.hex(), gid, op, header.model, header.frame
            )
        if (identity, gid) in self.requests.by_gateway:
            out.error(identity, gid, ErrorCode.BAD_REQUEST, "request id in use")
        elif op not in Op.ALL:
            out.error(identity, gid, ErrorCode.BAD_REQUEST, f"unknown op {op!r}")
        elif op == Op.LIST_MODELS:
            out.reply(identity, gid, {"models": self.registry.models()})
        elif op == Op.STATS:
            out.reply(identity, gid, self.stats(now))
        elif op == Op.METADATA:
            ttl_s = min(max(header.ttl_ms, 0), MAX_TTL_MS) / 1000
            self.ops.metadata(Parked(identity, gid, header.model, now + ttl_s))
        elif sum(_frame_len(f) for f in payload) > MAX_REQUEST_PAYLOAD:
            out.error(identity, gid, ErrorCode.BAD_REQUEST, "payload too large")
        elif header.ttl_ms <= 0:
            self.totals.expired += 1
            out.error(identity, gid, ErrorCode.DEADLINE_EXCEEDED, "ttl <= 0")
        else:
            deadline = now + min(header.ttl_ms, MAX_TTL_MS) / 1000
            if op in (Op.LOAD_PACKAGE, Op.UNLOAD_PACKAGE):
                self.ops.admin(identity, header, payload, deadline, now)
            elif not header.model:
                out.error(identity, gid, ErrorCode.BAD_REQUEST, "model is required")
            else:
                self.scheduler.submit(identity, header, payload, deadline, now)

    def _cancel(self, identity: bytes, gid: int) -> None:
        if not self.scheduler.cancel(identity, gid) and self.warmup.cancel(identity, gid):
            self.totals.cancelled += 1  # a metadata request waiting for workers

    # -- workers -----------------------------------------------------------------------

    def from_worker(self, identity: bytes, message: Message, now: float) -> Sequence[Action]:
        """One message from a worker: READY, HEARTBEAT, REPLY, ERROR or DISCONNECT."""
        self.out.now = now
        record = self.registry.get(identity)
        if record is not None:
            record.last_seen = now
        header = message.header
        if isinstance(header, Ready):
            self._ready(identity, header, now)
        elif isinstance(header, Disconnect):
            if record is not None:
                reason = f"left ({header.reason or 'no reason given'})"
                self.scheduler.worker_gone(record, reason, now)
        elif record is None:
            # Not registered (declared dead, or a broker restart it has not noticed): any
            # reply it sends is stale. Tell it to register again.
            if isinstance(header, Reply | Error):
                self.totals.stale += 1
            self.liveness.tell_to_leave(identity, now)
        elif isinstance(header, Heartbeat):
            record.reported_in_flight = header.in_flight
            record.counters = header.stats
            self.out.to_worker(record, self.heartbeat)  # echoed, as for gateways
        elif isinstance(header, Reply | Error):
            self.scheduler.answer(record, header, message.payload)
        else:
            self._malformed("worker", identity, f"unexpected {message.kind.name.lower()}", now)
        return self.out.take()

    def bad_from_worker(
        self, identity: bytes, why: str, rid: int | None, now: float
    ) -> Sequence[Action]:
        """A worker's message that did not decode; a reply we cannot read still ends its
        request (``rid``, if readable and in flight there): answered, credit freed."""
        self.out.now = now
        record = self.registry.get(identity)
        if record is not None:
            record.last_seen = now
        self._malformed("worker", identity, why, now)
        if record is not None and rid is not None and rid in record.in_flight:
            p = record.in_flight.pop(rid)
            record.errors += 1
            self.scheduler.fail(p, ErrorCode.INTERNAL, "malformed answer from worker")
        return self.out.take()

    def _ready(self, identity: bytes, header: Ready, now: float) -> None:
        """Register a worker, or refresh one (a worker re-announces when its models change,
        and announces capacity 0 when it drains before leaving)."""
        problem = check_ready(header)
        if problem:
            self._malformed("worker", identity, f"bad ready: {problem}", now)
            return
        record = self.registry.get(identity)
        if record is not None:
            if self.registry.update(record, header):
                logger.info(
                    "worker %s updated: capacity %d, models %s",
                    record.id,
                    record.capacity,
                    ",".join(sorted(record.models)) or "-",
                )
                self.scheduler.fail_unheld_queues()
            return
        previous = self.registry.by_id(header.worker)
        if previous is not None:
            # Same worker on a new connection (it reconnected after losing us): the old
            # connection is gone, and so is anything in flight on it.
            self.scheduler.worker_gone(previous, "replaced by a new connection", now)
        record = WorkerRecord.from_ready(identity, header, now)
        self.registry.add(record)
        self.liveness.registered(identity)
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

    # -- time ----------------------------------------------------------------------------

    def tick(self, now: float) -> Sequence[Action]:
        """Timers (deadlines, the warm-up's end), liveness when due, then dispatch."""
        self.out.now = now
        if self.warmup.warming and now >= self.warmup.until:
            self.ops.end_warmup(now - self.started)
        if self.warmup.parked:
            self.ops.answer_parked(now)
        self.scheduler.expire_due(now)
        self.liveness.check(now)
        self.scheduler.dispatch_all(now)
        return self.out.take()

    def next_wakeup(self) -> float:
        """When ``tick`` has something to do at the latest, with no message in between."""
        wake = self.liveness.next_check
        timer = self.requests.timers.next_time()
        if timer is not None:
            wake = min(wake, timer)
        if self.warmup.warming:
            wake = min(wake, self.warmup.until)
        return wake

    # -- sends that failed, shutdown, stats ------------------------------------------------

    def undelivered(self, failures: list[Undelivered], now: float) -> Sequence[Action]:
        """Actions the server could not send. A worker that cannot be sent to is dead (its
        requests that never left go to another worker); a gateway that cannot be
        heartbeated is forgotten; an answer to a gone gateway is counted ``undeliverable``."""
        self.out.now = now
        to_workers: dict[bytes, tuple[list[Header], str]] = {}
        for failure in failures:
            action = failure.action
            if isinstance(action, ToGateway):
                if isinstance(action.header, Heartbeat):
                    self.liveness.unreachable_gateway(action.identity)
                else:
                    self.totals.undeliverable += 1
                    if self._debug:
                        logger.debug(
                            "answer to gateway %s undeliverable: %s",
                            action.identity.hex(),
                            failure.why,
                        )
            else:
                to_workers.setdefault(action.identity, ([], failure.why))[0].append(action.header)
        for identity, (headers, why) in to_workers.items():
            self.scheduler.undelivered(identity, headers, why, now)
        self.scheduler.dispatch_all(now)
        return self.out.take()

    def shutdown(self, now: float) -> Sequence[Action]:
        """Answer everything pending ``shutting_down`` and tell workers to leave; from now
        on new requests are refused ``shutting_down``."""
        self.out.now = now
        pending = [p for p in self.requests if not p.orphan]
        for p in pending:
            self.scheduler.fail(p, ErrorCode.SHUTTING_DOWN, "broker shutting down")
        parked = self.warmup.take_parked()
        for m in parked:
            self.out.error(m.gateway, m.gid, ErrorCode.SHUTTING_DOWN, "broker shutting down")
        for record in self.registry:
            self.out.to_worker(record, Disconnect(reason="broker shutting down"))
        logger.info(
            "broker stopping: answered %d pending requests, told %d workers",
            len(pending) + len(parked),
            len(self.registry),
        )
        self.closing = True
        return self.out.take()

    def stats(self, now: float) -> dict[str, Any]:
        """The ``stats`` op's result: per worker, per model, and broker totals."""
        return snapshot(
            self.totals,
            self.registry,
            self.requests.queues,
            now=now,
            started=self.started,
            warming=self.warmup.warming,
            pending=len(self.requests),
            gateways=len(self.gateways),
        )

    def _malformed(self, peer: str, identity: bytes, why: str, now: float) -> None:
        self.totals.malformed += 1
        self._malformed_log.warning(
            "bad message from %s %s: %s", peer, identity.hex(), why, now=now
        )


def _frame_len(frame: Any) -> int:
    buffer = getattr(frame, "buffer", frame)
    return len(buffer)
