"""The broker process: a ROUTER facing gateways, a ROUTER facing workers, and a loop between.

Shaped like zguide's Majordomo broker (one thread, one poller) around a sans-I/O core, as
vLLM's engine core is wrapped by its I/O threads: this module only receives, decodes the
small msgpack header of each message (``shared.envelope``), hands it to
``broker.core.BrokerCore`` with the time, and sends the actions it returns. Payload frames
(audio in, JPEG out) are forwarded as the same ``zmq.Frame`` objects, never copied or
parsed. The rules the broker keeps are in ``broker.core`` and ``broker.scheduler``.
"""

from __future__ import annotations

import errno
import logging
import secrets
import signal
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import zmq

from broker.actions import Action, ToWorker, Undelivered
from broker.core import BrokerCore
from shared.config import BrokerConfig
from shared.envelope import EnvelopeError, decode, encode, peek_id
from shared.logs import setup_logging
from shared.zmqwire import recv_parts, send_parts


__all__ = ["Broker", "run"]

logger = logging.getLogger("broker")

MAX_FRAME_BYTES = 64 << 20  # ZMQ_MAXMSGSIZE: a peer sending more is disconnected
DRAIN_BATCH = 512
"""Messages read from one socket before looking at the other (fairness, and timers)."""
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
        self._own_context = context is None
        self._context: zmq.Context[Any] = context if context is not None else zmq.Context()
        self.frontend = self._router(config.frontend)
        self.backend = self._router(config.backend, curve_secret_file=config.curve_secret_file)
        self.frontend_endpoint = self.frontend.getsockopt_string(zmq.LAST_ENDPOINT)
        self.backend_endpoint = self.backend.getsockopt_string(zmq.LAST_ENDPOINT)
        self._stop = threading.Event()
        # Drawn at each start and sent in every heartbeat: a gateway that sees it change
        # knows its requests in flight went down with the previous broker.
        self.instance = secrets.token_hex(8)
        self.core = BrokerCore(
            config,
            now=time.monotonic(),
            instance=self.instance,
            debug=logger.isEnabledFor(logging.DEBUG),
        )
        self._heartbeat = encode(self.core.heartbeat)  # the same frames every time

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
        core = self.core
        logger.info(
            "broker %s listening: gateways on %s, workers on %s (heartbeat %.2fs x %d); "
            "requests for models no worker holds yet wait up to %.1f s for workers to register",
            self.instance,
            self.frontend_endpoint,
            self.backend_endpoint,
            core.heartbeat_s,
            self.config.liveness,
            core.warmup.seconds,
        )
        poller = zmq.Poller()
        poller.register(self.backend, zmq.POLLIN)  # first: answers free credits
        poller.register(self.frontend, zmq.POLLIN)
        backend, frontend = self.backend, self.frontend
        stop = self._stop
        while not stop.is_set():
            for sock, _ in poller.poll(self._poll_timeout_ms()):
                if sock is backend:
                    self._drain(backend, self._from_worker)
                else:
                    self._drain(frontend, self._from_gateway)
            actions = core.tick(time.monotonic())
            if actions:
                self._send(actions)
        self._send(core.shutdown(time.monotonic()))
        self._keep_answering(CLOSING_S)

    def close(self, *, linger_ms: int = 0) -> None:
        """Close the sockets; ``linger_ms`` lets the last answers and DISCONNECTs out."""
        self.frontend.close(linger=linger_ms)
        self.backend.close(linger=linger_ms)
        if self._own_context:
            self._context.term()

    def _keep_answering(self, seconds: float) -> None:
        """Keep the connections open a moment after the last answers, refusing new requests
        ``shutting_down``: a gateway reads those answers before its connection drops (a
        ZeroMQ socket with ``ZMQ_IMMEDIATE``, as BrokerClient's, discards what it has not
        read when the connection goes, and the caller would only hear "connection lost")."""
        end = time.monotonic() + seconds
        while (left := end - time.monotonic()) > 0:
            if self.frontend.poll(max(1, int(left * 1000)), zmq.POLLIN):
                self._drain(self.frontend, self._from_gateway)

    def _poll_timeout_ms(self) -> int:
        # Capped so that stop() (from a signal handler) is noticed promptly.
        wait_ms = int((self.core.next_wakeup() - time.monotonic()) * 1000) + 1
        return max(0, min(100, wait_ms))

    # -- messages in, actions out ------------------------------------------------------

    def _drain(self, sock: zmq.Socket[Any], handle: Callable[[list[Any]], None]) -> None:
        for _ in range(DRAIN_BATCH):
            try:
                frames = recv_parts(sock)
            except zmq.Again:
                return
            try:
                handle(frames)
            except Exception:  # a bug must not take every client down with it
                logger.exception("error while handling a message; message dropped")

    def _from_gateway(self, frames: list[Any]) -> None:
        identity = frames[0].bytes
        body = frames[1:]
        now = time.monotonic()
        try:
            message = decode(body)
        except EnvelopeError as exc:
            rid = peek_id(body) if len(body) >= 2 else None
            self._send(self.core.bad_from_gateway(identity, str(exc), rid, now))
            return
        self._send(self.core.from_gateway(identity, message, now))

    def _from_worker(self, frames: list[Any]) -> None:
        identity = frames[0].bytes
        body = frames[1:]
        now = time.monotonic()
        try:
            message = decode(body)
        except EnvelopeError as exc:
            rid = peek_id(body) if len(body) >= 2 else None
            self._send(self.core.bad_from_worker(identity, str(exc), rid, now))
            return
        self._send(self.core.from_worker(identity, message, now))

    def _send(self, actions: Sequence[Action]) -> None:
        """Send each action; what cannot be sent goes back to the core, which may answer
        with more to send (a dead worker's requests, sent to another)."""
        heartbeat, heartbeat_frames = self.core.heartbeat, self._heartbeat
        backend, frontend = self.backend, self.frontend
        while actions:
            failed: list[Undelivered] = []  # rare: the list and dict below stay empty
            gone: dict[bytes, str] = {}  # workers a send failed to: skip the rest for them
            for action in actions:
                to_worker = type(action) is ToWorker
                if gone and to_worker and action.identity in gone:
                    failed.append(Undelivered(action, gone[action.identity]))
                    continue
                if action.header is heartbeat:
                    frames = heartbeat_frames
                else:
                    frames = encode(action.header, action.payload)
                try:
                    send_parts(backend if to_worker else frontend, [action.identity, *frames])
                except zmq.ZMQError as exc:
                    why = _why_not_sent(exc)
                    if to_worker:
                        gone[action.identity] = why
                    failed.append(Undelivered(action, why))
            actions = self.core.undelivered(failed, time.monotonic()) if failed else ()


def _why_not_sent(exc: zmq.ZMQError) -> str:
    if exc.errno == errno.EHOSTUNREACH:
        return "unreachable"
    if exc.errno == zmq.EAGAIN:
        return "not reading"
    return str(exc)


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
