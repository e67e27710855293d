"""The playout clock of one stream, sans-I/O: when each frame is due, how long its request
may live, how many inferences may be in flight, and what to do next with the frame at the
head of the queue. No asyncio and no clock of its own: the caller passes ``now``
(``time.monotonic()`` in the gateway, a script in ``tests/test_stream_clock.py``).

The rules (docs/streams.md, "Gateway → client"):

- The clock starts when the first frame is ready: that frame's slot is ``now``, frame
  ``j``'s is ``j / fps`` later, plus the *shift*.
- A frame not ready by its slot plus ``grace_frames`` pushes the playout back one frame
  time (``DELAY``), at most ``max_delay_ms`` in all; past that it is dropped (``DROP``,
  ``LATE``). A frame whose audio has not even arrived by then is the client's lateness, not
  the workers': the clock stops (``RESTART``) and starts again when that frame is ready.
- Once a whole second of inferred frames was ready more than 1.5 frame times early, the
  playout moves forward by the surplus beyond one frame time, at most five frames at once
  (reported as ``caught_up`` on the ``SEND`` that did it).
- Inferences in flight are bounded by an AIMD *window*: halved by each frame dropped for
  lateness, grown by one per window of frames sent in time. A frame whose audio is in while
  the window is full is never requested (``SKIP``, dropped as ``SKIPPED`` at its turn).
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass
from typing import Protocol

from shared.config import StreamConfig
from shared.errors import ErrorCode, ServiceError


__all__ = ["Act", "Decision", "Frame", "Kind", "PlayoutClock", "Why"]


class Kind(enum.Enum):
    """How an issued frame gets its picture."""

    IDLE = "idle"  # silent, crop mode: no image at all, ready at once
    FETCH = "fetch"  # silent, composite mode: the avatar's raw frame (IdleFrames)
    INFER = "infer"  # speech: an ``infer`` request
    SKIP = "skip"  # speech while the window is full: never requested, dropped at its turn


class Act(enum.Enum):
    """What to do next with the head of the queue."""

    SEND = "send"  # send ``frame`` now
    DROP = "drop"  # drop ``frame`` (``why``), cancel its request
    FAIL = "fail"  # drop ``frame`` and end the stream with its error
    WAIT = "wait"  # nothing to do before ``until`` (None: before the next event)
    DELAY = "delay"  # the playout moved back one frame time; decide again
    RESTART = "restart"  # the client's audio is late: the clock stopped; decide again


class Why(enum.Enum):
    """Why a frame was dropped."""

    FAILED = "failed"  # its request failed (counts towards ``max_failures``)
    SKIPPED = "skipped"  # never requested: the workers are behind
    LATE = "late"  # not ready in time
    TOO_LATE = "too_late"  # refused by a worker that could not have it ready in time


class Cancellable(Protocol):
    """What the stream holds for a frame's request (an ``asyncio.Task``)."""

    def cancel(self) -> bool: ...
    def done(self) -> bool: ...


@dataclass(eq=False, slots=True)
class Frame:
    """One issued frame of the current epoch."""

    j: int  # stream frame index within the epoch
    seq: int
    frame_id: int
    audio_ms: int
    arrival: float | None  # when its last needed audio sample arrived (None: padding)
    idle: bool
    kind: Kind = Kind.INFER
    data: bytes | None = None  # the tagged frame, once ready
    failed: ServiceError | None = None
    ttl_ms: int = 0  # its request's time to live, when requested
    ready_at: float = 0.0  # when an inferred frame's answer came
    task: Cancellable | None = None  # its request, the stream's business
    group: list[Frame] | None = None  # a request for several frames: all of them, in order


@dataclass(frozen=True, slots=True)
class Decision:
    act: Act
    frame: Frame | None = None  # SEND, DROP, FAIL
    until: float | None = None  # WAIT: when to decide again at the latest
    why: Why | None = None  # DROP, FAIL
    caught_up: int = 0  # SEND: frames the playout moved forward with it


_WAIT_FOR_EVENT = Decision(Act.WAIT)
_DELAY = Decision(Act.DELAY)
_RESTART = Decision(Act.RESTART)


