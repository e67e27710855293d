"""Server-driven streams (docs/streams.md): the client sends audio, the gateway decides which
frames to compute, asks the workers as soon as each frame's audio is in, and paces the
frames out at the avatar's frame rate.

Three objects:

- :class:`StreamHub` (one per gateway): what streams share: limits, metrics (the audio-in →
  frame-out latency histogram), the LRU of raw full frames that composite-mode idle frames
  show, and a random token that makes stream keys unique across gateways.
- :class:`StreamSet` (one per connection): routes ``stream_*`` JSON and ``0x00 0x01`` audio
  chunks to its streams, answers malformed ones, and cancels all of them when the
  connection closes.
- :class:`Stream` (one per stream): the audio buffer, the frame clock, the frame-id walk,
  silence detection, the requests in flight, and the pacer.

A stream's life, in its own time base (``t = 0`` at its first audio sample, or at the
first after an interrupt):

1. Frame ``j`` shows audio time ``j / fps``. Once the stream holds audio up to the end of
   frame ``j``'s clip (``shared.streamtime``: about 0.49 s after ``j / fps``), the frame is
   *issued*: if the 200 ms around its time is silent it is an idle frame (no inference),
   otherwise an ``infer`` request carries the clip. At most ``max_ahead`` frames are issued
   and not yet sent per stream.
2. The pacer sends frames in order, one every ``1/fps``. Its clock starts when the first
   frame is ready; a frame still computing ``grace`` after its slot is dropped (its request
   cancelled: a late lip-sync frame is worth nothing). A frame that was not even issued by
   then (the client's audio came late) is not dropped: the clock restarts when it is ready,
   so a stalled microphone does not turn into a burst of drops.
3. ``stream_stop`` pads the audio with silence so that every frame whose time falls inside
   the received audio can be computed, lets them play out, then answers ``stream_ended``.
   ``stream_interrupt`` cancels everything at once and restarts the clock with the next
   audio; sequence numbers and the frame-id walk carry on, so the head does not jump.

Nothing here imports torch or touches a socket: requests go through an injected
``request`` (``BrokerClient.request``'s signature) and messages through an injected async
``send``, which is how ``tests/test_streams.py`` drives it.
"""

from __future__ import annotations

import asyncio
import bisect
import functools
import logging
import math
import secrets
import time
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from shared.config import from_env
from shared.errors import ErrorCode, ServiceError
from shared.streamproto import (
    FLAG_COMPOSITE,
    FLAG_IDLE,
    FLAG_NO_IMAGE,
    StreamInterrupt,
    StreamProtocolError,
    StreamStart,
    StreamStop,
    TaggedFrame,
    encode_tagged_frame,
    parse_audio_chunk,
    parse_stream_request,
    stream_ended_message,
    stream_error_message,
    stream_interrupted_message,
    stream_started_message,
)
from shared.streamtime import (
    clip_samples,
    clip_t0_ms,
    energy_window,
    frame_time_ms,
    frames_in,
    lookahead_ms,
    walk_frame,
)


if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

    from gateway.brokerclient import Answer


__all__ = [
    "IdleFrames",
    "LatencyHistogram",
    "Stream",
    "StreamHub",
    "StreamLimits",
    "StreamMetrics",
    "StreamSet",
]

logger = logging.getLogger(__name__)


class RequestFn(Protocol):
    """``BrokerClient.request``."""

    def __call__(
        self,
        op: str,
        *,
        model: str = "",
        frame: int = -1,
        opts: dict[str, Any] | None = None,
        payload: Any = (),
        ttl_ms: int = 2000,
    ) -> Awaitable[Answer]: ...


SendFn = Callable[[bytes | str], Awaitable[None]]

_FATAL = frozenset(
    {ErrorCode.BAD_REQUEST, ErrorCode.AUDIO_UNSUPPORTED, ErrorCode.FRAME_OUT_OF_RANGE}
)
"""Frame errors that will not go away by themselves: the stream ends with ``stream_error``."""


def _env(name: str) -> dict[str, Any]:
    return {"env": f"LIPSYNC_STREAM_{name.upper()}"}


