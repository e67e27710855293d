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
from dataclasses import dataclass, field

import numpy as np
import torch

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
from workers.audio_encoder import FEATURE_DIM, MEL_BANDS
from workers.backend import InferItem
from workers.mel import WINDOW_STEPS, melspectrogram, pcm_to_float, resample_to_16k
from workers.transfer import to_device


__all__ = [
    "DEFAULT_CACHE_ROWS",
    "StreamAudio",
    "StreamBatch",
    "StreamClip",
    "stream_audio_for",
    "stream_clips",
    "stream_windows",
]

DEFAULT_CACHE_ROWS = 8192
"""Rows kept per model (2 KiB each: 16 MiB). A stream in steady state needs 16, so this
covers hundreds of concurrent streams on one worker."""

_FOLD = (2 * WINDOW_STEPS, 16, 16)  # 16 rows x 512 = 32 x 16 x 16
_ROWS = CONTEXT_BEFORE + 1 + CONTEXT_AFTER  # 16
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


@dataclass(eq=False, slots=True)
class StreamBatch:
    """One batch's stream clips, planned: the mel windows still to encode, and where each
    of the clips' 16 rows comes from (a zero row, a cached row, or a fresh encoding).

    Positions are ``clip * 16 + row slot`` in the batch's ``[n * 16, 512]`` rows.
    """

    n: int
    mels: list[np.ndarray] = field(default_factory=list)  # [80, 16] each, to encode
    errors: dict[int, ServiceError] = field(default_factory=dict)  # per clip that failed
    cached_pos: list[int] = field(default_factory=list)
    cached_slot: list[int] = field(default_factory=list)  # rows of the cache table
    fresh_pos: list[int] = field(default_factory=list)
    fresh_mel: list[int] = field(default_factory=list)  # index into ``mels``
    writes: dict[int, int] = field(default_factory=dict)  # table row -> index into ``mels``


