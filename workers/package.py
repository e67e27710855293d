"""Model packages on disk: find one by name, check every file, describe it.

A package is the original system's "package_version 2.0" directory (DESIGN.md section 6).
Everything is checked up front, before a worker spends seconds decoding video or loading
weights, and every problem is reported with the file it is in: an operator reading
``sanders: rois_320_video.mp4 has 522 frames, expected 523`` knows what to regenerate,
whereas a shape error from deep inside numpy or torch tells them nothing.

This module reads metadata only (JSON, npy headers, video headers). It does not decode
frames (``workers.framecache`` does that, once per host) and does not touch torch
(``workers.engine`` loads the weights), so it stays cheap enough to run on every load.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np


__all__ = [
    "AUDIO_FEATURES",
    "CHECKPOINTS",
    "CROP_SIZE",
    "ENCODER_CHECKPOINT",
    "FEATURE_DIM",
    "INFO_FILE",
    "MODEL_NAME_RE",
    "PACKAGE_VERSION",
    "RECTS_FILE",
    "ROI_SIZE",
    "VIDEO_FILES",
    "VIDEO_INFO_KEYS",
    "Package",
    "PackageError",
    "VideoSpec",
    "check_model_name",
    "list_packages",
    "load_package",
    "package_dir",
    "probe_video",
    "read_features",
]

PACKAGE_VERSION = "2.0"
INFO_FILE = "package_info.json"
AUDIO_FEATURES = "aud_ave.npy"
RECTS_FILE = "cache/crop_rectangles.json"
CHECKPOINTS = ("checkpoint/best_trainloss.pth", "checkpoint/model_best.pth")
ENCODER_CHECKPOINT = "checkpoint/audio_visual_encoder.pth"
FEATURE_DIM = 512
CROP_SIZE = 328
ROI_SIZE = 320

VIDEO_FILES = {
    "full_body": "full_body_video.mp4",
    "crops_328": "crops_328_video.mp4",
    "rois_320": "rois_320_video.mp4",
    "model_inputs": "model_inputs_video.mp4",
}
"""Default file of each video (the original's names); package_info ``video_file`` wins."""

VIDEO_INFO_KEYS = {
    "full_body": "full_body_img",
    "crops_328": "crops_328",
    "rois_320": "rois_320",
    "model_inputs": "model_inputs",
}
"""Key of each video in package_info's ``videos`` block (the original says full_body_img)."""

_FIXED_SIZE = {"crops_328": CROP_SIZE, "rois_320": ROI_SIZE, "model_inputs": ROI_SIZE}

MODEL_NAME_RE = re.compile(r"[A-Za-z0-9_.-]{1,64}")
"""Model names: the directory name of the package, and the name on the wire."""

_DEFAULT_CHANNELS = (32, 64, 128, 256, 512)  # SyncTalk_2D's full width
_DEFAULT_FPS = 25.0


class PackageError(ValueError):
    """A package that cannot be served. ``problems`` lists each one, file name first."""

    def __init__(self, name: str, problems: list[str] | str) -> None:
        self.name = name
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__(f"{name}: " + "; ".join(self.problems))


@dataclass(frozen=True, slots=True)
class VideoSpec:
    """One of the four videos, as its container header describes it."""

    kind: str  # full_body | crops_328 | rois_320 | model_inputs
    path: Path
    frame_count: int
    width: int
    height: int
    fps: float

    @property
    def file(self) -> str:
        return self.path.name


@dataclass(frozen=True, slots=True)
class Package:
    """A checked package: paths, shapes and the per-frame rectangles (small, in memory).

    ``audio_features`` is a read-only memory map of ``aud_ave.npy``: the pages are shared
    with every other process that maps the same file.
    """

    name: str
    path: Path
    info: dict[str, Any]
    videos: dict[str, VideoSpec]
    frame_count: int
    fps: float
    frame_size: tuple[int, int]  # full_body (width, height)
    rects: np.ndarray  # int32 [frame_count, 4]: x1, y1, x2, y2
    audio_features: np.ndarray  # float32 [M, 512], memory-mapped
    checkpoint: Path
    encoder_checkpoint: Path | None
    arch: str = "unet328"
    audio_mode: str = "ave"
    channels: tuple[int, ...] = _DEFAULT_CHANNELS
    feather_px: int = 0  # paste.feather_px: 0 = SyncTalk's hard-edged paste (workers.paste)
    warnings: list[str] = field(default_factory=list)

    @property
    def cache_dir(self) -> Path:
        return self.path / "cache"


def check_model_name(name: object) -> str:
    """``name`` if it is a valid model name, else ``ValueError`` (``.`` and ``..`` too)."""
    if not isinstance(name, str) or not MODEL_NAME_RE.fullmatch(name) or name in (".", ".."):
        raise ValueError(f"invalid model name {name!r} (allowed: [A-Za-z0-9_.-], 1-64 chars)")
    return name


def package_dir(models_dir: str | os.PathLike[str], name: str) -> Path:
    """The directory of package ``name``, guaranteed to lie inside ``models_dir``.

    Symlinks are resolved before the check, so a link pointing elsewhere is refused too.
    """
    check_model_name(name)
    root = Path(models_dir).resolve()
    path = (root / name).resolve()
    if path == root or not path.is_relative_to(root):
        raise PackageError(name, "package path leaves the models dir")
    return path


def list_packages(models_dir: str | os.PathLike[str]) -> list[str]:
    """Names of the directories in ``models_dir`` that hold a ``package_info.json``.

    Hidden names (a leading dot: temporary builds) and invalid names are skipped.
    """
    root = Path(models_dir)
    if not root.is_dir():
        return []
    names = []
    for child in sorted(root.iterdir()):
        if child.name.startswith(".") or not MODEL_NAME_RE.fullmatch(child.name):
            continue
        if (child / INFO_FILE).is_file():
            names.append(child.name)
    return names


def probe_video(path: Path) -> tuple[int, int, int, float]:
    """``(frame_count, width, height, fps)`` from a video's header, without decoding.

    Raises ``ValueError`` if OpenCV cannot open it. A header count of 0 means unknown.
    """
    cap = cv2.VideoCapture(str(path))
    try:
        if not cap.isOpened():
            raise ValueError("cannot be opened as a video")
        count = int(cap.get(cv2.CAP_PROP_FRAME_COUNT))
        width = int(cap.get(cv2.CAP_PROP_FRAME_WIDTH))
        height = int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT))
        fps = float(cap.get(cv2.CAP_PROP_FPS))
    finally:
        cap.release()
    if width <= 0 or height <= 0:
        raise ValueError("has no readable frame size")
    return max(count, 0), width, height, fps


