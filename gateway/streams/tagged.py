"""A stream frame as the client gets it: the tagged frame (docs/streams.md, "Gateway →
client") of an idle frame or of a worker's answer. Pure functions of the frame and the
answer."""

from __future__ import annotations

from gateway.streams.clock import Frame
from gateway.streams.core import ModelInfo
from gateway.streams.interfaces import Answer
from shared.errors import ErrorCode, ServiceError
from shared.streamproto import (
    FLAG_COMPOSITE,
    FLAG_IDLE,
    FLAG_NO_IMAGE,
    TaggedFrame,
    encode_tagged_frame,
)


__all__ = ["idle_frame", "inferred_frame"]


def idle_frame(sid: int, frame: Frame, model: ModelInfo, jpeg: bytes | None = None) -> bytes:
    """A silent frame: the whole frame's bounds, and in crop mode (``jpeg`` None) no image
    (the client draws its preloaded full frame ``frame_id``)."""
    width, height = model.size
    flags = FLAG_IDLE | (FLAG_NO_IMAGE if jpeg is None else FLAG_COMPOSITE)
    return _encode(sid, frame, flags, (0.0, 0.0, float(width), float(height)), jpeg or b"")


def inferred_frame(
    sid: int,
    frame: Frame,
    answer: Answer,
    *,
    composite: bool,
    model: ModelInfo,
    us: float,
    index: int = 0,
) -> bytes:
    """A worker's answer to frame ``frame`` after ``us`` µs (``index``: the frame's place
    in a request for several, whose answer holds one image and four bounds per frame):
    ServiceError (``internal``) when it has no image for it, TypeError or ValueError when
    its bounds are unreadable. Bounds are the face rectangle the worker pasted into, the
    model's when it names none."""
    if len(answer.payload) <= index:
        raise ServiceError(ErrorCode.INTERNAL, "answer without an image")
    header = answer.header
    bounds = header.bounds[4 * index : 4 * index + 4] if header.bounds else model.bounds
    x1, y1, x2, y2 = (float(b) for b in bounds)
    flags = FLAG_COMPOSITE if composite else 0
    image = bytes(answer.payload[index])
    return _encode(sid, frame, flags, (x1, y1, x2, y2), image, round(us), header.worker)


def _encode(
    sid: int,
    frame: Frame,
    flags: int,
    bounds: tuple[float, float, float, float],
    image: bytes,
    processing_us: int = 0,
    worker: str = "",
) -> bytes:
    return encode_tagged_frame(
        TaggedFrame(
            stream=sid,
            seq=frame.seq,
            frame_id=frame.frame_id,
            audio_ms=frame.audio_ms,
            flags=flags,
            bounds=bounds,
            processing_us=processing_us,
            worker=worker,
            image=image,
        )
    )
