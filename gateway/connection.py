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
the closest shape, a failed one its error shape, never silence.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed

from gateway.admin import ADMIN_TYPES, admin, admin_error
from gateway.outbox import KEEP, Fallback, Outbox, Sequencer
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
    VideoFrameD,
    error_message,
    hello_message,
    inference_message,
    metadata_error_message,
    metadata_message,
    model_list_error_message,
    model_list_message,
    parse_binary_request,
    parse_json_request,
    protocol_ack_message,
    stats_message,
    stream_error_message,
    unknown_type_message,
    valid_model_name,
    video_frame_error_message,
)
from shared.errors import ErrorCode, ServiceError
from shared.modelstats import merge_models


if TYPE_CHECKING:
    from gateway.brokerclient import Answer
    from gateway.server import Gateway


__all__ = ["CLOSE_OVERFLOW", "FEATURES", "PROTOCOL_VERSION", "Connection", "peer_name"]

logger = logging.getLogger(__name__)

PROTOCOL_VERSION = 1
FEATURES = (
    "layout_a",
    "layout_b",
    "layout_c",
    "layout_d",
    "audio_override",
    "output_mode",
    "quality",
    "pipelining",
    "error_codes",
    "streams",
    "tagged_frames",
    "deadlines",
)
"""What ``hello`` offers (``streams``, ``tagged_frames``: docs/streams.md; ``deadlines``:
B requests with their own deadline, docs/protocol.md section 4)."""

STREAM_TYPES = frozenset({"stream_start", "stream_stop", "stream_interrupt"})
MODES = ("crop", "composite")
AUDIO_SR = 24_000  # layout B and audio_override: the original page's capture rate
VIDEO_FRAME_TTL_MS = 5_000
LOCAL_TTL_MS = 2_000  # list_models, metadata, stats: the broker answers them itself
DEADLINE_PREFIX = bytes([EXTENSION, DEADLINE])
CLOSE_OVERFLOW = 1008  # policy violation: more undelivered answers than allowed
SLOW_CLIENT = "slow_client: answer not read in time; its image was dropped"

JsonAnswer = str | bytes
JsonHandler = Callable[[JsonRequest, float], Awaitable[JsonAnswer]]
ErrorShape = Callable[[JsonRequest, str], str]


def _text(exc: ServiceError) -> str:
    """An error as clients see it: ``code: message`` (code first, so programs can split)."""
    return f"{exc.code.value}: {exc.message}"


def _jpeg(answer: Answer) -> bytes:
    if not answer.payload:
        raise ServiceError(ErrorCode.INTERNAL, "answer without an image")
    return bytes(answer.payload[0])


def _bounds(answer: Answer) -> tuple[float, ...]:
    try:
        return tuple(float(b) for b in answer.header.bounds or ())
    except (TypeError, ValueError):
        raise ServiceError(ErrorCode.INTERNAL, "answer with bad bounds") from None


