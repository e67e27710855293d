"""``LipsyncClient``: an asyncio client of the gateway's WebSocket protocol, for servers.

Why over the gateway's WebSocket and not the broker's ZeroMQ socket: the gateway is the one
public door. It checks the Origin, the token and every size limit, and it already speaks a
documented protocol (docs/protocol.md) that browsers use; a server-to-server client that
went around it would need its own auth and limits, and would tie callers to the internal
envelope, which may change. The cost is one hop and the protocol's shapes, which this
module hides behind typed calls.

How answers are matched. The protocol's answers carry no request id: a layout C answer says
only its frame id, a ``metadata`` answer its model, a ``stats`` or error answer nothing at
all. So the client never has two requests in flight that the same answer could belong to:
each request has a *key* (``("c", frame_id)`` for inference, ``("video", frame_id)``,
``("metadata", model)``, ``("list",)``, and ``("plain",)`` for ``stats``, ``hello`` and
admin messages, whose errors share one shape), and a request waits until no other request
with its key is in flight. Distinct frame ids, the common case, are fully pipelined, up to
the gateway's per-connection limit (learnt from ``hello``). A request that times out keeps
its key until its late answer arrives (or one more timeout passes), so a late answer is
never taken for the next request's.

Output mode (``crop`` or ``composite``) is a per-connection setting in this protocol
(``hello`` ``mode_b``); the client switches it with a ``hello`` when a call asks for the
other mode, once the requests of the current mode have been answered.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import os
from collections.abc import AsyncIterator, Generator, Sequence
from typing import Any
from urllib.parse import urlsplit

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

from lipsync.client.errors import ConnectionLost, LipsyncError, ServerError, Timeout, parse_error
from lipsync.client.httpget import http_get_json
from lipsync.client.results import (
    AdminResult,
    Frame,
    Health,
    Metadata,
    Stats,
    VideoFrame,
)
from lipsync.client.streaming import Stream
from shared.browser import (
    MAX_AUDIO_BYTES,
    DeadlineRequest,
    ErrorResponseC,
    ProtocolError,
    RequestB,
    VideoFrameD,
    check_model_name,
    parse_inference_response,
)
from shared.errors import ErrorCode
from shared.streamproto import TAGGED_FRAME, StreamProtocolError, parse_tagged_frame


__all__ = [
    "ADMIN_TIMEOUT_S",
    "DEFAULT_TIMEOUT_S",
    "DEFAULT_URL",
    "Batch",
    "LipsyncClient",
    "token_from_env",
]

logger = logging.getLogger("lipsync.client")

DEFAULT_URL = "ws://127.0.0.1:8086/ws"
DEFAULT_TIMEOUT_S = 10.0
ADMIN_TIMEOUT_S = 75.0
"""Admin operations: the gateway gives workers up to 60 s (a first load decodes videos)."""
MAX_MESSAGE_BYTES = 32 << 20
MODES = ("crop", "composite")
AUDIO_RATE = 24_000
DEADLINE_GRACE_S = 5.0
"""With a deadline of its own, a request is waited for that long plus this."""
"""Layout B audio: int16 LE mono PCM at 24 kHz, 640 ms centred on the frame."""

Key = tuple[Any, ...]
_PLAIN: Key = ("plain",)


def _consume(fut: asyncio.Future[Any]) -> None:
    """Mark a future's exception as seen: an abandoned request must not log warnings."""
    if not fut.cancelled():
        fut.exception()


