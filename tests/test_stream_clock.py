"""The streams' sans-I/O core (gateway/streams/clock.py, core.py): scripted timelines of
audio arrivals and answers in, the exact sequence of decisions out. No sockets, no sleeps,
no event loop: time is a number the script passes.

The timelines run at 32 frames/s with 16 kHz audio in chunks of one frame time (500
samples), and answers 1/64 s after their request, so that every time is a sum of binary
fractions and exact. At 32 fps frame ``j``'s clip ends inside chunk ``13 + j``
(``shared.streamtime``), so frame ``j`` is issued when that chunk arrives, at
``(14 + j) / 32`` s, and answered at ``(29 + 2j) / 64`` s. Times below are in 64ths of a
second.
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections.abc import Callable

import numpy as np
import pytest

from gateway.streams.clock import Act, Decision, Frame, Kind, PlayoutClock, Why
from gateway.streams.core import FATAL, ModelInfo, StreamCore, model_info
from shared.config import StreamConfig
from shared.errors import ErrorCode, ServiceError
from shared.streamtime import clip_samples, walk_frame


FPS = 32
SR = 16_000
CHUNK = SR // FPS  # samples: one frame time
MODEL = ModelInfo(fps=FPS, frame_count=7, size=(64, 48), bounds=(8.0, 8.0, 40.0, 40.0))
LOUD = (8000 * np.sin(np.arange(CHUNK) * 2 * np.pi * 440 / SR)).astype("<i2").tobytes()
QUIET = bytes(2 * CHUNK)

AnswerFn = Callable[[Frame], "tuple[float, ServiceError | None] | None"]


def on_time(frame: Frame) -> tuple[float, ServiceError | None]:
    return 1 / 64, None


class Timeline:
    """Drives a StreamCore as ``gateway.streams.Stream`` does, on a scripted clock: audio
    chunks, stop and interrupt at given times; each ``infer`` answered as ``answer`` says
    (delay and error; None: never). After every event and at every ``WAIT``'s deadline the
    pacer decides until it waits; after a send or a drop it issues what may go out. A
    cancelled request leaves the window after the step that cancelled it, as a cancelled
    task's ``finally`` runs after the pacer's step."""

    def __init__(
        self, answer: AnswerFn = on_time, config: StreamConfig | None = None, mode: str = "crop"
    ) -> None:
        self.core = StreamCore(config or StreamConfig(), sample_rate=SR, mode=mode)
        self.core.open(MODEL)
        self.answer = answer
        self.events: list[tuple[float, int, Callable[[float], None]]] = []
        self._order = itertools.count()
        self.wake: float | None = None
        self.log: list[tuple[float, str, int | None]] = []
        self.issued: list[tuple[float, int, Kind, float | None]] = []
        self._in_flight: set[Frame] = set()
        self._cancelled: list[Frame] = []
        self.failed: ServiceError | None = None

    # -- the script ------------------------------------------------------------------------

    def at(self, t: float, event: Callable[[float], None]) -> None:
        heapq.heappush(self.events, (t, next(self._order), event))

    def audio(self, chunks: range | list[int], pcm: bytes = LOUD, at: float | None = None) -> None:
        """Chunk ``k`` arrives when it is complete, ``(k + 1) / 32`` s, or all at ``at``."""
        for k in chunks:
            t = (k + 1) / FPS if at is None else at
            self.at(t, lambda now, pcm=pcm: self._feed(pcm, now))

    def stop(self, t: float) -> None:
        self.at(t, self._stop)

    def run(self) -> list[tuple[float, str, int | None]]:
        """Everything that happens at one time happens before the pacer decides at it."""
        while (self.events or self.wake is not None) and self.failed is None:
            now = min(self.events[0][0] if self.events else math.inf, self.wake or math.inf)
            while self.events and self.events[0][0] == now:
                heapq.heappop(self.events)[2](now)
            self.wake = None
            self._pace(now)
        return self.log

    # -- what the stream does ----------------------------------------------------------------

    def _feed(self, pcm: bytes, now: float) -> None:
        assert self.core.feed(pcm, now) is None
        self._pump(now)

    def _stop(self, now: float) -> None:
        self.core.stop()
        self._pump(now)

    def _pump(self, now: float) -> None:
        while (frame := self.core.issue_next(now)) is not None:
            arrival = None if frame.arrival is None else frame.arrival * 64
            self.issued.append((now * 64, frame.j, frame.kind, arrival))
            if frame.kind is Kind.INFER:
                start, end = clip_samples(frame.j, FPS, SR)
                assert len(self.core.clip(frame)) == 2 * (end - start)
                self._in_flight.add(frame)
                plan = self.answer(frame)
                if plan is not None:
                    delay, error = plan
                    self.at(now + delay, lambda t, f=frame, e=error: self._answered(f, e, t))
            elif frame.kind is Kind.IDLE:
                self.core.ready(frame, b"idle", now)

    def _answered(self, frame: Frame, error: ServiceError | None, now: float) -> None:
        if frame not in self._in_flight:
            return  # cancelled
        self._in_flight.discard(frame)
        if error is None:
            self.core.ready(frame, b"tagged", now)
        else:
            frame.failed = error
        self.core.inference_ended()

    def _cancel(self, frames: list[Frame]) -> None:
        for frame in frames:
            if frame in self._in_flight:
                self._in_flight.discard(frame)
                self._cancelled.append(frame)

    def _pace(self, now: float) -> None:
        while not self.core.finished:
            decision = self.core.decide(now)
            if decision.act is Act.WAIT:
                self.wake = decision.until
                break
            frame = decision.frame
            what = decision.act.value
            if decision.why is not None and decision.why is not Why.FAILED:
                what += f" {decision.why.value}"
            if decision.caught_up:
                what += f" caught up {decision.caught_up}"
            self.log.append((now * 64, what, None if frame is None else frame.j))
            if frame is not None and decision.act is not Act.SEND:
                self._cancel([frame])
            if decision.act is Act.FAIL:
                assert frame is not None
                self.failed = frame.failed
                self._cancel(self.core.end())
                break
            if decision.act in (Act.SEND, Act.DROP):
                self._pump(now)
            for _ in self._cancelled:
                self.core.inference_ended()
            self._cancelled.clear()


def sends(js: range, t: Callable[[int], float]) -> list[tuple[float, str, int | None]]:
    return [(t(j), "send", j) for j in js]


# -- timelines ------------------------------------------------------------------------------------


def test_steady_stream_is_paced_from_its_first_frame_and_stop_plays_out_the_tail():
    """24 chunks (0.75 s) in real time, stop at 50/64: frame 0 is ready at 29/64 and sets
    the clock, each later frame goes out on its slot two 64ths later, and the 13 frames
    still to come when the stop arrives (padded with silence) all play out."""
    tl = Timeline()
    tl.audio(range(24))
    tl.stop(50 / 64)
    assert tl.run() == sends(range(24), lambda j: 29 + 2 * j)
    core = tl.core
    assert core.finished and (core.sent, core.idle, core.dropped) == (24, 0, 0)
    assert all(kind is Kind.INFER for _, _, kind, _ in tl.issued)
    # issued as soon as their clip is in, at most 8 ahead of the frame being sent; timed
    # from the arrival of the chunk their clip ends in (padding: not timed)
    assert [(t, j, a) for t, j, _, a in tl.issued[:11]] == [
        (28 + 2 * j, j, 28 + 2 * j) for j in range(11)
    ]
    assert [(t, j, a) for t, j, _, a in tl.issued[11:19]] == [(50, j, None) for j in range(11, 19)]
    assert [(t, j) for t, j, _, _ in tl.issued[19:]] == [
        (29 + 2 * (j - 8), j) for j in range(19, 24)
    ]


def test_late_answers_push_the_playout_back_then_are_dropped():
    """Frame 3 comes 1/64 s past its slot and grace: the playout moves back one frame time
    (``delay``) and it is shown. Frame 6 never comes: the playout moves back while it may
    (200 ms in all: six frame times at 32 fps), then frame 6 is dropped as late, the window
    of requests halves, and the frames behind it go out at once and on the new slots. When
    the audio ends, the clock stops (``restart``): the client is late, not the workers."""

    def answer(frame: Frame) -> tuple[float, None] | None:
        if frame.j == 6:
            return None
        return (4 / 64 if frame.j == 3 else 1 / 64), None

    tl = Timeline(answer)
    tl.audio(range(30))  # frames 0 .. 16
    log = tl.run()
    assert log == [
        *sends(range(3), lambda j: 29 + 2 * j),
        (37, "delay", None),
        (38, "send", 3),
        *sends(range(4, 6), lambda j: 31 + 2 * j),
        (45, "delay", None),
        (47, "delay", None),
        (49, "delay", None),
        (51, "delay", None),
        (53, "delay", None),
        (55, "drop late", 6),
        *sends(range(7, 17), lambda j: 41 + 2 * j),
        (77, "restart", None),
    ]
    clock = tl.core.clock
    assert clock.shift == pytest.approx(6 / 32) and not clock.running
    assert clock.window == pytest.approx(_grown(4.0, 10))  # 10 inferred frames sent since
    assert (tl.core.sent, tl.core.dropped) == (16, 1)


def test_a_stalled_microphone_restarts_the_clock_instead_of_dropping():
    """Chunks 20-23 come 0.3 s late, all at once: frame 7's audio is missing at its slot and
    grace, so the clock stops (no drop); it starts again on frame 7 once it is ready."""
    tl = Timeline()
    tl.audio(range(20))
    tl.audio(range(20, 24), at=1.0)
    tl.stop(66 / 64)
    assert tl.run() == [
        *sends(range(7), lambda j: 29 + 2 * j),
        (45, "restart", None),
        *sends(range(7, 24), lambda j: 51 + 2 * j),
    ]
    assert tl.core.dropped == 0 and tl.core.finished


def test_workers_behind_get_fewer_requests_the_rest_skipped():
    """A worker that takes 10/64 s a frame cannot keep 32 fps. With four frames ahead and
    no playout delay allowed, frames 0-7 go out late but within their grace; frame 8 is
    dropped as late, which halves the window of requests to 4 while 4 are still in flight,
    so frame 12, whose audio is in, is never requested (``skip``) and is dropped at its turn
    without waiting. The requests of dropped frames are cancelled."""
    tl = Timeline(lambda frame: (10 / 64, None), StreamConfig(max_ahead=4, max_delay_ms=0))
    tl.audio(range(26))  # frames 0 .. 12
    assert tl.run() == [
        *sends(range(4), lambda j: 38 + 2 * j),
        *sends(range(4, 8), lambda j: 40 + 2 * j),
        (56, "drop late", 8),
        (58, "drop late", 9),
        (60, "drop late", 10),
        (62, "drop late", 11),
        (62, "drop skipped", 12),
        (66, "restart", None),
    ]
    kinds = {j: kind for _, j, kind, _ in tl.issued}
    assert kinds == {j: Kind.SKIP if j == 12 else Kind.INFER for j in range(13)}
    # issued as the window of four frames ahead moves, not as the audio comes in
    assert [t for t, *_ in tl.issued] == [28, 30, 32, 34, 38, 40, 42, 44, 48, 50, 52, 54, 56]
    assert tl.core.clock.window == 1.0 and tl.core.clock.inferring == 0


def test_a_fatal_answer_ends_the_stream_and_others_only_count():
    bad = ServiceError(ErrorCode.INTERNAL, "boom")

    def answer(frame: Frame) -> tuple[float, ServiceError | None]:
        if frame.j in (2, 3):
            return 1 / 64, bad
        if frame.j == 5:
            return 1 / 64, ServiceError(ErrorCode.FRAME_OUT_OF_RANGE, "no such frame")
        return 1 / 64, None

    tl = Timeline(answer)
    tl.audio(range(30))
    log = tl.run()
    # a failed frame is dropped as soon as it is the head, before its slot
    assert log == [
        *sends(range(2), lambda j: 29 + 2 * j),
        (33, "drop", 2),
        (35, "drop", 3),
        (37, "send", 4),
        (39, "fail", 5),
    ]
    assert ErrorCode.FRAME_OUT_OF_RANGE in FATAL and tl.failed is not None
    assert tl.failed.code is ErrorCode.FRAME_OUT_OF_RANGE
    assert tl.core.failures_in_a_row == 1  # frame 4 broke the run of 2 and 3
    assert not tl.core.frames and tl.core.issue_next(1.0) is None  # ended: nothing more


def test_max_failures_in_a_row_end_the_stream():
    tl = Timeline(
        lambda frame: (1 / 64, ServiceError(ErrorCode.INTERNAL, "x")),
        StreamConfig(max_failures=3),
    )
    tl.audio(range(30))
    assert tl.run() == [(29, "drop", 0), (31, "drop", 1), (33, "fail", 2)]


def test_silence_gives_idle_frames_without_requests():
    """Crop mode: a silent frame is ready at once (no image); composite mode fetches the
    avatar's raw frame instead. Either way nobody is asked to infer it."""
    tl = Timeline()
    tl.audio(range(20), pcm=QUIET)
    tl.stop(21 / 32)
    log = tl.run()
    assert {kind for _, _, kind, _ in tl.issued} == {Kind.IDLE}
    # the clock starts on the first idle frame, issued with chunk 13
    assert log == sends(range(20), lambda j: 28 + 2 * j)
    assert tl.core.idle == 20 and tl.core.clock.inferring == 0
    composite = StreamCore(StreamConfig(), sample_rate=SR, mode="composite")
    composite.open(MODEL)
    for _ in range(14):
        assert composite.feed(QUIET, 0.0) is None
    frame = composite.issue_next(0.0)
    assert frame is not None and frame.kind is Kind.FETCH and frame.idle


