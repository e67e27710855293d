"""A connection's settings and the ``hello`` that changes them (docs/protocol.md section 7),
sans-I/O: the message's fields in, the new settings (or a ``ProtocolError``) out.

All or nothing: a bad field changes nothing. The answer echoes the settings in force and
the gateway's limits a client should know.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from shared.browser import ProtocolError, hello_message
from shared.config import GatewayConfig


__all__ = ["FEATURES", "MODES", "PROTOCOL_VERSION", "Settings", "hello_answer", "negotiate"]

PROTOCOL_VERSION = 1
FEATURES = (
    "layout_a",
    "layout_b",
    "layout_c",
    "layout_d",
    "audio_override",
    "output_mode",
    "quality",
    "pipelining",
    "error_codes",
    "streams",
    "tagged_frames",
    "deadlines",
)
"""What ``hello`` offers (``streams``, ``tagged_frames``: docs/streams.md; ``deadlines``:
B requests with their own deadline, docs/protocol.md section 4)."""
MODES = ("crop", "composite")


@dataclass(frozen=True, slots=True)
class Settings:
    """One connection's settings; the defaults are what the original clients expect."""

    mode_a: str = "composite"  # the A client draws the answer as the whole picture
    mode_b: str = "crop"  # the C client draws the answer at its bounds
    quality: int | None = None  # None: the worker's default
    video_quality: int | None = None
    said_hello: bool = False  # a client of ours: answers may carry our extra fields


def negotiate(fields: Mapping[str, Any], current: Settings) -> tuple[int, Settings]:
    """The version to speak and the settings after a ``hello`` with ``fields``.

    Raises:
        ProtocolError: a bad version, mode or quality (nothing changes then).
    """
    version = fields.get("version", PROTOCOL_VERSION)
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise ProtocolError("hello version must be an integer >= 1")
    changes: dict[str, Any] = {"said_hello": True}
    for key in ("mode_a", "mode_b"):
        if key in fields:
            if fields[key] not in MODES:
                raise ProtocolError(f"{key} must be crop or composite")
            changes[key] = fields[key]
    for key in ("quality", "video_quality"):
        if key in fields:
            value = fields[key]
            if value is not None and (
                not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= 100
            ):
                raise ProtocolError(f"{key} must be an integer 1..100 or null")
            changes[key] = value
    return min(version, PROTOCOL_VERSION), dataclasses.replace(current, **changes)


def hello_answer(version: int, settings: Settings, config: GatewayConfig) -> str:
    current: dict[str, Any] = {"mode_a": settings.mode_a, "mode_b": settings.mode_b}
    if settings.quality is not None:
        current["quality"] = settings.quality
    if settings.video_quality is not None:
        current["video_quality"] = settings.video_quality
    current["max_in_flight"] = config.max_in_flight
    current["max_message_bytes"] = config.max_message_bytes
    current["max_deadline_ms"] = config.max_deadline_ms
    return hello_message(version, FEATURES, current)
