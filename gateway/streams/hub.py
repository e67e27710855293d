"""What every stream of a gateway shares (docs/streams.md): the settings, the metrics, the
LRU of raw full frames that composite-mode idle frames show, the count of open streams, and
a random token that makes stream keys unique across gateways."""

from __future__ import annotations

import secrets
from typing import TYPE_CHECKING, Any

from gateway.streams.idle import IdleFrames
from gateway.streams.interfaces import RequestFn, SendFn
from gateway.streams.metrics import StreamMetrics
from gateway.streams.stream import Stream
from gateway.streams.streamset import StreamSet
from shared.config import StreamConfig, from_env
from shared.opts import MAX_FRAMES_PER_REQUEST


if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry


__all__ = ["StreamHub"]


class StreamHub:
    """One per gateway. ``connection()`` makes a connection's :class:`StreamSet`. Settings
    come from ``LIPSYNC_STREAM_*`` variables when not given (``shared.config.StreamConfig``)."""

    def __init__(
        self, config: StreamConfig | None = None, *, registry: CollectorRegistry | None = None
    ) -> None:
        self.config = config if config is not None else from_env(StreamConfig)
        if not 1 <= self.config.frames_per_request <= MAX_FRAMES_PER_REQUEST:
            raise ValueError(
                f"LIPSYNC_STREAM_FRAMES_PER_REQUEST must be 1..{MAX_FRAMES_PER_REQUEST}, "
                f"not {self.config.frames_per_request}"
            )
        self.metrics = StreamMetrics(registry)
        metrics = self.metrics
        self.idle_frames = IdleFrames(
            self.config.idle_cache_items,
            self.config.idle_cache_bytes,
            on_fetch=lambda: metrics.add("idle_fetches"),
        )
        self.token = secrets.token_hex(4)
        self._connections = 0
        self._streams: set[Stream] = set()

    def connection(self, *, request: RequestFn, send: SendFn) -> StreamSet:
        self._connections += 1
        return StreamSet(self, request=request, send=send, key=f"{self.token}.{self._connections}")

    @property
    def active(self) -> int:
        return len(self._streams)

    def add(self, stream: Stream) -> None:
        self._streams.add(stream)
        self.metrics.set_active(len(self._streams))

    def remove(self, stream: Stream) -> None:
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
