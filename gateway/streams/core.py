"""One stream's decisions, sans-I/O: which frames to issue as audio comes in (idle, fetch,
infer or skip), their clips, what to send or drop next (the :class:`PlayoutClock`), and the
bookkeeping of a stream's epochs, stop and failures. Events in (audio chunks with their
arrival time, answers, stop, interrupt), frames and decisions out; the caller
(:class:`gateway.streams.stream.Stream`) makes the requests, sends the bytes and passes
``now``. ``tests/test_stream_clock.py`` drives it with a script.

Frame ``j`` of an epoch shows audio time ``j / fps``; it is issued once the buffer holds its
whole clip (``shared.streamtime``: about 0.49 s past its time), and idle when the 200 ms
around its time is quieter than ``silence_dbfs``. At most ``max_ahead`` frames are issued and
not yet sent.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from gateway.streams.audio import AudioBuffer
from gateway.streams.clock import Act, Decision, Frame, Kind, PlayoutClock, Why
from shared.config import StreamConfig
from shared.errors import ErrorCode, ServiceError
from shared.opts import MAX_FRAMES_PER_REQUEST, InferOpts
from shared.streamtime import (
    clip_samples,
    clip_t0_ms,
    energy_window,
    frame_time_ms,
    frames_in,
    lookahead_ms,
    walk_frame,
)


__all__ = ["FATAL", "ModelInfo", "StreamCore", "model_info"]

FATAL = frozenset(
    {ErrorCode.BAD_REQUEST, ErrorCode.AUDIO_UNSUPPORTED, ErrorCode.FRAME_OUT_OF_RANGE}
)
"""Frame errors that will not go away by themselves: the stream ends with ``stream_error``."""


@dataclass(frozen=True, slots=True)
class ModelInfo:
    """What a stream needs of its model's ``metadata``."""

    fps: float
    frame_count: int
    size: tuple[int, int]
    bounds: tuple[float, float, float, float]


def model_info(info: Any, model: str) -> ModelInfo:
    """A ``metadata`` result, checked; ServiceError when a stream cannot use it."""
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
            f"model {model!r} has no audio encoder: it cannot follow live audio",
        )
    return ModelInfo(fps, frame_count, (width, height), (x1, y1, x2, y2))


