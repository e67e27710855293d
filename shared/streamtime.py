"""Stream timing: which audio a stream frame needs, in samples (docs/streams.md, "Timing").

The gateway cuts a clip of the stream's audio for every frame it asks a worker for, and the
worker finds each feature row's mel window inside that clip. Both sides must agree to the
sample, so the arithmetic lives here, once, with no I/O and no numpy.

Frame ``j`` of a stream shows audio time ``j / fps``. Its model input is feature rows
``j-8 .. j+7``; row ``k`` is the encoder applied to mel frames ``[s_k, s_k + 16)`` with
``s_k = int(80·k/fps)`` (SyncTalk's formula, the same expression as
``workers.mel.window_start`` so the two can never round differently). A mel frame ``m`` is
a centred 800-sample STFT frame at 16 kHz: samples ``[200m - 400, 200m + 400)``, and
pre-emphasis reads one sample before that. So row ``k`` needs 16 kHz samples
``[200·s_k - 401, 200·s_k + 3400)``.

A clip must also start on the grid of the whole stream's analysis, so that its numbers are
the ones a computation over the whole stream would give:

* at 16 kHz the clip starts on a hop (200 samples), so its mel frames are the stream's;
* at other rates it starts on a 50 ms boundary (800 samples at 16 kHz: a whole number of
  samples at 24, 44.1 and 48 kHz and a whole period of every polyphase resampler from
  those rates), and carries ``RESAMPLE_MARGIN`` extra samples each side, since resampling
  a cut clip differs from resampling the stream within ~10 output samples of the cuts.

Before the stream's first sample the clip holds zeros (exactly what a whole-stream
computation pads with).
"""

from __future__ import annotations

import math


__all__ = [
    "CONTEXT_AFTER",
    "CONTEXT_BEFORE",
    "ENERGY_WINDOW_S",
    "HOP",
    "RESAMPLE_MARGIN",
    "SAMPLE_RATE",
    "SUPPORTED_RATES",
    "WINDOW_STEPS",
    "clip_16k",
    "clip_samples",
    "clip_t0_ms",
    "clip_start_from_t0",
    "energy_window",
    "frame_time_ms",
    "frames_in",
    "lookahead_ms",
    "mel_start",
    "row_span_16k",
    "walk_frame",
]

SAMPLE_RATE = 16_000
SUPPORTED_RATES = (16_000, 24_000, 44_100, 48_000)
HOP = 200  # 16 kHz samples per mel frame
HALF_WINDOW = 400  # n_fft / 2: a centred mel frame reaches this far each side
WINDOW_STEPS = 16  # mel frames per feature row (0.2 s)
CONTEXT_BEFORE = 8
CONTEXT_AFTER = 7
ALIGN_RESAMPLED = 800  # 50 ms at 16 kHz
RESAMPLE_MARGIN = 32  # 16 kHz samples (2 ms) beyond a resampled clip's needs, each side
ENERGY_WINDOW_S = 0.2  # silence is judged on the 200 ms around a frame's time


def mel_start(k: int, fps: float) -> int:
    """First mel frame of feature row ``k`` (``k >= 0``): ``int(80·k/fps)``."""
    return int(80.0 * (k / float(fps)))


def row_span_16k(k: int, fps: float) -> tuple[int, int]:
    """16 kHz samples ``[lo, hi)`` of the stream that feature row ``k`` depends on."""
    s = mel_start(k, fps)
    return HOP * s - HALF_WINDOW - 1, HOP * (s + WINDOW_STEPS - 1) + HALF_WINDOW


def _check_rate(sr: int) -> None:
    if sr not in SUPPORTED_RATES:
        raise ValueError(f"unsupported sample rate {sr} (supported: {list(SUPPORTED_RATES)})")


