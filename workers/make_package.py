"""Synthetic model packages, in exactly the layout of a real one (DESIGN.md section 6).

Tests, demos and benchmarks need a package without downloading weights or a person's
video. This one is drawn: a cartoon face on a moving background, a face rectangle that
drifts a little from frame to frame, audio features that vary smoothly, and randomly
initialised weights (UNet-328 of the requested width, plus the AVE audio encoder saved
without its ``audio_encoder.`` prefix, as SyncTalk publishes it), whose batch-norm
statistics are calibrated on the package's own frames so that the output responds to the
image and to the audio. The derived videos
follow SyncTalk_2D's preprocessing: crop the rectangle, resize to 328 (cubic), ROI =
``[4:324, 4:324]``, mask = the ROI with a black rectangle at (5, 5) of 310×305.

The same seed gives the same files, byte for byte, with one OpenCV and torch build (the mp4v
encoder and torch.save are deterministic; calibrated statistics are rounded to fp16 so that
float noise between CPUs rarely shows). mp4 is lossy: compare against decoded frames, never
the drawn ones.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np
import torch
from torch import nn

from workers.audio import audio_windows
from workers.audio_encoder import FEATURE_DIM, AudioEncoder
from workers.mel import SAMPLE_RATE, mel_windows, melspectrogram
from workers.package import (
    AUDIO_FEATURES,
    CHECKPOINTS,
    CROP_SIZE,
    ENCODER_CHECKPOINT,
    INFO_FILE,
    PACKAGE_VERSION,
    RECTS_FILE,
    ROI_SIZE,
    VIDEO_FILES,
    VIDEO_INFO_KEYS,
    check_model_name,
)
from workers.unet import WIDTHS, UNet328


if TYPE_CHECKING:
    from workers.h264 import H264Writer

__all__ = [
    "MASK_RECT",
    "PackageVideos",
    "Scene",
    "calibrate",
    "make_package",
    "mask_mouth",
    "save_checkpoints",
    "save_encoder",
    "write_metadata",
]

FPS = 25
MASK_RECT = (5, 5, 310, 305)
"""SyncTalk_2D's mouth mask on the 320×320 ROI: x, y, width, height (filled black)."""

_MIN_SIZE = 64


def mask_mouth(roi: np.ndarray) -> np.ndarray:
    """A copy of ``roi`` with SyncTalk's mask drawn on it (the model's channels 3-5)."""
    masked = roi.copy()
    cv2.rectangle(masked, MASK_RECT, (0, 0, 0), -1)
    return masked