@dataclass(frozen=True, kw_only=True)
class StreamLimits:
    """Per-gateway stream settings. Every bound a client could otherwise push is here.

    ``StreamHub`` reads them from ``LIPSYNC_STREAM_<FIELD>`` variables (e.g.
    ``LIPSYNC_STREAM_GRACE_FRAMES``) when not given them: a CPU demo may rather show late
    frames than none, a GPU deployment wants the defaults.
    """

    max_ahead: int = field(default=8, metadata=_env("max_ahead"))  # issued, not sent, per stream
    max_streams_per_connection: int = field(default=8, metadata=_env("per_connection"))
    max_streams: int = field(default=256, metadata=_env("max_streams"))  # per gateway
    # a frame may be this many frame times late before the pacer acts on it
    grace_frames: float = field(default=1.0, metadata=_env("grace_frames"))
    # how far late frames may push a stream's playout back before they are dropped instead
    max_delay_ms: int = field(default=200, metadata=_env("max_delay_ms"))
    # RMS of the 200 ms around a frame (dBFS), below which it is idle
    silence_dbfs: float = field(default=-45.0, metadata=_env("silence_dbfs"))
    # audio held ahead of the next frame to issue
    max_buffer_s: float = field(default=10.0, metadata=_env("max_buffer_s"))
    ttl_ms: int = field(default=2000, metadata=_env("ttl_ms"))  # one frame's request, at most
    # once a stream's clock runs, a frame's request lives only until the frame could no
    # longer be shown, so that a worker never computes it for nobody (workers.servicetime)
    slot_deadlines: bool = field(default=True, metadata=_env("slot_deadlines"))
    start_ttl_ms: int = field(default=5000, metadata=_env("start_ttl_ms"))  # stream's metadata
    # consecutive failed frames (2 s at 25 fps) before giving up
    max_failures: int = field(default=50, metadata=_env("max_failures"))
    # raw full frames for composite-mode idle frames, all models
    idle_cache_items: int = field(default=64, metadata=_env("idle_cache_items"))
    idle_cache_bytes: int = field(default=32 << 20, metadata=_env("idle_cache_bytes"))


class LatencyHistogram:
    """Counts in log-spaced buckets (``ratio`` apart) from ``lo_ms`` to ``hi_ms``: bounded
    memory whatever the traffic, quantiles to within one bucket (2 %)."""

    def __init__(self, lo_ms: float = 1.0, hi_ms: float = 60_000.0, ratio: float = 1.02) -> None:
        n = math.ceil(math.log(hi_ms / lo_ms) / math.log(ratio)) + 1
        self._edges = [lo_ms * ratio**i for i in range(n)]  # upper edges
        self._counts = [0] * (n + 1)  # the last one: above hi_ms
        self.count = 0
        self.sum_ms = 0.0

    def observe(self, ms: float) -> None:
        self._counts[bisect.bisect_left(self._edges, ms)] += 1
        self.count += 1
        self.sum_ms += ms

    def quantile(self, q: float) -> float | None:
        """The upper edge of the bucket holding quantile ``q`` (ms); None when empty."""
        if not self.count:
            return None
        rank = max(1, math.ceil(q * self.count))
        seen = 0
        for i, c in enumerate(self._counts):
            seen += c
            if seen >= rank:
                return self._edges[min(i, len(self._edges) - 1)]
        return self._edges[-1]

    def snapshot(self) -> dict[str, float | int | None]:
        def r(x: float | None) -> float | None:
            return None if x is None else round(x, 1)

        return {
            "count": self.count,
            "mean_ms": r(self.sum_ms / self.count) if self.count else None,
            "p50_ms": r(self.quantile(0.5)),
            "p95_ms": r(self.quantile(0.95)),
            "p99_ms": r(self.quantile(0.99)),
        }


class StreamMetrics:
    """Stream counters and the latency histogram; also exported to Prometheus when given the
    gateway's registry (label values from closed sets only)."""

    COUNTERS = (
        "streams_started",
        "streams_refused",
        "streams_ended",
        "streams_failed",
        "interrupts",
        "frames_sent",
        "idle_frames",
        "inferred",  # infer requests sent
        "idle_fetches",  # raw full frames fetched for composite idle frames (cache misses)
        "dropped",
        "skipped",  # dropped without asking (part of "dropped"): the workers are behind
        "too_late",  # dropped before its time: a worker would have had it ready too late
        "delayed",  # a late frame pushed its stream's playout back one frame time
        "caught_up",  # frames a stream's playout moved forward after a second of early frames
        "audio_chunks",
        "audio_rejected",  # malformed chunks, chunks for unknown streams, audio after stop
    )

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.latency = LatencyHistogram()
        self.counters = dict.fromkeys(self.COUNTERS, 0)
        self.active = 0
        self._prom: dict[str, Any] = {}
        if registry is not None:
            from prometheus_client import Counter, Gauge, Histogram

            self._prom = {
                "latency": Histogram(
                    "lipsync_gateway_stream_latency_seconds",
                    "Stream frames: arrival of the last audio sample a frame needs to the frame "
                    "being sent.",
                    buckets=(0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1, 2, 5),
                    registry=registry,
                ),
                "events": Counter(
                    "lipsync_gateway_stream_events",
                    "Stream events: frames sent, idle frames, infer requests, drops, streams.",
                    ["event"],
                    registry=registry,
                ),
                "active": Gauge(
                    "lipsync_gateway_streams", "Streams open on this gateway.", registry=registry
                ),
            }

    def add(self, name: str, n: int = 1) -> None:
        self.counters[name] += n
        if self._prom:
            self._prom["events"].labels(name).inc(n)

    def observe_latency(self, seconds: float) -> None:
        self.latency.observe(seconds * 1000)
        if self._prom:
            self._prom["latency"].observe(seconds)

    def set_active(self, n: int) -> None:
        self.active = n
        if self._prom:
            self._prom["active"].set(n)

    def snapshot(self) -> dict[str, Any]:
        return {"active": self.active, **self.counters, "latency": self.latency.snapshot()}