class LipsyncClient:
    """One WebSocket connection to a gateway.

    ::

        async with LipsyncClient("ws://127.0.0.1:8086/ws", token=None, timeout=10) as c:
            names = await c.list_models()
            frame = await c.infer(names[0], 12)
            async for f in c.infer_batch(names[0], range(32)):
                ...

    Every call raises a ``LipsyncError``: ``ServerError`` (with ``code``),
    ``Timeout``, or ``ConnectionLost``. Safe to use from many tasks of one event loop.
    """

    def __init__(
        self,
        url: str = DEFAULT_URL,
        token: str | None = None,
        timeout: float = DEFAULT_TIMEOUT_S,
        *,
        quality: int | None = None,
        open_timeout: float = 10.0,
    ) -> None:
        self.url = url
        self.token = token or None
        self.timeout = timeout
        self.quality = quality
        self.open_timeout = open_timeout
        self.features: tuple[str, ...] = ()
        self.max_in_flight = 1
        self.max_deadline_ms = 0  # the longest deadline_ms the gateway accepts
        self._ws: ClientConnection | None = None
        self._reader: asyncio.Task[None] | None = None
        self._waiting: dict[Key, asyncio.Future[Any]] = {}
        self._slots = asyncio.Semaphore(1)
        self._lost: ConnectionLost | None = None
        self._mode_b = "crop"
        self._mode_lock = asyncio.Lock()
        self._b_active = 0
        self._b_idle = asyncio.Event()
        self._b_idle.set()
        self._streams: dict[int, Stream] = {}
        self._stream_ids = itertools.count(1)
        self._timers: set[asyncio.TimerHandle] = set()

    # -- lifecycle -------------------------------------------------------------------------

    async def __aenter__(self) -> LipsyncClient:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def connect(self) -> None:
        """Open the WebSocket and say ``hello`` (learns the gateway's limits and features)."""
        headers = [("Authorization", f"Bearer {self.token}")] if self.token else None
        try:
            self._ws = await connect(
                self.url,
                additional_headers=headers,
                compression=None,
                max_size=MAX_MESSAGE_BYTES,
                open_timeout=self.open_timeout,
            )
        except InvalidStatus as exc:
            status = exc.response.status_code
            body = exc.response.body.decode("utf-8", "replace").strip() if exc.response.body else ""
            code = {401: ErrorCode.UNAUTHORIZED, 403: ErrorCode.UNAUTHORIZED}.get(
                status, ErrorCode.SHUTTING_DOWN if status == 503 else ErrorCode.BAD_REQUEST
            )
            why = f"handshake refused ({status}): {body or 'no reason'}"
            raise ServerError(code, why) from None
        except (OSError, InvalidHandshake, TimeoutError) as exc:
            raise ConnectionLost(f"cannot connect to {self.url}: {exc}") from exc
        self._lost = None
        self._reader = asyncio.create_task(self._read_loop(), name="lipsync-client-read")
        settings: dict[str, Any] = {"mode_b": "crop"}
        if self.quality is not None:
            settings["quality"] = self.quality
        try:
            hello = await self._hello(settings)
        except BaseException:
            await self.close()
            raise
        limit = hello.get("max_in_flight")
        self.max_in_flight = limit if isinstance(limit, int) and limit > 0 else 1
        self._slots = asyncio.Semaphore(self.max_in_flight)
        self.features = tuple(str(f) for f in hello.get("features") or ())
        most = hello.get("max_deadline_ms")
        self.max_deadline_ms = most if isinstance(most, int) and "deadlines" in self.features else 0

    async def close(self) -> None:
        """Close the connection; calls still waiting fail with ``ConnectionLost``."""
        ws, self._ws = self._ws, None
        if ws is not None:
            await ws.close()
        if self._reader is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
            self._reader = None
        self._fail_all(ConnectionLost("client closed"))
        for timer in self._timers:
            timer.cancel()
        self._timers.clear()

    # -- calls -----------------------------------------------------------------------------

    async def list_models(self, *, timeout: float | None = None) -> list[str]:
        answer = await self._call(("list",), {"type": "list_models"}, timeout)
        if "error" in answer:
            raise parse_error(str(answer["error"]))
        return [str(m) for m in answer.get("models") or ()]

    async def metadata(self, name: str, *, timeout: float | None = None) -> Metadata:
        _check_name(name)
        message = {"type": "get_metadata", "model_name": name}
        answer = await self._call(("metadata", name), message, timeout)
        if answer.get("success") is not True:
            raise parse_error(str(answer.get("error", "internal: no metadata")))
        return Metadata.from_json(answer)

    async def video_frame(
        self,
        name: str,
        frame_id: int,
        video_type: str = "full_body",
        *,
        timeout: float | None = None,
    ) -> VideoFrame:
        """A frame of one of the avatar's source videos (``full_body``, ``crops_328``,
        ``rois_320``, ``model_inputs``) as JPEG."""
        _check_name(name)
        _check_frame(frame_id, 2**31 - 1)
        message = {
            "type": "get_video_frame",
            "model_name": name,
            "frame_id": frame_id,
            "video_type": video_type,
        }
        answer = await self._call(("video", frame_id), message, timeout)
        if isinstance(answer, dict):
            raise parse_error(str(answer.get("error", "internal: no video frame")))
        d: VideoFrameD = answer
        return VideoFrame(name, d.frame_id, d.video_type, d.image)

    async def infer(
        self,
        name: str,
        frame_id: int,
        audio: bytes | None = None,
        mode: str = "crop",
        *,
        timeout: float | None = None,
        deadline_ms: int | None = None,
    ) -> Frame:
        """Frame ``frame_id`` of model ``name`` with its mouth moved by ``audio`` (int16 LE
        mono PCM at 24 kHz, 640 ms centred on the frame: 8 frames before, the frame, 7
        after, as the original page sends it) or, without audio, by the avatar's own
        recorded audio. ``mode``: ``crop`` (the face rectangle, draw it at ``bounds``) or
        ``composite`` (the whole frame). ``deadline_ms``: how long the server may take
        (default: the gateway's, 2 s; at most ``max_deadline_ms``), for offline rendering
        that would rather wait than get ``deadline_exceeded``; the wait for the answer is
        then at least that long too."""
        _check_name(name)
        _check_frame(frame_id, 2**32 - 1)
        if mode not in MODES:
            raise ValueError("mode must be crop or composite")
        pcm = bytes(audio or b"")
        if len(pcm) % 2 or len(pcm) > MAX_AUDIO_BYTES:
            raise ValueError(f"audio must be int16 PCM of at most {MAX_AUDIO_BYTES} bytes")
        request = RequestB(name, frame_id, pcm)
        data = request.serialize()
        if deadline_ms is not None:
            data = self._with_deadline(deadline_ms, request)
            wait = self.timeout if timeout is None else timeout
            timeout = max(wait, deadline_ms / 1000 + DEADLINE_GRACE_S)
        answer = await self._call(("c", frame_id), data, timeout, mode=mode)
        if isinstance(answer, ErrorResponseC):
            raise parse_error(answer.error)
        x1, y1, x2, y2 = (tuple(answer.bounds) + (0.0, 0.0, 0.0, 0.0))[:4]
        return Frame(
            model=name,
            frame_id=answer.frame_id,
            jpeg=answer.image,
            bounds=(x1, y1, x2, y2),
            processing_time_ms=int(answer.processing_time_ms),
            mode=mode,
        )

    def infer_batch(
        self,
        name: str,
        frame_ids: Sequence[int],
        audio: Sequence[bytes | None] | None = None,
        ordered: bool = True,
        mode: str = "crop",
        *,
        timeout: float | None = None,
        return_exceptions: bool = False,
        window: int | None = None,
        deadline_ms: int | None = None,
    ) -> Batch:
        """Many frames over this one connection, pipelined. ``audio``, if given, holds one
        clip (or None) per frame id.

        ``async for frame in c.infer_batch(...)`` yields results in ``frame_ids`` order
        (``ordered=True``) or as they complete; ``await c.infer_batch(...)`` returns the
        list in order. A failed frame raises its error where it would be yielded, unless
        ``return_exceptions`` (then the ``LipsyncError`` takes its place).

        ``window`` caps the requests in flight. The default is what the workers holding
        the model may hold at once (the ``capacity`` the gateway reports in
        ``metadata``), within the gateway's per-connection limit: more would only wait in
        the broker's queue, and a request that waits there longer than its deadline
        fails although the workers serve every frame they are given. ``deadline_ms`` is
        each request's deadline (see :meth:`infer`)."""
        ids = list(frame_ids)
        clips: list[bytes | None] = list(audio) if audio is not None else [None] * len(ids)
        if len(clips) != len(ids):
            raise ValueError("audio must hold one clip (or None) per frame id")
        if window is not None and window < 1:
            raise ValueError("window must be at least 1")
        return Batch(
            self, name, ids, clips, ordered, mode, timeout, return_exceptions, window, deadline_ms
        )

    async def serving_window(self, name: str, *, timeout: float | None = None) -> int:
        """How many requests for ``name`` to keep in flight: the capacity of the workers
        that hold it, as the broker knows it, within the gateway's per-connection limit
        (that limit alone when the gateway does not say)."""
        meta = await self.metadata(name, timeout=timeout)
        if meta.capacity < 1:
            return self.max_in_flight
        return max(1, min(self.max_in_flight, meta.capacity))

    async def stats(self, *, timeout: float | None = None) -> Stats:
        """``get_stats``: gateway counters plus per-model statistics (``model_stats``)."""
        answer = await self._call(_PLAIN, {"type": "get_stats"}, timeout)
        if answer.get("type") != "stats":
            raise parse_error(str(answer.get("error", "internal: no stats")))
        return Stats.from_json(answer)

    async def health(self, *, timeout: float | None = None) -> Health:
        """``GET /health`` on the gateway's port (plain HTTP; needs no token)."""
        status, body = await http_get_json(_http_url(self.url, "/health"), timeout or self.timeout)
        return Health.from_json(status, body)

    async def stream(
        self,
        name: str,
        sample_rate: int = 16_000,
        mode: str = "crop",
        *,
        quality: int | None = None,
        timeout: float | None = None,
        frames_per_request: int | None = None,
    ) -> Stream:
        """Start a server-driven stream (docs/streams.md): ``await s.push(pcm)`` audio as
        it comes, ``async for frame in s.frames()``, then ``await s.stop()`` (or
        ``interrupt()`` to drop what is queued). Frames run about ``s.info.lookahead_ms``
        behind the audio: the model needs that much audio after a frame's time.
        ``frames_per_request`` (1..8): how many consecutive frames each worker request
        asks for (fewer messages for a busy deployment; each frame is issued up to that
        many frame times later, which ``lookahead_ms`` includes)."""
        _check_name(name)
        if mode not in MODES:
            raise ValueError("mode must be crop or composite")
        if "streams" not in self.features:
            raise ServerError(ErrorCode.BAD_REQUEST, "this gateway does not offer streams")
        ws = self._open_ws()
        sid = next(self._stream_ids) & 0xFFFFFFFF
        stream = Stream(
            sid,
            sample_rate,
            send=self._send_now,
            on_closed=self._forget_stream,
            timeout=self.timeout,
        )
        self._streams[sid] = stream
        message: dict[str, Any] = {
            "type": "stream_start",
            "stream": sid,
            "model_name": name,
            "sample_rate": sample_rate,
            "mode": mode,
        }
        if quality is not None:
            message["quality"] = quality
        if frames_per_request is not None:
            message["frames_per_request"] = frames_per_request
        try:
            await self._send(ws, json.dumps(message))
            await stream._wait_started(timeout or self.timeout)
        except BaseException:
            self._streams.pop(sid, None)
            raise
        return stream

    # -- admin (the gateway needs LIPSYNC_TOKEN) -------------------------------------------

    async def load_package(
        self,
        name: str,
        workers: str | int = "all",
        *,
        timeout: float = ADMIN_TIMEOUT_S,
        check: bool = True,
    ) -> AdminResult:
        """Load package ``name`` from the models dir on ``workers``: ``"all"``, a count
        (those not holding it first), or a worker id. Raises ``ServerError`` (with the
        ``AdminResult`` in ``details``) if any chosen worker failed, unless ``check`` is
        False."""
        return await self._admin("load_package", name, workers, timeout, check)

    async def unload_package(
        self,
        name: str,
        workers: str | int = "all",
        *,
        timeout: float = ADMIN_TIMEOUT_S,
        check: bool = True,
    ) -> AdminResult:
        """Unload ``name`` from the workers holding it (``"all"``, a count, or an id): its
        frames are unmapped and its weights freed."""
        return await self._admin("unload_package", name, workers, timeout, check)

    async def reload_package(
        self,
        name: str,
        workers: str | int = "all",
        *,
        timeout: float = ADMIN_TIMEOUT_S,
        check: bool = True,
    ) -> AdminResult:
        """Load ``name`` again where it is loaded (after its files changed); a worker whose
        reload fails keeps serving the old one."""
        return await self._admin("reload_package", name, workers, timeout, check)

    async def _admin(
        self, kind: str, name: str, workers: str | int, timeout: float, check: bool
    ) -> AdminResult:
        _check_name(name)
        message = {"type": kind, "model_name": name, "workers": workers}
        answer = await self._call(_PLAIN, message, timeout)
        if answer.get("type") != "admin":
            raise parse_error(str(answer.get("error", "internal: no admin answer")))
        result = AdminResult.from_json(answer)
        if check and not result.success:
            raise parse_error(result.error or "internal: admin operation failed", result)
        return result

    # -- request machinery -------------------------------------------------------------------

    def _with_deadline(self, deadline_ms: int, request: RequestB) -> bytes:
        if self.max_deadline_ms < 1:
            raise ValueError("this gateway does not take per-request deadlines")
        if not isinstance(deadline_ms, int) or not 1 <= deadline_ms <= self.max_deadline_ms:
            raise ValueError(f"deadline_ms must be an integer in 1..{self.max_deadline_ms}")
        return DeadlineRequest(deadline_ms, request).serialize()

    def _open_ws(self) -> ClientConnection:
        if self._lost is not None:
            raise self._lost
        if self._ws is None:
            raise ConnectionLost("not connected")
        return self._ws

    async def _send_now(self, data: str | bytes) -> None:
        """Send on the open connection (``ConnectionLost`` when there is none)."""
        await self._send(self._open_ws(), data)

    async def _send(self, ws: ClientConnection, data: str | bytes) -> None:
        try:
            await ws.send(data)
        except ConnectionClosed as exc:
            raise ConnectionLost(f"connection closed: {exc}") from None

    async def _hello(self, settings: dict[str, Any]) -> dict[str, Any]:
        answer = await self._call(
            _PLAIN, {"type": "hello", "version": 1, **settings}, None, counted=False
        )
        if answer.get("type") != "hello":
            raise parse_error(str(answer.get("error", "internal: no hello answer")))
        self._mode_b = str(answer.get("mode_b", self._mode_b))
        return dict(answer)

    async def _call(
        self,
        key: Key,
        message: dict[str, Any] | bytes,
        timeout: float | None,
        *,
        counted: bool = True,
        mode: str | None = None,
    ) -> Any:
        """Send one request and wait for the answer that carries ``key``."""
        ws = self._open_ws()
        data = json.dumps(message) if isinstance(message, dict) else message
        wait = self.timeout if timeout is None else timeout
        if mode is not None:
            await self._enter_mode(mode)
        try:
            fut = await self._claim(key)
        except BaseException:
            if mode is not None:
                self._b_done()
            raise
        if mode is not None:
            fut.add_done_callback(lambda _: self._b_done())
        try:
            if counted:
                await self._slots.acquire()
                fut.add_done_callback(lambda _: self._slots.release())
            await self._send(ws, data)
        except BaseException:
            if self._waiting.get(key) is fut:
                del self._waiting[key]
            fut.cancel()
            raise
        try:
            return await asyncio.wait_for(asyncio.shield(fut), wait)
        except TimeoutError:
            self._abandon(key, fut, wait)
            raise Timeout(f"no answer in {wait:g} s") from None
        except asyncio.CancelledError:
            self._abandon(key, fut, wait)
            raise

    async def _claim(self, key: Key) -> asyncio.Future[Any]:
        """Wait until no request with ``key`` is in flight, then take the key."""
        while (current := self._waiting.get(key)) is not None:
            await asyncio.wait([current])
            if self._waiting.get(key) is current:
                del self._waiting[key]
        if self._lost is not None:
            raise self._lost
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        fut.add_done_callback(_consume)
        self._waiting[key] = fut
        return fut

    def _abandon(self, key: Key, fut: asyncio.Future[Any], after: float) -> None:
        """The caller gave up. Keep the key until the late answer comes, or ``after`` more
        seconds (the gateway answers every request by its deadline; this is the bound)."""
        if fut.done():
            return

        def release() -> None:
            self._timers.discard(timer)
            if self._waiting.get(key) is fut:
                del self._waiting[key]
            fut.cancel()

        timer = asyncio.get_running_loop().call_later(max(after, 5.0), release)
        self._timers.add(timer)

    async def _enter_mode(self, mode: str) -> None:
        """Count a layout B request in, switching the connection's output mode first if
        needed (after the requests of the other mode are answered)."""
        async with self._mode_lock:
            if self._mode_b != mode:
                await self._b_idle.wait()
                await self._hello({"mode_b": mode})
            self._b_active += 1
            self._b_idle.clear()

    def _b_done(self) -> None:
        self._b_active -= 1
        if self._b_active == 0:
            self._b_idle.set()

    def _resolve(self, key: Key, value: Any) -> None:
        fut = self._waiting.pop(key, None)
        if fut is None:
            logger.debug("answer for %s that nobody waits for: dropped", key)
        elif not fut.done():
            fut.set_result(value)

    async def _read_loop(self) -> None:
        ws = self._ws
        assert ws is not None
        reason = "connection closed"
        try:
            async for message in ws:
                try:
                    self._dispatch(message)
                except (ProtocolError, StreamProtocolError, ValueError) as exc:
                    logger.warning("unreadable message from the gateway: %s", exc)
        except ConnectionClosed as exc:
            reason = f"connection closed: {exc}"
        finally:
            self._fail_all(ConnectionLost(reason))

    def _dispatch(self, message: str | bytes) -> None:
        if isinstance(message, str):
            answer = json.loads(message)
            if not isinstance(answer, dict):
                return
            kind = answer.get("type")
            if isinstance(kind, str) and kind.startswith("stream_"):
                stream = self._streams.get(answer.get("stream"))  # type: ignore[arg-type]
                if stream is not None:
                    stream.feed_json(answer)
            elif kind in ("stats", "hello", "error", "admin"):
                self._resolve(_PLAIN, answer)
            elif kind == "model_list":
                self._resolve(("list",), answer)
            elif kind == "metadata":
                self._resolve(("metadata", answer.get("model_name")), answer)
            elif kind == "video_frame":
                self._resolve(("video", answer.get("frame_id")), answer)
            return
        if not message:
            return
        first = message[0]
        if first in (0, 1):
            c = parse_inference_response(message)
            self._resolve(("c", c.frame_id), c)
        elif first == 2:
            d = VideoFrameD.parse(message)
            self._resolve(("video", d.frame_id), d)
        elif first == TAGGED_FRAME:
            frame = parse_tagged_frame(message)
            stream = self._streams.get(frame.stream)
            if stream is not None:
                stream.feed_frame(frame)

    def _fail_all(self, exc: ConnectionLost) -> None:
        if self._lost is None:
            self._lost = exc
        waiting, self._waiting = self._waiting, {}
        for fut in waiting.values():
            if not fut.done():
                fut.set_exception(exc)
        for stream in list(self._streams.values()):
            stream.connection_lost(exc)
        self._streams.clear()

    def _forget_stream(self, sid: int) -> None:
        self._streams.pop(sid, None)


