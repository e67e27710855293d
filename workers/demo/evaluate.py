"""Does the demo lip-sync? Mouth opening measured on output frames against audio loudness.

The measure is deliberately dumb and external: count dark pixels inside the mouth box of
each output face crop (``avatar.mouth_opening``), and correlate that per frame with the RMS
energy of the frame's own 40 ms of audio. It needs no access to the model's internals, so
it works the same on frames from the model directly, from the engine, or off the wire.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from workers.audio import AudioFeaturizer, audio_windows
from workers.checkpoint import load_audio_encoder, load_unet
from workers.demo.avatar import mouth_opening
from workers.demo.speech import frame_rms
from workers.framecache import decode_video
from workers.mel import FPS, SAMPLE_RATE, resample_to_16k
from workers.package import CHECKPOINTS, ENCODER_CHECKPOINT, VIDEO_FILES


__all__ = ["SyncReport", "load_speech", "pearson", "render_with_audio", "sync_report"]


@dataclass(slots=True)
class SyncReport:
    r: float  # Pearson correlation of opening and frame RMS over all frames
    r_speech: float  # the same over frames with audible sound only
    open_speech: float  # mean opening over the loudest quarter of frames
    open_silence: float  # mean opening over silent frames (should be ≈ closed)
    closed_reference: float  # opening of the package's own (closed) frames, for scale
    frames: int
    silent_frames: int


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    a = np.asarray(a, np.float64) - np.mean(a)
    b = np.asarray(b, np.float64) - np.mean(b)
    den = float(np.sqrt((a * a).sum() * (b * b).sum()))
    return float((a * b).sum() / den) if den > 0 else 0.0


def load_speech(path: str | os.PathLike[str]) -> np.ndarray:
    """A WAV file (any rate, e.g. espeak-ng's 22050 Hz) → float32 mono at 16 kHz."""
    from math import gcd

    from scipy.io import wavfile
    from scipy.signal import resample_poly

    sr, data = wavfile.read(str(path))
    x = data.astype(np.float32)
    if data.dtype == np.int16:
        x /= 32768.0
    if x.ndim == 2:
        x = x.mean(axis=1)
    if sr in (16_000, 24_000, 44_100, 48_000):
        return resample_to_16k(x, sr)
    g = gcd(SAMPLE_RATE, sr)
    return resample_poly(x.astype(np.float64), SAMPLE_RATE // g, sr // g).astype(np.float32)


def render_with_audio(
    package: str | os.PathLike[str], audio16k: np.ndarray, batch: int = 8
) -> np.ndarray:
    """The package's model outputs (320×320 BGR ROIs) for every frame of ``audio16k``.

    Feature table path (DESIGN section 5): the clip's features, rows i-8..i+7 for frame i,
    the idle loop's frame ``i % N`` as the image.
    """
    pkg = Path(package)
    unet = load_unet(pkg / CHECKPOINTS[0])
    featurizer = AudioFeaturizer(load_audio_encoder(pkg / ENCODER_CHECKPOINT))
    feats = featurizer.features_from_pcm(audio16k, SAMPLE_RATE)
    rois = decode_video(pkg / VIDEO_FILES["rois_320"])
    masked = decode_video(pkg / VIDEO_FILES["model_inputs"])
    n = feats.shape[0]
    out = np.empty((n, 320, 320, 3), np.uint8)
    with torch.inference_mode():
        for s in range(0, n, batch):
            idx = list(range(s, min(n, s + batch)))
            img = np.stack(
                [np.concatenate([rois[i % len(rois)], masked[i % len(rois)]], 2) for i in idx]
            )
            x = torch.from_numpy(img).permute(0, 3, 1, 2).float() / 255.0
            a = torch.from_numpy(audio_windows(feats, idx))
            y = unet(x, a).clamp(0, 1).mul(255).round().byte().permute(0, 2, 3, 1).numpy()
            out[s : s + len(idx)] = y
    return out


def sync_report(
    frames: np.ndarray, audio16k: np.ndarray, closed: np.ndarray | None = None
) -> SyncReport:
    """Correlate the mouth opening of ``frames`` (face crops, frame i ↔ audio frame i) with
    the audio's per-frame RMS. ``closed``: a closed-mouth crop for the reference value."""
    rms = frame_rms(audio16k, SAMPLE_RATE, FPS)
    n = min(len(rms), len(frames))
    rms = rms[:n]
    opening = np.array([mouth_opening(f) for f in frames[:n]])
    db = 20 * np.log10(np.maximum(rms, 1e-6))
    silent = db < -60
    audible = ~silent
    loud = rms >= np.quantile(rms, 0.75)
    return SyncReport(
        r=pearson(opening, rms),
        r_speech=pearson(opening[audible], rms[audible]) if audible.sum() > 2 else 0.0,
        open_speech=float(opening[loud].mean()),
        open_silence=float(opening[silent].mean()) if silent.any() else float("nan"),
        closed_reference=mouth_opening(closed) if closed is not None else float("nan"),
        frames=n,
        silent_frames=int(silent.sum()),
    )
