"""One browser connection: read messages, turn each into a broker request, answer each in the
shape its client expects (DESIGN.md section 4, docs/protocol.md).

Requests are handled concurrently (pipelining), unlike the original proxy, which served one
message at a time. Three rules keep that safe:

- **Bounded work.** At most ``max_in_flight`` requests per connection wait for the broker;
  past that a request is answered at once with ``too_many_in_flight`` in its own error shape.
- **Order where the client needs it.** Layout A answers carry nothing to match them by, so
  they go out in request order (:class:`~gateway.outbox.Sequencer`). Other answers name
  their frame or model and go out as soon as they are ready.
- **Bounded output.** Answers wait in an :class:`~gateway.outbox.Outbox`; when the client
  does not read, the oldest images are replaced by their layout's error shapes, in their
  slots. A client holding more than ``max_undelivered`` answers (pipelining without limit
  against a stall, or not reading at all) is closed with 1008 (:data:`CLOSE_OVERFLOW`).

Every message gets exactly one answer, whatever happens to it: a malformed one an error in
the closest shape, a failed one its error shape, never silence. What the connection may use
of the gateway is its :class:`~gateway.context.ConnectionContext`; the JSON requests are
answered by :mod:`gateway.jsonops`, ``hello`` is negotiated by :mod:`gateway.hello`.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed

from gateway.admin import ADMIN_TYPES, admin, admin_error
from gateway.brokerclient import Answer
from gateway.context import ConnectionContext
from gateway.delivery import CLOSE_OVERFLOW, Delivery
from gateway.hello import Settings, hello_answer, negotiate
from gateway.jsonops import JsonAnswer, JsonOps
from gateway.outbox import KEEP, Fallback
from gateway.replies import (
    SLOW_CLIENT,
    ErrorShape,
    bounds_of,
    check_frame,
    error_text,
    image_of,
    infer_opts,
    inference_error,
    metadata_error,
    model_list_error,
    plain_error,
    video_frame_error,
)
from shared.browser import (
    DEADLINE,
    EXTENSION,
    DeadlineRequest,
    ErrorResponseC,
    JsonRequest,
    ProtocolError,
    RequestA,
    RequestB,
    ResponseC,
    error_message,
    parse_binary_request,
    parse_json_request,
    protocol_ack_message,
    stream_error_message,
    unknown_type_message,
)
from shared.errors import ErrorCode, ServiceError


__all__ = ["CLOSE_OVERFLOW", "Connection", "peer_name"]

logger = logging.getLogger(__name__)

STREAM_TYPES = frozenset({"stream_start", "stream_stop", "stream_interrupt"})
DEADLINE_PREFIX = bytes([EXTENSION, DEADLINE])

JsonHandler = Callable[[JsonRequest, float], Awaitable[JsonAnswer]]


class Connection:
    """Serves one WebSocket until it closes."""

    def __init__(self, ctx: ConnectionContext, ws: ServerConnection) -> None:
        self.ctx = ctx
        self.config = ctx.config
        self.metrics = ctx.metrics
        self.ws = ws
        self.peer = peer_name(ws)
        self.out = Delivery(ctx.config, ctx.metrics, ctx.totals, self.peer, self._close)
        self._closer: asyncio.Future[None] | None = None  # an overflow close, held till done
        self.tasks: set[asyncio.Task[None]] = set()
        # server-driven streams (docs/streams.md): their own bounds, not max_in_flight
        self.streams = ctx.streams.connection(request=ctx.request, send=self._stream_send)
        self.received = 0
        self.settings = Settings()  # changed by hello
        ops = JsonOps(
            self._ask,
            lambda: self.settings,
            ctx.health,
            ctx.stats_fields,
            self.config.request_timeout_ms,
        )
        self._json: dict[str, tuple[str, JsonHandler, ErrorShape]] = {
            "": ("inference", ops.inference, inference_error),
            "inference": ("inference", ops.inference, inference_error),
            "list_models": ("list_models", ops.list_models, model_list_error),
            "get_metadata": ("get_metadata", ops.metadata, metadata_error),
            "get_video_frame": ("get_video_frame", ops.video_frame, video_frame_error),
            "get_stats": ("get_stats", ops.stats, plain_error),
        }
        admin_op = functools.partial(
            admin, ctx.request, bool(self.config.token), ctx.health.invalidate, self.peer
        )
        for kind in ADMIN_TYPES:  # load/unload/reload a package; token-protected
            self._json[kind] = (kind, admin_op, admin_error)

    # -- lifecycle ---------------------------------------------------------------------

    async def serve(self) -> None:
        sender = asyncio.create_task(self._send_loop(), name=f"send-{self.peer}")
        try:
            async for message in self.ws:
                self.receive(message)
        except ConnectionClosed:
            pass
        finally:
            await self.streams.close()
            for task in list(self.tasks):
                task.cancel()  # the broker client sends CANCEL for each
            if self.tasks:
                await asyncio.gather(*self.tasks, return_exceptions=True)
            sender.cancel()
            try:
                await sender
            except asyncio.CancelledError:
                pass
            logger.info(
                "%s closed (code %s): %d messages, %d answers dropped",
                self.peer,
                self.ws.close_code,
                self.received,
                self.dropped,
            )

    @property
    def dropped(self) -> int:
        """Answers whose image this client never got because it did not read in time."""
        return self.out.dropped

    async def drain(self) -> None:
        """Wait until every accepted request is answered and handed to the socket."""
        while self.tasks:
            await asyncio.wait(set(self.tasks))
        await self.out.flushed()

    async def _send_loop(self) -> None:
        try:
            await self.out.run(self._send)
        except ConnectionClosed:
            pass

    async def _send(self, data: bytes | str, kind: str) -> None:
        await self.ws.send(data)
        size = len(data) if isinstance(data, bytes) else len(data.encode("utf-8"))
        self.metrics.sent(kind, size)

    # -- output ------------------------------------------------------------------------

    async def _stream_send(self, data: bytes | str) -> None:
        if isinstance(data, bytes):
            self._put(data, "tagged", None)  # the sequence numbers show a gap
        else:
            self._put_json(data)

    def _put(self, data: bytes | str, kind: str, fallback: Fallback = KEEP) -> None:
        self.out.put(data, kind, fallback)

    def _put_json(self, text: str) -> None:
        self.out.put_json(text)

    def _close(self, code: int, reason: str) -> None:
        self._closer = asyncio.ensure_future(self.ws.close(code, reason))

    # -- dispatch ----------------------------------------------------------------------

    def receive(self, message: str | bytes) -> None:
        """Handle one client message: answer it now, or start a task that will."""
        self.received += 1
        if self.out.overflowed:
            return  # closing: what it sends now is not read

        t0 = time.monotonic()
        if isinstance(message, str):
            self.ctx.totals.json_requests += 1
            self._on_text(message, t0)
        else:
            self.ctx.totals.binary_requests += 1
            self._on_binary(message, t0)

    def _admit(self) -> ServiceError | None:
        if self.ctx.shutting_down():
            return ServiceError(ErrorCode.SHUTTING_DOWN, "server shutting down")
        if len(self.tasks) >= self.config.max_in_flight:
            return ServiceError(
                ErrorCode.TOO_MANY_IN_FLIGHT,
                f"more than {self.config.max_in_flight} requests in flight",
            )
        return None

    def _spawn(self, coro: Awaitable[None]) -> None:
        task = asyncio.ensure_future(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def _done(self, op: str, outcome: str, t0: float, *, broker: bool = True) -> float:
        """Count an answered request; its processing time in ms."""
        elapsed = time.monotonic() - t0
        self.metrics.answered(op, outcome, elapsed if broker else None)
        if broker:
            self.ctx.totals.answered += 1
            self.ctx.totals.time_ms += elapsed * 1000
        return elapsed * 1000

    async def _ask(self, op: str, **kwargs: Any) -> Answer:
        self.metrics.in_flight.inc()
        try:
            return await self.ctx.request(op, **kwargs)
        except ServiceError:
            raise
        except Exception as exc:
            logger.exception("broker request %s failed", op)
            raise ServiceError(ErrorCode.INTERNAL, "internal error") from exc
        finally:
            self.metrics.in_flight.dec()

    # -- binary: layouts A and B -------------------------------------------------------

    def _on_binary(self, data: bytes, t0: float) -> None:
        if data[:2] == DEADLINE_PREFIX:  # ours: a B request with its own deadline
            self._on_deadline_request(data, t0)
            return
        if data[:1] == b"\x00":  # this project's own: a stream's audio chunk
            self.streams.handle_audio(data)
            return
        try:
            request = parse_binary_request(data)
        except ProtocolError as exc:
            self._malformed_binary(exc)
            return
        if isinstance(request, RequestA):
            self._on_a(request, t0)
        else:
            self._on_b(request, t0)

    def _malformed_binary(self, exc: ProtocolError) -> None:
        self.metrics.malformed.labels("binary").inc()
        self._put(ErrorResponseC(0, 0, f"bad_request: {exc}").serialize(), "c")

    def _on_a(self, request: RequestA, t0: float) -> None:
        refusal = self._admit() or check_frame(request.frame_id)
        if refusal is None:
            self._spawn(self._infer_a(request, self.out.ticket(), t0))
            return
        self._done("infer_a", refusal.code.value, t0, broker=False)
        self.out.release_a(self.out.ticket(), b"")  # in order, like every A answer

    async def _infer_a(self, request: RequestA, ticket: int, t0: float) -> None:
        try:
            answer = await self._ask(
                "infer",
                model=request.model_name,
                frame=request.frame_id,
                opts=infer_opts(self.settings.mode_a, self.settings.quality),
                ttl_ms=self.config.request_timeout_ms,
            )
            image, outcome = image_of(answer), "ok"
        except ServiceError as exc:
            image, outcome = b"", exc.code.value
        self._done("infer_a", outcome, t0)
        self.out.release_a(ticket, image)

    def _on_deadline_request(self, data: bytes, t0: float) -> None:
        try:
            wrapped = DeadlineRequest.parse(data)
        except ProtocolError as exc:
            self._malformed_binary(exc)
            return
        request, most = wrapped.request, self.config.max_deadline_ms
        if not 1 <= wrapped.deadline_ms <= most:
            ms = self._done("infer_b", ErrorCode.BAD_REQUEST.value, t0, broker=False)
            why = f"bad_request: deadline_ms must be 1..{most} on this gateway"
            self._put(ErrorResponseC(request.frame_id, ms, why).serialize(), "c")
            return
        self._on_b(request, t0, wrapped.deadline_ms)

    def _on_b(self, request: RequestB, t0: float, ttl_ms: int | None = None) -> None:
        refusal = self._admit()
        if refusal is None:
            self._spawn(self._infer_b(request, t0, ttl_ms or self.config.request_timeout_ms))
            return
        ms = self._done("infer_b", refusal.code.value, t0, broker=False)
        self._put(ErrorResponseC(request.frame_id, ms, error_text(refusal)).serialize(), "c")

    async def _infer_b(self, request: RequestB, t0: float, ttl_ms: int) -> None:
        try:
            answer = await self._ask(
                "infer",
                model=request.model_name,
                frame=request.frame_id,
                opts=infer_opts(self.settings.mode_b, self.settings.quality),
                payload=(request.audio,) if request.audio else (),
                ttl_ms=ttl_ms,
            )
            image, bounds = image_of(answer), bounds_of(answer)
        except ServiceError as exc:
            ms = self._done("infer_b", exc.code.value, t0)
            self._put(ErrorResponseC(request.frame_id, ms, error_text(exc)).serialize(), "c")
        else:
            ms = self._done("infer_b", "ok", t0)
            self._put(
                ResponseC(request.frame_id, ms, image, bounds).serialize(),
                "c",
                ErrorResponseC(request.frame_id, ms, SLOW_CLIENT).serialize(),
            )

    # -- text: JSON --------------------------------------------------------------------

    def _on_text(self, text: str, t0: float) -> None:
        try:
            request = parse_json_request(text)
        except ProtocolError as exc:
            self.metrics.malformed.labels("text").inc()
            self._put_json(error_message(f"bad_request: {exc}"))
            return
        kind = request.type
        entry = self._json.get(kind)
        if entry is not None:
            op, handler, shape = entry
            refusal = self._admit()
            if refusal is None:
                self._spawn(self._json_call(op, handler, shape, request, t0))
            else:
                self._done(op, refusal.code.value, t0, broker=False)
                self._put_json(shape(request, error_text(refusal)))
        elif kind in ("switch_to_binary", "test_binary"):
            self._done("protocol_ack", "ok", t0, broker=False)
            self._put_json(protocol_ack_message())
        elif kind == "hello":
            self._hello(request, t0)
        elif kind in STREAM_TYPES:
            self._on_stream(kind, request, t0)
        else:
            self._done("unknown", ErrorCode.BAD_REQUEST.value, t0, broker=False)
            self._put_json(unknown_type_message(kind))

    def _on_stream(self, kind: str, request: JsonRequest, t0: float) -> None:
        self._done("stream", "ok", t0, broker=False)
        if self.ctx.shutting_down() and kind == "stream_start":
            stream = request.extra.get("stream")
            code = ErrorCode.SHUTTING_DOWN.value
            self._put_json(stream_error_message(stream, code, "server shutting down"))
        else:
            fields = {**request.extra, "type": kind, "model_name": request.model_name}
            self.streams.handle_json(fields)

    async def _json_call(
        self, op: str, handler: JsonHandler, shape: ErrorShape, request: JsonRequest, t0: float
    ) -> None:
        try:
            answer = await handler(request, t0)
            outcome = "ok"
        except ServiceError as exc:
            answer, outcome = shape(request, error_text(exc)), exc.code.value
        except Exception:  # a bug here must still answer the client
            logger.exception("%s failed", op)
            answer, outcome = shape(request, "internal: internal error"), "internal"
        self._done(op, outcome, t0)
        if isinstance(answer, bytes):  # a video frame (D); its error shape is JSON
            self._put(answer, "d", shape(request, SLOW_CLIENT))
        else:
            self._put_json(answer)

    def _hello(self, request: JsonRequest, t0: float) -> None:
        """``hello``: negotiate the version and this connection's settings (all or
        nothing: a bad field changes nothing)."""
        try:
            version, self.settings = negotiate(request.extra, self.settings)
        except ProtocolError as exc:
            self._done("hello", ErrorCode.BAD_REQUEST.value, t0, broker=False)
            self._put_json(error_message(f"bad_request: {exc}"))
            return
        self._done("hello", "ok", t0, broker=False)
        self._put_json(hello_answer(version, self.settings, self.config))


def peer_name(ws: ServerConnection) -> str:
    """``host:port`` of the client, for logs."""
    address = ws.remote_address
    if isinstance(address, tuple) and len(address) >= 2:
        return f"{address[0]}:{address[1]}"
    return str(address)
