"""What a SyncTalk_2D training run means, decided without touching the disk.

The importer (``workers.synctalk_import``) lists directories and reads files; everything it
then has to decide lives here, as plain functions of names, text and arrays, so that each
rule is tested on its own: which frames there are, what a ``.lms`` file says, the face
rectangle inference_328 crops, which checkpoint SyncTalk_2D would load, how long the audio
feature table of a recording is, and what a checkpoint that does not fit probably is.

Each rule follows SyncTalk_2D's own code (facts in ``docs/packages.md``), including where
that code is lax: landmarks are parsed as float32 and truncated to int32, exactly as
``inference_328.py`` does, so a rect here is the rect it crops.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import torch


__all__ = [
    "LANDMARKS",
    "RECT_POINTS",
    "DatasetError",
    "checkpoint_hint",
    "choose_checkpoint",
    "face_rect",
    "feature_rows",
    "frame_count",
    "pad_features",
    "parse_landmarks",
    "rect_problem",
    "summarise",
]

LANDMARKS = 110
"""Points per ``.lms`` file: SyncTalk_2D's PFLD landmark model."""

RECT_POINTS = (1, 31, 52)
"""The points the crop uses: x of 1 (left), x of 31 (right), y of 52 (top)."""

_SHOWN = 3  # problems named in one message; the rest are counted

_FRAME_RE = re.compile(r"(\d+)\.jpg")


class DatasetError(ValueError):
    """A training run that cannot be imported. The message names the file."""


def summarise(problems: Sequence[str], what: str = "frames") -> str:
    """One message for several problems: the first three, then how many more."""
    shown = "; ".join(problems[:_SHOWN])
    if len(problems) <= _SHOWN:
        return shown
    return f"{shown}; and {len(problems) - _SHOWN} more {what} with problems"


def frame_count(names: Iterable[str], folder: str = "full_body_img") -> int:
    """The number of frames ``N`` in a ``full_body_img/`` holding ``names``, or
    ``DatasetError``.

    SyncTalk_2D reads ``0.jpg .. N-1.jpg`` (no zero padding, from 0, no gaps). Files that
    are not ``<digits>.jpg`` are ignored, as SyncTalk ignores them when it reads by number.
    """
    numbers: set[int] = set()
    padded: list[str] = []
    for name in names:
        match = _FRAME_RE.fullmatch(name)
        if not match:
            continue
        digits = match.group(1)
        if len(digits) > 1 and digits.startswith("0"):
            padded.append(name)
            continue
        numbers.add(int(digits))
    if padded:
        example = sorted(padded)[0]
        raise DatasetError(
            f"{folder}/{example}: frame names are zero-padded; SyncTalk_2D names them "
            f"0.jpg, 1.jpg, ... (rename {example} to {int(example[:-4])}.jpg and so on)"
        )
    if not numbers:
        raise DatasetError(f"{folder}/: holds no frames (<i>.jpg, numbered from 0)")
    last = max(numbers)
    if 0 not in numbers and 1 in numbers:
        raise DatasetError(
            f"{folder}/0.jpg: missing; the frames are numbered from 1 (ffmpeg's %d "
            f"pattern), SyncTalk_2D numbers them from 0: rename 1.jpg..{last}.jpg to "
            f"0.jpg..{last - 1}.jpg (and their .lms files)"
        )
    missing = [i for i in range(last + 1) if i not in numbers]
    if missing:
        more = f" (and {len(missing) - 1} more missing)" if len(missing) > 1 else ""
        raise DatasetError(
            f"{folder}/{missing[0]}.jpg: missing{more}; SyncTalk_2D needs every frame "
            f"from 0.jpg to {last}.jpg (frames without landmarks must not be deleted)"
        )
    return last + 1


