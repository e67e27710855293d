"""Python client of the lip-sync gateway, for servers (asyncio, over its WebSocket).

::

    from lipsync.client import LipsyncClient

    async with LipsyncClient("ws://127.0.0.1:8086/ws", token=None, timeout=10) as c:
        models = await c.list_models()
        frame = await c.infer(models[0], 12)           # Frame: jpeg, bounds, ...
        frames = await c.infer_batch(models[0], range(32))

README.md ("Python client") has more; docs/protocol.md is the wire contract underneath.
"""

from __future__ import annotations

from lipsync.client.client import (
    ADMIN_TIMEOUT_S,
    DEFAULT_TIMEOUT_S,
    DEFAULT_URL,
    Batch,
    LipsyncClient,
    token_from_env,
)
from lipsync.client.errors import ConnectionLost, LipsyncError, ServerError, Timeout
from lipsync.client.results import (
    AdminResult,
    Frame,
    Health,
    LatencySummary,
    Metadata,
    ModelStats,
    Stats,
    StreamEnd,
    StreamFrame,
    StreamInfo,
    VideoFrame,
    WorkerOutcome,
)
from lipsync.client.streaming import Stream
from shared.errors import ErrorCode


__all__ = [
    "ADMIN_TIMEOUT_S",
    "DEFAULT_TIMEOUT_S",
    "DEFAULT_URL",
    "AdminResult",
    "Batch",
    "ConnectionLost",
    "ErrorCode",
    "Frame",
    "Health",
    "LatencySummary",
    "LipsyncClient",
    "LipsyncError",
    "Metadata",
    "ModelStats",
    "ServerError",
    "Stats",
    "Stream",
    "StreamEnd",
    "StreamFrame",
    "StreamInfo",
    "Timeout",
    "VideoFrame",
    "WorkerOutcome",
    "token_from_env",
]