class StreamAudio:
    """Windows for stream frames of one model, with the ``(stream, row)`` LRU.

    The cached rows live in one table on the encoder's device (``cache_rows`` x 512
    float32), so a batch's windows are put together there: no row goes back to the host.
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
        self._rows: OrderedDict[tuple[str, int], int] = OrderedDict()  # key -> table row
        self._free = list(range(self.cache_rows - 1, -1, -1))
        self._table: torch.Tensor | None = None  # [cache_rows, 512], made on first use
        self.encoded = 0  # rows run through the encoder
        self.reused = 0  # rows taken from the cache

    def __len__(self) -> int:
        return len(self._rows)

    def windows(self, clips: Sequence[StreamClip]) -> list[np.ndarray | ServiceError]:
        """Each clip's ``[32,16,16]`` window, or the error that clip earned (one bad clip
        never fails the others). All rows missing from the cache go through the encoder
        in one batch, each once even when several clips of a stream need it."""
        batch = self.plan(clips)
        feats = self.featurizer.encode_tensor(_stack(batch.mels))
        rows = self.assemble(batch, feats).cpu().numpy()
        return [batch.errors.get(c) or rows[c].reshape(_FOLD) for c in range(len(clips))]

    def plan(self, clips: Sequence[StreamClip]) -> StreamBatch:
        """Host work for a batch: check the clips, look their rows up in the cache, compute
        the mel windows of the others (each once per stream), and reserve their rows of
        the cache. ``assemble`` then builds the windows from the encoded mels."""
        batch = StreamBatch(len(clips))
        index_of: dict[tuple[str, int], int] = {}
        for c, clip in enumerate(clips):
            try:
                cached, todo = self._plan(clip)
            except ServiceError as exc:
                batch.errors[c] = exc
                continue
            for slot, row in cached:
                batch.cached_pos.append(c * _ROWS + slot)
                batch.cached_slot.append(row)
            for slot, k, mel in todo:
                key = (clip.stream, k) if clip.stream is not None else None
                if key is not None and key in index_of:
                    index = index_of[key]
                else:
                    index = len(batch.mels)
                    batch.mels.append(mel)
                    if key is not None:
                        index_of[key] = index
                batch.fresh_pos.append(c * _ROWS + slot)
                batch.fresh_mel.append(index)
        self.encoded += len(batch.mels)
        for key, index in index_of.items():
            reserved = self._reserve(key)
            if reserved is not None:
                batch.writes[reserved] = index  # a row reused within the batch: the last wins
        return batch

    def assemble(self, batch: StreamBatch, feats: torch.Tensor) -> torch.Tensor:
        """The batch's rows ``[n, 16, 512]`` on the device, from ``feats`` (the encoded
        ``batch.mels``, ``[len(mels), 512]``); the fresh rows are kept in the cache table.
        Rows of failed clips are zeros. Reads come before writes (stream order), so a
        cached row evicted by this very batch is still read as it was."""
        dev = feats.device
        with torch.inference_mode():
            rows = torch.zeros((batch.n * _ROWS, FEATURE_DIM), device=dev)
            if batch.cached_pos:
                table = self._table_on(dev)
                rows[to_device(batch.cached_pos, dev)] = table[to_device(batch.cached_slot, dev)]
            if batch.fresh_pos:
                rows[to_device(batch.fresh_pos, dev)] = feats[to_device(batch.fresh_mel, dev)]
            if batch.writes:
                table = self._table_on(dev)
                table[to_device(list(batch.writes), dev)] = feats[
                    to_device(list(batch.writes.values()), dev)
                ]
            return rows.view(batch.n, _ROWS, FEATURE_DIM)

    # -- internals -----------------------------------------------------------------------

    def _table_on(self, device: torch.device) -> torch.Tensor:
        if self._table is None or self._table.device != device:
            self._table = torch.zeros((self.cache_rows, FEATURE_DIM), device=device)
        return self._table

    def _reserve(self, key: tuple[str, int]) -> int | None:
        """A table row for ``key`` (evicting the least recently used), or None when the
        cache is off."""
        if self.cache_rows == 0:
            return None
        if self._free:
            row = self._free.pop()
        else:
            _, row = self._rows.popitem(last=False)
        self._rows[key] = row
        return row

    def _plan(
        self, clip: StreamClip
    ) -> tuple[list[tuple[int, int]], list[tuple[int, int, np.ndarray]]]:
        """The clip's cached rows as ``(slot, table row)`` (slots of rows ``k < 0`` stay
        zero), and ``(slot, k, mel window)`` for each row still to encode."""
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
        cached: list[tuple[int, int]] = []  # (slot, table row)
        todo: list[int] = []
        for slot, k in enumerate(range(j - CONTEXT_BEFORE, j + CONTEXT_AFTER + 1)):
            if k < 0:
                continue  # a zero row: the stream's start
            key = (clip.stream, k) if clip.stream is not None else None
            row = self._rows.get(key) if key is not None else None
            if row is not None:
                self._rows.move_to_end(key)  # type: ignore[arg-type]
                self.reused += 1
                cached.append((slot, row))
            else:
                todo.append(slot)
        if not todo:
            return cached, []
        ks = [j - CONTEXT_BEFORE + slot for slot in todo]
        mels = self._mel_windows(clip, start16, ks)
        return cached, [(slot, k, mel) for slot, k, mel in zip(todo, ks, mels, strict=True)]

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


def stream_clips(items: Sequence[InferItem]) -> list[StreamClip]:
    """The clips of stream items (``audio_t0_ms`` set)."""
    return [
        StreamClip(
            pcm=item.audio if item.audio is not None else b"",
            sr=item.audio_sr,
            t0_ms=item.audio_t0_ms if item.audio_t0_ms is not None else float("nan"),
            frame=item.stream_frame,
            stream=item.stream,
        )
        for item in items
    ]


def stream_windows(
    featurizer: AudioFeaturizer, fps: float, items: Sequence[InferItem]
) -> list[np.ndarray | ServiceError]:
    """Windows for stream items, one per item, or the error that item earned."""
    return stream_audio_for(featurizer, fps).windows(stream_clips(items))


def _stack(mels: list[np.ndarray]) -> np.ndarray:
    if not mels:
        return np.zeros((0, MEL_BANDS, WINDOW_STEPS), np.float32)
    return np.stack(mels)