def clip_16k(j: int, fps: float, sr: int) -> tuple[int, int]:
    """Frame ``j``'s clip in 16 kHz samples of the stream, ``[start, end)``.

    ``start`` is a multiple of 200 (16 kHz streams) or 800 (other rates); it may be
    negative (zeros before the stream's start). Rows of frames below 0 are zero rows and
    need no audio, so the clip starts at row ``max(j-8, 0)``'s needs.
    """
    if j < 0:
        raise ValueError(f"frame index must be >= 0, not {j}")
    _check_rate(sr)
    margin = 0 if sr == SAMPLE_RATE else RESAMPLE_MARGIN
    align = HOP if sr == SAMPLE_RATE else ALIGN_RESAMPLED
    lo = row_span_16k(max(j - CONTEXT_BEFORE, 0), fps)[0] - margin
    hi = row_span_16k(j + CONTEXT_AFTER, fps)[1] + margin
    return (lo // align) * align, hi


def clip_samples(j: int, fps: float, sr: int) -> tuple[int, int]:
    """Frame ``j``'s clip in samples of the stream at ``sr``: ``[start, end)``.

    ``start`` converts exactly (it lies on the 16 kHz grid's 50 ms boundaries at other
    rates); ``end`` is rounded up.
    """
    start16, end16 = clip_16k(j, fps, sr)
    start = start16 * sr // SAMPLE_RATE
    end = -((-end16 * sr) // SAMPLE_RATE)
    return start, end


def frame_time_ms(j: int, fps: float) -> float:
    """Audio time frame ``j`` shows, in ms since the stream's (epoch's) first sample."""
    return 1000.0 * j / float(fps)


def clip_t0_ms(j: int, fps: float, sr: int) -> float:
    """``audio_t0_ms`` of frame ``j``'s clip: its first sample's time relative to frame
    ``j``'s time (negative)."""
    start16, _ = clip_16k(j, fps, sr)
    return 1000.0 * start16 / SAMPLE_RATE - frame_time_ms(j, fps)


def clip_start_from_t0(j: int, fps: float, t0_ms: float) -> int:
    """The worker's inverse of ``clip_t0_ms``: the clip's first sample, 16 kHz samples of
    the stream (exact for any sane fps: the float error is far below half a sample)."""
    return round(SAMPLE_RATE * (j / float(fps)) + SAMPLE_RATE * t0_ms / 1000.0)


def lookahead_ms(fps: float, sr: int) -> int:
    """How long after frame ``j``'s time its clip ends, at most (ms, rounded up): the
    smallest possible audio-in → frame-out delay of a stream."""
    worst = 0.0
    # the pattern of int(80·k/fps) repeats within fps frames for integer fps; 200 covers
    # any fps a video has
    for j in range(200):
        end = clip_16k(j, fps, sr)[1] / SAMPLE_RATE - j / float(fps)
        worst = max(worst, end)
    return math.ceil(worst * 1000 - 1e-9)


def energy_window(j: int, fps: float, sr: int) -> tuple[int, int]:
    """Samples (at ``sr``) of the 200 ms around frame ``j``'s time, clamped at 0."""
    centre = j / float(fps)
    lo = round((centre - ENERGY_WINDOW_S / 2) * sr)
    hi = round((centre + ENERGY_WINDOW_S / 2) * sr)
    return max(lo, 0), max(hi, 0)


def frames_in(n_samples: int, fps: float, sr: int) -> int:
    """Frames whose time falls inside the first ``n_samples`` samples: ``ceil(n·fps/sr)``."""
    if n_samples <= 0:
        return 0
    return max(0, math.ceil(n_samples * float(fps) / sr - 1e-9))


def walk_frame(position: int, frame_count: int) -> int:
    """The avatar frame at ``position`` of the ping-pong walk ``0 .. N-1, N-2 .. 1, 0, ...``
    (the head moves back and forth and never jumps from the last frame to the first)."""
    if frame_count <= 1:
        return 0
    period = 2 * frame_count - 2
    q = position % period
    return q if q < frame_count else period - q