class PlayoutClock:
    """Slots, deadlines, catch-up and the window of one stream (see the module docstring).
    ``fps`` is set once the stream's model is known, before the first ``decide``."""

    __slots__ = (
        "_early_min",
        "_early_n",
        "config",
        "fps",
        "inferring",
        "shift",
        "start",
        "window",
    )

    def __init__(self, config: StreamConfig, fps: float = 0.0) -> None:
        self.config = config
        self.fps = fps
        # (time of the slot of frame j0, j0) while the clock runs
        self.start: tuple[float, int] | None = None
        # Seconds the playout has moved since the clock started: back by a frame time for a
        # late frame (at most max_delay_ms), forward when a whole second of inferred frames
        # was early, so that the stream's latency follows what the workers do now, not what
        # its first frame happened to take.
        self.shift = 0.0
        self._early_min = math.inf
        self._early_n = 0
        # Inferred frames allowed in flight. When the workers cannot keep up, the stream
        # asks for fewer frames, each in time, instead of for every frame, each late (which
        # shows nothing and wastes the workers on frames nobody sees).
        self.window = float(config.max_ahead)
        self.inferring = 0  # requests in flight (the stream counts them in and out)

    @property
    def running(self) -> bool:
        return self.start is not None

    def restart(self) -> None:
        """Stop the clock: it starts again when the next frame is ready."""
        self.start = None

    def slot(self, j: int) -> float:
        """When frame ``j`` is due (the clock must be running)."""
        assert self.start is not None
        t0, j0 = self.start
        return t0 + self.shift + (j - j0) / self.fps

    def may_infer(self) -> bool:
        """Whether a frame issued now may be requested: before the clock runs always (the
        first frames set it), then while the window has room."""
        return self.start is None or self.inferring < int(self.window)

    def frame_ttl_ms(self, j: int, now: float) -> int:
        """How long frame ``j``'s request is worth waiting for: until the latest moment the
        pacer could still show it (its slot with the playout pushed back as far as it may
        go, plus the grace), capped by ``ttl_ms``. Before the clock runs, ``ttl_ms``."""
        config = self.config
        if not config.slot_deadlines or self.start is None:
            return config.ttl_ms
        t0, j0 = self.start
        last = t0 + (j - j0 + config.grace_frames) / self.fps + config.max_delay_ms / 1000
        return max(1, min(config.ttl_ms, int((last - now) * 1000)))

    def too_late(self, frame: Frame) -> bool:
        """Failed only for lack of time: its request carried the frame's own deadline and a
        worker (or the broker) found it could not be ready by then. A late frame, not a
        failure that counts towards ending the stream."""
        failed = frame.failed
        return (
            failed is not None
            and failed.code is ErrorCode.DEADLINE_EXCEEDED
            and frame.ttl_ms < self.config.ttl_ms
        )

    def decide(self, now: float, j: int, head: Frame | None) -> Decision:
        """What to do at ``now`` with frame ``j``, the next to send (``head``: None while
        not issued). Updates the clock (start, shift, window) for the decision it returns;
        the caller then does it (and removes a sent or dropped frame from its queue)."""
        if head is not None and (head.failed is not None or head.kind is Kind.SKIP):
            if head.kind is Kind.SKIP:
                return Decision(Act.DROP, head, why=Why.SKIPPED)
            if self.too_late(head):
                self._late()
                return Decision(Act.DROP, head, why=Why.TOO_LATE)
            return Decision(Act.DROP, head, why=Why.FAILED)
        if self.start is None:
            if head is None or head.data is None:
                return _WAIT_FOR_EVENT
            self.start = (now, j)
            self.shift = 0.0
            self._early_min, self._early_n = math.inf, 0
        slot = self.slot(j)
        if head is not None and head.data is not None:
            if now < slot:
                return Decision(Act.WAIT, until=slot)
            caught_up = 0
            if not head.idle:
                self.window = min(float(self.config.max_ahead), self.window + 1 / self.window)
                caught_up = self._catch_up(slot - head.ready_at)
            return Decision(Act.SEND, head, caught_up=caught_up)
        late = slot + self.config.grace_frames / self.fps
        if now < late:
            return Decision(Act.WAIT, until=late)
        if head is None:
            self.start = None  # the client's audio came late: restart the clock on it
            return _RESTART
        if self.shift + 1 / self.fps <= self.config.max_delay_ms / 1000 + 1e-9:
            self.shift += 1 / self.fps  # jitter: play this stream a frame later from now on
            return _DELAY
        self._late()
        return Decision(Act.DROP, head, why=Why.LATE)

    def _late(self) -> None:
        """A frame that could not be shown in time: fewer requests in flight from now on."""
        self.window = max(1.0, self.window / 2)

    def _catch_up(self, early: float) -> int:
        """Once a second's inferred frames were all ready early by more than 1.5 frame
        times, move the clock forward by the surplus beyond one frame time, at most five
        frames at once (those then go out back to back: latency lower, pacing one burst).
        Returns the frames it moved."""
        self._early_min = min(self._early_min, early)
        self._early_n += 1
        frames = 0
        if self._early_n >= self.fps:
            if self._early_min > 1.5 / self.fps:
                frames = min(5, int((self._early_min - 1 / self.fps) * self.fps))
                self.shift -= frames / self.fps
            self._early_min, self._early_n = math.inf, 0
        return frames
