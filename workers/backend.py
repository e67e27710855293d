"""The contract between the worker's runtime (sockets, batching, deadlines) and whatever
computes frames: the real UNet-328 engine or the null backend.

The runtime calls ``forward`` on its compute thread and ``encode`` on a helper thread, so
the JPEG work of one batch overlaps the forward pass of the next (OpenCV and torch both
release the GIL). Per-item failures are returned, not raised, so that one bad request
becomes one error reply and never fails its batch-mates.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol


__all__ = [
    "VIDEO_TYPES",
    "Backend",
    "ForwardBatch",
    "InferItem",
    "InferResult",
    "Mode",
    "ModelInfo",
]

VIDEO_TYPES = ("full_body", "crops_328", "rois_320", "model_inputs")
"""The original server's video names, as listed in ``available_videos``."""

Mode = Literal["crop", "composite"]


@dataclass(slots=True, frozen=True)
class ModelInfo:
    """What a worker announces about one loaded model (travels in READY)."""

    name: str
    frame_count: int
    fps: float
    size: tuple[int, int]  # full frame (width, height)
    bounds: tuple[float, float, float, float]  # crop rect of frame 0: x1, y1, x2, y2
    videos: tuple[str, ...] = VIDEO_TYPES
    width: str = "full"  # full | half | quarter
    audio: bool = False  # has an audio encoder: can serve requests that carry audio

    def to_map(self) -> dict[str, Any]:
        return {
            "frame_count": self.frame_count,
            "fps": self.fps,
            "size": list(self.size),
            "bounds": list(self.bounds),
            "videos": list(self.videos),
            "width": self.width,
            "audio": self.audio,
        }


@dataclass(slots=True)
class InferItem:
    """One frame to compute.

    ``audio`` is int16 LE mono PCM at ``audio_sr`` Hz covering the 16-row feature window
    centred on ``frame_id`` (layout B: 640 ms, 8 frames before, the frame, 7 after). When it
    is None the package's own ``aud_ave.npy`` rows are used.

    A stream frame (docs/streams.md) says where its clip lies instead: ``audio_t0_ms`` (the
    clip's first sample relative to stream frame ``stream_frame``'s time) and ``stream``
    (the key its feature rows are cached under; see ``workers.stream_audio``).
    """

    frame_id: int
    mode: Mode = "composite"
    quality: int = 85
    audio: bytes | None = None
    audio_sr: int = 24000
    tag: Any = None  # opaque to the backend: the runtime's handle for this item
    audio_t0_ms: float | None = None  # set: a stream frame's clip, not layout B
    stream: str | None = None
    stream_frame: int = 0


@dataclass(slots=True)
class InferResult:
    jpeg: bytes
    bounds: tuple[float, float, float, float]  # crop rect in full-frame pixels
    shape: str = "320x320x3"  # model output shape, "WxHxC" as the original reported it
    # ms: prepare / inference / composite / encode
    timings: dict[str, float] = field(default_factory=dict)


@dataclass(slots=True)
class ForwardBatch:
    """What ``forward`` hands to ``encode``: backend-specific state plus per-item errors.

    ``errors[i]`` is an exception for items that failed before or during the forward pass
    (``encode`` returns it unchanged for that slot), else None.
    """

    model: str
    items: Sequence[InferItem]
    state: Any = None
    errors: list[BaseException | None] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)


class Backend(Protocol):
    """Computes frames for the models it holds. Thread-safety: ``forward`` is only called
    from one thread; ``encode`` may run concurrently with the next ``forward``."""

    name: str  # "torch" or "null", announced in READY
    device: str  # e.g. "cpu", "cuda:0"

    def models(self) -> dict[str, ModelInfo]: ...

    def forward(self, model: str, items: Sequence[InferItem]) -> ForwardBatch:
        """Run the model for up to ``max_batch`` items of one model."""
        ...

    def encode(self, batch: ForwardBatch) -> list[InferResult | BaseException]:
        """Composite and JPEG-encode a finished batch, one entry per item."""
        ...

    def video_frame(self, model: str, frame_id: int, video_type: str, quality: int) -> bytes:
        """A raw frame of one of the package's videos, as JPEG. Raises ServiceError."""
        ...

    def load(self, model: str) -> ModelInfo:
        """Load (or reload) a package by name from the models dir. Raises ServiceError."""
        ...

    def unload(self, model: str) -> None:
        """Drop a model and return its memory. Raises ServiceError if not loaded."""
        ...
