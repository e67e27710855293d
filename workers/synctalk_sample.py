"""A small SyncTalk_2D training run, drawn: the input of the importer's tests and benchmark.

It has the layout SyncTalk_2D's preprocessing and training leave (``docs/packages.md``):

    <root>/dataset/<name>/full_body_img/<i>.jpg   drawn frames, JPEG quality 95 (cv2)
    <root>/dataset/<name>/landmarks/<i>.lms       110 points "x y"; 1, 31 and 52 give the rect
    <root>/dataset/<name>/aud_ave.npy             float32 [N-1, 512], first/last rows repeated
    <root>/dataset/<name>/aud.wav                 (with audio="wav" or "both") 16 kHz int16
    <root>/checkpoint/<name>/<epoch>.pth          UNet-328 weights, one file per epoch
    <root>/model/checkpoints/audio_visual_encoder.pth   AVE weights, keys without prefix

The face rect drifts a few pixels from frame to frame, so a crop taken at the wrong place
shows. At quarter width every epoch's UNet is the committed demo weights (trained, so its
output follows its input smoothly) with a little noise of its own; at other widths it has
random weights with batch-norm statistics calibrated on the run's own crops
(``workers.make_package.calibrate``), good for timing but not for comparing pixels.
Options produce the variants forks write: float landmarks with six decimals, checkpoints
wrapped in ``{"model_state_dict": ...}``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
from scipy.io import wavfile

from workers.audio import audio_windows
from workers.audio_encoder import AudioEncoder
from workers.make_package import Scene, calibrate, mask_mouth, save_encoder
from workers.package import CROP_SIZE
from workers.synctalk_dataset import LANDMARKS, pad_features
from workers.unet import WIDTHS, UNet328


__all__ = ["SampleRun", "write_sample_run"]

_FPS = 25


@dataclass(frozen=True)
class SampleRun:
    """Where the parts of a written run are, and the rects its landmarks give."""

    root: Path
    dataset: Path
    checkpoints: Path  # the folder of <epoch>.pth files
    encoder: Path
    rects: np.ndarray  # int [N, 4]: x1, y1, x2, y2, as inference_328 computes them


def write_sample_run(
    root: str | os.PathLike[str],
    *,
    name: str = "avatar",
    frames: int = 6,
    size: tuple[int, int] = (192, 144),
    width: str = "quarter",
    epochs: tuple[int, ...] = (4, 9, 10),
    seed: int = 0,
    float_landmarks: bool = False,
    wrapped: bool = False,
    audio: str = "npy",
) -> SampleRun:
    """Write a run of ``frames`` frames of ``size`` (width, height) under ``root``.

    ``audio`` is ``"npy"`` (aud_ave.npy only), ``"wav"`` (aud.wav only) or ``"both"``.
    """
    if audio not in ("npy", "wav", "both"):
        raise ValueError(f"audio must be npy, wav or both, not {audio!r}")
    base = Path(root)
    dataset = base / "dataset" / name
    (dataset / "full_body_img").mkdir(parents=True)
    (dataset / "landmarks").mkdir()
    rng = np.random.default_rng(seed)
    scene = Scene(rng, size)
    rects = np.zeros((frames, 4), dtype=np.int64)
    rois: list[np.ndarray] = []  # of the first two frames: batch-norm calibration input
    for i in range(frames):
        points = _write_lms(
            dataset / "landmarks" / f"{i}.lms", _landmarks(rng, i, size), float_landmarks
        )
        rects[i] = _rect_of(points)
        image = scene.draw(i, rects[i], loudness=1.0 + np.sin(i / 2.0))
        cv2.imwrite(str(dataset / "full_body_img" / f"{i}.jpg"), image)
        if len(rois) < 2:
            x1, y1, x2, y2 = rects[i]
            crop = cv2.resize(
                image[y1:y2, x1:x2], (CROP_SIZE, CROP_SIZE), interpolation=cv2.INTER_CUBIC
            )
            rois.append(crop[4:324, 4:324])
    features = _features(rng, frames)
    if audio in ("npy", "both"):
        np.save(dataset / "aud_ave.npy", features)
    if audio in ("wav", "both"):
        _write_wav(dataset / "aud.wav", rng, frames)

    checkpoints = base / "checkpoint" / name
    checkpoints.mkdir(parents=True)
    pairs = np.stack([np.concatenate([roi, mask_mouth(roi)], axis=2) for roi in rois])
    batch = torch.from_numpy(pairs).permute(0, 3, 1, 2).float() / 255
    sound = torch.from_numpy(audio_windows(features, list(range(len(rois)))))
    trained = _demo_weights() if width == "quarter" else None
    with torch.random.fork_rng(devices=[]):
        for epoch in epochs:
            torch.manual_seed(seed * 1000 + epoch)
            state = _epoch_weights(trained, width, batch, sound)
            blob = {"epoch": epoch, "model_state_dict": state} if wrapped else state
            torch.save(blob, checkpoints / f"{epoch}.pth")
        torch.manual_seed(seed * 1000 + 999)
        encoder = trained[1] if trained is not None else AudioEncoder().eval()
    encoder_file = base / "model" / "checkpoints" / "audio_visual_encoder.pth"
    encoder_file.parent.mkdir(parents=True)
    save_encoder(encoder, encoder_file)
    return SampleRun(base, dataset, checkpoints, encoder_file, rects)


def _demo_weights() -> tuple[UNet328, AudioEncoder] | None:
    """The committed demo weights (a trained quarter-width UNet and encoder), if present."""
    from workers.demo.build import WEIGHTS_FILE, load_weights

    if not WEIGHTS_FILE.is_file():
        return None
    unet, encoder, _ = load_weights(WEIGHTS_FILE)
    return unet, encoder


def _epoch_weights(
    trained: tuple[UNet328, AudioEncoder] | None,
    width: str,
    image: torch.Tensor,
    sound: torch.Tensor,
) -> dict[str, torch.Tensor]:
    """One epoch's UNet state dict (under the caller's seed).

    Trained weights, nudged by a little noise so that every epoch's file differs, where
    the width allows: a trained net maps one grey level of input noise (JPEG, H.264) to
    about one level of output, which is what lets tests compare frames "within JPEG
    noise". Random weights, even calibrated, amplify such noise twenty-fold.
    """
    if trained is None:
        unet = UNet328(WIDTHS[width])
        calibrate(unet, image, sound)
        return unet.state_dict()
    state = {}
    for key, value in trained[0].state_dict().items():
        if value.is_floating_point() and "running_" not in key and value.numel() > 1:
            value = value + 1e-3 * value.std() * torch.randn_like(value)
        state[key] = value.clone()
    return state


def _landmarks(rng: np.random.Generator, i: int, size: tuple[int, int]) -> np.ndarray:
    """110 float points; 1, 31 and 52 place a square of side ~half the height that drifts
    a few pixels (with fractional parts, so that truncation matters)."""
    w, h = size
    side = max(16, int(0.5 * h))
    cx = w / 2 + 3.0 * np.sin(i / 1.7)
    top = h * 0.25 + 2.0 * np.cos(i / 2.3)
    x1 = cx - side / 2 + rng.uniform(0.05, 0.95)
    points = np.column_stack(
        [rng.uniform(x1, x1 + side, LANDMARKS), rng.uniform(top, top + side, LANDMARKS)]
    )
    points[1] = (x1, top + side * 0.4)
    points[31] = (x1 + side + rng.uniform(-1.0, 1.0), top + side * 0.4)
    points[52] = (cx, top + rng.uniform(0.05, 0.95))
    return points


def _rect_of(points: np.ndarray) -> tuple[int, int, int, int]:
    """inference_328's rect from the values as written (float32, truncated)."""
    x1 = int(np.float32(points[1, 0]))
    x2 = int(np.float32(points[31, 0]))
    y1 = int(np.float32(points[52, 1]))
    return x1, y1, x2, y1 + x2 - x1