def test_interrupt_starts_a_new_epoch_where_the_walk_left_off():
    core = StreamCore(StreamConfig(), sample_rate=SR, mode="crop")
    core.open(MODEL)
    for k in range(16):
        core.feed(LOUD, k / 32)
    issued = []
    while (frame := core.issue_next(0.5)) is not None:
        issued.append(frame)
    assert [f.j for f in issued] == [0, 1, 2]
    core.ready(issued[0], b"x", 0.5)
    assert core.decide(0.5).act is Act.SEND
    opts = core.infer_opts(issued[1], key="tok.1.7", quality=80)
    assert opts["stream"] == "tok.1.7.0" and opts["stream_frame"] == 1
    dropped = core.interrupt()
    assert dropped == issued[1:] and not core.frames and not core.clock.running
    assert (core.epoch, core.seq_base, core.audio.received) == (1, 1, 0)
    for k in range(14):
        core.feed(LOUD, 1 + k / 32)
    frame = core.issue_next(2.0)
    assert frame is not None and (frame.j, frame.seq, frame.audio_ms) == (0, 1, 0)
    assert frame.frame_id == walk_frame(1, MODEL.frame_count)
    assert core.infer_opts(frame, key="tok.1.7", quality=80)["stream"] == "tok.1.7.1"