def make_package(
    models_dir: str | os.PathLike[str],
    *,
    name: str = "synthetic",
    frames: int = 16,
    size: tuple[int, int] = (320, 240),
    width: str = "quarter",
    seed: int = 0,
) -> Path:
    """Write package ``name`` into ``models_dir`` and return its path.

    ``size`` is the full frame (width, height), both even and at least 64. The package is
    built in a hidden temporary directory and renamed into place, so a worker scanning
    ``models_dir`` never sees half of it. Refuses to overwrite an existing package.
    """
    check_model_name(name)
    if width not in WIDTHS:
        raise ValueError(f"unknown width {width!r} (known: {', '.join(WIDTHS)})")
    if frames < 1:
        raise ValueError(f"frames must be at least 1, not {frames}")
    w, h = (int(v) for v in size)
    if w < _MIN_SIZE or h < _MIN_SIZE or w % 2 or h % 2:
        raise ValueError(f"size must be even and at least {_MIN_SIZE}x{_MIN_SIZE}, not {w}x{h}")
    root = Path(models_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / name
    if final.exists():
        raise FileExistsError(f"{final} already exists")
    tmp = root / f".{name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        _write(tmp, name, frames, (w, h), width, seed)
        tmp.rename(final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def _write(
    path: Path, name: str, frames: int, size: tuple[int, int], width: str, seed: int
) -> None:
    (path / "cache").mkdir(parents=True)
    (path / "checkpoint").mkdir()
    rng = np.random.default_rng(seed)
    features = _audio_features(rng, frames)
    rects = _rects(rng, frames, size)
    scene = Scene(rng, size)

    calibration: list[tuple[np.ndarray, np.ndarray]] = []  # (rois, masked) of a few frames
    picks = set(np.linspace(0, frames - 1, min(frames, 2)).round().astype(int).tolist())
    with PackageVideos(path, size) as videos:
        for i in range(frames):
            full = scene.draw(i, rects[i], float(features[i].mean()))
            x1, y1, x2, y2 = rects[i]
            crop = cv2.resize(
                full[y1:y2, x1:x2], (CROP_SIZE, CROP_SIZE), interpolation=cv2.INTER_CUBIC
            )
            roi = videos.write(full, crop)
            if i in picks:
                calibration.append((roi.copy(), mask_mouth(roi)))

    np.save(path / AUDIO_FEATURES, features)
    write_metadata(
        path, name, rects, width, {"synthetic": {"seed": seed, "size": list(size), "width": width}}
    )
    _save_weights(path, width, seed, features, calibration)


class PackageVideos:
    """A package's four videos, open for writing a frame at a time.

    ``codec`` is ``"mp4v"`` (OpenCV's own encoder: fast, deterministic, lossy; synthetic
    packages) or ``"h264"`` (near-lossless, ``workers.h264``; imported avatars).

    ``write(full, crop)`` takes the full frame and its 328×328 face crop and derives the
    other two as SyncTalk_2D's preprocessing does (ROI = ``crop[4:324, 4:324]``, model
    input = the ROI with the mouth masked), so every package maker writes the same layout.
    """

    def __init__(self, path: Path, full_size: tuple[int, int], codec: str = "mp4v") -> None:
        self._writers: dict[str, cv2.VideoWriter | H264Writer] = {}
        try:
            for kind, file in VIDEO_FILES.items():
                size = full_size if kind == "full_body" else _square(kind)
                self._writers[kind] = _writer(path / file, size, codec)
        except BaseException:
            self.close()
            raise

    def write(self, full: np.ndarray, crop: np.ndarray) -> np.ndarray:
        """Write one frame to all four videos; returns the ROI (a view of ``crop``)."""
        roi = crop[4:324, 4:324]
        self._writers["full_body"].write(full)
        self._writers["crops_328"].write(crop)
        self._writers["rois_320"].write(np.ascontiguousarray(roi))
        self._writers["model_inputs"].write(mask_mouth(roi))
        return roi

    def close(self) -> None:
        for writer in self._writers.values():
            writer.release()

    def __enter__(self) -> PackageVideos:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def write_metadata(
    path: Path, name: str, rects: np.ndarray, width: str | Sequence[int], extra: dict[str, Any]
) -> None:
    """``rects.json`` and ``package_info.json`` for a package of ``len(rects)`` frames at
    ``width`` (a width name or the UNet's channel list); ``extra`` adds top-level keys to
    the info (how the package was made, its paste option)."""
    channels = list(WIDTHS[width]) if isinstance(width, str) else [int(c) for c in width]
    rect_map = {str(i): {"rect": [int(v) for v in r]} for i, r in enumerate(rects)}
    (path / RECTS_FILE).write_text(json.dumps(rect_map))
    frames = len(rects)
    info = {
        "package_type": "mp4_video_package",
        "package_version": PACKAGE_VERSION,
        "dataset_name": name,
        "original_shape": [CROP_SIZE, CROP_SIZE],
        "videos": {
            VIDEO_INFO_KEYS[kind]: {"video_file": file, "frame_count": frames, "fps": FPS}
            for kind, file in VIDEO_FILES.items()
        },
        "model": {"arch": "unet328", "audio_mode": "ave", "channels": channels},
        **extra,
    }
    (path / INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")


def save_checkpoints(path: Path, unet: UNet328, encoder: AudioEncoder | None) -> None:
    """The package's two checkpoints (the encoder is optional: without it a package
    serves its own audio only)."""
    torch.save(unet.state_dict(), path / CHECKPOINTS[0])
    if encoder is not None:
        save_encoder(encoder, path / ENCODER_CHECKPOINT)


def save_encoder(encoder: AudioEncoder, file: Path) -> None:
    """The encoder as SyncTalk publishes it: without the ``audio_encoder.`` prefix
    (loaders add it back)."""
    prefix = "audio_encoder."
    state = {k.removeprefix(prefix): v for k, v in encoder.state_dict().items()}
    torch.save(state, file)


def _square(kind: str) -> tuple[int, int]:
    side = CROP_SIZE if kind == "crops_328" else ROI_SIZE
    return side, side


def _writer(path: Path, size: tuple[int, int], codec: str) -> cv2.VideoWriter | H264Writer:
    if codec == "h264":
        from workers.h264 import H264Writer  # PyAV loads only where H.264 is written

        return H264Writer(path, size, FPS)
    if codec != "mp4v":
        raise ValueError(f"unknown codec {codec!r} (mp4v or h264)")
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter.fourcc(*"mp4v"), FPS, size)
    if not writer.isOpened():
        raise RuntimeError(f"{path.name}: opencv cannot write mp4v video here")
    return writer


def _audio_features(rng: np.random.Generator, frames: int) -> np.ndarray:
    """Non-negative, smooth in time, different per column: like ReLU outputs of the AVE."""
    t = np.arange(frames, dtype=np.float64)[:, None]
    period = rng.uniform(8.0, 40.0, size=(1, FEATURE_DIM))  # frames per cycle
    phase = rng.uniform(0.0, 2 * np.pi, size=(1, FEATURE_DIM))
    scale = rng.uniform(0.5, 6.0, size=(1, FEATURE_DIM))
    offset = rng.uniform(-0.5, 0.5, size=(1, FEATURE_DIM))
    feats = scale * np.maximum(0.0, offset + np.sin(2 * np.pi * t / period + phase))
    return np.ascontiguousarray(feats, dtype=np.float32)


def _rects(rng: np.random.Generator, frames: int, size: tuple[int, int]) -> np.ndarray:
    """Square face rectangles, side about half the height, drifting a few pixels."""
    w, h = size
    side = max(16, int(round(0.5 * h)) // 2 * 2)
    side = min(side, w - 4, h - 4)
    cx0, cy0 = w / 2, h * 0.45
    amp = max(0.0, min(6.0, (w - side) / 2 - 1, (h - side) / 2 - 1))
    phase = rng.uniform(0, 2 * np.pi, size=2)
    rects = np.zeros((frames, 4), dtype=np.int32)
    for i in range(frames):
        cx = cx0 + amp * np.sin(2 * np.pi * i / 37 + phase[0])
        cy = cy0 + amp * 0.5 * np.sin(2 * np.pi * i / 53 + phase[1])
        x1 = int(np.clip(round(cx - side / 2), 0, w - side))
        y1 = int(np.clip(round(cy - side / 2), 0, h - side))
        rects[i] = (x1, y1, x1 + side, y1 + side)
    return rects


class Scene:
    """A background with a few moving shapes, and a cartoon face drawn inside the rect."""

    def __init__(self, rng: np.random.Generator, size: tuple[int, int]) -> None:
        w, h = size
        self.size = size
        y, x = np.mgrid[0:h, 0:w].astype(np.float32)
        base = rng.uniform(40, 200, size=3)
        grad = rng.uniform(-60, 60, size=(3, 2))
        self.background = np.stack(
            [np.clip(base[c] + grad[c, 0] * x / w + grad[c, 1] * y / h, 0, 255) for c in range(3)],
            axis=-1,
        ).astype(np.uint8)
        self.shapes = [
            (
                rng.uniform(0, w),
                rng.uniform(0, h),
                rng.uniform(0.03, 0.12) * min(w, h),
                tuple(int(v) for v in rng.integers(0, 256, size=3)),
                rng.uniform(-2, 2),
            )
            for _ in range(6)
        ]
        self.skin = tuple(int(v) for v in rng.integers([90, 120, 170], [130, 170, 230]))

    def draw(self, i: int, rect: np.ndarray, loudness: float) -> np.ndarray:
        w, h = self.size
        img = self.background.copy()
        for x, y, r, colour, speed in self.shapes:
            centre = (int(x + speed * i) % w, int(y))
            cv2.circle(img, centre, int(r), colour, -1, lineType=cv2.LINE_AA)
        x1, y1, x2, y2 = (int(v) for v in rect)
        s = x2 - x1
        cx, cy = x1 + s // 2, y1 + s // 2
        cv2.ellipse(img, (cx, cy), (int(s * 0.42), int(s * 0.48)), 0, 0, 360, self.skin, -1)
        for dx in (-1, 1):
            eye = (cx + dx * int(s * 0.17), cy - int(s * 0.12))
            cv2.ellipse(
                img, eye, (max(2, s // 14), max(1, s // 22)), 0, 0, 360, (250, 250, 250), -1
            )
            cv2.circle(img, eye, max(1, s // 30), (40, 30, 20), -1)
        nose = np.array(
            [[cx, cy - s // 20], [cx - s // 20, cy + s // 10], [cx + s // 20, cy + s // 10]]
        )
        cv2.polylines(img, [nose.astype(np.int32)], True, (60, 80, 120), max(1, s // 60))
        opening = max(1, int(s * 0.02 + s * 0.06 * min(1.0, loudness / 2.0)))
        mouth = (cx, cy + int(s * 0.24))
        cv2.ellipse(img, mouth, (int(s * 0.14), opening), 0, 0, 360, (40, 30, 120), -1)
        return img


def _save_weights(
    path: Path,
    width: str,
    seed: int,
    features: np.ndarray,
    calibration: list[tuple[np.ndarray, np.ndarray]],
) -> None:
    """Random weights, seeded without disturbing the caller's torch RNG, with calibrated
    batch-norm statistics (see ``calibrate``)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet328(WIDTHS[width])
        encoder = AudioEncoder()
        rng = np.random.default_rng(seed + 1)
    images = np.stack([np.concatenate(pair, axis=2) for pair in calibration])
    image = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    ids = [int(i) for i in np.linspace(0, len(features) - 1, len(calibration)).round()]
    audio = torch.from_numpy(audio_windows(features, ids))
    calibrate(unet, image, audio)
    calibrate(encoder, torch.from_numpy(_speechlike_mel(rng)).unsqueeze(1))
    save_checkpoints(path, unet, encoder)


def calibrate(module: nn.Module, *inputs: torch.Tensor) -> None:
    """Set every batch norm's running statistics to what it sees on ``inputs``.

    At random initialisation (running mean 0, variance 1) the signal shrinks layer after
    layer: the UNet's output would be a near-constant grey whatever the image, and the
    audio would change no pixel at all. Tests of the audio path and demos need a model
    that responds to both its inputs, as a trained one does; one pass in train mode over
    the package's own frames gives exactly that, still from random weights. The
    statistics are rounded to fp16 precision so that the file does not depend on the
    last bits of this machine's convolutions.
    """
    norms = [m for m in module.modules() if isinstance(m, nn.BatchNorm2d)]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # cumulative average: one batch sets the statistics
    module.train()
    with torch.no_grad():
        module(*inputs)
    module.eval()
    for norm in norms:
        norm.momentum = 0.1
        assert norm.running_mean is not None and norm.running_var is not None
        norm.running_mean.copy_(norm.running_mean.half().float())
        norm.running_var.copy_(norm.running_var.half().float())


def _speechlike_mel(rng: np.random.Generator, seconds: float = 1.0) -> np.ndarray:
    """Encoder windows ``[N, 80, 16]`` of a voiced, gliding, amplitude-modulated signal."""
    t = np.arange(int(SAMPLE_RATE * seconds)) / SAMPLE_RATE
    f0 = 110 + 60 * np.sin(2 * np.pi * 0.7 * t + rng.uniform(0, 6))
    phase = 2 * np.pi * np.cumsum(f0) / SAMPLE_RATE
    voice = sum(np.sin(k * phase) / k for k in range(1, 12))
    envelope = 0.5 + 0.5 * np.sin(2 * np.pi * 3.0 * t) ** 2
    y = 0.2 * envelope * voice + 0.01 * rng.standard_normal(len(t))
    return mel_windows(melspectrogram(y.astype(np.float32)), int(seconds * FPS))
