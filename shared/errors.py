"""Error codes that cross process boundaries, and the one exception type that carries them.

A code is a short stable string (it travels in msgpack headers, JSON answers and metrics
labels); the message is for humans. Every process answers bad input with one of these codes
instead of crashing or staying silent.
"""

from __future__ import annotations

from enum import StrEnum


__all__ = ["ErrorCode", "ServiceError", "WireFormatError"]


class ErrorCode(StrEnum):
    BAD_REQUEST = "bad_request"  # malformed or out-of-limits input
    UNKNOWN_MODEL = "unknown_model"  # no worker holds that model
    FRAME_OUT_OF_RANGE = "frame_out_of_range"
    UNKNOWN_VIDEO = "unknown_video"
    AUDIO_UNSUPPORTED = "audio_unsupported"  # package has no audio encoder
    OVERLOADED = "overloaded"  # a bounded queue is full: retry later
    TOO_MANY_IN_FLIGHT = "too_many_in_flight"  # per-connection pipelining limit
    DEADLINE_EXCEEDED = "deadline_exceeded"
    WORKER_LOST = "worker_lost"  # the worker died and no retry was possible
    BROKER_UNAVAILABLE = "broker_unavailable"
    UNAUTHORIZED = "unauthorized"
    CANCELLED = "cancelled"
    SHUTTING_DOWN = "shutting_down"
    SLOW_CLIENT = "slow_client"  # the client did not read the answer in time: image dropped
    INTERNAL = "internal"


class WireFormatError(ValueError):
    """Bytes that are not a valid message of one of our wire formats. Every parser in
    ``shared/`` raises one of these, and only these, whatever its input, so that the
    process reading them answers or drops the message instead of crashing::

        WireFormatError (ValueError)
        ├── shared.envelope.EnvelopeError          the internal ZeroMQ envelope
        ├── shared.browser.ProtocolError           browser layouts A-D, JSON requests
        └── shared.streamproto.StreamProtocolError stream audio, tagged frames, stream JSON

    Messages are short and lowercase (they reach clients inside ``bad_request: ...``).
    """


class ServiceError(Exception):
    """An error with a wire code. ``str(err)`` is the human message."""

    def __init__(self, code: ErrorCode | str, message: str) -> None:
        super().__init__(message)
        self.code = ErrorCode(code) if code in ErrorCode._value2member_map_ else ErrorCode.INTERNAL
        self.message = message

    def __repr__(self) -> str:
        return f"ServiceError({self.code.value!r}, {self.message!r})"
