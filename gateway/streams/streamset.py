"""One connection's streams: ``stream_*`` JSON and ``0x00 0x01`` audio chunks routed to
them, malformed ones answered, all of them cancelled when the connection closes."""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Mapping
from typing import Any, Protocol

from gateway.streams.idle import IdleFrames
from gateway.streams.interfaces import RequestFn, SendFn
from gateway.streams.metrics import StreamMetrics
from gateway.streams.stream import Stream
from shared.config import StreamConfig
from shared.errors import ErrorCode
from shared.streamproto import (
    StreamInterrupt,
    StreamProtocolError,
    StreamStart,
    StreamStop,
    parse_audio_chunk,
    parse_stream_request,
    stream_error_message,
)


__all__ = ["Registry", "StreamSet"]


class Registry(Protocol):
    """What a connection's streams share with the gateway's (``StreamHub``)."""

    @property
    def config(self) -> StreamConfig: ...
    @property
    def metrics(self) -> StreamMetrics: ...
    @property
    def idle_frames(self) -> IdleFrames: ...
    @property
    def active(self) -> int: ...
    def add(self, stream: Stream) -> None: ...
    def remove(self, stream: Stream) -> None: ...


class StreamSet:
    """One connection's streams. ``handle_json`` / ``handle_audio`` are synchronous (they
    act at once, in message order: an interrupt right behind a chunk sees the chunk);
    answers go out through ``send`` from tasks this object owns and ``close`` ends.
    ``key`` (the gateway's token and the connection's serial) makes stream keys unique
    across connections and gateways."""

    def __init__(self, registry: Registry, *, request: RequestFn, send: SendFn, key: str) -> None:
        self.registry = registry
        self.request = request
        self.send = send
        self.key = key
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
        metrics = self.registry.metrics
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
        registry = self.registry
        config = registry.config
        sid = request.stream if request.stream is not None else self._new_id()
        if sid in self.streams:
            self._error(sid, ErrorCode.BAD_REQUEST, "stream id in use on this connection")
            return
        if self._closed:
            return
        if len(self.streams) >= config.max_streams_per_connection:
            registry.metrics.add("streams_refused")
            self._error(
                sid,
                ErrorCode.OVERLOADED,
                f"at most {config.max_streams_per_connection} streams per connection",
            )
            return
        if registry.active >= config.max_streams:
            registry.metrics.add("streams_refused")
            self._error(sid, ErrorCode.OVERLOADED, "too many streams on this gateway")
            return
        stream = Stream(
            sid=sid,
            key=f"{self.key}.{sid}",
            start=request,
            request=self.request,
            send=self.send,
            config=config,
            metrics=registry.metrics,
            idle_frames=registry.idle_frames,
            on_closed=self._closed_stream,
        )
        self.streams[sid] = stream
        registry.add(stream)
        registry.metrics.add("streams_started")
        stream.run()

    def _closed_stream(self, stream: Stream) -> None:
        if self.streams.get(stream.sid) is stream:
            del self.streams[stream.sid]
            self._ended.append(stream.sid)
        self.registry.remove(stream)

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
