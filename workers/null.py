"""The null backend: a worker that computes nothing and answers with a fixed JPEG.

It measures the serving infrastructure (gateway + broker + worker runtime) without a model,
and lets the runtime's tests run in milliseconds on any machine.

Service time: ``forward`` sleeps ``delay_ms`` **per item**, so a batch of n costs n x delay
and a worker's throughput is ``1000 / delay_ms`` requests/s whatever its batch size (a
device that is already busy: batching does not make it faster). ``encode`` costs nothing
beyond handing out the same bytes. A request's latency at an idle worker is therefore
about ``delay_ms`` plus the batching wait (``max_delay_ms``).

Frame tags (``LIPSYNC_NULL_FRAME_TAGS=1``): each answer carries its frame id in a JPEG
comment (:func:`tag_jpeg`, read back by :func:`jpeg_frame_tag`), so a test that pipelines
layout A requests (whose answers are bare JPEGs) can check that every answer is the one its
request asked for, in order. Off by default: the answers are then byte-identical.

Models: ``names`` when given (``lipsync worker --backend null --models a,b``); otherwise
the packages found in the models dir (their frame count and fps read from
``package_info.json``); otherwise one model called ``null``.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path

from shared.config import WorkerConfig
from shared.errors import ErrorCode, ServiceError
from workers.backend import VIDEO_TYPES, ForwardBatch, InferItem, InferResult, ModelInfo


__all__ = ["NullBackend", "fixed_jpeg", "jpeg_frame_tag", "tag_jpeg"]

logger = logging.getLogger(__name__)

DEFAULT_FRAMES = 100
DEFAULT_SIZE = (1280, 720)
DEFAULT_BOUNDS = (480.0, 160.0, 800.0, 480.0)
_TAG = b"lipsync-frame:"


def fixed_jpeg(size: int) -> bytes:
    """A valid JPEG of exactly ``size`` bytes (or the smallest we can make, if less).

    A small gradient image is encoded once, then padded with JPEG comment segments (COM,
    0xFFFE) right after the start-of-image marker: every decoder skips them, so the image
    stays valid whatever the size asked for."""
    import cv2
    import numpy as np

    ramp = np.linspace(0, 255, 64, dtype=np.uint8)
    image = np.dstack(
        [np.tile(ramp, (64, 1)), np.tile(ramp[:, None], (1, 64)), np.full((64, 64), 128, np.uint8)]
    )
    ok, encoded = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 80])
    if not ok:
        raise RuntimeError("opencv could not encode the null jpeg")
    base = encoded.tobytes()
    missing = size - len(base)
    segments = []
    while missing >= 4:  # a segment is marker (2) + length (2) + data
        data_len = min(missing - 4, 65533)
        segments.append(b"\xff\xfe" + (data_len + 2).to_bytes(2, "big") + b"\x00" * data_len)
        missing -= data_len + 4
    return base[:2] + b"".join(segments) + base[2:]


def tag_jpeg(jpeg: bytes, frame_id: int) -> bytes:
    """``jpeg`` with a comment segment naming ``frame_id`` right after its start marker
    (still a valid JPEG: decoders skip comments)."""
    text = _TAG + str(frame_id).encode()
    return jpeg[:2] + b"\xff\xfe" + (len(text) + 2).to_bytes(2, "big") + text + jpeg[2:]


def jpeg_frame_tag(jpeg: bytes) -> int | None:
    """The frame id :func:`tag_jpeg` wrote into ``jpeg``, or None if it carries none."""
    if jpeg[2:4] != b"\xff\xfe":
        return None
    size = int.from_bytes(jpeg[4:6], "big")
    text = jpeg[6 : 4 + size]
    if not text.startswith(_TAG):
        return None
    try:
        return int(text[len(_TAG) :])
    except ValueError:
        return None


class NullBackend:
    """``workers.backend.Backend`` without a model (see the module docstring)."""

    name = "null"

    def __init__(
        self,
        models: dict[str, ModelInfo],
        *,
        delay_ms: float = 0.0,
        jpeg_bytes: int = 20_000,
        device: str = "cpu",
        frame_tags: bool = False,
    ) -> None:
        if delay_ms < 0:
            raise ValueError("delay_ms must be >= 0")
        self.device = device
        self.delay_s = delay_ms / 1000
        self.jpeg = fixed_jpeg(jpeg_bytes)
        self.frame_tags = frame_tags
        self._models = dict(models)

    @classmethod
    def from_config(cls, config: WorkerConfig) -> NullBackend:
        names = [n.strip() for n in config.models.split(",") if n.strip()]
        if names:
            models = {n: _info(n) for n in names}
        else:
            models = _packages(Path(config.models_dir)) or {"null": _info("null")}
        return cls(
            models,
            delay_ms=config.null_delay_ms,
            jpeg_bytes=config.null_jpeg_bytes,
            frame_tags=config.null_frame_tags,
        )

    def warmup(self) -> None:
        """Nothing to warm up; here so the runtime treats every backend alike."""

    def models(self) -> dict[str, ModelInfo]:
        return dict(self._models)

    def forward(self, model: str, items: Sequence[InferItem]) -> ForwardBatch:
        info = self._model(model)
        started = time.perf_counter()
        errors: list[BaseException | None] = [
            None
            if 0 <= item.frame_id < info.frame_count
            else ServiceError(ErrorCode.FRAME_OUT_OF_RANGE, f"frame {item.frame_id} out of range")
            for item in items
        ]
        computed = sum(e is None for e in errors)
        if computed and self.delay_s:
            time.sleep(self.delay_s * computed)
        elapsed = (time.perf_counter() - started) * 1000
        return ForwardBatch(
            model=model,
            items=items,
            state=info,
            errors=errors,
            timings={"inference": round(elapsed, 3)},
        )

    def encode(self, batch: ForwardBatch) -> list[InferResult | BaseException]:
        info: ModelInfo = batch.state
        return [
            error
            if error is not None
            else InferResult(
                jpeg=tag_jpeg(self.jpeg, item.frame_id) if self.frame_tags else self.jpeg,
                bounds=info.bounds,
                timings={"prepare": 0.0, "composite": 0.0, "encode": 0.0},
            )
            for item, error in zip(batch.items, batch.errors, strict=True)
        ]

    def video_frame(self, model: str, frame_id: int, video_type: str, quality: int) -> bytes:
        info = self._model(model)
        if video_type not in info.videos:
            raise ServiceError(ErrorCode.UNKNOWN_VIDEO, f"unknown video {video_type!r}")
        if not 0 <= frame_id < info.frame_count:
            raise ServiceError(ErrorCode.FRAME_OUT_OF_RANGE, f"frame {frame_id} out of range")
        return self.jpeg

    def load(self, model: str) -> ModelInfo:
        info = self._models.get(model) or _info(model)
        self._models[model] = info
        return info

    def unload(self, model: str) -> None:
        if self._models.pop(model, None) is None:
            raise ServiceError(ErrorCode.UNKNOWN_MODEL, f"model {model!r} is not loaded")

    def _model(self, model: str) -> ModelInfo:
        info = self._models.get(model)
        if info is None:
            raise ServiceError(ErrorCode.UNKNOWN_MODEL, f"model {model!r} is not loaded")
        return info


def _info(name: str, frames: int = DEFAULT_FRAMES, fps: float = 25.0) -> ModelInfo:
    return ModelInfo(
        name=name,
        frame_count=frames,
        fps=fps,
        size=DEFAULT_SIZE,
        bounds=DEFAULT_BOUNDS,
        videos=VIDEO_TYPES,
        width="null",
        audio=True,
    )


def _packages(models_dir: Path) -> dict[str, ModelInfo]:
    """Fake models named after the packages in ``models_dir``, with their frame counts."""
    found: dict[str, ModelInfo] = {}
    if not models_dir.is_dir():
        return found
    for info_file in sorted(models_dir.glob("*/package_info.json")):
        name = info_file.parent.name
        try:
            info = json.loads(info_file.read_text())
            video = info["videos"]["full_body_img"]
            found[name] = _info(name, int(video["frame_count"]), float(video.get("fps", 25)))
        except (OSError, ValueError, KeyError, TypeError):
            logger.warning(
                "%s: unreadable package_info.json; serving %s with defaults", info_file, name
            )
            found[name] = _info(name)
    return found