def read_features(file: Path) -> np.ndarray:
    """An ``aud_ave.npy``, memory-mapped read-only, or ``ValueError`` saying what is wrong
    with it (float32 ``[M, 512]``, M >= 1; the message leaves the file name to the caller)."""
    try:
        arr: np.ndarray = np.load(file, mmap_mode="r", allow_pickle=False)
    except Exception as exc:  # numpy raises ValueError/OSError/EOFError for damaged files
        raise ValueError(f"unreadable or truncated ({exc})") from None
    if arr.dtype != np.float32:
        raise ValueError(f"dtype is {arr.dtype}, expected float32")
    if arr.ndim != 2 or arr.shape[1] != FEATURE_DIM or arr.shape[0] < 1:
        raise ValueError(f"shape is {list(arr.shape)}, expected [M, {FEATURE_DIM}]")
    return arr


def load_package(models_dir: str | os.PathLike[str], name: str) -> Package:
    """Check package ``name`` in ``models_dir`` and describe it, or raise ``PackageError``.

    All problems found are reported together (one message, ``"; "``-separated), each
    starting with the file it concerns. A bad name raises ``PackageError`` as well.
    """
    try:
        path = package_dir(models_dir, name)
    except ValueError as exc:
        if isinstance(exc, PackageError):
            raise
        raise PackageError(str(name), str(exc)) from None
    if not path.is_dir():
        raise PackageError(name, f"no package directory in {Path(models_dir)}")
    return _Checker(name, path).run()