class IdleFrames:
    """Raw ``full_body`` JPEGs that composite-mode idle frames show, per (model, frame,
    quality), in a small LRU bounded by count and bytes. Shared by all streams: a silent
    stream walks the same few frames again and again. Concurrent requests for one frame
    share one fetch, which finishes even if the frame that started it is dropped."""

    def __init__(
        self, max_items: int, max_bytes: int, metrics: StreamMetrics | None = None
    ) -> None:
        self.metrics = metrics
        self.max_items = max_items
        self.max_bytes = max_bytes
        self._items: OrderedDict[tuple[str, int, int], bytes] = OrderedDict()
        self._loading: dict[tuple[str, int, int], asyncio.Task[bytes]] = {}
        self._bytes = 0
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._items)

    async def get(
        self, request: RequestFn, model: str, frame_id: int, quality: int, ttl_ms: int
    ) -> bytes:
        key = (model, frame_id, quality)
        jpeg = self._items.get(key)
        if jpeg is not None:
            self._items.move_to_end(key)
            self.hits += 1
            return jpeg
        task = self._loading.get(key)
        if task is None:
            self.misses += 1
            if self.metrics is not None:
                self.metrics.add("idle_fetches")
            task = asyncio.ensure_future(self._fetch(request, key, ttl_ms))
            self._loading[key] = task
            task.add_done_callback(functools.partial(self._done, key))
        else:
            self.hits += 1
        return await asyncio.shield(task)

    async def _fetch(self, request: RequestFn, key: tuple[str, int, int], ttl_ms: int) -> bytes:
        model, frame_id, quality = key
        answer = await request(
            "video_frame",
            model=model,
            frame=frame_id,
            opts={"video_type": "full_body", "quality": quality},
            ttl_ms=ttl_ms,
        )
        if not answer.payload:
            raise ServiceError(ErrorCode.INTERNAL, "video frame answer without an image")
        jpeg = bytes(answer.payload[0])
        if len(jpeg) <= self.max_bytes and key not in self._items:
            self._items[key] = jpeg
            self._bytes += len(jpeg)
            while len(self._items) > self.max_items or self._bytes > self.max_bytes:
                _, old = self._items.popitem(last=False)
                self._bytes -= len(old)
        return jpeg

    def _done(self, key: tuple[str, int, int], task: asyncio.Task[bytes]) -> None:
        self._loading.pop(key, None)
        if not task.cancelled():
            task.exception()  # retrieved: its waiters (if any are left) got it too


class StreamHub:
    """What every stream of a gateway shares. ``connection()`` makes a connection's
    :class:`StreamSet`."""

    def __init__(
        self, limits: StreamLimits | None = None, *, registry: CollectorRegistry | None = None
    ) -> None:
        self.limits = limits if limits is not None else from_env(StreamLimits)
        self.metrics = StreamMetrics(registry)
        self.idle_frames = IdleFrames(
            self.limits.idle_cache_items, self.limits.idle_cache_bytes, self.metrics
        )
        self.token = secrets.token_hex(4)
        self._connections = 0
        self._streams: set[Stream] = set()

    def connection(self, *, request: RequestFn, send: SendFn) -> StreamSet:
        self._connections += 1
        return StreamSet(self, request=request, send=send, serial=self._connections)

    @property
    def active(self) -> int:
        return len(self._streams)

    def _add(self, stream: Stream) -> None:
        self._streams.add(stream)
        self.metrics.set_active(len(self._streams))

    def _remove(self, stream: Stream) -> None:
        self._streams.discard(stream)
        self.metrics.set_active(len(self._streams))

    def stats(self) -> dict[str, Any]:
        return {
            **self.metrics.snapshot(),
            "idle_cache": {
                "items": len(self.idle_frames),
                "hits": self.idle_frames.hits,
                "misses": self.idle_frames.misses,
            },
        }


