"""One request the worker holds (``Job``), and how a request becomes one.

Sans-I/O: a decoded ``Request``, its payload, the time and the session in; a ``Job`` out,
or a ``ServiceError`` naming what is wrong with the request (the I/O thread answers it at
once, so a bad option never reaches a batch and never fails its batch-mates).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from shared.envelope import Op, Request
from shared.errors import ErrorCode, ServiceError
from workers.backend import InferItem


__all__ = ["Job", "infer_item", "job_from_request"]


@dataclass(eq=False, slots=True)
class Job:
    """One request the worker holds."""

    rid: int
    op: str
    model: str
    frame: int
    opts: dict[str, Any]
    deadline: float  # worker monotonic clock
    received: float
    session: int
    item: InferItem | None = None
    payload: list[bytes] = field(default_factory=list)


def job_from_request(
    h: Request, payload: list[bytes], now: float, session: int, jpeg_quality: int
) -> Job:
    """The job for request ``h`` received at ``now`` (its deadline: ``now`` + its ttl) in
    ``session``; an ``infer`` gets its ``InferItem``. Raises ServiceError (bad_request)."""
    job = Job(
        h.id,
        h.op,
        h.model,
        h.frame,
        h.opts,
        now + h.ttl_ms / 1000,
        now,
        session,
        payload=payload,
    )
    if h.op == Op.INFER:
        job.item = infer_item(h, payload, jpeg_quality)
    return job


def infer_item(h: Request, payload: list[bytes], jpeg_quality: int) -> InferItem:
    """The frame an ``infer`` request asks for, its options checked (``jpeg_quality``: the
    worker's default). Raises ServiceError (bad_request) naming the option at fault."""
    opts = h.opts
    mode = opts.get("mode", "composite")
    quality = opts.get("quality", jpeg_quality)
    audio_sr = opts.get("audio_sr", 24000)
    if mode not in ("crop", "composite"):
        raise ServiceError(ErrorCode.BAD_REQUEST, "mode must be crop or composite")
    if not isinstance(quality, int) or isinstance(quality, bool) or not 1 <= quality <= 100:
        raise ServiceError(ErrorCode.BAD_REQUEST, "quality must be an int in 1..100")
    if not isinstance(audio_sr, int) or not 8000 <= audio_sr <= 192_000:
        raise ServiceError(ErrorCode.BAD_REQUEST, "audio_sr must be an int in 8000..192000")
    audio = payload[0] if payload else None
    item = InferItem(
        frame_id=h.frame, mode=mode, quality=quality, audio=audio, audio_sr=audio_sr, tag=h.id
    )
    if "audio_t0_ms" in opts:  # a stream frame (docs/streams.md)
        t0, stream, j = opts["audio_t0_ms"], opts.get("stream"), opts.get("stream_frame")
        if audio is None:
            raise ServiceError(ErrorCode.BAD_REQUEST, "audio_t0_ms without audio")
        if not isinstance(t0, int | float) or isinstance(t0, bool):
            raise ServiceError(ErrorCode.BAD_REQUEST, "audio_t0_ms must be a number")
        if stream is not None and (not isinstance(stream, str) or len(stream) > 128):
            raise ServiceError(ErrorCode.BAD_REQUEST, "stream must be a short string")
        if not isinstance(j, int) or isinstance(j, bool) or j < 0:
            raise ServiceError(ErrorCode.BAD_REQUEST, "stream_frame must be an int >= 0")
        item.audio_t0_ms, item.stream, item.stream_frame = float(t0), stream, j
    return item