class _Checker:
    """Collects problems while reading a package, so that one load reports all of them."""

    def __init__(self, name: str, path: Path) -> None:
        self.name = name
        self.path = path
        self.problems: list[str] = []
        self.warnings: list[str] = []

    def fail(self, message: str) -> None:
        self.problems.append(message)

    def raise_if_failed(self) -> None:
        if self.problems:
            raise PackageError(self.name, self.problems)

    def run(self) -> Package:
        info = self._info()
        self.raise_if_failed()
        model = self._model_block(info)
        raw_videos = info.get("videos")
        videos_info: dict[str, Any] = raw_videos if isinstance(raw_videos, dict) else {}
        videos = self._videos(videos_info)
        declared = _declared_count(videos_info.get("model_inputs"))
        if declared is not None:
            frame_count = declared
        elif "model_inputs" in videos and videos["model_inputs"].frame_count > 0:
            frame_count = videos["model_inputs"].frame_count
        else:
            frame_count = max((v.frame_count for v in videos.values()), default=0)
        self._frame_counts(videos, videos_info, frame_count)
        frame_size = (
            (videos["full_body"].width, videos["full_body"].height)
            if "full_body" in videos
            else (0, 0)
        )
        rects = self._rects(frame_count, frame_size)
        features = self._features()
        checkpoint, encoder = self._checkpoints()
        fps = self._fps(videos_info, videos)
        feather_px = self._paste_block(info, rects)
        self.raise_if_failed()
        assert rects is not None and features is not None and checkpoint is not None
        if frame_count <= 0:
            raise PackageError(self.name, "package has no frames")
        return Package(
            name=self.name,
            path=self.path,
            info=info,
            videos=videos,
            frame_count=frame_count,
            fps=fps,
            frame_size=frame_size,
            rects=rects,
            audio_features=features,
            checkpoint=checkpoint,
            encoder_checkpoint=encoder,
            arch=model[0],
            audio_mode=model[1],
            channels=model[2],
            feather_px=feather_px,
            warnings=self.warnings,
        )

    def _info(self) -> dict[str, Any]:
        obj = self._json(INFO_FILE)
        if obj is None:
            return {}
        if not isinstance(obj, dict):
            self.fail(f"{INFO_FILE}: not a json object")
            return {}
        version = obj.get("package_version", obj.get("version"))
        if str(version) != PACKAGE_VERSION:
            self.fail(f"{INFO_FILE}: package_version is {version!r}, expected {PACKAGE_VERSION!r}")
        if "videos" in obj and not isinstance(obj["videos"], dict):
            self.fail(f"{INFO_FILE}: videos is not a json object")
        return obj

    def _json(self, rel: str) -> Any:
        file = self.path / rel
        if not file.is_file():
            self.fail(f"{rel}: missing")
            return None
        try:
            return json.loads(file.read_bytes())
        except json.JSONDecodeError as exc:
            self.fail(f"{rel}: not valid json (line {exc.lineno} column {exc.colno})")
        except (UnicodeDecodeError, OSError) as exc:
            self.fail(f"{rel}: unreadable ({exc.__class__.__name__})")
        return None

    def _model_block(self, info: dict[str, Any]) -> tuple[str, str, tuple[int, ...]]:
        block = info.get("model")
        if block is None:
            return "unet328", "ave", _DEFAULT_CHANNELS
        if not isinstance(block, dict):
            self.fail(f"{INFO_FILE}: model is not a json object")
            return "unet328", "ave", _DEFAULT_CHANNELS
        arch = block.get("arch", "unet328")
        mode = block.get("audio_mode", "ave")
        channels = block.get("channels", list(_DEFAULT_CHANNELS))
        if arch != "unet328":
            self.fail(f"{INFO_FILE}: model.arch {arch!r} is not supported (only 'unet328')")
        if mode != "ave":
            self.fail(f"{INFO_FILE}: model.audio_mode {mode!r} is not supported (only 'ave')")
        ok = (
            isinstance(channels, list)
            and len(channels) == 5
            and all(type(c) is int and c > 0 and c % 2 == 0 for c in channels)
        )
        if not ok:
            self.fail(f"{INFO_FILE}: model.channels must be 5 positive even integers")
            return str(arch), str(mode), _DEFAULT_CHANNELS
        return str(arch), str(mode), tuple(channels)

    def _paste_block(self, info: dict[str, Any], rects: np.ndarray | None) -> int:
        """``paste.feather_px``: an integer from 0 to half the smallest face rect."""
        block = info.get("paste")
        if block is None:
            return 0
        if not isinstance(block, dict):
            self.fail(f"{INFO_FILE}: paste is not a json object")
            return 0
        feather = block.get("feather_px", 0)
        if type(feather) is not int or feather < 0:
            self.fail(f"{INFO_FILE}: paste.feather_px must be an integer >= 0, not {feather!r}")
            return 0
        if rects is not None and len(rects):
            smallest = int((rects[:, 2] - rects[:, 0]).min())
            if feather > smallest // 2:
                self.fail(
                    f"{INFO_FILE}: paste.feather_px {feather} is more than half the smallest "
                    f"face rect ({smallest} px)"
                )
                return 0
        return feather

    def _videos(self, videos_info: dict[str, Any]) -> dict[str, VideoSpec]:
        videos: dict[str, VideoSpec] = {}
        for kind, default in VIDEO_FILES.items():
            entry = videos_info.get(VIDEO_INFO_KEYS[kind])
            file = default
            if isinstance(entry, dict) and entry.get("video_file") is not None:
                file = entry["video_file"]
                if not isinstance(file, str) or not _plain_file_name(file):
                    self.fail(f"{INFO_FILE}: videos.{VIDEO_INFO_KEYS[kind]}.video_file is invalid")
                    continue
            path = self.path / file
            if not path.is_file():
                self.fail(f"{file}: missing")
                continue
            try:
                count, width, height, fps = probe_video(path)
            except ValueError as exc:
                self.fail(f"{file}: {exc}")
                continue
            size = _FIXED_SIZE.get(kind)
            if size is not None and (width, height) != (size, size):
                self.fail(f"{file}: frames are {width}x{height}, expected {size}x{size}")
            videos[kind] = VideoSpec(kind, path, count, width, height, fps)
        return videos

    def _frame_counts(
        self, videos: dict[str, VideoSpec], videos_info: dict[str, Any], expected: int
    ) -> None:
        for kind, spec in videos.items():
            declared = _declared_count(videos_info.get(VIDEO_INFO_KEYS[kind]))
            key = VIDEO_INFO_KEYS[kind]
            if declared is not None and declared != expected:
                self.fail(
                    f"{INFO_FILE}: videos.{key}.frame_count is {declared}, expected {expected}"
                )
            # A header count of 0 means "unknown": the frame cache checks the decoded count.
            if spec.frame_count and spec.frame_count != expected:
                self.fail(f"{spec.file} has {spec.frame_count} frames, expected {expected}")
        for kind, entry in videos_info.items():
            bad = isinstance(entry, dict) and "frame_count" in entry
            if bad and _declared_count(entry) is None:
                self.fail(f"{INFO_FILE}: videos.{kind}.frame_count is not a positive integer")

    def _rects(self, expected: int, frame_size: tuple[int, int]) -> np.ndarray | None:
        obj = self._json(RECTS_FILE)
        if obj is None:
            return None
        if not isinstance(obj, dict):
            self.fail(f"{RECTS_FILE}: not a json object")
            return None
        if len(obj) != expected:
            self.fail(f"{RECTS_FILE} has {len(obj)} frames, expected {expected}")
            return None
        rects = np.zeros((expected, 4), dtype=np.int32)
        width, height = frame_size
        bad: list[str] = []
        for i in range(expected):
            entry = obj.get(str(i))
            rect = entry.get("rect") if isinstance(entry, dict) else entry
            problem = _rect_problem(rect, width, height)
            if problem:
                bad.append(f"frame {i}: {problem}")
                continue
            rects[i] = [int(v) for v in rect]  # type: ignore[union-attr]
        if bad:
            more = f" (and {len(bad) - 3} more)" if len(bad) > 3 else ""
            self.fail(f"{RECTS_FILE}: " + ", ".join(bad[:3]) + more)
            return None
        rects.setflags(write=False)
        return rects

    def _features(self) -> np.ndarray | None:
        file = self.path / AUDIO_FEATURES
        if not file.is_file():
            self.fail(f"{AUDIO_FEATURES}: missing")
            return None
        try:
            return read_features(file)
        except ValueError as exc:
            self.fail(f"{AUDIO_FEATURES}: {exc}")
            return None

    def _checkpoints(self) -> tuple[Path | None, Path | None]:
        checkpoint = next((self.path / c for c in CHECKPOINTS if (self.path / c).is_file()), None)
        if checkpoint is None:
            self.fail(f"{CHECKPOINTS[0]}: missing (nor {Path(CHECKPOINTS[1]).name})")
        encoder = self.path / ENCODER_CHECKPOINT
        return checkpoint, encoder if encoder.is_file() else None

    def _fps(self, videos_info: dict[str, Any], videos: dict[str, VideoSpec]) -> float:
        for key in ("model_inputs", "full_body_img", "crops_328", "rois_320"):
            entry = videos_info.get(key)
            if isinstance(entry, dict) and "fps" in entry:
                fps = entry["fps"]
                number = isinstance(fps, int | float) and not isinstance(fps, bool)
                if number and math.isfinite(fps) and 0 < fps <= 1000:
                    return float(fps)
                self.fail(f"{INFO_FILE}: videos.{key}.fps is not a positive number")
                return _DEFAULT_FPS
        for spec in videos.values():
            if math.isfinite(spec.fps) and 0 < spec.fps <= 1000:
                return spec.fps
        return _DEFAULT_FPS


def _declared_count(entry: Any) -> int | None:
    if not isinstance(entry, dict):
        return None
    count = entry.get("frame_count")
    if type(count) is int and count > 0:
        return count
    return None


def _plain_file_name(file: str) -> bool:
    """A file name with no directory part: package_info must not point outside the package."""
    return bool(file) and "/" not in file and "\\" not in file and file not in (".", "..")


def _rect_problem(rect: Any, width: int, height: int) -> str:
    if not isinstance(rect, list) or len(rect) != 4:
        return "rect is not [x1, y1, x2, y2]"
    if not all(
        isinstance(v, int | float) and not isinstance(v, bool) and float(v).is_integer()
        for v in rect
    ):
        return f"rect {rect} is not 4 integers"
    x1, y1, x2, y2 = (int(v) for v in rect)
    if x2 <= x1 or y2 <= y1:
        return f"rect {rect} is empty"
    if x2 - x1 != y2 - y1:
        return f"rect {rect} is not square"
    if width and height and (x1 < 0 or y1 < 0 or x2 > width or y2 > height):
        return f"rect {rect} is outside the {width}x{height} frame"
    return ""
