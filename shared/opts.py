"""The options of internal requests (``Request.opts``), typed.

On the wire ``opts`` is a plain msgpack map (the envelope stays small and forwardable);
in code each op's options are a dataclass with ``to_map`` (the sender's side: absent
fields are left out, so defaults stay the receiver's) and ``from_map`` (the receiver's
side: every field checked, a bad one named in a ``ServiceError(bad_request)``). One place
knows the keys, instead of string keys checked in five modules.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from shared.errors import ErrorCode, ServiceError


__all__ = ["MAX_FRAMES_PER_REQUEST", "MODES", "AdminOpts", "InferOpts", "VideoFrameOpts"]

MODES = ("crop", "composite")
MAX_STREAM_KEY = 128
MAX_FRAMES_PER_REQUEST = 8
"""The most consecutive stream frames one request may ask for (``InferOpts.more_frames``)."""


def _bad(message: str) -> ServiceError:
    return ServiceError(ErrorCode.BAD_REQUEST, message)


def _int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _quality(value: Any) -> int | None:
    if value is None:
        return None
    if not _int(value) or not 1 <= value <= 100:
        raise _bad("quality must be an int in 1..100")
    return int(value)


@dataclass(frozen=True, slots=True)
class InferOpts:
    """``infer``: output mode, JPEG quality (None: the worker's default), the rate of the
    audio in the payload; a stream's frame also says where its clip lies (``audio_t0_ms``
    relative to stream frame ``stream_frame``'s time) and its ``stream`` key (the feature
    rows are cached under it, and the broker keeps a stream on one worker by it)."""

    mode: str = "composite"
    quality: int | None = None
    audio_sr: int = 24_000
    stream: str | None = None
    stream_frame: int = 0
    audio_t0_ms: float | None = None
    more_frames: tuple[int, ...] = ()
    """A stream's request for several consecutive frames: the avatar frame ids of stream
    frames ``stream_frame + 1 ...`` (the request's own ``frame`` is the first), all cut
    from the one clip, answered with one image per frame in one reply."""

    def to_map(self) -> dict[str, Any]:
        out: dict[str, Any] = {"mode": self.mode}
        if self.quality is not None:
            out["quality"] = self.quality
        if self.audio_sr != 24_000 or self.audio_t0_ms is not None:
            out["audio_sr"] = self.audio_sr
        if self.stream is not None:
            out["stream"] = self.stream
        if self.audio_t0_ms is not None:
            out["stream_frame"] = self.stream_frame
            out["audio_t0_ms"] = self.audio_t0_ms
        if self.more_frames:
            out["more_frames"] = list(self.more_frames)
        return out

    @classmethod
    def from_map(cls, opts: Mapping[str, Any]) -> InferOpts:
        mode = opts.get("mode", "composite")
        if mode not in MODES:
            raise _bad("mode must be crop or composite")
        audio_sr = opts.get("audio_sr", 24_000)
        if not _int(audio_sr) or not 8000 <= audio_sr <= 192_000:
            raise _bad("audio_sr must be an int in 8000..192000")
        stream = opts.get("stream")
        if stream is not None and (not isinstance(stream, str) or len(stream) > MAX_STREAM_KEY):
            raise _bad("stream must be a short string")
        t0 = opts.get("audio_t0_ms")
        j = opts.get("stream_frame")
        if t0 is not None:
            if not isinstance(t0, int | float) or isinstance(t0, bool):
                raise _bad("audio_t0_ms must be a number")
            if not isinstance(j, int) or isinstance(j, bool) or j < 0:
                raise _bad("stream_frame must be an int >= 0")
        more = opts.get("more_frames", ())
        if more and (
            t0 is None
            or not isinstance(more, list | tuple)
            or len(more) >= MAX_FRAMES_PER_REQUEST
            or not all(_int(f) and f >= 0 for f in more)
        ):
            raise _bad(
                f"more_frames must be a stream request's list of at most "
                f"{MAX_FRAMES_PER_REQUEST - 1} frame ids"
            )
        return cls(
            mode=mode,
            quality=_quality(opts.get("quality")),
            audio_sr=audio_sr,
            stream=stream,
            stream_frame=j if isinstance(j, int) and t0 is not None else 0,
            audio_t0_ms=float(t0) if t0 is not None else None,
            more_frames=tuple(int(f) for f in more),
        )


@dataclass(frozen=True, slots=True)
class VideoFrameOpts:
    """``video_frame``: which of the package's videos, and the JPEG quality."""

    video_type: str = "full_body"
    quality: int | None = None

    def to_map(self) -> dict[str, Any]:
        out: dict[str, Any] = {"video_type": self.video_type}
        if self.quality is not None:
            out["quality"] = self.quality
        return out

    @classmethod
    def from_map(cls, opts: Mapping[str, Any]) -> VideoFrameOpts:
        """Types only: whether the package has that video, and the quality's range, are
        the backend's to say (with the video's own name in the message)."""
        video_type = opts.get("video_type", "full_body")
        quality = opts.get("quality")
        if not isinstance(video_type, str) or not (quality is None or _int(quality)):
            raise _bad("bad video_type or quality")
        return cls(video_type=video_type, quality=quality)


@dataclass(frozen=True, slots=True)
class AdminOpts:
    """``load_package`` / ``unload_package``: on which workers (``"all"``, a count or a
    worker id; the broker fans out), or on one named ``worker``; ``reload`` a package
    where it is loaded."""

    workers: str | int | None = None
    worker: str | None = None
    reload: bool = False

    def to_map(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.workers is not None:
            out["workers"] = self.workers
        if self.worker is not None:
            out["worker"] = self.worker
        if self.reload:
            out["reload"] = True
        return out

    @classmethod
    def from_map(cls, opts: Mapping[str, Any]) -> AdminOpts:
        worker = opts.get("worker")
        if worker is not None and not isinstance(worker, str):
            raise _bad("bad worker name")
        workers = opts.get("workers")
        if workers is not None and not isinstance(workers, str | int):
            raise _bad("workers must be all, a count or a worker id")
        return cls(workers=workers, worker=worker, reload=opts.get("reload") is True)
