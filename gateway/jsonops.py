"""The JSON requests a connection answers through the broker: ``list_models``,
``get_metadata``, ``get_video_frame``, ``inference`` and ``get_stats`` (docs/protocol.md
section 3), each turned into one internal request and its answer into the original text.

The connection dispatches, counts and queues; this module only knows how to ask and what
to answer, through the narrow parts of the gateway it is given.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any

from gateway.brokerclient import Answer
from gateway.context import Health
from gateway.hello import Settings
from gateway.replies import (
    bounds_of,
    check_frame,
    image_of,
    infer_opts,
    model_name_of,
    serving_of,
    timing,
)
from shared.browser import (
    JsonRequest,
    VideoFrameD,
    inference_message,
    metadata_message,
    model_list_message,
    stats_message,
    valid_model_name,
)
from shared.errors import ErrorCode, ServiceError
from shared.modelstats import merge_models
from shared.opts import VideoFrameOpts


__all__ = ["LOCAL_TTL_MS", "VIDEO_FRAME_TTL_MS", "JsonAnswer", "JsonOps"]

VIDEO_FRAME_TTL_MS = 5_000
LOCAL_TTL_MS = 2_000  # list_models, metadata, stats: the broker answers them itself

JsonAnswer = str | bytes  # text, or a layout D video frame
Ask = Callable[..., Awaitable[Answer]]


class JsonOps:
    """The handlers; each takes (request, t0) and returns the answer or raises
    ``ServiceError`` (the connection answers it in the request's error shape)."""

    def __init__(
        self,
        ask: Ask,
        settings: Callable[[], Settings],
        health: Health,
        stats_fields: Callable[[], dict[str, Any]],
        request_timeout_ms: int,
    ) -> None:
        self.ask = ask
        self.settings = settings
        self.health = health
        self.stats_fields = stats_fields
        self.request_timeout_ms = request_timeout_ms

    async def list_models(self, request: JsonRequest, t0: float) -> JsonAnswer:
        answer = await self.ask("list_models", ttl_ms=LOCAL_TTL_MS)
        result = answer.header.result if isinstance(answer.header.result, dict) else {}
        models = result.get("models")
        return model_list_message([str(m) for m in models] if isinstance(models, list) else [])

    async def metadata(self, request: JsonRequest, t0: float) -> JsonAnswer:
        model = model_name_of(request)
        answer = await self.ask("metadata", model=model, ttl_ms=LOCAL_TTL_MS)
        r = answer.header.result if isinstance(answer.header.result, dict) else {}
        try:
            return metadata_message(
                model,
                int(r.get("frame_count", 0)),
                [str(v) for v in r.get("videos", ())],
                [float(b) for b in r.get("bounds") or ()],
                audio_path=str(r.get("audio_path", "")),
                serving=serving_of(r) if self.settings().said_hello else None,
            )
        except (TypeError, ValueError):
            raise ServiceError(ErrorCode.INTERNAL, "bad metadata from broker") from None

    async def video_frame(self, request: JsonRequest, t0: float) -> JsonAnswer:
        model = _frame_request(request)
        video_type = request.video_type
        if not video_type:
            raise ServiceError(ErrorCode.BAD_REQUEST, "video_type is required")
        if not valid_model_name(video_type):  # same alphabet and length as a model name
            raise ServiceError(ErrorCode.UNKNOWN_VIDEO, "bad video type")
        opts = VideoFrameOpts(video_type, self.settings().video_quality)
        answer = await self.ask(
            "video_frame",
            model=model,
            frame=request.frame_id,
            opts=opts.to_map(),
            ttl_ms=VIDEO_FRAME_TTL_MS,
        )
        return VideoFrameD(request.frame_id, video_type, image_of(answer)).serialize()

    async def inference(self, request: JsonRequest, t0: float) -> JsonAnswer:
        model = _frame_request(request)
        audio = request.audio_override
        # The JSON answer carries no image ("use_binary_protocol_for_image_data"), so ask
        # for the cheaper crop: the worker still runs the model and reports timings.
        answer = await self.ask(
            "infer",
            model=model,
            frame=request.frame_id,
            opts=infer_opts("crop", self.settings().quality),
            payload=(audio,) if audio else (),
            ttl_ms=self.request_timeout_ms,
        )
        timings = answer.header.timings or {}
        result = answer.header.result if isinstance(answer.header.result, dict) else {}
        shape = result.get("shape")
        return inference_message(
            success=True,
            frame_id=request.frame_id,
            processing_time_ms=(time.monotonic() - t0) * 1000,
            prediction_shape=shape if isinstance(shape, str) and shape else "320x320x3",
            bounds=bounds_of(answer),
            prepare_time_ms=timing(timings, "prepare"),
            inference_time_ms=timing(timings, "inference"),
            composite_time_ms=timing(timings, "composite") + timing(timings, "encode"),
        )

    async def stats(self, request: JsonRequest, t0: float) -> JsonAnswer:
        status = await self.health.status()
        return stats_message(
            {
                **self.stats_fields(),
                "broker": status.broker,
                "workers": status.workers,
                "models": status.models,
                "model_stats": merge_models(status.stats),
            }
        )


def _frame_request(request: JsonRequest) -> str:
    """The model of a request for one frame, once its name and frame id are checked."""
    refusal = check_frame(request.frame_id)
    model = model_name_of(request)
    if refusal is not None:
        raise refusal
    return model
