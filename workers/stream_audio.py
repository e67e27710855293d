"""Stream frames' audio input: a PCM clip cut by the gateway → the ``[32,16,16]`` window.

A stream request (docs/streams.md, "Internal") carries frame ``j``'s clip: the stream's PCM
from a little before row ``j-8``'s mel window to the end of row ``j+7``'s, with
``audio_t0_ms`` saying where it starts relative to frame ``j``'s time. Everything about
*which* samples is in ``shared.streamtime``, shared with the gateway that cuts the clips.

Per frame, the window is rows ``j-8 .. j+7``: row ``k`` is the AVE encoder applied to mel
frames ``[int(80·k/fps), +16)`` of the stream, located inside the clip; rows of frames
below 0 are zero rows (the stream's start, as SyncTalk pads a clip's start). The clip is
enough to compute all 16 rows from scratch, so any worker can serve any frame. In steady
state, though, frame ``j`` shares 15 rows with frame ``j-1``: rows are cached per
``(stream, k)`` in a bounded LRU, so each is encoded once (one encoder window per frame
instead of 16). The cache never changes a result: a row is a function of the stream's
audio only, and the stream key is unique per stream *epoch* (the gateway changes it when
an interrupt restarts the stream's clock).

Numbers equal a whole-stream computation (``AudioFeaturizer.features_from_pcm`` of the
stream's audio, then ``audio_window``) to float tolerance for every frame whose rows lie
inside the stream; ``tests/test_stream_audio.py`` holds it to that.

Layout B (640 ms centred on the frame, no ``audio_t0_ms``) is not handled here: it stays
``AudioFeaturizer.windows_from_pcm``, whose last rows clamp at the clip's end (a clip that
ends 7 frames after its frame cannot hold rows 12..15's full windows, so it cannot be the
same computation).
"""

from __future__ import annotations

import math
import weakref
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from shared.errors import ErrorCode, ServiceError
from shared.streamtime import (
    CONTEXT_AFTER,
    CONTEXT_BEFORE,
    HOP,
    SAMPLE_RATE,
    SUPPORTED_RATES,
    clip_start_from_t0,
    mel_start,
    row_span_16k,
)
from workers.audio import AudioFeaturizer
from workers.audio_encoder import FEATURE_DIM
from workers.backend import InferItem
from workers.mel import WINDOW_STEPS, melspectrogram, pcm_to_float, resample_to_16k


__all__ = [
    "DEFAULT_CACHE_ROWS",
    "StreamAudio",
    "StreamClip",
    "stream_audio_for",
    "stream_windows",
]

DEFAULT_CACHE_ROWS = 8192
"""Rows kept per model (2 KiB each: 16 MiB). A stream in steady state needs 16, so this
covers hundreds of concurrent streams on one worker."""

_FOLD = (2 * WINDOW_STEPS, 16, 16)  # 16 rows x 512 = 32 x 16 x 16
_PRE = 3  # mel frames before a window's first that a sub-clip starts at: covers pre-emphasis
_MAX_CLIP_S = 4.0


@dataclass(frozen=True, slots=True)
class StreamClip:
    """One stream frame's audio request, as the runtime received it."""

    pcm: bytes | bytearray | memoryview | np.ndarray  # int16 LE mono at ``sr``
    sr: int
    t0_ms: float  # the clip's first sample relative to frame ``frame``'s time
    frame: int  # the stream frame index j (not the avatar frame id)
    stream: str | None = None  # cache key; None: no caching


