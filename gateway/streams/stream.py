"""One stream's life in asyncio around its sans-I/O :class:`StreamCore`: the pacer task,
the requests in flight, and the messages to the client.

``run`` starts the pacer task, which opens the stream (the model's ``metadata``), then
loops on ``StreamCore.decide`` (send, drop, wait...) until the stream is finished, failed or
cancelled, and finally cancels what is left and tells ``on_closed``. Control calls
(``feed``, ``stop``, ``interrupt``, ``cancel``) are synchronous, from the connection's
receive loop, so they act in message order.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

from gateway.streams.clock import Act, Decision, Frame, Kind, Why
from gateway.streams.core import StreamCore, model_info
from gateway.streams.idle import IdleFrames
from gateway.streams.interfaces import RequestFn, SendFn
from gateway.streams.metrics import StreamMetrics
from gateway.streams.tagged import idle_frame, inferred_frame
from shared.config import StreamConfig
from shared.errors import ErrorCode, ServiceError
from shared.streamproto import (
    StreamStart,
    stream_ended_message,
    stream_error_message,
    stream_interrupted_message,
    stream_started_message,
)


__all__ = ["Stream"]

logger = logging.getLogger("gateway.streams")


class Stream:
    """One stream (docs/streams.md). Made by :class:`gateway.streams.StreamSet`."""

    def __init__(
        self,
        *,
        sid: int,
        key: str,
        start: StreamStart,
        request: RequestFn,
        send: SendFn,
        config: StreamConfig,
        metrics: StreamMetrics,
        idle_frames: IdleFrames,
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
        self.config = config
        self.metrics = metrics
        self.idle_frames = idle_frames
        self.on_closed = on_closed
        self.core = StreamCore(
            config,
            sample_rate=start.sample_rate,
            mode=start.mode,
            frames_per_request=start.frames_per_request,
        )
        self.state = "starting"  # starting | running | stopping | closed
        self.closing = False  # ending now: failed or cancelled (a stop is not an end yet)
        self._error: ServiceError | None = None  # why it failed: the pacer says so
        self._cancelled = False
        self._stop_requested = False
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
        error = self.core.feed(pcm, time.monotonic())
        if error is not None:
            self._fail(error)
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
        _cancel(self.core.interrupt())
        self._changed.set()
        task = asyncio.ensure_future(self._send_json(stream_interrupted_message(self.sid)))
        self._messages.add(task)
        task.add_done_callback(self._messages.discard)

    def cancel(self) -> None:
        """The connection closed: end now, without a word."""
        self.closing = True
        self._cancelled = True
        _cancel(self.core.end())
        if self._pacer is not None:
            self._pacer.cancel()

    async def wait_closed(self) -> None:
        await self._closed.wait()

    # -- the pacer task ---------------------------------------------------------------------

    async def _run(self) -> None:
        try:
            opened = await self._open()
            if opened:
                while not (self.closing or self.core.finished):
                    await self._step()
            if self._error is not None:  # failed (before or after it opened)
                await self._send_error(self._error)
            elif opened and not self._cancelled:
                core = self.core
                await self._send_json(
                    stream_ended_message(
                        stream=self.sid,
                        frames=core.sent,
                        idle_frames=core.idle,
                        dropped=core.dropped,
                    )
                )
                self.metrics.add("streams_ended")
        except asyncio.CancelledError:
            pass
        except Exception:
            logger.exception("stream %d (%s) failed", self.sid, self.model)
            self.metrics.add("streams_failed")
            try:
                await self._send_error(ServiceError(ErrorCode.INTERNAL, "internal error"))
            except Exception:
                pass
        finally:
            self.state = "closed"
            self.closing = True
            _cancel(self.core.end())
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
                "metadata", model=self.model, ttl_ms=self.config.start_ttl_ms
            )
            info = model_info(answer.header.result, self.model)
        except ServiceError as exc:
            self.metrics.add("streams_failed")
            await self._send_error(exc)
            return False
        if self.closing:
            return False
        self.core.open(info)
        self.state = "running"
        await self._send_json(
            stream_started_message(
                stream=self.sid,
                model_name=self.model,
                fps=info.fps,
                frame_count=info.frame_count,
                sample_rate=self.sr,
                mode=self.mode,
                lookahead_ms=self.core.lookahead_ms,
                bounds=info.bounds,
                frames_per_request=self.core.per_request,
            )
        )
        if self._stop_requested:
            self._begin_stopping()
        self._pump()
        return True

    async def _step(self) -> None:
        """Send, drop or wait for the next frame; one decision per call."""
        self._changed.clear()
        now = time.monotonic()
        decision = self.core.decide(now)
        act = decision.act
        if act is Act.WAIT:
            until = decision.until
            try:
                await asyncio.wait_for(self._changed.wait(), None if until is None else until - now)
            except TimeoutError:
                pass
            return
        self.metrics.decided(decision)
        if act is Act.SEND:
            await self._emit(decision)
        elif act is Act.DROP or act is Act.FAIL:
            self._drop(decision)
        # Act.DELAY, Act.RESTART: the clock moved or stopped; the next step decides again

    async def _emit(self, decision: Decision) -> None:
        frame = decision.frame
        assert frame is not None and frame.data is not None
        if frame.arrival is not None:
            self.metrics.observe_latency(time.monotonic() - frame.arrival)
        self._pump()
        async with self._send_lock:
            await self.send(frame.data)

    def _drop(self, decision: Decision) -> None:
        frame = decision.frame
        assert frame is not None
        # a request for several frames goes on for the others (they may still be in time)
        alone = frame.group is None or len(frame.group) == 1
        if alone and frame.task is not None and not frame.task.done():
            frame.task.cancel()
        if decision.act is Act.FAIL:
            assert frame.failed is not None
            self._fail(frame.failed)
            return
        if decision.why is Why.FAILED and self.core.failures_in_a_row == 1:
            logger.info("stream %d (%s): frame failed: %s", self.sid, self.model, frame.failed)
        self._pump()

    # -- issuing frames ------------------------------------------------------------------------

    def _begin_stopping(self) -> None:
        self.state = "stopping"
        self.core.stop()
        self._changed.set()
        self._pump()

    def _pump(self) -> None:
        """Issue every frame whose audio is in (``StreamCore.issue_next``)."""
        if self.closing:
            return
        core = self.core
        now = time.monotonic()
        while (frame := core.issue_next(now)) is not None:
            kind = frame.kind
            if kind is Kind.INFER:
                self.metrics.add("inferred")
                frame.task = self._spawn(self._infer(frame, core.clip(frame)))
            elif kind is Kind.FETCH:
                frame.task = self._spawn(self._idle_composite(frame))
            else:
                if kind is Kind.IDLE:
                    assert core.model is not None
                    core.ready(frame, idle_frame(self.sid, frame, core.model), now)
                self._changed.set()

    async def _infer(self, frame: Frame, clip: bytes) -> None:
        t0 = time.monotonic()
        core = self.core
        group = frame.group or [frame]
        try:
            answer = await self.request(
                "infer",
                model=self.model,
                frame=frame.frame_id,
                opts=core.infer_opts(frame, key=self.key, quality=self.quality),
                payload=(clip,),
                ttl_ms=frame.ttl_ms,
            )
            now = time.monotonic()
            assert core.model is not None
            composite = self.mode == "composite"
            us = (now - t0) * 1e6
            data = [
                inferred_frame(
                    self.sid, f, answer, composite=composite, model=core.model, us=us, index=i
                )
                for i, f in enumerate(group)
            ]
            for f, tagged in zip(group, data, strict=True):
                core.ready(f, tagged, now)
        except ServiceError as exc:
            for f in group:
                f.failed = exc
        except (TypeError, ValueError):
            for f in group:
                f.failed = ServiceError(ErrorCode.INTERNAL, "answer with bad bounds")
        finally:
            core.inference_ended(len(group))
            self._changed.set()

    async def _idle_composite(self, frame: Frame) -> None:
        core = self.core
        try:
            jpeg = await self.idle_frames.get(
                self.request, self.model, frame.frame_id, self.quality, self.config.ttl_ms
            )
            assert core.model is not None
            core.ready(frame, idle_frame(self.sid, frame, core.model, jpeg), 0.0)
        except ServiceError as exc:
            frame.failed = exc
        finally:
            self._changed.set()

    # -- endings ------------------------------------------------------------------------------

    def _fail(self, exc: ServiceError) -> None:
        """End the stream with ``stream_error`` (no ``stream_ended``); the pacer sends it."""
        if self.closing:
            return
        logger.warning("stream %d (%s) ends: %s: %s", self.sid, self.model, exc.code, exc.message)
        self.metrics.add("streams_failed")
        self.closing = True
        self._error = exc
        _cancel(self.core.end())
        self._changed.set()

    async def _send_error(self, exc: ServiceError) -> None:
        await self._send_json(stream_error_message(self.sid, exc.code.value, exc.message))

    async def _send_json(self, text: str) -> None:
        async with self._send_lock:
            await self.send(text)

    def _spawn(self, coro: Awaitable[None]) -> asyncio.Task[None]:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task


def _cancel(frames: list[Frame]) -> None:
    """Cancel the requests of frames that were dropped."""
    for frame in frames:
        if frame.task is not None and not frame.task.done():
            frame.task.cancel()