def test_feed_limits():
    core = StreamCore(StreamConfig(max_buffer_s=1.0), sample_rate=SR, mode="crop")
    too_long = core.feed(bytes(2 * SR + 2), 0.0)
    assert too_long is not None and too_long.code is ErrorCode.BAD_REQUEST
    assert core.feed(b"", 0.0) is None and core.feed(b"\x01", 0.0) is None
    assert core.feed(bytes(2 * SR), 0.0) is None  # one second: the most a chunk may be
    ahead = core.feed(LOUD, 0.0)
    assert ahead is not None and ahead.code is ErrorCode.OVERLOADED
    assert "1 s ahead of the frames" in ahead.message


def test_model_info_is_checked():
    ok = {"fps": 25, "frame_count": 3, "size": [64, 48], "bounds": [1, 2, 3, 4], "audio": True}
    assert model_info(ok, "m") == ModelInfo(25.0, 3, (64, 48), (1.0, 2.0, 3.0, 4.0))
    for bad, code in (
        ({**ok, "fps": "x"}, ErrorCode.INTERNAL),
        ({**ok, "fps": math.nan}, ErrorCode.INTERNAL),
        ({**ok, "frame_count": 0}, ErrorCode.INTERNAL),
        ({k: v for k, v in ok.items() if k != "size"}, ErrorCode.INTERNAL),
        ({**ok, "audio": False}, ErrorCode.AUDIO_UNSUPPORTED),
        (None, ErrorCode.INTERNAL),
    ):
        with pytest.raises(ServiceError) as info:
            model_info(bad, "m")
        assert info.value.code is code