class StreamCore:
    """See the module docstring. ``open`` once the model is known; until then audio is only
    held. Call ``issue_next`` until it answers None after every event that may let frames
    out (audio, a sent or dropped frame, stop); ``decide`` in the pacer."""

    def __init__(
        self,
        config: StreamConfig,
        *,
        sample_rate: int,
        mode: str,
        frames_per_request: int | None = None,
    ) -> None:
        self.config = config
        self.sr = sample_rate
        self.mode = mode
        per = config.frames_per_request if frames_per_request is None else frames_per_request
        if not 1 <= per <= MAX_FRAMES_PER_REQUEST:
            raise ValueError(f"frames_per_request must be 1..{MAX_FRAMES_PER_REQUEST}")
        self.per_request = per
        self.audio = AudioBuffer()
        self.clock = PlayoutClock(config)
        self.model: ModelInfo | None = None
        self.issuing = False  # opened and not ended
        self.epoch = 0
        self.seq_base = 0  # seq of frame 0 of this epoch (also its walk position)
        self.next_issue = 0
        self.next_send = 0
        self.frames: dict[int, Frame] = {}
        self.final: int | None = None  # once stopping: frames to finish in this epoch
        # the stream's totals (``stream_ended``)
        self.sent = 0
        self.idle = 0
        self.dropped = 0
        self.failures_in_a_row = 0
        self._clip_memo = (-1, 0, 0)  # (j, start, end) of the last clip_samples asked for

    # -- events --------------------------------------------------------------------------

    def open(self, model: ModelInfo) -> None:
        self.model = model
        self.clock.fps = model.fps
        self.issuing = True

    @property
    def lookahead_ms(self) -> int:
        """How far frames run behind the audio at least: the model's lookahead, plus the
        wait for the rest of a request's frames when it asks for several."""
        wait = (self.per_request - 1) * 1000 / self.clock.fps if self.clock.fps else 0.0
        return lookahead_ms(self.clock.fps, self.sr) + math.ceil(wait)

    def feed(self, pcm: bytes, now: float) -> ServiceError | None:
        """One chunk of audio that arrived at ``now``; the error that ends the stream if it
        breaks a limit."""
        n = len(pcm) // 2
        if n > self.sr:
            return ServiceError(ErrorCode.BAD_REQUEST, "audio chunk longer than one second")
        if not n:
            return None
        self.audio.feed(pcm, now)
        if self.audio.held > self.config.max_buffer_s * self.sr:
            return ServiceError(
                ErrorCode.OVERLOADED,
                f"audio more than {self.config.max_buffer_s:g} s ahead of the frames",
            )
        return None

    def stop(self) -> None:
        """No more audio: pad with silence so that every frame whose time falls inside the
        received audio can be computed; the stream is finished once they are out."""
        fps = self.clock.fps
        final = frames_in(self.audio.received, fps, self.sr)
        self.final = final
        self.audio.pad(clip_samples(final - 1, fps, self.sr)[1] if final else 0)

    def interrupt(self) -> list[Frame]:
        """Barge-in: a new epoch (audio time restarts at 0, sequence numbers and the walk go
        on from the first frame not sent). Returns the frames dropped, to cancel."""
        dropped = self._take_frames()
        self.seq_base += self.next_send
        self.epoch += 1
        self.audio.reset()
        self.next_issue = self.next_send = 0
        self.clock.restart()
        if self.final is not None:
            self.final = 0  # stopping: nothing left to finish
        return dropped

    def end(self) -> list[Frame]:
        """The stream is ending (failed or gone): issue nothing more. Returns the frames
        dropped, to cancel."""
        self.issuing = False
        return self._take_frames()

    def _take_frames(self) -> list[Frame]:
        frames = list(self.frames.values())
        self.frames.clear()
        return frames

    def ready(self, frame: Frame, data: bytes, now: float) -> None:
        """``frame``'s tagged bytes are ready (an answer came at ``now``)."""
        frame.data = data
        if frame.kind is Kind.INFER:
            frame.ready_at = now
            self.failures_in_a_row = 0

    def inference_ended(self, frames: int = 1) -> None:
        """An ``infer`` request for ``frames`` frames is no longer in flight (answered,
        failed or cancelled)."""
        self.clock.inferring -= frames

    @property
    def finished(self) -> bool:
        """Stopped and every frame to finish is sent or dropped."""
        return self.final is not None and self.next_send >= self.final

    # -- issuing -------------------------------------------------------------------------

    def issue_next(self, now: float) -> Frame | None:
        """The next frame whose clip is in, if ``max_ahead`` allows; None when there is none
        (and then forget the audio no frame still to issue needs). An ``INFER`` frame's clip
        is ``clip(frame)``, to take before the next call."""
        model = self.model
        if not self.issuing or model is None:
            return None
        j = self.next_issue
        fps, sr = model.fps, self.sr
        start, end = self._clip_span(j)
        if (
            j - self.next_send >= self.config.max_ahead
            or (self.final is not None and j >= self.final)
            or end > self.audio.end
        ):
            self.audio.trim(start)
            return None
        lo, hi = energy_window(j, fps, sr)
        seq = self.seq_base + j
        frame = Frame(
            j=j,
            seq=seq,
            frame_id=walk_frame(seq, model.frame_count),
            audio_ms=round(frame_time_ms(j, fps)),
            arrival=self.audio.arrival(end),
            idle=self.audio.quieter_than(lo, hi, self.config.silence_dbfs),
        )
        if frame.idle:
            frame.kind = Kind.IDLE if self.mode == "crop" else Kind.FETCH
        elif not self.clock.may_infer():
            frame.kind = Kind.SKIP
        elif self.per_request > 1:
            group = self._group(frame, now)
            if group is None:
                return None  # the frames after it are not in yet: they go together
            self.clock.inferring += len(group)
            frame.ttl_ms = self.clock.frame_ttl_ms(j, now)
            for member in group:
                self.frames[member.j] = member
            self.next_issue = j + len(group)
            return frame
        else:
            self.clock.inferring += 1
            frame.ttl_ms = self.clock.frame_ttl_ms(j, now)
        self.frames[j] = frame
        self.next_issue = j + 1
        return frame

    def _group(self, first: Frame, now: float) -> list[Frame] | None:
        """``first`` and the frames after it that one request will ask for: up to
        ``per_request`` consecutive speaking frames, within ``max_ahead`` and the stop; None
        while the audio of a frame that would belong is not in yet (so that they go
        together)."""
        model = self.model
        assert model is not None
        fps, sr = model.fps, self.sr
        group = [first]
        first.group = group
        room = self.config.max_ahead - (first.j - self.next_send)
        last = first.j + min(self.per_request, room) - 1
        if self.final is not None:
            last = min(last, self.final - 1)
        for j in range(first.j + 1, last + 1):
            end = clip_samples(j, fps, sr)[1]
            if end > self.audio.end:
                return None
            lo, hi = energy_window(j, fps, sr)
            if self.audio.quieter_than(lo, hi, self.config.silence_dbfs):
                break  # an idle frame ends the group (it needs no inference)
            seq = self.seq_base + j
            group.append(
                Frame(
                    j=j,
                    seq=seq,
                    frame_id=walk_frame(seq, model.frame_count),
                    audio_ms=round(frame_time_ms(j, fps)),
                    arrival=self.audio.arrival(end),
                    idle=False,
                    group=group,
                )
            )
        return group

    def clip(self, frame: Frame) -> bytes:
        """The PCM an ``infer`` request for ``frame`` carries (for a group, from the first
        frame's clip start to the last one's end)."""
        start, end = self._clip_span(frame.j)
        if frame.group is not None and len(frame.group) > 1:
            end = clip_samples(frame.group[-1].j, self.clock.fps, self.sr)[1]
        return self.audio.slice(start, end)

    def _clip_span(self, j: int) -> tuple[int, int]:
        """``clip_samples(j)``, remembered for the last ``j`` asked: the pump asks for the
        next frame's after every chunk until its audio is in."""
        memo = self._clip_memo
        if memo[0] != j:
            memo = self._clip_memo = (j, *clip_samples(j, self.clock.fps, self.sr))
        return memo[1], memo[2]

    def infer_opts(self, frame: Frame, *, key: str, quality: int) -> dict[str, Any]:
        """The ``opts`` of ``frame``'s ``infer`` request (docs/streams.md, "Internal"): the
        stream key is new with each epoch, since audio time restarts."""
        more = tuple(f.frame_id for f in frame.group[1:]) if frame.group else ()
        return InferOpts(
            mode=self.mode,
            quality=quality,
            audio_sr=self.sr,
            stream=f"{key}.{self.epoch}",
            stream_frame=frame.j,
            audio_t0_ms=clip_t0_ms(frame.j, self.clock.fps, self.sr),
            more_frames=more,
        ).to_map()

    # -- the pacer -----------------------------------------------------------------------

    def decide(self, now: float) -> Decision:
        """What to do next (:meth:`PlayoutClock.decide`), with the frame sent or dropped
        already taken off the queue and counted. A failed frame ends the stream (``FAIL``)
        when its error is in :data:`FATAL` or it is the ``max_failures``-th in a row."""
        j = self.next_send
        frame = self.frames.get(j)
        decision = self.clock.decide(now, j, frame)
        act = decision.act
        if act is Act.SEND:
            del self.frames[j]
            self.next_send = j + 1
            self.sent += 1
            if decision.frame is not None and decision.frame.idle:
                self.idle += 1
        elif act is Act.DROP:
            del self.frames[j]
            self.next_send = j + 1
            self.dropped += 1
            if decision.why is Why.FAILED and frame is not None and frame.failed is not None:
                self.failures_in_a_row += 1
                code = frame.failed.code
                if code in FATAL or self.failures_in_a_row >= self.config.max_failures:
                    return Decision(Act.FAIL, frame, why=Why.FAILED)
        return decision