class StreamAudio:
    """Windows for stream frames of one model, with the ``(stream, row)`` LRU.

    Not thread-safe: call it from the thread that runs the model (the engine's forward).
    """

    def __init__(
        self, featurizer: AudioFeaturizer, fps: float, *, cache_rows: int = DEFAULT_CACHE_ROWS
    ) -> None:
        if fps <= 0 or not math.isfinite(fps):
            raise ValueError(f"fps must be > 0, not {fps}")
        self.featurizer = featurizer
        self.fps = float(fps)
        self.cache_rows = max(0, cache_rows)
        self._rows: OrderedDict[tuple[str, int], np.ndarray] = OrderedDict()
        self.encoded = 0  # rows run through the encoder
        self.reused = 0  # rows taken from the cache

    def __len__(self) -> int:
        return len(self._rows)

    def windows(self, clips: Sequence[StreamClip]) -> list[np.ndarray | ServiceError]:
        """Each clip's ``[32,16,16]`` window, or the error that clip earned (one bad clip
        never fails the others). All rows missing from the cache go through the encoder
        in one batch, each once even when several clips of a stream need it."""
        errors: dict[int, ServiceError] = {}
        rows: dict[int, np.ndarray] = {}
        to_encode: list[np.ndarray] = []
        index_of: dict[tuple[str, int], int] = {}
        fills: list[tuple[int, int, int]] = []  # (clip, row slot, index in to_encode)
        for c, clip in enumerate(clips):
            try:
                rows[c], todo = self._plan(clip)
            except ServiceError as exc:
                errors[c] = exc
                continue
            for slot, k, mel in todo:
                key = (clip.stream, k) if clip.stream is not None else None
                if key is not None and key in index_of:
                    index = index_of[key]
                else:
                    index = len(to_encode)
                    to_encode.append(mel)
                    if key is not None:
                        index_of[key] = index
                fills.append((c, slot, index))
        if to_encode:
            feats = self.featurizer.encode(np.stack(to_encode))
            self.encoded += len(to_encode)
            for c, slot, index in fills:
                rows[c][slot] = feats[index]
            for key, index in index_of.items():
                self._remember(key, feats[index].copy())
        return [errors[c] if c in errors else rows[c].reshape(_FOLD) for c in range(len(clips))]

    # -- internals -----------------------------------------------------------------------

    def _remember(self, key: tuple[str, int], row: np.ndarray) -> None:
        if self.cache_rows == 0:
            return
        self._rows[key] = row
        self._rows.move_to_end(key)
        while len(self._rows) > self.cache_rows:
            self._rows.popitem(last=False)

    def _plan(self, clip: StreamClip) -> tuple[np.ndarray, list[tuple[int, int, np.ndarray]]]:
        """The clip's ``[16, 512]`` rows with zero rows (``k < 0``) and cached rows filled
        in, and ``(slot, k, mel window)`` for each row still to encode."""
        j = clip.frame
        if not isinstance(j, int) or isinstance(j, bool) or j < 0:
            raise ServiceError(ErrorCode.BAD_REQUEST, f"stream frame must be >= 0, not {j!r}")
        if clip.sr not in SUPPORTED_RATES:
            rates = ", ".join(str(r) for r in SUPPORTED_RATES)
            raise ServiceError(ErrorCode.BAD_REQUEST, f"stream audio rate must be one of {rates}")
        if not math.isfinite(clip.t0_ms) or not -_MAX_CLIP_S * 1000 <= clip.t0_ms <= 0:
            raise ServiceError(ErrorCode.BAD_REQUEST, "audio_t0_ms must be in -4000..0")
        start16 = clip_start_from_t0(j, self.fps, clip.t0_ms)
        align = HOP if clip.sr == SAMPLE_RATE else 4 * HOP
        if start16 % align:
            raise ServiceError(
                ErrorCode.BAD_REQUEST, "audio_t0_ms is not on the stream's analysis grid"
            )
        rows = np.zeros((CONTEXT_BEFORE + 1 + CONTEXT_AFTER, FEATURE_DIM), np.float32)
        todo: list[int] = []
        for slot, k in enumerate(range(j - CONTEXT_BEFORE, j + CONTEXT_AFTER + 1)):
            if k < 0:
                continue
            cached = self._rows.get((clip.stream, k)) if clip.stream is not None else None
            if cached is not None:
                self._rows.move_to_end((clip.stream, k))  # type: ignore[arg-type]
                self.reused += 1
                rows[slot] = cached
            else:
                todo.append(slot)
        if not todo:
            return rows, []
        ks = [j - CONTEXT_BEFORE + slot for slot in todo]
        mels = self._mel_windows(clip, start16, ks)
        return rows, [(slot, k, mel) for slot, k, mel in zip(todo, ks, mels, strict=True)]

    def _mel_windows(self, clip: StreamClip, start16: int, ks: list[int]) -> list[np.ndarray]:
        """Mel windows ``[80, 16]`` of rows ``ks`` from the clip (which starts at stream
        sample ``start16`` at 16 kHz)."""
        try:
            audio = pcm_to_float(clip.pcm)
        except ValueError as exc:
            raise ServiceError(ErrorCode.BAD_REQUEST, f"bad stream audio: {exc}") from None
        if len(audio) > _MAX_CLIP_S * clip.sr:
            raise ServiceError(ErrorCode.BAD_REQUEST, "stream audio clip longer than 4 s")
        y16 = resample_to_16k(audio, clip.sr)
        lo = row_span_16k(ks[0], self.fps)[0] - start16
        hi = row_span_16k(ks[-1], self.fps)[1] - start16
        if lo < 0 or hi > len(y16):
            raise ServiceError(
                ErrorCode.BAD_REQUEST,
                f"stream audio clip too short for frame {clip.frame} "
                f"(needs 16 kHz samples {lo}..{hi}, has {len(y16)})",
            )
        # A sub-clip on the hop grid, _PRE mel frames before the first window: its first
        # samples (pre-emphasis without a predecessor, the STFT's zero padding) reach
        # only mel frames before the ones used. Hop alignment and ``lo >= 0`` put its
        # start inside the clip.
        first = mel_start(ks[0], self.fps)
        sub = y16[HOP * (first - _PRE) - start16 : hi]
        mel = melspectrogram(sub, SAMPLE_RATE)
        out = []
        for k in ks:
            local = mel_start(k, self.fps) - first + _PRE
            out.append(np.ascontiguousarray(mel[:, local : local + WINDOW_STEPS]))
        return out


_BY_FEATURIZER: weakref.WeakKeyDictionary[AudioFeaturizer, dict[float, StreamAudio]] = (
    weakref.WeakKeyDictionary()
)


def stream_audio_for(featurizer: AudioFeaturizer, fps: float) -> StreamAudio:
    """The ``StreamAudio`` of one model's featurizer (one row cache per loaded model: a
    reload brings a new featurizer, hence a fresh cache)."""
    per_fps = _BY_FEATURIZER.setdefault(featurizer, {})
    audio = per_fps.get(fps)
    if audio is None:
        audio = per_fps[fps] = StreamAudio(featurizer, fps)
    return audio


def stream_windows(
    featurizer: AudioFeaturizer, fps: float, items: Sequence[InferItem]
) -> list[np.ndarray | ServiceError]:
    """The engine's entry point: windows for stream items (``audio_t0_ms`` set), one per
    item, or the error that item earned."""
    clips = [
        StreamClip(
            pcm=item.audio if item.audio is not None else b"",
            sr=item.audio_sr,
            t0_ms=item.audio_t0_ms if item.audio_t0_ms is not None else float("nan"),
            frame=item.stream_frame,
            stream=item.stream,
        )
        for item in items
    ]
    return stream_audio_for(featurizer, fps).windows(clips)