# -- the playout clock alone -------------------------------------------------------------------


def _frame(
    j: int, *, data: bytes | None = b"x", ready_at: float = 0.0, idle: bool = False
) -> Frame:
    return Frame(
        j=j, seq=j, frame_id=0, audio_ms=0, arrival=None, idle=idle, data=data, ready_at=ready_at
    )


def _grown(window: float, sends: int, cap: float = 8.0) -> float:
    for _ in range(sends):
        window = min(cap, window + 1 / window)
    return window


def _brief(d: Decision) -> tuple[str, int | None, float | None]:
    return (d.act.value, None if d.frame is None else d.frame.j, d.until)


def test_clock_waits_starts_and_paces():
    clock = PlayoutClock(StreamConfig(), fps=FPS)
    assert _brief(clock.decide(1.0, 0, None)) == ("wait", None, None)  # nothing yet
    pending = _frame(0, data=None)
    assert _brief(clock.decide(1.0, 0, pending)) == ("wait", None, None)  # not ready
    assert clock.frame_ttl_ms(5, 1.0) == 2000  # before the clock runs: ttl_ms
    assert _brief(clock.decide(2.0, 0, _frame(0))) == ("send", 0, None)
    assert clock.start == (2.0, 0) and clock.slot(4) == 2.125
    ready = _frame(1)
    assert _brief(clock.decide(2.0, 1, ready)) == ("wait", None, 2.03125)  # its slot
    assert _brief(clock.decide(2.03125, 1, ready)) == ("send", 1, None)
    # not ready: wait for slot + grace, then delay
    assert _brief(clock.decide(2.0625, 2, pending)) == ("wait", None, 2.09375)
    # frame 9's request may live until its slot with the playout pushed back 200 ms, + grace
    assert clock.frame_ttl_ms(9, 2.0) == int((9 + 1) / 32 * 1000 + 200)
    assert clock.frame_ttl_ms(0, 3.0) == 1  # never zero or negative
    slotless = PlayoutClock(StreamConfig(slot_deadlines=False), fps=FPS)
    slotless.start = (2.0, 0)
    assert slotless.frame_ttl_ms(9, 2.0) == 2000


