"""Audio → the UNet's audio input: per-frame features, and the 16-row window around a frame.

Two ways a frame gets its audio (DESIGN.md sections 5 and 7):

* from a feature table ``F`` (``[M, 512]``, row i ↔ video frame i): the package's own
  ``aud_ave.npy``, or ``AudioFeaturizer.features_from_pcm`` of a whole clip. Frame i's
  input is ``audio_window(F, i)``: rows ``i-8 .. i+7``, zero rows outside ``F``.
* from a request's own PCM (layout B): 640 ms centred on the frame (8 frames before, the
  frame, 7 after). ``AudioFeaturizer.windows_from_pcm`` encodes the clip's 16 frames and
  uses them as rows 0..15, so the requested frame is row 8.

Layout B is an approximation of the table case: the clip ends 7 frames after the requested
one, so the mel windows of the clip's last frames (12..15 at 25 fps) are clamped to end at
the clip's last mel frame instead of reaching 0.2 s further. Feed ≈ 0.2 s more audio after
the window (or use a table) where bit-exactness with SyncTalk matters.

The fold ``[16, 512] → [32, 16, 16]`` is a plain memory reshape (channel 2k holds the first
half of row k), exactly as SyncTalk_2D does it; do not transpose.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import overload

import numpy as np
import torch

from workers.audio_encoder import FEATURE_DIM, AudioEncoder
from workers.mel import FPS, SAMPLE_RATE, mel_windows, melspectrogram, pcm_to_float, resample_to_16k
from workers.transfer import to_device
from workers.unet import AUDIO_CHANNELS, prepare_module


__all__ = [
    "CONTEXT_AFTER",
    "CONTEXT_BEFORE",
    "WINDOW_ROWS",
    "AudioFeaturizer",
    "Pcm",
    "audio_window",
    "audio_windows",
    "frames_in",
    "layout_b_mels",
]

CONTEXT_BEFORE = 8
CONTEXT_AFTER = 7
WINDOW_ROWS = CONTEXT_BEFORE + 1 + CONTEXT_AFTER  # 16
_FOLD = (AUDIO_CHANNELS, 16, 16)  # 16 × 512 = 32 × 16 × 16

Pcm = bytes | bytearray | memoryview | np.ndarray
"""int16 LE mono PCM as bytes, or an int16 (or float) 1-d array."""


def audio_window(features: np.ndarray, i: int) -> np.ndarray:
    """Frame ``i``'s audio input from a feature table: rows ``i-8 .. i+7`` → ``[32,16,16]``.

    Rows outside ``[0, M)`` are zeros (SyncTalk's ``get_audio_features``); any integer
    ``i`` is accepted, so a frame far outside the table gets an all-zero window (which the
    model does not read as silence: keep ``i`` inside the table).
    """
    m = features.shape[0]
    if features.ndim != 2 or features.shape[1] != FEATURE_DIM:
        raise ValueError(f"features must be [M, {FEATURE_DIM}], not {list(features.shape)}")
    out = np.zeros((WINDOW_ROWS, FEATURE_DIM), dtype=np.float32)
    lo, hi = i - CONTEXT_BEFORE, i + CONTEXT_AFTER + 1
    src_lo, src_hi = max(lo, 0), min(hi, m)
    if src_lo < src_hi:
        out[src_lo - lo : src_hi - lo] = features[src_lo:src_hi]
    return out.reshape(_FOLD)


def audio_windows(features: np.ndarray, indices: Sequence[int]) -> np.ndarray:
    """``audio_window`` for several frames: ``[B, 32, 16, 16]`` float32."""
    if not len(indices):
        return np.zeros((0, *_FOLD), dtype=np.float32)
    return np.stack([audio_window(features, int(i)) for i in indices])


def layout_b_mels(pcm: Pcm, sr: int, fps: float = FPS) -> np.ndarray:
    """The encoder input of one layout B clip (640 ms centred on its frame): the mel
    windows ``[16, 80, 16]`` of its 16 frames. Raises ``ValueError`` for a clip that is
    not usable audio."""
    y16 = resample_to_16k(pcm_to_float(pcm), sr)
    if not len(y16):
        raise ValueError("audio clip is empty")
    return mel_windows(melspectrogram(y16, SAMPLE_RATE), WINDOW_ROWS, fps)


def frames_in(n_samples_16k: int, fps: float = FPS) -> int:
    """Video frames that start inside ``n_samples_16k`` samples of 16 kHz audio."""
    return max(0, math.ceil(n_samples_16k * fps / SAMPLE_RATE - 1e-9))


class AudioFeaturizer:
    """PCM → AVE features with one encoder on one device.

    The encoder is moved to ``device`` in eval mode, channels_last (faster on CPU and CUDA),
    and fp16 with ``half=True`` (CUDA only).
    All windows of a call go through the encoder together, in chunks of ``max_batch``
    windows (a bound on activation memory for long clips). Not thread-safe: call it from
    the thread that runs the UNet.
    """

    def __init__(
        self,
        encoder: AudioEncoder,
        device: str | torch.device = "cpu",
        *,
        half: bool = False,
        max_batch: int = 256,
    ) -> None:
        self.encoder = prepare_module(encoder, device, half=half)
        self.device = next(self.encoder.parameters()).device
        self.max_batch = max_batch

    def encode(self, windows: np.ndarray) -> np.ndarray:
        """Mel windows ``[N, 80, 16]`` → features ``[N, 512]`` float32."""
        return self.encode_tensor(windows).cpu().numpy()

    def encode_tensor(self, windows: np.ndarray) -> torch.Tensor:
        """Mel windows ``[N, 80, 16]`` → features ``[N, 512]`` float32 on the encoder's
        device, in batches of ``max_batch``, without waiting for the device (the upload
        goes through pinned memory; see ``workers.transfer``)."""
        with torch.inference_mode():
            out = torch.empty((windows.shape[0], FEATURE_DIM), device=self.device)
            for start in range(0, windows.shape[0], self.max_batch):
                chunk = np.ascontiguousarray(windows[start : start + self.max_batch])
                mel = to_device(chunk, self.device, torch.float32)
                out[start : start + chunk.shape[0]] = self.encoder(mel.unsqueeze(1)).float()
        return out

    def features_from_pcm(
        self, pcm: Pcm, sr: int, n_frames: int | None = None, fps: float = FPS
    ) -> np.ndarray:
        """A clip's feature table ``[N, 512]``: row j ↔ video frame j of the clip.

        ``n_frames`` defaults to the frames that start inside the clip (``frames_in``);
        frames whose window runs past the end get the clamped last window.
        """
        y16 = resample_to_16k(pcm_to_float(pcm), sr)
        n = frames_in(len(y16), fps) if n_frames is None else n_frames
        mel = melspectrogram(y16, SAMPLE_RATE)
        return self.encode(mel_windows(mel, n, fps))

    def windows_from_pcm(
        self, pcms: Sequence[Pcm], sr: int | Sequence[int], fps: float = FPS
    ) -> np.ndarray:
        """Layout B for a batch: each 640 ms clip (centred on its frame) → ``[B, 32, 16, 16]``.

        ``sr`` is one rate for all clips or one per clip. Each clip's 16 frames are
        encoded (all clips in one encoder batch) and used as rows 0..15 of its window.
        """
        rates = [sr] * len(pcms) if isinstance(sr, int) else list(sr)
        if len(rates) != len(pcms):
            raise ValueError(f"{len(pcms)} clips but {len(rates)} sample rates")
        if not pcms:
            return np.zeros((0, *_FOLD), dtype=np.float32)
        windows = [layout_b_mels(pcm, rate, fps) for pcm, rate in zip(pcms, rates, strict=True)]
        feats = self.encode(np.concatenate(windows))
        return feats.reshape(len(pcms), *_FOLD)

    @overload
    def window_from_pcm(self, pcm: Pcm, sr: int, fps: float = FPS) -> np.ndarray: ...

    @overload
    def window_from_pcm(
        self, pcm: list[Pcm] | tuple[Pcm, ...], sr: int | Sequence[int], fps: float = FPS
    ) -> np.ndarray: ...

    def window_from_pcm(self, pcm, sr, fps=FPS):  # type: ignore[no-untyped-def]
        """Layout B for one clip: ``[32, 16, 16]``; the requested frame is row 8.

        Given a list or tuple of clips, the same as ``windows_from_pcm``: ``[B, 32, 16, 16]``.
        """
        if isinstance(pcm, list | tuple):
            return self.windows_from_pcm(pcm, sr, fps)
        return self.windows_from_pcm([pcm], sr, fps)[0]
