"""The raw full frames that composite-mode idle frames show (docs/streams.md, "Silence")."""

from __future__ import annotations

import asyncio
import functools
from collections import OrderedDict
from collections.abc import Callable

from gateway.streams.interfaces import RequestFn
from shared.errors import ErrorCode, ServiceError
from shared.opts import VideoFrameOpts


__all__ = ["IdleFrames"]


class IdleFrames:
    """Raw ``full_body`` JPEGs that composite-mode idle frames show, per (model, frame,
    quality), in a small LRU bounded by count and bytes. Shared by all streams: a silent
    stream walks the same few frames again and again. Concurrent requests for one frame
    share one fetch, which finishes even if the frame that started it is dropped.
    ``on_fetch`` is called once per fetch (a cache miss): the gateway counts them."""

    def __init__(
        self, max_items: int, max_bytes: int, on_fetch: Callable[[], None] | None = None
    ) -> None:
        self.on_fetch = on_fetch
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
            if self.on_fetch is not None:
                self.on_fetch()
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
            opts=VideoFrameOpts("full_body", quality).to_map(),
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