class Connection:
    """Serves one WebSocket until it closes. ``gateway`` holds what connections share."""

    def __init__(self, gateway: Gateway, ws: ServerConnection) -> None:
        self.gateway = gateway
        self.config = gateway.config
        self.metrics = gateway.metrics
        self.ws = ws
        self.peer = peer_name(ws)
        held_bytes = int(self.config.max_undelivered_mb * 1024 * 1024)
        self.outbox = Outbox(
            max_bytes=held_bytes,
            max_age_s=self.config.slow_client_ms / 1000,
            on_drop=self._on_drop,
        )
        self.sequencer = Sequencer(max_bytes=held_bytes)
        self.overflowed = False  # closed for holding too many undelivered answers
        self._closer: asyncio.Future[None] | None = None  # that close, held till done
        self.tasks: set[asyncio.Task[None]] = set()
        # server-driven streams (docs/streams.md): their own bounds, not max_in_flight
        self.streams = gateway.streams.connection(
            request=gateway.broker.request, send=self._stream_send
        )
        self.received = 0
        # per-connection settings, changed by hello
        self.mode_a = "composite"  # the A client draws the answer as the whole picture
        self.mode_b = "crop"  # the C client draws the answer at its bounds
        self.quality: int | None = None  # None: the worker's default
        self.video_quality: int | None = None
        self.said_hello = False  # a client of ours: answers may carry our extra fields
        self._json: dict[str, tuple[str, JsonHandler, ErrorShape]] = {
            "": ("inference", self._inference, _inference_error),
            "inference": ("inference", self._inference, _inference_error),
            "list_models": ("list_models", self._list_models, _model_list_error),
            "get_metadata": ("get_metadata", self._metadata, _metadata_error),
            "get_video_frame": ("get_video_frame", self._video_frame, _video_frame_error),
            "get_stats": ("get_stats", self._stats, _plain_error),
        }
        for kind in ADMIN_TYPES:  # load/unload/reload a package; token-protected
            self._json[kind] = (kind, functools.partial(admin, self), admin_error)

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
        return self.outbox.dropped + self.sequencer.dropped

    async def drain(self) -> None:
        """Wait until every accepted request is answered and handed to the socket."""
        while self.tasks:
            await asyncio.wait(set(self.tasks))
        await self.outbox.flushed()

    async def _send_loop(self) -> None:
        try:
            await self.outbox.run(self._send)
        except ConnectionClosed:
            pass

    async def _send(self, data: bytes | str, kind: str) -> None:
        await self.ws.send(data)
        size = len(data) if isinstance(data, bytes) else len(data.encode("utf-8"))
        self.metrics.bytes_out.inc(size)
        self.metrics.messages_out.labels(kind).inc()

    async def _stream_send(self, data: bytes | str) -> None:
        if isinstance(data, bytes):
            self._put(data, "tagged", None)  # the sequence numbers show a gap
        else:
            self._put_json(data)

    def _put(self, data: bytes | str, kind: str, fallback: Fallback = KEEP) -> None:
        """Queue an answer for the socket (``fallback``: see ``gateway.outbox``)."""
        self.outbox.put(data, kind, fallback)
        self._check_undelivered()

    def _check_undelivered(self) -> None:
        """Close a connection that holds more undelivered answers than allowed: it pipelines
        without limit against a stall, or does not read at all. Each answer it holds costs
        only a few bytes once its image is given up, but the count must end somewhere."""
        held = len(self.outbox) + self.sequencer.waiting
        if held <= self.config.max_undelivered or self.overflowed:
            return
        self.overflowed = True
        self.metrics.overflow_closes.inc()
        reason = f"more than {self.config.max_undelivered} answers undelivered"
        logger.warning(
            "%s: %s (%d waiting for order, %d for the socket); closing with %d",
            self.peer,
            reason,
            self.sequencer.waiting,
            len(self.outbox),
            CLOSE_OVERFLOW,
        )
        self._closer = asyncio.ensure_future(self.ws.close(CLOSE_OVERFLOW, reason))

    def _on_drop(self, kind: str) -> None:
        self.metrics.dropped.labels(kind).inc()
        self.gateway.totals["dropped_frames"] += 1

    # -- dispatch ----------------------------------------------------------------------

    def receive(self, message: str | bytes) -> None:
        """Handle one client message: answer it now, or start a task that will."""
        self.received += 1
        if self.overflowed:
            return  # closing: what it sends now is not read

        t0 = time.monotonic()
        if isinstance(message, str):
            self.gateway.totals["json_requests"] += 1
            self._on_text(message, t0)
        else:
            self.gateway.totals["binary_requests"] += 1
            self._on_binary(message, t0)

    def _admit(self) -> ServiceError | None:
        if self.gateway.shutting_down:
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
        self.metrics.requests.labels(op, outcome).inc()
        if broker:
            self.metrics.latency.labels(op).observe(elapsed)
            self.gateway.totals["answered"] += 1
            self.gateway.totals["time_ms"] += elapsed * 1000
        return elapsed * 1000

    async def _ask(self, op: str, **kwargs: Any) -> Answer:
        self.metrics.in_flight.inc()
        try:
            return await self.gateway.broker.request(op, **kwargs)
        except ServiceError:
            raise
        except Exception as exc:
            logger.exception("broker request %s failed", op)
            raise ServiceError(ErrorCode.INTERNAL, "internal error") from exc
        finally:
            self.metrics.in_flight.dec()

    def _infer_opts(self, mode: str, *, audio: bool = False) -> dict[str, Any]:
        opts: dict[str, Any] = {"mode": mode}
        if self.quality is not None:
            opts["quality"] = self.quality
        if audio:
            opts["audio_sr"] = AUDIO_SR
        return opts

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
            self.metrics.malformed.labels("binary").inc()
            self._put(ErrorResponseC(0, 0, f"bad_request: {exc}").serialize(), "c")
            return
        if isinstance(request, RequestA):
            self._on_a(request, t0)
        else:
            self._on_b(request, t0)

    def _on_a(self, request: RequestA, t0: float) -> None:
        refusal = self._admit() or _frame_check(request.frame_id)
        if refusal is None:
            self._spawn(self._infer_a(request, self.sequencer.ticket(), t0))
            return
        self._done("infer_a", refusal.code.value, t0, broker=False)
        self._release_a(self.sequencer.ticket(), b"")  # in order, like every A answer

    async def _infer_a(self, request: RequestA, ticket: int, t0: float) -> None:
        try:
            answer = await self._ask(
                "infer",
                model=request.model_name,
                frame=request.frame_id,
                opts=self._infer_opts(self.mode_a),
                ttl_ms=self.config.request_timeout_ms,
            )
            image, outcome = _jpeg(answer), "ok"
        except ServiceError as exc:
            image, outcome = b"", exc.code.value
        self._done("infer_a", outcome, t0)
        self._release_a(ticket, image)

    def _release_a(self, ticket: int, image: bytes) -> None:
        seq = self.sequencer
        reordered, dropped = seq.reordered, seq.dropped
        for answer in seq.complete(ticket, image):
            self.outbox.put(answer, "a", b"" if answer else KEEP)
        if seq.reordered > reordered:
            self.metrics.reordered.inc(seq.reordered - reordered)
        for _ in range(seq.dropped - dropped):
            self._on_drop("a")
        self._check_undelivered()

    def _on_deadline_request(self, data: bytes, t0: float) -> None:
        try:
            wrapped = DeadlineRequest.parse(data)
        except ProtocolError as exc:
            self.metrics.malformed.labels("binary").inc()
            self._put(ErrorResponseC(0, 0, f"bad_request: {exc}").serialize(), "c")
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
        self._put(ErrorResponseC(request.frame_id, ms, _text(refusal)).serialize(), "c")

    async def _infer_b(self, request: RequestB, t0: float, ttl_ms: int) -> None:
        try:
            answer = await self._ask(
                "infer",
                model=request.model_name,
                frame=request.frame_id,
                opts=self._infer_opts(self.mode_b, audio=bool(request.audio)),
                payload=(request.audio,) if request.audio else (),
                ttl_ms=ttl_ms,
            )
            image, bounds = _jpeg(answer), _bounds(answer)
        except ServiceError as exc:
            ms = self._done("infer_b", exc.code.value, t0)
            self._put(ErrorResponseC(request.frame_id, ms, _text(exc)).serialize(), "c")
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
                self._put_json(shape(request, _text(refusal)))
        elif kind in ("switch_to_binary", "test_binary"):
            self._done("protocol_ack", "ok", t0, broker=False)
            self._put_json(protocol_ack_message())
        elif kind == "hello":
            self._hello(request, t0)
        elif kind in STREAM_TYPES:
            self._done("stream", "ok", t0, broker=False)
            if self.gateway.shutting_down and kind == "stream_start":
                self._put_json(
                    stream_error_message(
                        request.extra.get("stream"),
                        ErrorCode.SHUTTING_DOWN.value,
                        "server shutting down",
                    )
                )
            else:
                fields = {**request.extra, "type": kind, "model_name": request.model_name}
                self.streams.handle_json(fields)
        else:
            self._done("unknown", ErrorCode.BAD_REQUEST.value, t0, broker=False)
            self._put_json(unknown_type_message(kind))

    def _put_json(self, text: str) -> None:
        self._put(text, "json")

    async def _json_call(
        self, op: str, handler: JsonHandler, shape: ErrorShape, request: JsonRequest, t0: float
    ) -> None:
        try:
            answer = await handler(request, t0)
            outcome = "ok"
        except ServiceError as exc:
            answer, outcome = shape(request, _text(exc)), exc.code.value
        except Exception:  # a bug here must still answer the client
            logger.exception("%s failed", op)
            answer, outcome = shape(request, "internal: internal error"), "internal"
        self._done(op, outcome, t0)
        if isinstance(answer, bytes):  # a video frame (D); its error shape is JSON
            self._put(answer, "d", shape(request, SLOW_CLIENT))
        else:
            self._put_json(answer)

    async def _list_models(self, request: JsonRequest, t0: float) -> JsonAnswer:
        answer = await self._ask("list_models", ttl_ms=LOCAL_TTL_MS)
        result = answer.header.result if isinstance(answer.header.result, dict) else {}
        models = result.get("models")
        return model_list_message([str(m) for m in models] if isinstance(models, list) else [])

    async def _metadata(self, request: JsonRequest, t0: float) -> JsonAnswer:
        model = _model_name(request)
        answer = await self._ask("metadata", model=model, ttl_ms=LOCAL_TTL_MS)
        r = answer.header.result if isinstance(answer.header.result, dict) else {}
        try:
            return metadata_message(
                model,
                int(r.get("frame_count", 0)),
                [str(v) for v in r.get("videos", ())],
                [float(b) for b in r.get("bounds") or ()],
                audio_path=str(r.get("audio_path", "")),
                serving=_serving(r) if self.said_hello else None,
            )
        except (TypeError, ValueError):
            raise ServiceError(ErrorCode.INTERNAL, "bad metadata from broker") from None

    async def _video_frame(self, request: JsonRequest, t0: float) -> JsonAnswer:
        model = _model_name(request)
        refusal = _frame_check(request.frame_id)
        if refusal is not None:
            raise refusal
        video_type = request.video_type
        if not video_type:
            raise ServiceError(ErrorCode.BAD_REQUEST, "video_type is required")
        if not valid_model_name(video_type):  # same alphabet and length as a model name
            raise ServiceError(ErrorCode.UNKNOWN_VIDEO, "bad video type")
        opts: dict[str, Any] = {"video_type": video_type}
        if self.video_quality is not None:
            opts["quality"] = self.video_quality
        answer = await self._ask(
            "video_frame",
            model=model,
            frame=request.frame_id,
            opts=opts,
            ttl_ms=VIDEO_FRAME_TTL_MS,
        )
        return VideoFrameD(request.frame_id, video_type, _jpeg(answer)).serialize()

    async def _inference(self, request: JsonRequest, t0: float) -> JsonAnswer:
        model = _model_name(request)
        refusal = _frame_check(request.frame_id)
        if refusal is not None:
            raise refusal
        audio = request.audio_override
        # The JSON answer carries no image ("use_binary_protocol_for_image_data"), so ask
        # for the cheaper crop: the worker still runs the model and reports timings.
        answer = await self._ask(
            "infer",
            model=model,
            frame=request.frame_id,
            opts=self._infer_opts("crop", audio=bool(audio)),
            payload=(audio,) if audio else (),
            ttl_ms=self.config.request_timeout_ms,
        )
        timings = answer.header.timings or {}
        result = answer.header.result if isinstance(answer.header.result, dict) else {}
        shape = result.get("shape")
        return inference_message(
            success=True,
            frame_id=request.frame_id,
            processing_time_ms=(time.monotonic() - t0) * 1000,
            prediction_shape=shape if isinstance(shape, str) and shape else "320x320x3",
            bounds=_bounds(answer),
            prepare_time_ms=_timing(timings, "prepare"),
            inference_time_ms=_timing(timings, "inference"),
            composite_time_ms=_timing(timings, "composite") + _timing(timings, "encode"),
        )

    async def _stats(self, request: JsonRequest, t0: float) -> JsonAnswer:
        status = await self.gateway.health.status()
        return stats_message(
            {
                **self.gateway.stats_fields(),
                "broker": status.broker,
                "workers": status.workers,
                "models": status.models,
                "model_stats": merge_models(status.stats),
            }
        )

    def _hello(self, request: JsonRequest, t0: float) -> None:
        """``hello``: negotiate the version, and optionally set this connection's output
        mode for layouts A and B and its JPEG qualities. All or nothing: a bad field
        changes nothing."""
        extra = request.extra
        try:
            version = extra.get("version", PROTOCOL_VERSION)
            if not isinstance(version, int) or isinstance(version, bool) or version < 1:
                raise ProtocolError("hello version must be an integer >= 1")
            settings: dict[str, Any] = {}
            for key in ("mode_a", "mode_b"):
                if key in extra:
                    if extra[key] not in MODES:
                        raise ProtocolError(f"{key} must be crop or composite")
                    settings[key] = extra[key]
            for key in ("quality", "video_quality"):
                if key in extra:
                    value = extra[key]
                    if value is not None and (
                        not isinstance(value, int)
                        or isinstance(value, bool)
                        or not 1 <= value <= 100
                    ):
                        raise ProtocolError(f"{key} must be an integer 1..100 or null")
                    settings[key] = value
        except ProtocolError as exc:
            self._done("hello", ErrorCode.BAD_REQUEST.value, t0, broker=False)
            self._put_json(error_message(f"bad_request: {exc}"))
            return
        for key, value in settings.items():
            setattr(self, key, value)
        self.said_hello = True
        self._done("hello", "ok", t0, broker=False)
        current: dict[str, Any] = {"mode_a": self.mode_a, "mode_b": self.mode_b}
        if self.quality is not None:
            current["quality"] = self.quality
        if self.video_quality is not None:
            current["video_quality"] = self.video_quality
        current["max_in_flight"] = self.config.max_in_flight
        current["max_message_bytes"] = self.config.max_message_bytes
        current["max_deadline_ms"] = self.config.max_deadline_ms
        self._put_json(hello_message(min(version, PROTOCOL_VERSION), FEATURES, current))