def test_clock_catches_up_after_a_second_of_early_frames():
    """32 inferred frames (one second) all ready 3 frame times early: the playout moves
    forward by the surplus beyond one frame time (2 frames), and the next frame, due two
    frame times sooner, goes out at once."""
    clock = PlayoutClock(StreamConfig(), fps=FPS)
    t = 10.0
    assert clock.decide(t, 0, _frame(0, ready_at=t - 3 / 32)).act is Act.SEND
    caught = []
    for j in range(1, 32):
        t = clock.slot(j)
        d = clock.decide(t, j, _frame(j, ready_at=t - 3 / 32))
        assert d.act is Act.SEND
        caught.append(d.caught_up)
    assert caught == [0] * 30 + [2] and clock.shift == -2 / 32
    assert clock.decide(t, 32, _frame(32, ready_at=t)).act is Act.SEND  # due at t - 1/32
    # idle frames neither count towards it nor grow the window
    window = clock.window
    assert clock.decide(t + 1, 33, _frame(33, idle=True)).caught_up == 0
    assert clock.window == window


def test_window_halves_on_late_frames_and_grows_back():
    config = StreamConfig(max_ahead=8, max_delay_ms=0)
    clock = PlayoutClock(config, fps=FPS)
    assert clock.may_infer()
    clock.decide(0.0, 0, _frame(0))
    late = _frame(1, data=None)
    assert _brief(clock.decide(1.0, 1, late)) == ("drop", 1, None)
    assert clock.window == 4.0
    clock.inferring = 3
    assert clock.may_infer()
    clock.inferring = 4
    assert not clock.may_infer()
    for j in range(2, 7):
        assert clock.decide(100.0, j, _frame(j, data=None)).why is Why.LATE
    assert clock.window == 1.0  # never below one
    assert clock.decide(100.0, 7, _frame(7)).act is Act.SEND
    assert clock.window == 2.0  # one per window of frames in time


