"""Turning broker answers into what clients see, and the error shapes of each JSON request.

Pure functions, shared by ``gateway.connection`` (binary layouts) and ``gateway.jsonops``
(JSON requests): an error text is ``code: message``; an answer's image and bounds are
checked before they reach a client; each JSON request type has its own error shape, the
one the original proxy answered it with.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from gateway.brokerclient import Answer
from shared.browser import (
    JsonRequest,
    error_message,
    inference_message,
    metadata_error_message,
    model_list_error_message,
    valid_model_name,
    video_frame_error_message,
)
from shared.errors import ErrorCode, ServiceError
from shared.opts import InferOpts


__all__ = [
    "AUDIO_SR",
    "SLOW_CLIENT",
    "ErrorShape",
    "bounds_of",
    "check_frame",
    "error_text",
    "image_of",
    "infer_opts",
    "inference_error",
    "metadata_error",
    "model_list_error",
    "model_name_of",
    "plain_error",
    "serving_of",
    "timing",
    "video_frame_error",
]

SLOW_CLIENT = f"{ErrorCode.SLOW_CLIENT.value}: answer not read in time; its image was dropped"
"""The error an answer goes out as when its client did not read it in time."""

ErrorShape = Callable[[JsonRequest, str], str]
AUDIO_SR = 24_000  # layout B and audio_override: the original page's capture rate


def infer_opts(mode: str, quality: int | None) -> dict[str, Any]:
    """The options of an ``infer`` request (``shared.opts.InferOpts``): output mode and
    JPEG quality (None: the worker's default); audio, if any, at the original page's
    rate."""
    return InferOpts(mode=mode, quality=quality, audio_sr=AUDIO_SR).to_map()


def error_text(exc: ServiceError) -> str:
    """An error as clients see it: ``code: message`` (code first, so programs can split)."""
    return f"{exc.code.value}: {exc.message}"


def image_of(answer: Answer) -> bytes:
    if not answer.payload:
        raise ServiceError(ErrorCode.INTERNAL, "answer without an image")
    return bytes(answer.payload[0])


def bounds_of(answer: Answer) -> tuple[float, ...]:
    try:
        return tuple(float(b) for b in answer.header.bounds or ())
    except (TypeError, ValueError):
        raise ServiceError(ErrorCode.INTERNAL, "answer with bad bounds") from None


def check_frame(frame_id: int) -> ServiceError | None:
    """Negative ids are out of every model's range; the rest is the worker's to judge."""
    if frame_id < 0:
        return ServiceError(ErrorCode.FRAME_OUT_OF_RANGE, f"frame {frame_id} out of range")
    return None


def model_name_of(request: JsonRequest) -> str:
    if not request.model_name:
        raise ServiceError(ErrorCode.BAD_REQUEST, "model_name is required")
    if not valid_model_name(request.model_name):
        raise ServiceError(ErrorCode.BAD_REQUEST, "bad model name")
    return request.model_name


def serving_of(result: dict[str, Any]) -> dict[str, int]:
    """The broker's view of who serves a model, for clients of ours (``metadata``)."""
    return {"workers": int(result.get("workers", 0)), "capacity": int(result.get("capacity", 0))}


def timing(timings: dict[str, Any], key: str) -> float:
    value = timings.get(key, 0.0)
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else 0.0


def inference_error(request: JsonRequest, error: str) -> str:
    return inference_message(
        success=False, frame_id=request.frame_id, processing_time_ms=0, error=error
    )


def model_list_error(request: JsonRequest, error: str) -> str:
    return model_list_error_message(error)


def metadata_error(request: JsonRequest, error: str) -> str:
    return metadata_error_message(request.model_name, error)


def video_frame_error(request: JsonRequest, error: str) -> str:
    return video_frame_error_message(request.model_name, request.frame_id, error)


def plain_error(request: JsonRequest, error: str) -> str:
    return error_message(error)