class StreamSet:
    """One connection's streams. ``handle_json`` / ``handle_audio`` are synchronous (they
    act at once, in message order: an interrupt right behind a chunk sees the chunk);
    answers go out through ``send`` from tasks this object owns and ``close`` ends."""

    def __init__(self, hub: StreamHub, *, request: RequestFn, send: SendFn, serial: int) -> None:
        self.hub = hub
        self.request = request
        self.send = send
        self.serial = serial
        self.streams: dict[int, Stream] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._next_id = 1
        self._ended: deque[int] = deque(maxlen=64)  # recently ended: late chunks are expected
        self._closed = False

    def __len__(self) -> int:
        return len(self.streams)

    # -- client messages -------------------------------------------------------------------

    def handle_json(self, message: Mapping[str, Any]) -> None:
        """A ``stream_start`` / ``stream_stop`` / ``stream_interrupt`` object."""
        try:
            request = parse_stream_request(message)
        except StreamProtocolError as exc:
            self._error(exc.stream, ErrorCode.BAD_REQUEST, str(exc))
            return
        if isinstance(request, StreamStart):
            self._start(request)
            return
        stream = self.streams.get(request.stream)
        if stream is None or stream.closing:
            self._error(request.stream, ErrorCode.BAD_REQUEST, "unknown stream")
        elif isinstance(request, StreamStop):
            stream.stop()
        elif isinstance(request, StreamInterrupt):
            stream.interrupt()

    def handle_audio(self, data: bytes | bytearray | memoryview) -> None:
        """A binary message whose first byte is 0x00."""
        metrics = self.hub.metrics
        try:
            chunk = parse_audio_chunk(data)
        except StreamProtocolError as exc:
            metrics.add("audio_rejected")
            self._error(exc.stream, ErrorCode.BAD_REQUEST, str(exc))
            return
        stream = self.streams.get(chunk.stream)
        if stream is None:
            metrics.add("audio_rejected")
            if chunk.stream not in self._ended:  # else: sent before the client heard the end
                self._error(chunk.stream, ErrorCode.BAD_REQUEST, "audio for an unknown stream")
            return
        metrics.add("audio_chunks")
        stream.feed(chunk.pcm)

    async def close(self) -> None:
        """The connection is gone: cancel every stream and what it has in flight."""
        self._closed = True
        streams = list(self.streams.values())
        for stream in streams:
            stream.cancel()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(
            *(s.wait_closed() for s in streams), *self._tasks, return_exceptions=True
        )

    # -- internals ---------------------------------------------------------------------------

    def _start(self, request: StreamStart) -> None:
        limits = self.hub.limits
        sid = request.stream if request.stream is not None else self._new_id()
        if sid in self.streams:
            self._error(sid, ErrorCode.BAD_REQUEST, "stream id in use on this connection")
            return
        if self._closed:
            return
        if len(self.streams) >= limits.max_streams_per_connection:
            self.hub.metrics.add("streams_refused")
            self._error(
                sid,
                ErrorCode.OVERLOADED,
                f"at most {limits.max_streams_per_connection} streams per connection",
            )
            return
        if self.hub.active >= limits.max_streams:
            self.hub.metrics.add("streams_refused")
            self._error(sid, ErrorCode.OVERLOADED, "too many streams on this gateway")
            return
        stream = Stream(
            sid=sid,
            key=f"{self.hub.token}.{self.serial}.{sid}",
            start=request,
            request=self.request,
            send=self.send,
            hub=self.hub,
            on_closed=self._closed_stream,
        )
        self.streams[sid] = stream
        self.hub._add(stream)
        self.hub.metrics.add("streams_started")
        stream.run()

    def _closed_stream(self, stream: Stream) -> None:
        if self.streams.get(stream.sid) is stream:
            del self.streams[stream.sid]
            self._ended.append(stream.sid)
        self.hub._remove(stream)

    def _new_id(self) -> int:
        while self._next_id in self.streams or self._next_id in self._ended:
            self._next_id = self._next_id % 0xFFFFFFFF + 1
        sid = self._next_id
        self._next_id = self._next_id % 0xFFFFFFFF + 1
        return sid

    def _error(self, stream: int | None, code: ErrorCode, message: str) -> None:
        if self._closed:
            return
        self._spawn(self.send(stream_error_message(stream, code.value, message)))

    def _spawn(self, coro: Awaitable[None]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


@dataclass(eq=False, slots=True)
class _Frame:
    """One issued frame of the current epoch."""

    j: int  # stream frame index within the epoch
    seq: int
    frame_id: int
    audio_ms: int
    arrival: float | None  # when its last needed audio sample arrived (None: padding)
    idle: bool
    data: bytes | None = None  # the tagged frame, once ready
    failed: ServiceError | None = None
    skipped: bool = False  # not requested: the workers are not keeping up
    ttl_ms: int = 0  # its request's time to live, when requested
    task: asyncio.Task[None] | None = None
    ready_at: float = 0.0  # when an inferred frame's answer came

    @property
    def done(self) -> bool:
        return self.data is not None or self.failed is not None or self.skipped


@dataclass(slots=True)
class _Totals:
    sent: int = 0
    idle: int = 0
    dropped: int = 0
    failures_in_a_row: int = 0
    last_error: ServiceError | None = None
    padded_from: int | None = None  # sample index where stop's silence begins
    arrivals: deque[tuple[int, float]] = field(default_factory=deque)


class Stream:
    """One stream (see the module docstring). Created by :class:`StreamSet`; ``run``
    starts its pacer task, which opens the stream (metadata), paces its frames and, when
    the stream ends for any reason, cancels what is left and tells ``on_closed``."""

    def __init__(
        self,
        *,
        sid: int,
        key: str,
        start: StreamStart,
        request: RequestFn,
        send: SendFn,
        hub: StreamHub,
        on_closed: Callable[[Stream], None],
    ) -> None:
        self.sid = sid
        self.key = key
        self.model = start.model_name
        self.sr = start.sample_rate
        self.mode = start.mode
        self.quality = start.quality
        self.request = request
        self.send = send
        self.hub = hub
        self.limits = hub.limits
        self.metrics = hub.metrics
        self.on_closed = on_closed
        # from the model's metadata, once known
        self.fps = 0.0
        self.frame_count = 0
        self.size = (0, 0)
        self.bounds: tuple[float, float, float, float] = (0.0, 0.0, 0.0, 0.0)
        self.lookahead_ms = 0
        self.state = "starting"  # starting | running | stopping | closed
        self.closing = False  # ending now: failed or cancelled (a stop is not an end yet)
        self._error: ServiceError | None = None  # why it failed: the pacer says so
        self._cancelled = False
        self._stop_requested = False
        self._final_frames: int | None = None
        # epoch state (reset by interrupt)
        self.epoch = 0
        self._audio = bytearray()  # int16 LE from stream sample ``_base`` on
        self._base = 0
        self._received = 0  # samples received this epoch (padding excluded)
        self._next_issue = 0
        self._next_send = 0
        self._frames: dict[int, _Frame] = {}
        self._seq_base = 0  # seq of frame 0 of this epoch (also the walk position)
        self._clock: tuple[float, int] | None = None  # (time of slot of frame j0, j0)
        # Seconds the clock has moved since it started: back by a frame time for a late
        # frame (at most max_delay_ms), forward when a whole second of inferred frames was
        # early (see _catch_up), so the stream's latency follows what the workers do now,
        # not what its first frame happened to take.
        self._shift = 0.0
        self._early_min = math.inf
        self._early_n = 0
        # Inferred frames allowed in flight: halved by each frame dropped for lateness, grown
        # by one per window of frames in time (AIMD), so that when the workers cannot keep
        # up the stream asks for fewer frames, each in time, instead of for every frame,
        # each late (which shows nothing and wastes the workers on frames nobody sees).
        self._window = float(self.limits.max_ahead)
        self._inferring = 0
        self._t = _Totals()
        self._changed = asyncio.Event()
        self._send_lock = asyncio.Lock()
        self._tasks: set[asyncio.Task[None]] = set()  # frames in flight
        self._messages: set[asyncio.Task[None]] = set()  # JSON answers on their way
        self._pacer: asyncio.Task[None] | None = None
        self._closed = asyncio.Event()

    # -- control (synchronous, from the connection's receive loop) ------------------------

    def run(self) -> None:
        self._pacer = asyncio.ensure_future(self._run())

    def feed(self, pcm: bytes) -> None:
        """Append one chunk of audio (int16 LE at the stream's rate)."""
        if self.closing or self._stop_requested:
            self.metrics.add("audio_rejected")
            return
        n = len(pcm) // 2
        if n > self.sr:
            self._fail(ServiceError(ErrorCode.BAD_REQUEST, "audio chunk longer than one second"))
            return
        if not n:
            return
        self._audio += pcm
        self._received += n
        self._t.arrivals.append((self._received, time.monotonic()))
        if len(self._audio) // 2 > self.limits.max_buffer_s * self.sr:
            self._fail(
                ServiceError(
                    ErrorCode.OVERLOADED,
                    f"audio more than {self.limits.max_buffer_s:g} s ahead of the frames",
                )
            )
            return
        self._pump()

    def stop(self) -> None:
        """Finish the frames of the audio received so far, then ``stream_ended``."""
        if self._stop_requested:
            return
        self._stop_requested = True
        if self.state == "running":
            self._begin_stopping()

    def interrupt(self) -> None:
        """Barge-in: drop everything queued or in flight now; answer ``stream_interrupted``."""
        if self.closing:
            return
        self.metrics.add("interrupts")
        self._cancel_frames()
        self._seq_base += self._next_send
        self.epoch += 1
        self._audio = bytearray()
        self._base = 0
        self._received = 0
        self._next_issue = self._next_send = 0
        self._clock = None
        self._t.arrivals.clear()
        self._t.padded_from = None
        if self.state == "stopping":
            self._final_frames = 0  # nothing left to finish: the pacer ends the stream
        self._changed.set()
        task = asyncio.ensure_future(self._send_json(stream_interrupted_message(self.sid)))
        self._messages.add(task)
        task.add_done_callback(self._messages.discard)

    def cancel(self) -> None:
        """The connection closed: end now, without a word."""
        self.closing = True
        self._cancelled = True
        self._cancel_frames()
        if self._pacer is not None:
            self._pacer.cancel()

    async def wait_closed(self) -> None:
        await self._closed.wait()

    # -- the pacer task ---------------------------------------------------------------------

    async def _run(self) -> None:
        try:
            opened = await self._open()
            if opened:
                while not self._finished():
                    await self._step()
            if self._error is not None:  # failed (before or after it opened)
                await self._send_json(
                    stream_error_message(self.sid, self._error.code.value, self._error.message)
                )
            elif opened and not self._cancelled:
                await self._send_json(
                    stream_ended_message(
                        stream=self.sid,
                        frames=self._t.sent,
                        idle_frames=self._t.idle,
                        dropped=self._t.dropped,
                    )
                )
                self.metrics.add("streams_ended")
        except asyncio.CancelledError:
            pass
        except Exception:
            logger.exception("stream %d (%s) failed", self.sid, self.model)
            self.metrics.add("streams_failed")
            try:
                await self._send_json(
                    stream_error_message(self.sid, ErrorCode.INTERNAL.value, "internal error")
                )
            except Exception:
                pass
        finally:
            self.state = "closed"
            self.closing = True
            self._cancel_frames()
            tasks = list(self._tasks)
            for task in tasks:
                task.cancel()
            messages = list(self._messages)
            if self._cancelled:  # nobody is listening any more
                for task in messages:
                    task.cancel()
            if tasks or messages:
                await asyncio.gather(*tasks, *messages, return_exceptions=True)
            self.on_closed(self)
            self._closed.set()

    async def _open(self) -> bool:
        try:
            answer = await self.request(
                "metadata", model=self.model, ttl_ms=self.limits.start_ttl_ms
            )
            self._apply_metadata(answer.header.result)
        except ServiceError as exc:
            self.metrics.add("streams_failed")
            await self._send_json(stream_error_message(self.sid, exc.code.value, exc.message))
            return False
        if self.closing:
            return False
        self.state = "running"
        await self._send_json(
            stream_started_message(
                stream=self.sid,
                model_name=self.model,
                fps=self.fps,
                frame_count=self.frame_count,
                sample_rate=self.sr,
                mode=self.mode,
                lookahead_ms=self.lookahead_ms,
                bounds=self.bounds,
            )
        )
        if self._stop_requested:
            self._begin_stopping()
        self._pump()
        return True

    def _apply_metadata(self, info: Any) -> None:
        try:
            fps = float(info["fps"])
            frame_count = int(info["frame_count"])
            width, height = (int(v) for v in info["size"])
            x1, y1, x2, y2 = (float(v) for v in info["bounds"])
            audio = bool(info.get("audio", False))
        except (KeyError, TypeError, ValueError):
            raise ServiceError(ErrorCode.INTERNAL, "model metadata unreadable") from None
        if not (math.isfinite(fps) and 1 <= fps <= 240) or frame_count < 1:
            raise ServiceError(ErrorCode.INTERNAL, "model metadata out of range")
        if not audio:
            raise ServiceError(
                ErrorCode.AUDIO_UNSUPPORTED,
                f"model {self.model!r} has no audio encoder: it cannot follow live audio",
            )
        self.fps = fps
        self.frame_count = frame_count
        self.size = (width, height)
        self.bounds = (x1, y1, x2, y2)
        self.lookahead_ms = lookahead_ms(fps, self.sr)

    def _finished(self) -> bool:
        if self.closing:
            return True
        return (
            self.state == "stopping"
            and self._final_frames is not None
            and self._next_send >= self._final_frames
        )

    async def _step(self) -> None:
        """Send, drop or wait for the next frame; one decision per call."""
        self._changed.clear()
        now = time.monotonic()
        j = self._next_send
        frame = self._frames.get(j)
        if frame is not None and (frame.failed is not None or frame.skipped):
            if self._too_late(frame):
                self.metrics.add("too_late")
                self._drop_late(frame)
                return
            self._drop(frame, failed=not frame.skipped)
            return
        if self._clock is None:
            if frame is None or not frame.done:
                await self._wait(None)
                return
            self._clock = (now, j)
            self._shift = 0.0
            self._early_min, self._early_n = math.inf, 0
        slot = self._clock[0] + self._shift + (j - self._clock[1]) / self.fps
        if frame is not None and frame.done:
            if now < slot:
                await self._wait(slot - now)
                return
            await self._emit(frame, slot)
            return
        late = slot + self.limits.grace_frames / self.fps
        if now < late:
            await self._wait(late - now)
            return
        if frame is None:
            self._clock = None  # the client's audio came late: restart the clock on it
        elif self._shift + 1 / self.fps <= self.limits.max_delay_ms / 1000 + 1e-9:
            self._shift += 1 / self.fps  # jitter: play this stream a frame later from now on
            self.metrics.add("delayed")
        else:
            self._drop_late(frame)

    def _drop_late(self, frame: _Frame) -> None:
        """A frame that could not be shown in time: fewer requests in flight from now on."""
        self._window = max(1.0, self._window / 2)
        self._drop(frame, failed=False)

    def _too_late(self, frame: _Frame) -> bool:
        """Failed only for lack of time: its request carried the frame's own deadline and
        a worker (or the broker) found it could not be ready by then. A late frame, not a
        failure that counts towards ending the stream."""
        failed = frame.failed
        return (
            failed is not None
            and failed.code is ErrorCode.DEADLINE_EXCEEDED
            and frame.ttl_ms < self.limits.ttl_ms
        )

    def _frame_ttl_ms(self, j: int) -> int:
        """How long frame ``j``'s request is worth waiting for: until the latest moment the
        pacer could still show it (its slot with the playout pushed back as far as it may
        go, plus the grace), capped by ``ttl_ms``. Before the clock runs, ``ttl_ms``."""
        if not self.limits.slot_deadlines or self._clock is None:
            return self.limits.ttl_ms
        t0, j0 = self._clock
        last = t0 + (j - j0 + self.limits.grace_frames) / self.fps + self.limits.max_delay_ms / 1000
        return max(1, min(self.limits.ttl_ms, int((last - time.monotonic()) * 1000)))

    async def _wait(self, timeout: float | None) -> None:
        try:
            await asyncio.wait_for(self._changed.wait(), timeout)
        except TimeoutError:
            pass

    async def _emit(self, frame: _Frame, slot: float) -> None:
        del self._frames[frame.j]
        self._next_send += 1
        self._t.sent += 1
        self.metrics.add("frames_sent")
        if frame.idle:
            self._t.idle += 1
            self.metrics.add("idle_frames")
        else:
            self._window = min(float(self.limits.max_ahead), self._window + 1 / self._window)
            self._catch_up(slot - frame.ready_at)
        if frame.arrival is not None:
            self.metrics.observe_latency(time.monotonic() - frame.arrival)
        self._pump()
        assert frame.data is not None
        async with self._send_lock:
            await self.send(frame.data)

    def _catch_up(self, early: float) -> None:
        """Once a second's inferred frames were all ready early by more than 1.5 frame
        times, move the clock forward by the surplus beyond one frame time, at most five
        frames at once (those then go out back to back: latency lower, pacing one burst)."""
        self._early_min = min(self._early_min, early)
        self._early_n += 1
        if self._early_n >= self.fps:
            if self._early_min > 1.5 / self.fps:
                frames = min(5, int((self._early_min - 1 / self.fps) * self.fps))
                self._shift -= frames / self.fps
                self.metrics.add("caught_up", frames)
            self._early_min, self._early_n = math.inf, 0

    def _drop(self, frame: _Frame, *, failed: bool) -> None:
        del self._frames[frame.j]
        if frame.task is not None and not frame.task.done():
            frame.task.cancel()
        self._next_send += 1
        self._t.dropped += 1
        self.metrics.add("dropped")
        if frame.skipped:
            self.metrics.add("skipped")
        if failed and frame.failed is not None:
            self._note_failure(frame.failed)
        self._pump()

    # -- issuing frames ------------------------------------------------------------------------

    def _begin_stopping(self) -> None:
        """Pad with silence so every frame inside the received audio can be computed."""
        self.state = "stopping"
        final = frames_in(self._received, self.fps, self.sr)
        self._final_frames = final
        self._t.padded_from = self._received
        if final:
            need = clip_samples(final - 1, self.fps, self.sr)[1]
            missing = need - (self._base + len(self._audio) // 2)
            if missing > 0:
                self._audio += bytes(2 * missing)
        self._changed.set()
        self._pump()

    def _pump(self) -> None:
        """Issue every frame whose audio is in, up to ``max_ahead`` unsent."""
        if self.state not in ("running", "stopping"):
            return
        end_held = self._base + len(self._audio) // 2
        while self._next_issue - self._next_send < self.limits.max_ahead:
            j = self._next_issue
            if self._final_frames is not None and j >= self._final_frames:
                break
            start, end = clip_samples(j, self.fps, self.sr)
            if end > end_held:
                break
            self._issue(j, start, end)
            self._next_issue += 1
        self._trim()

    def _issue(self, j: int, start: int, end: int) -> None:
        seq = self._seq_base + j
        frame = _Frame(
            j=j,
            seq=seq,
            frame_id=walk_frame(seq, self.frame_count),
            audio_ms=round(frame_time_ms(j, self.fps)),
            arrival=self._arrival(end),
            idle=self._silent(j),
        )
        self._frames[j] = frame
        if frame.idle and self.mode == "crop":
            frame.data = self._tagged(frame, FLAG_IDLE | FLAG_NO_IMAGE, self._full_rect(), b"")
            self._changed.set()
            return
        if frame.idle:
            coro = self._idle_composite(frame)
        elif self._clock is not None and self._inferring >= int(self._window):
            frame.skipped = True
            self._changed.set()
            return
        else:
            self.metrics.add("inferred")
            self._inferring += 1
            frame.ttl_ms = self._frame_ttl_ms(j)
            coro = self._infer(frame, self._slice(start, end))
        frame.task = self._spawn(coro)

    async def _infer(self, frame: _Frame, clip: bytes) -> None:
        t0 = time.monotonic()
        try:
            answer = await self.request(
                "infer",
                model=self.model,
                frame=frame.frame_id,
                opts={
                    "mode": self.mode,
                    "quality": self.quality,
                    "audio_sr": self.sr,
                    "stream": f"{self.key}.{self.epoch}",
                    "stream_frame": frame.j,
                    "audio_t0_ms": clip_t0_ms(frame.j, self.fps, self.sr),
                },
                payload=(clip,),
                ttl_ms=frame.ttl_ms,
            )
            if not answer.payload:
                raise ServiceError(ErrorCode.INTERNAL, "answer without an image")
            bounds = answer.header.bounds or self.bounds
            x1, y1, x2, y2 = (float(b) for b in bounds)
            flags = FLAG_COMPOSITE if self.mode == "composite" else 0
            frame.ready_at = time.monotonic()
            frame.data = self._tagged(
                frame,
                flags,
                (x1, y1, x2, y2),
                bytes(answer.payload[0]),
                processing_us=(time.monotonic() - t0) * 1e6,
                worker=answer.header.worker,
            )
            self._t.failures_in_a_row = 0
        except ServiceError as exc:
            frame.failed = exc
        except (TypeError, ValueError):
            frame.failed = ServiceError(ErrorCode.INTERNAL, "answer with bad bounds")
        finally:
            self._inferring -= 1
            self._changed.set()

    async def _idle_composite(self, frame: _Frame) -> None:
        try:
            jpeg = await self.hub.idle_frames.get(
                self.request, self.model, frame.frame_id, self.quality, self.limits.ttl_ms
            )
            frame.data = self._tagged(frame, FLAG_IDLE | FLAG_COMPOSITE, self._full_rect(), jpeg)
        except ServiceError as exc:
            frame.failed = exc
        finally:
            self._changed.set()

    def _tagged(
        self,
        frame: _Frame,
        flags: int,
        bounds: tuple[float, float, float, float],
        image: bytes,
        *,
        processing_us: float = 0.0,
        worker: str = "",
    ) -> bytes:
        return encode_tagged_frame(
            TaggedFrame(
                stream=self.sid,
                seq=frame.seq,
                frame_id=frame.frame_id,
                audio_ms=frame.audio_ms,
                flags=flags,
                bounds=bounds,
                processing_us=round(processing_us),
                worker=worker,
                image=image,
            )
        )

    def _full_rect(self) -> tuple[float, float, float, float]:
        return (0.0, 0.0, float(self.size[0]), float(self.size[1]))

    # -- audio buffer --------------------------------------------------------------------------

    def _slice(self, start: int, end: int) -> bytes:
        """Samples ``[start, end)`` of the epoch's audio; zeros before its first sample."""
        lead = max(0, -start)
        lo = max(start, 0) - self._base
        hi = end - self._base
        if lo < 0:
            raise RuntimeError("stream audio trimmed too early")  # a bug, not input
        body = bytes(self._audio[2 * lo : 2 * hi])
        return bytes(2 * lead) + body if lead else body

    def _silent(self, j: int) -> bool:
        lo, hi = energy_window(j, self.fps, self.sr)
        pcm = self._slice(lo, hi) if hi > lo else b""
        if not pcm:
            return True
        x = np.frombuffer(pcm, dtype="<i2").astype(np.float64)
        rms = math.sqrt(float(np.mean(x * x))) / 32768.0
        return rms <= 0 or 20 * math.log10(rms) < self.limits.silence_dbfs

    def _arrival(self, end: int) -> float | None:
        """When the chunk holding sample ``end - 1`` arrived; None when it is stop's
        padding (not audio the client sent)."""
        padded = self._t.padded_from
        if padded is not None and end > padded:
            return None
        arrivals = self._t.arrivals
        while len(arrivals) > 1 and arrivals[0][0] < end:
            arrivals.popleft()
        if arrivals and arrivals[0][0] >= end:
            return arrivals[0][1]
        return None

    def _trim(self) -> None:
        """Forget audio that no frame still to issue needs."""
        keep_from = clip_samples(self._next_issue, self.fps, self.sr)[0]
        cut = keep_from - self._base
        if cut > 0:
            cut = min(cut, len(self._audio) // 2)
            del self._audio[: 2 * cut]
            self._base += cut

    # -- endings ------------------------------------------------------------------------------

    def _note_failure(self, exc: ServiceError) -> None:
        t = self._t
        t.failures_in_a_row += 1
        t.last_error = exc
        if exc.code in _FATAL or t.failures_in_a_row >= self.limits.max_failures:
            self._fail(exc)
        elif t.failures_in_a_row == 1:
            logger.info("stream %d (%s): frame failed: %s", self.sid, self.model, exc)

    def _fail(self, exc: ServiceError) -> None:
        """End the stream with ``stream_error`` (no ``stream_ended``); the pacer sends it."""
        if self.closing:
            return
        logger.warning("stream %d (%s) ends: %s: %s", self.sid, self.model, exc.code, exc.message)
        self.metrics.add("streams_failed")
        self.closing = True
        self._error = exc
        self._cancel_frames()
        self._changed.set()

    def _cancel_frames(self) -> None:
        for frame in self._frames.values():
            if frame.task is not None and not frame.task.done():
                frame.task.cancel()
        self._frames.clear()

    async def _send_json(self, text: str) -> None:
        async with self._send_lock:
            await self.send(text)

    def _spawn(self, coro: Awaitable[None]) -> asyncio.Task[None]:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task