def parse_landmarks(text: str, file: str) -> np.ndarray:
    """A ``.lms`` file's points as int32 ``[110, 2]`` (x, y), or ``DatasetError``.

    Values are read as float32 and truncated to int32 (inference_328.py's
    ``np.array(..., dtype=np.int32)`` of float32 rows), so integer files and the
    six-decimal float files of some forks give the same rect.
    """
    rows: list[tuple[float, float]] = []
    for number, line in enumerate(text.splitlines(), start=1):
        parts = line.split()
        if not parts:
            continue
        try:
            if len(parts) != 2:
                raise ValueError
            x, y = float(parts[0]), float(parts[1])
        except ValueError:
            shown = line.strip()[:40]
            raise DatasetError(f"{file}: line {number} is not 'x y' (it says {shown!r})") from None
        if not (np.isfinite(x) and np.isfinite(y)):
            raise DatasetError(f"{file}: line {number} is not a finite point")
        rows.append((x, y))
    if len(rows) != LANDMARKS:
        what = "empty" if not rows else f"{len(rows)} points"
        raise DatasetError(f"{file}: {what}, expected {LANDMARKS} (one 'x y' per line)")
    points = np.array(rows, dtype=np.float32)
    if np.abs(points).max() >= 2**31:
        raise DatasetError(f"{file}: coordinates out of range")
    return points.astype(np.int32)


def face_rect(points: np.ndarray) -> tuple[int, int, int, int]:
    """inference_328's crop ``(x1, y1, x2, y2)``: x1 = point 1's x, x2 = point 31's x,
    y1 = point 52's y, and the square's side x2 - x1 downwards from y1."""
    x1 = int(points[1, 0])
    x2 = int(points[31, 0])
    y1 = int(points[52, 1])
    return x1, y1, x2, y1 + (x2 - x1)


def rect_problem(rect: tuple[int, int, int, int], width: int, height: int) -> str:
    """Why inference_328 could not crop ``rect`` from a ``width`` x ``height`` frame, or "".

    SyncTalk does not clamp: a rect past the right or bottom edge comes out non-square
    and a negative corner wraps around, so such a frame cannot be served as trained.
    """
    x1, y1, x2, y2 = rect
    if x2 <= x1:
        return (
            f"face rect {list(rect)} is empty: point 31's x ({x2}) is not right of "
            f"point 1's x ({x1})"
        )
    if x1 < 0 or y1 < 0 or x2 > width or y2 > height:
        return f"face rect {list(rect)} leaves the {width}x{height} frame"
    return ""


def choose_checkpoint(names: Iterable[str]) -> str | None:
    """The file SyncTalk_2D would load from a checkpoint folder: ``best.pth`` where a fork
    saved one, else the largest ``<epoch>.pth`` by number (``10.pth`` beats ``9.pth``);
    None when there is neither."""
    names = list(names)
    if "best.pth" in names:
        return "best.pth"
    epochs = [(int(n[:-4]), n) for n in names if n.endswith(".pth") and n[:-4].isdigit()]
    return max(epochs)[1] if epochs else None


def checkpoint_hint(state: Mapping[str, torch.Tensor]) -> str:
    """What a state dict that is not a UNet-328 (ave) probably is, or ""."""
    keys = list(state)
    if any(k.startswith("face_encoder.") for k in keys):
        return "it looks like a SyncNet checkpoint (syncnet_ckpt/), not the UNet"
    first = state.get("audio_model.conv1.conv.0.weight")
    if first is not None and first.ndim == 4 and first.shape[1] == 256:
        return (
            "it looks like a wenet-mode checkpoint (audio_model.conv1 takes 256 channels): "
            "only ave mode is supported"
        )
    if keys and all(k.split(".", 1)[0].isdigit() or k.startswith("audio_encoder.") for k in keys):
        return "it looks like the audio encoder (audio_visual_encoder.pth), not the UNet"
    return ""


def feature_rows(mel_frames: int, fps: float = 25.0) -> int:
    """How many encoder windows SyncTalk_2D's ``AudDataset`` takes from a mel of
    ``mel_frames`` frames: ``int((T - 16) / 80 * fps) + 2`` (before the two padding rows)."""
    return int((mel_frames - 16) / 80.0 * float(fps)) + 2


def pad_features(features: np.ndarray) -> np.ndarray:
    """The table SyncTalk_2D saves: the first and the last row repeated once each."""
    return np.ascontiguousarray(
        np.concatenate([features[:1], features, features[-1:]]), dtype=np.float32
    )