class Batch:
    """``infer_batch``'s result: iterate it (``async for``) or await it (a list)."""

    def __init__(
        self,
        client: LipsyncClient,
        name: str,
        frame_ids: list[int],
        clips: list[bytes | None],
        ordered: bool,
        mode: str,
        timeout: float | None,
        return_exceptions: bool,
        window: int | None = None,
        deadline_ms: int | None = None,
    ) -> None:
        self._args = (client, name, frame_ids, clips, mode, timeout)
        self.window = window
        self.deadline_ms = deadline_ms
        self.ordered = ordered
        self.return_exceptions = return_exceptions

    def __len__(self) -> int:
        return len(self._args[2])

    async def __aiter__(self) -> AsyncIterator[Frame | LipsyncError]:
        client, name, frame_ids, clips, mode, timeout = self._args
        window = self.window
        if window is None and frame_ids:
            window = await client.serving_window(name, timeout=timeout)
        gate = asyncio.Semaphore(window or 1)
        deadline_ms = self.deadline_ms

        async def one(i: int, clip: bytes | None) -> Frame:
            async with gate:
                return await client.infer(
                    name, i, clip, mode, timeout=timeout, deadline_ms=deadline_ms
                )

        tasks = [
            asyncio.ensure_future(one(i, clip)) for i, clip in zip(frame_ids, clips, strict=True)
        ]
        try:
            source = tasks if self.ordered else asyncio.as_completed(tasks)
            for task in source:
                try:
                    yield await task
                except LipsyncError as exc:
                    if not self.return_exceptions:
                        raise
                    yield exc
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _collect(self) -> list[Frame | LipsyncError]:
        return [item async for item in self]

    def __await__(self) -> Generator[Any, None, list[Frame | LipsyncError]]:
        return self._collect().__await__()


def _check_name(name: str) -> None:
    try:
        check_model_name(name)
    except ProtocolError:
        raise ValueError(f"bad model name {name!r}: 1-64 characters of [A-Za-z0-9_.-]") from None


def _check_frame(frame_id: int, top: int) -> None:
    if not isinstance(frame_id, int) or isinstance(frame_id, bool) or not 0 <= frame_id <= top:
        raise ValueError(f"frame id must be an integer in 0..{top}")


def _http_url(ws_url: str, path: str) -> str:
    parts = urlsplit(ws_url)
    scheme = "https" if parts.scheme == "wss" else "http"
    return f"{scheme}://{parts.netloc}{path}"


def token_from_env() -> str | None:
    """``LIPSYNC_TOKEN`` if set (what the CLI uses when no ``--token`` is given)."""
    return os.environ.get("LIPSYNC_TOKEN") or None
