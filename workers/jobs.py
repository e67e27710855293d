"""One request the worker holds (``Job``), and how a request becomes one.

Sans-I/O: a decoded ``Request``, its payload, the time and the session in; a ``Job`` out,
or a ``ServiceError`` naming what is wrong with the request (the I/O thread answers it at
once, so a bad option never reaches a batch and never fails its batch-mates).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from shared.envelope import Op, Request
from shared.errors import ErrorCode, ServiceError
from shared.opts import InferOpts
from workers.backend import InferItem


__all__ = ["Job", "further_items", "infer_item", "job_from_request"]


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
    more: list[InferItem] = field(default_factory=list)  # a stream's further frames

    @property
    def items(self) -> list[InferItem]:
        """Every frame this job asks for, in order (one, unless a stream asked for more)."""
        return [self.item, *self.more] if self.item is not None else []


def job_from_request(
    h: Request,
    payload: list[bytes],
    now: float,
    session: int,
    jpeg_quality: int,
    fps: float = 25.0,
) -> Job:
    """The job for request ``h`` received at ``now`` (its deadline: ``now`` + its ttl) in
    ``session``; an ``infer`` gets its ``InferItem`` (and, for a stream request for
    several frames, one more per further frame: ``fps`` is the model's, which places each
    further frame's time in the shared clip). Raises ServiceError (bad_request)."""
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
        opts = InferOpts.from_map(h.opts)
        job.item = infer_item(h, opts, payload, jpeg_quality)
        job.more = further_items(job.item, opts.more_frames, fps)
    return job


def further_items(first: InferItem, frame_ids: tuple[int, ...], fps: float) -> list[InferItem]:
    """Stream frames ``first.stream_frame + 1 ...`` showing avatar frames ``frame_ids``, from
    ``first``'s clip: frame ``j + i`` starts ``i`` frame times later than frame ``j``, so
    the clip's start lies that much further before it."""
    if not frame_ids or first.audio_t0_ms is None:
        return []
    step_ms = 1000.0 / fps
    return [
        replace(
            first,
            frame_id=frame_id,
            audio_t0_ms=first.audio_t0_ms - i * step_ms,
            stream_frame=first.stream_frame + i,
        )
        for i, frame_id in enumerate(frame_ids, start=1)
    ]


def infer_item(h: Request, opts: InferOpts, payload: list[bytes], jpeg_quality: int) -> InferItem:
    """The frame an ``infer`` request asks for (``opts``: its options, already checked by
    ``InferOpts.from_map``, which raises ServiceError (bad_request) naming the option at
    fault; ``jpeg_quality``: the worker's default)."""
    audio = payload[0] if payload else None
    item = InferItem(
        frame_id=h.frame,
        mode=opts.mode,  # type: ignore[arg-type]  # checked by from_map
        quality=jpeg_quality if opts.quality is None else opts.quality,
        audio=audio,
        audio_sr=opts.audio_sr,
        tag=h.id,
    )
    if opts.audio_t0_ms is not None:  # a stream frame (docs/streams.md)
        if audio is None:
            raise ServiceError(ErrorCode.BAD_REQUEST, "audio_t0_ms without audio")
        item.audio_t0_ms, item.stream, item.stream_frame = (
            opts.audio_t0_ms,
            opts.stream,
            opts.stream_frame,
        )
    return item