@pytest.mark.parametrize(
    ("code", "ttl_ms", "why"),
    [
        (ErrorCode.DEADLINE_EXCEEDED, 150, Why.TOO_LATE),  # its own deadline: late, not failed
        (ErrorCode.DEADLINE_EXCEEDED, 2000, Why.FAILED),  # the plain ttl: a failure
        (ErrorCode.OVERLOADED, 150, Why.FAILED),
    ],
)
def test_failed_frames_are_dropped_at_once(code, ttl_ms, why):
    clock = PlayoutClock(StreamConfig(), fps=FPS)
    frame = _frame(0, data=None)
    frame.failed, frame.ttl_ms = ServiceError(code, "x"), ttl_ms
    d = clock.decide(0.0, 0, frame)
    assert (d.act, d.why) == (Act.DROP, why) and not clock.running
    assert clock.window == (4.0 if why is Why.TOO_LATE else 8.0)


def test_a_request_for_several_frames_waits_for_them_and_carries_them():
    """``frames_per_request`` 4: frame j is issued only once frame j+3's audio is in, with
    frames j..j+3 in one request (one clip from j's start to j+3's end, the others' avatar
    frames in ``more_frames``); an idle frame ends a group; the stop cuts the last one.
    Frames run that much further behind the audio (``lookahead_ms``)."""
    single = StreamCore(StreamConfig(), sample_rate=SR, mode="crop")
    core = StreamCore(StreamConfig(), sample_rate=SR, mode="crop", frames_per_request=4)
    for c in (single, core):
        c.open(MODEL)
    assert core.lookahead_ms == single.lookahead_ms + math.ceil(3 * 1000 / FPS)
    for k in range(16):  # frame 0's clip is in (chunk 13), frame 3's not yet (chunk 16)
        core.feed(LOUD, k / FPS)
    assert core.issue_next(1.0) is None
    core.feed(LOUD, 16 / FPS)
    first = core.issue_next(1.0)
    assert first is not None and first.kind is Kind.INFER
    assert first.group is not None and [f.j for f in first.group] == [0, 1, 2, 3]
    assert all(f.group is first.group for f in first.group)
    assert core.next_issue == 4 and core.clock.inferring == 4
    opts = core.infer_opts(first, key="s", quality=80)
    assert opts["stream_frame"] == 0
    assert opts["more_frames"] == [walk_frame(j, MODEL.frame_count) for j in (1, 2, 3)]
    start, _ = clip_samples(0, FPS, SR)
    _, end = clip_samples(3, FPS, SR)
    assert len(core.clip(first)) == 2 * (end - start)
    core.inference_ended(4)
    assert core.clock.inferring == 0
    # the speech ends, then the stream stops: every frame once, groups of speaking frames
    # only (at most 4, consecutive), idle frames on their own
    for k in range(17, 40):
        core.feed(QUIET, k / FPS)
    core.stop()
    issued = []
    while (frame := core.issue_next(2.0)) is not None:
        issued.append(frame)
        if frame.group is not None:
            core.inference_ended(len(frame.group))
            core.next_send = frame.group[-1].j + 1  # as if sent: room within max_ahead
        else:
            core.next_send = frame.j + 1
    covered = [f.j for fr in issued for f in (fr.group or [fr])]
    assert covered == list(range(4, core.final or 0))
    groups = [fr.group for fr in issued if fr.group is not None]
    assert groups and all(1 <= len(g) <= 4 for g in groups)
    assert all(not f.idle for g in groups for f in g)
    idle = [fr for fr in issued if fr.group is None]
    assert idle and all(fr.kind is Kind.IDLE for fr in idle)


def test_frames_per_request_is_bounded():
    with pytest.raises(ValueError):
        StreamCore(StreamConfig(), sample_rate=SR, mode="crop", frames_per_request=9)
    with pytest.raises(ValueError):
        StreamCore(StreamConfig(frames_per_request=0), sample_rate=SR, mode="crop")
