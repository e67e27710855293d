"""Asyncio client of the broker's frontend: one DEALER socket, many requests in flight.

Why an object rather than raw sockets in the gateway: it owns the three things every caller
would otherwise get wrong. It matches answers to requests by id; it bounds every wait (a
request with no answer by its ttl plus a grace fails with ``deadline_exceeded`` instead of
hanging); and it tracks broker liveness, so that when the broker goes silent every waiting
caller learns it at once (``broker_unavailable``) rather than each at its own timeout.

Liveness (DESIGN.md section 3, rule 3): the client heartbeats the broker every interval so
the broker knows it, and any message from the broker counts as a sign of life. After
``liveness`` silent intervals the broker is declared dead: in-flight requests fail, new ones
fail fast, and the socket is kept (ZeroMQ reconnects by itself) until the broker speaks
again.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import zmq
import zmq.asyncio
from zmq.utils.monitor import parse_monitor_message

from shared.envelope import (
    Cancel,
    EnvelopeError,
    Error,
    Header,
    Heartbeat,
    Reply,
    Request,
    decode,
    encode,
)
from shared.errors import ErrorCode, ServiceError
from shared.logs import RateLimitedLog
from shared.zmqwire import recv_parts, send_parts


__all__ = ["Answer", "BrokerClient"]

logger = logging.getLogger(__name__)

DEFAULT_MAX_IN_FLIGHT = 10_000
READ_BATCH = 256
"""Messages read from the broker per event-loop turn at most."""
_POLLIN = int(zmq.POLLIN)
DEFAULT_GRACE_S = 1.0
"""Slack after a request's ttl before the client gives up on it: the broker answers expired
requests itself shortly after their deadline, and that answer is more informative."""


@dataclass(slots=True)
class Answer:
    """A successful answer. For ``infer`` and ``video_frame``, ``payload[0]`` is the JPEG."""

    header: Reply
    payload: list[bytes]


class BrokerClient:
    """Request/answer client over a ``zmq.asyncio`` DEALER.

    Use from one event loop::

        client = BrokerClient("tcp://127.0.0.1:5555")
        await client.start()
        answer = await client.request("infer", model="avatar", frame=12)
        await client.close()

    ``request`` raises ``ServiceError`` with the broker's or worker's code, or with
    ``broker_unavailable``, ``deadline_exceeded`` or ``overloaded`` decided here.
    Cancelling the awaiting task sends ``CANCEL`` so nobody computes an unwanted frame.
    """

    def __init__(
        self,
        endpoint: str,
        *,
        heartbeat_s: float = 1.0,
        liveness: int = 3,
        context: zmq.asyncio.Context | None = None,
        max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
        grace_s: float = DEFAULT_GRACE_S,
    ) -> None:
        if heartbeat_s <= 0 or liveness < 1:
            raise ValueError("heartbeat_s must be > 0 and liveness >= 1")
        if max_in_flight < 1:
            raise ValueError("max_in_flight must be >= 1")
        self.endpoint = endpoint
        self.heartbeat_s = heartbeat_s
        self.liveness = liveness
        self.max_in_flight = max_in_flight
        self.grace_s = grace_s
        self._own_context = context is None
        self._context = context if context is not None else zmq.asyncio.Context()
        self._socket: zmq.asyncio.Socket | None = None
        # The same socket, driven without pyzmq's asyncio layer (a future and two event
        # registrations per message): sends go straight out (all are non-blocking), and
        # a reader on the socket's FD drains every message waiting (see ``_readable``).
        self._sync: zmq.Socket[Any] | None = None
        self._fd = -1
        self._read_scheduled = False
        self._tasks: list[asyncio.Task[None]] = []
        self._pending: dict[int, asyncio.Future[Answer]] = {}
        self._ids = itertools.count(1)
        self._last_seen = 0.0  # monotonic time of the last message from the broker
        self._instance = ""  # the broker's id, from its heartbeats ("" until one says it)
        self._last_id = 0  # highest request id sent so far
        self._sent_before_beat = 0  # highest id sent before the broker's last heartbeat
        self._alive = False
        self._seen = asyncio.Event()
        self._closed = False
        self._malformed_log = RateLimitedLog(logger, every_s=10.0)
        self.counters: dict[str, int] = {
            "sent": 0,
            "answered": 0,
            "errors": 0,
            "timeouts": 0,
            "cancelled": 0,
            "broker_lost": 0,
            "broker_restarts": 0,
            "unmatched": 0,  # answers for ids no longer waiting: late or duplicate
            "malformed": 0,
        }

    # -- lifecycle ---------------------------------------------------------------------

    async def start(self, *, wait_s: float | None = None) -> None:
        """Connect and wait (at most ``wait_s``, default liveness intervals) until the broker
        answers a heartbeat. Returns either way: a broker that is not up yet is not an
        error; requests fail fast with ``broker_unavailable`` until it is."""
        if self._socket is not None:
            raise RuntimeError("client already started")
        sock = self._context.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        # Only queue on a live connection: while the broker is away, a send fails at once
        # instead of piling stale requests up for whoever comes back.
        sock.setsockopt(zmq.IMMEDIATE, 1)
        sock.setsockopt(zmq.SNDHWM, self.max_in_flight + 1000)
        sock.setsockopt(zmq.RCVHWM, self.max_in_flight + 1000)
        sock.connect(self.endpoint)
        self._socket = sock
        self._sync = zmq.Socket.shadow(sock.underlying)
        self._fd = int(sock.getsockopt(zmq.FD))
        asyncio.get_running_loop().add_reader(self._fd, self._readable)
        monitor = sock.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        self._tasks = [
            asyncio.create_task(self._heartbeat_loop(), name="brokerclient-heartbeat"),
            asyncio.create_task(self._monitor_loop(monitor), name="brokerclient-monitor"),
        ]
        wait = self.heartbeat_s * self.liveness if wait_s is None else wait_s
        deadline = time.monotonic() + wait
        # Heartbeats sent before the TCP handshake completes are refused (IMMEDIATE), so
        # knock more often than once an interval until the broker has seen us.
        while not self._seen.is_set() and time.monotonic() < deadline:
            self._send_now(encode(Heartbeat()))
            try:
                await asyncio.wait_for(self._seen.wait(), min(0.05, wait))
            except TimeoutError:
                pass
        if not self._seen.is_set():
            logger.warning("broker at %s not answering yet; will keep trying", self.endpoint)

    async def close(self) -> None:
        """Fail what is still waiting, stop the tasks, close the socket. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._fail_all(ErrorCode.BROKER_UNAVAILABLE, "client closed")
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            try:
                await task
            except asyncio.CancelledError:
                pass
        self._tasks = []
        if self._fd >= 0:
            asyncio.get_running_loop().remove_reader(self._fd)
            self._fd = -1
        self._sync = None
        if self._socket is not None:
            self._socket.disable_monitor()
            self._socket.close(linger=0)
            self._socket = None
        if self._own_context:
            self._context.term()

    async def __aenter__(self) -> BrokerClient:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- state -------------------------------------------------------------------------

    @property
    def broker_alive(self) -> bool:
        """The broker spoke within the last ``liveness`` heartbeat intervals."""
        return (
            self._alive and time.monotonic() - self._last_seen <= self.heartbeat_s * self.liveness
        )

    @property
    def in_flight(self) -> int:
        return len(self._pending)

    # -- requests ----------------------------------------------------------------------

    async def request(
        self,
        op: str,
        *,
        model: str = "",
        frame: int = -1,
        opts: dict[str, Any] | None = None,
        payload: Sequence[bytes] = (),
        ttl_ms: int = 2000,
    ) -> Answer:
        """Send one request and wait for its answer.

        Raises:
            ServiceError: the error answer, or ``broker_unavailable`` (broker declared dead,
                not connected, or client closed), ``overloaded`` (``max_in_flight``
                reached), ``deadline_exceeded`` (no answer by ttl plus grace).
        """
        if self._closed or self._socket is None:
            raise ServiceError(ErrorCode.BROKER_UNAVAILABLE, "client is not running")
        if not self.broker_alive:
            raise ServiceError(ErrorCode.BROKER_UNAVAILABLE, "broker unavailable")
        if len(self._pending) >= self.max_in_flight:
            raise ServiceError(ErrorCode.OVERLOADED, "too many requests in flight to broker")
        rid = next(self._ids)
        header = Request(
            id=rid, op=op, model=model, frame=frame, ttl_ms=int(ttl_ms), opts=opts or {}
        )
        future: asyncio.Future[Answer] = asyncio.get_running_loop().create_future()
        if not self._send_now(encode(header, payload)):
            raise ServiceError(ErrorCode.BROKER_UNAVAILABLE, "broker not connected")
        self._pending[rid] = future
        self._last_id = rid
        self.counters["sent"] += 1
        try:
            async with asyncio.timeout(max(0, ttl_ms) / 1000 + self.grace_s):
                return await future
        except TimeoutError:
            if self._pending.pop(rid, None) is not None:
                self.counters["timeouts"] += 1
                self._send_now(encode(Cancel(id=rid)))
            raise ServiceError(ErrorCode.DEADLINE_EXCEEDED, "no answer from broker") from None
        except asyncio.CancelledError:
            if self._pending.pop(rid, None) is not None:
                self.counters["cancelled"] += 1
                self._send_now(encode(Cancel(id=rid)))
            raise
        finally:
            self._pending.pop(rid, None)

    # -- internals ---------------------------------------------------------------------

    def _send_now(self, frames: list[Any]) -> bool:
        """Send without waiting. False when ZeroMQ would block (no live connection, or the
        queue is full)."""
        sock = self._sync
        if sock is None:
            return False
        try:
            send_parts(sock, frames)
        except zmq.Again:
            return False
        except zmq.ZMQError as exc:
            logger.debug("send to broker failed: %s", exc)
            return False
        finally:
            self._check_readable()
        return True

    def _check_readable(self) -> None:
        """A send can leave a message waiting without the socket's FD signalling it (the
        FD is edge-triggered): look, and read soon if so."""
        if self._read_scheduled or self._sync is None:
            return
        if _readable_now(self._sync):
            self._read_scheduled = True
            asyncio.get_running_loop().call_soon(self._readable)

    def _readable(self) -> None:
        """The messages waiting, until ZeroMQ says none is (asking it so also re-arms the
        FD the event loop watches); at most ``READ_BATCH`` per call, so that a flood of
        answers cannot starve the loop's other work: the rest is read on its next turn."""
        self._read_scheduled = False
        sock = self._sync
        if sock is None:
            return
        for _ in range(READ_BATCH):
            try:
                frames = recv_parts(sock)
            except zmq.Again:
                if _readable_now(sock):
                    continue  # arrived meanwhile
                return
            except zmq.ZMQError as exc:  # socket closed under us during shutdown
                if not self._closed:
                    logger.warning("receive from broker failed: %s", exc)
                return
            self._on_message(frames)
        self._read_scheduled = True
        asyncio.get_running_loop().call_soon(self._readable)

    def _on_message(self, frames: list[Any]) -> None:
        self._on_broker_message()
        try:
            message = decode(frames)
        except EnvelopeError as exc:
            self._malformed(str(exc))
            return
        # bytes, as callers expect (one copy, as a copying receive made)
        self._handle(message.header, [frame.bytes for frame in message.payload])

    def _handle(self, header: Header, payload: list[Any]) -> None:
        if isinstance(header, Reply):
            future = self._pending.pop(header.id, None)
            if future is None or future.done():
                self.counters["unmatched"] += 1
                return
            self.counters["answered"] += 1
            future.set_result(Answer(header, payload))
        elif isinstance(header, Error):
            future = self._pending.pop(header.id, None)
            if future is None or future.done():
                self.counters["unmatched"] += 1
                return
            self.counters["errors"] += 1
            future.set_exception(ServiceError(header.code, header.message))
        elif isinstance(header, Heartbeat):
            self._note_instance(header.instance)  # liveness already noted
        else:
            self._malformed(f"unexpected {header.KIND.name.lower()} from broker")

    def _on_broker_message(self) -> None:
        self._last_seen = time.monotonic()
        if not self._alive:
            self._alive = True
            if self._seen.is_set():
                logger.info("broker at %s is back", self.endpoint)
            self._seen.set()

    async def _heartbeat_loop(self) -> None:
        while True:
            await asyncio.sleep(self.heartbeat_s)
            self._send_now(encode(Heartbeat(in_flight=len(self._pending))))
            silent = time.monotonic() - self._last_seen
            if self._alive and silent > self.heartbeat_s * self.liveness:
                self._alive = False
                logger.warning(
                    "broker at %s silent for %.1f s: failing %d requests in flight",
                    self.endpoint,
                    silent,
                    len(self._pending),
                )
                self.counters["broker_lost"] += len(self._pending)
                self._fail_all(ErrorCode.BROKER_UNAVAILABLE, "broker unavailable")

    async def _monitor_loop(self, monitor: zmq.asyncio.Socket) -> None:
        """The TCP connection to the broker dropped: every request in flight was sent over
        it and is lost (the broker answers a connection, and ours is gone; a reconnect is
        a new one). Fail them now, not at their deadlines; new requests go out as soon as
        ZeroMQ has reconnected."""
        try:
            while True:
                event = parse_monitor_message(await monitor.recv_multipart())
                if event["event"] != zmq.EVENT_DISCONNECTED or not self._pending:
                    continue
                logger.warning(
                    "connection to broker at %s lost: failing %d requests in flight",
                    self.endpoint,
                    len(self._pending),
                )
                self.counters["broker_lost"] += len(self._pending)
                self._fail_all(ErrorCode.BROKER_UNAVAILABLE, "connection to broker lost")
        finally:
            monitor.close(linger=0)

    def _note_instance(self, instance: str) -> None:
        """A heartbeat from a different broker instance: the previous one went down and
        took with it every request sent before its last heartbeat; fail those now rather
        than at their deadlines. Requests sent since may have reached the new one, so they
        keep waiting (a quick restart is otherwise invisible: the gateway never sees the
        broker silent for the liveness period)."""
        if not instance:
            return
        if self._instance and instance != self._instance:
            lost = [rid for rid in self._pending if rid <= self._sent_before_beat]
            logger.warning(
                "broker at %s restarted (instance %s, was %s): failing %d requests it held",
                self.endpoint,
                instance,
                self._instance,
                len(lost),
            )
            self.counters["broker_restarts"] += 1
            self.counters["broker_lost"] += len(lost)
            for rid in lost:
                future = self._pending.pop(rid)
                if not future.done():
                    future.set_exception(
                        ServiceError(ErrorCode.BROKER_UNAVAILABLE, "broker restarted")
                    )
        self._instance = instance
        self._sent_before_beat = self._last_id

    def _fail_all(self, code: ErrorCode, message: str) -> None:
        pending, self._pending = self._pending, {}
        for future in pending.values():
            if not future.done():
                future.set_exception(ServiceError(code, message))

    def _malformed(self, why: str) -> None:
        self.counters["malformed"] += 1
        self._malformed_log.warning(
            "malformed message from broker (%s); %d so far", why, self.counters["malformed"]
        )


def _readable_now(sock: zmq.Socket[Any]) -> bool:
    try:
        return bool(int(sock.getsockopt(zmq.EVENTS)) & _POLLIN)
    except zmq.ZMQError:
        return False
