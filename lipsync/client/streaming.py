"""One server-driven stream (docs/streams.md) as the client sees it.

The client sends audio as it comes (``push``); the gateway decides which avatar frame shows
which moment of it, asks workers for each frame once its audio lookahead has arrived, and
sends tagged frames paced at the avatar's fps. ``frames()`` yields them in sequence order.

Frames wait here until read, at most ``MAX_BUFFERED_FRAMES``; past that the oldest is
dropped and counted (``client_dropped``), as the gateway does for a client that does not
read: a late lip-sync frame is worth nothing, and memory stays bounded.
"""

from __future__ import annotations

import asyncio
import json
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from lipsync.client.errors import ConnectionLost, LipsyncError, ServerError, Timeout
from lipsync.client.results import StreamEnd, StreamFrame, StreamInfo
from shared.errors import ErrorCode
from shared.streamproto import MAX_CHUNK_BYTES, encode_audio_chunk


__all__ = ["MAX_BUFFERED_FRAMES", "Stream"]

MAX_BUFFERED_FRAMES = 256
_END = object()


class Stream:
    """Made by ``LipsyncClient.stream``. ``info`` is the gateway's ``stream_started``.

    The stream knows nothing of the client that made it: it sends through ``send`` (a
    message to the gateway), says ``on_closed(sid)`` once it has ended, and is fed what
    the gateway says about it through :meth:`feed_json`, :meth:`feed_frame` and
    :meth:`connection_lost` (events in, like a sans-I/O protocol)."""

    def __init__(
        self,
        sid: int,
        sample_rate: int,
        *,
        send: Callable[[str | bytes], Awaitable[None]],
        on_closed: Callable[[int], None],
        timeout: float,
    ) -> None:
        self._send = send
        self._on_closed = on_closed
        self.timeout = timeout
        self.sid = sid
        self.sample_rate = sample_rate
        self.info: StreamInfo | None = None
        self.end: StreamEnd | None = None
        self.client_dropped = 0
        loop = asyncio.get_running_loop()
        self._started: asyncio.Future[StreamInfo] = loop.create_future()
        self._ended: asyncio.Future[StreamEnd] = loop.create_future()
        for fut in (self._started, self._ended):
            fut.add_done_callback(_consume)
        self._interrupts: deque[asyncio.Future[None]] = deque()
        self._queue: deque[Any] = deque()
        self._ready = asyncio.Event()
        self._error: LipsyncError | None = None
        self._stopping = False

    @property
    def closed(self) -> bool:
        return self._ended.done()

    async def __aenter__(self) -> Stream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        if not self.closed:
            try:
                await self.stop()
            except LipsyncError:
                pass

    # -- calls -----------------------------------------------------------------------------

    async def push(self, pcm: bytes) -> None:
        """Send audio: int16 LE mono PCM at ``sample_rate``, any length (cut into chunks of
        at most one second here)."""
        if self._error is not None:
            raise self._error
        if self._ended.done() or self._stopping:
            raise ServerError(ErrorCode.BAD_REQUEST, "stream is stopped")
        if len(pcm) % 2:
            raise ValueError("audio must be int16: an even number of bytes")
        step = min(2 * self.sample_rate, MAX_CHUNK_BYTES)
        view = memoryview(pcm)
        for start in range(0, len(view), step):
            await self._send(encode_audio_chunk(self.sid, view[start : start + step]))

    async def frames(self) -> AsyncIterator[StreamFrame]:
        """Frames in sequence order until the stream ends (after ``stop``) or fails (the
        error is raised here)."""
        while True:
            while self._queue:
                item = self._queue.popleft()
                if item is _END:
                    self._queue.appendleft(_END)  # every later reader ends too
                    if self._error is not None:
                        raise self._error
                    return
                yield item
            self._ready.clear()
            await self._ready.wait()

    async def stop(self, *, timeout: float | None = None) -> StreamEnd:
        """Finish the frames of the audio sent so far (the tail padded with silence), then
        end. Returns the gateway's counts."""
        if not self._ended.done() and not self._stopping:
            self._stopping = True
            await self._control({"type": "stream_stop", "stream": self.sid})
        wait = timeout if timeout is not None else self.timeout + self._tail_s()
        try:
            return await asyncio.wait_for(asyncio.shield(self._ended), wait)
        except TimeoutError:
            raise Timeout(f"stream {self.sid} did not end in {wait:g} s") from None

    async def interrupt(self, *, timeout: float | None = None) -> None:
        """Barge-in: drop every frame queued or in flight (here too), restart the clock with
        the next audio. The stream stays open."""
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        fut.add_done_callback(_consume)
        self._interrupts.append(fut)
        await self._control({"type": "stream_interrupt", "stream": self.sid})
        wait = self.timeout if timeout is None else timeout
        try:
            await asyncio.wait_for(asyncio.shield(fut), wait)
        except TimeoutError:
            raise Timeout(f"stream {self.sid}: no stream_interrupted in {wait:g} s") from None

    # -- internals ---------------------------------------------------------------------------

    def _tail_s(self) -> float:
        """How long a stop may take: the buffered audio still to be shown, at 1x."""
        if self.info is None:
            return 0.0
        return 2.0 + self.info.lookahead_ms / 1000

    async def _control(self, message: dict[str, Any]) -> None:
        if self._error is not None:
            raise self._error
        await self._send(json.dumps(message))

    async def _wait_started(self, timeout: float) -> StreamInfo:
        try:
            return await asyncio.wait_for(asyncio.shield(self._started), timeout)
        except TimeoutError:
            raise Timeout(f"stream {self.sid} did not start in {timeout:g} s") from None

    def _push_item(self, item: Any) -> None:
        if item is not _END and len(self._queue) >= MAX_BUFFERED_FRAMES:
            self._queue.popleft()
            self.client_dropped += 1
        self._queue.append(item)
        self._ready.set()

    # -- events from the connection ------------------------------------------------------------

    def feed_frame(self, frame: StreamFrame) -> None:
        """A tagged frame of this stream arrived."""
        if not self._ended.done():
            self._push_item(frame)

    def feed_json(self, m: dict[str, Any]) -> None:
        """A ``stream_*`` message about this stream arrived."""
        kind = m.get("type")
        if kind == "stream_started":
            self.info = StreamInfo.from_json(m)
            if not self._started.done():
                self._started.set_result(self.info)
        elif kind == "stream_interrupted":
            # frames of the old epoch still waiting here are worth nothing now
            self._queue = deque(x for x in self._queue if x is _END)
            if self._interrupts:
                fut = self._interrupts.popleft()
                if not fut.done():
                    fut.set_result(None)
        elif kind == "stream_ended":
            self._finish(
                StreamEnd(
                    stream=self.sid,
                    frames=_int(m.get("frames")),
                    idle_frames=_int(m.get("idle_frames")),
                    dropped=_int(m.get("dropped")),
                    client_dropped=self.client_dropped,
                ),
                None,
            )
        elif kind == "stream_error":
            code = str(m.get("code", "internal"))
            error = ServerError(
                ErrorCode(code) if code in ErrorCode._value2member_map_ else ErrorCode.INTERNAL,
                str(m.get("error", "")),
            )
            self._finish(None, error)  # the gateway refuses only streams that are gone

    def _finish(self, end: StreamEnd | None, error: LipsyncError | None) -> None:
        self.end = end
        self._error = error
        if not self._started.done():
            self._started.set_exception(error or ConnectionLost("stream ended before it began"))
        if not self._ended.done():
            if end is not None:
                self._ended.set_result(end)
            else:
                self._ended.set_exception(error or ConnectionLost("stream failed"))
        while self._interrupts:
            fut = self._interrupts.popleft()
            if not fut.done():
                fut.set_exception(error or ServerError(ErrorCode.BAD_REQUEST, "stream ended"))
        self._push_item(_END)
        self._on_closed(self.sid)

    def connection_lost(self, exc: ConnectionLost) -> None:
        """The connection to the gateway is gone: the stream fails with ``exc``."""
        if not self._ended.done():
            self._finish(None, exc)


def _consume(fut: asyncio.Future[Any]) -> None:
    if not fut.cancelled():
        fut.exception()


def _int(value: Any) -> int:
    return int(value) if isinstance(value, int | float) and not isinstance(value, bool) else 0