# -- helpers -----------------------------------------------------------------------------


def peer_name(ws: ServerConnection) -> str:
    """``host:port`` of the client, for logs."""
    address = ws.remote_address
    if isinstance(address, tuple) and len(address) >= 2:
        return f"{address[0]}:{address[1]}"
    return str(address)


def _frame_check(frame_id: int) -> ServiceError | None:
    """Negative ids are out of every model's range; the rest is the worker's to judge."""
    if frame_id < 0:
        return ServiceError(ErrorCode.FRAME_OUT_OF_RANGE, f"frame {frame_id} out of range")
    return None


def _model_name(request: JsonRequest) -> str:
    if not request.model_name:
        raise ServiceError(ErrorCode.BAD_REQUEST, "model_name is required")
    if not valid_model_name(request.model_name):
        raise ServiceError(ErrorCode.BAD_REQUEST, "bad model name")
    return request.model_name


def _serving(result: dict[str, Any]) -> dict[str, int]:
    """The broker's view of who serves a model, for clients of ours (``metadata``)."""
    return {"workers": int(result.get("workers", 0)), "capacity": int(result.get("capacity", 0))}


def _timing(timings: dict[str, Any], key: str) -> float:
    value = timings.get(key, 0.0)
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else 0.0


def _inference_error(request: JsonRequest, error: str) -> str:
    return inference_message(
        success=False, frame_id=request.frame_id, processing_time_ms=0, error=error
    )


def _model_list_error(request: JsonRequest, error: str) -> str:
    return model_list_error_message(error)


def _metadata_error(request: JsonRequest, error: str) -> str:
    return metadata_error_message(request.model_name, error)


def _video_frame_error(request: JsonRequest, error: str) -> str:
    return video_frame_error_message(request.model_name, request.frame_id, error)


def _plain_error(request: JsonRequest, error: str) -> str:
    return error_message(error)