def _write_lms(path: Path, points: np.ndarray, as_float: bool) -> np.ndarray:
    """Write the points as a fork (six decimals) or upstream (integers) does; return the
    values as written."""
    if as_float:
        lines = [f"{x:.6f} {y:.6f}" for x, y in points]
    else:  # upstream writes the truncated integers
        lines = [f"{int(x)} {int(y)}" for x, y in points]
    path.write_text("\n".join(lines) + "\n")
    return np.array([[float(v) for v in line.split()] for line in lines])


def _features(rng: np.random.Generator, frames: int) -> np.ndarray:
    """N-1 rows, first and last repeated (SyncTalk's table for an N-frame recording)."""
    rows = max(1, frames - 3)
    t = np.arange(rows, dtype=np.float64)[:, None]
    period = rng.uniform(4.0, 20.0, size=(1, 512))
    scale = rng.uniform(0.5, 4.0, size=(1, 512))
    inner = scale * np.maximum(0.0, np.sin(2 * np.pi * t / period + rng.uniform(0, 6, (1, 512))))
    return pad_features(inner.astype(np.float32))


def _write_wav(path: Path, rng: np.random.Generator, frames: int) -> None:
    """A voiced, amplitude-modulated signal as long as the video, 16 kHz int16 mono."""
    sr = 16_000
    t = np.arange(int(sr * frames / _FPS)) / sr
    y = 0.3 * np.sin(2 * np.pi * 140 * t) * (0.5 + 0.5 * np.sin(2 * np.pi * 3 * t))
    y += 0.01 * rng.standard_normal(len(t))
    wavfile.write(path, sr, (np.clip(y, -1, 1) * 32767).astype(np.int16))
