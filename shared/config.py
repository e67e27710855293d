"""Configuration of every process, in one place.

One frozen dataclass per process. Values come from keyword arguments (the CLI) or from
``LIPSYNC_*`` environment variables; a flag wins over the variable, the variable over the
default. README.md lists every variable.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any, TypeVar


__all__ = ["BrokerConfig", "GatewayConfig", "StreamConfig", "WorkerConfig", "from_env"]

_C = TypeVar("_C")


@dataclass(frozen=True, kw_only=True)
class BrokerConfig:
    # gateways connect to the frontend (DEALER -> ROUTER), workers to the backend
    frontend: str = field(
        default="tcp://127.0.0.1:5555", metadata={"env": "LIPSYNC_BROKER_FRONTEND"}
    )
    backend: str = field(default="tcp://127.0.0.1:5556", metadata={"env": "LIPSYNC_BROKER_BACKEND"})
    heartbeat_s: float = 1.0  # rule 3: every interval when idle
    liveness: int = 3  # a peer silent for this many intervals is dead
    queue_limit: int = 256  # per-model pending requests before answering "overloaded"
    # After a (re)start, requests for a model no worker holds yet wait this long for workers
    # to register before ``unknown_model``; < 0 = two liveness periods (a worker notices a
    # restart within one, and its reconnect back-off is at most one more).
    warmup_s: float = -1.0
    curve_secret_file: str = ""  # optional CURVE server key for a backend beyond loopback
    log_level: str = "INFO"


@dataclass(frozen=True, kw_only=True)
class WorkerConfig:
    broker: str = field(default="tcp://127.0.0.1:5556", metadata={"env": "LIPSYNC_WORKER_BROKER"})
    models_dir: str = "models"
    models: str = ""  # comma list; empty = every package in models_dir
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    worker_index: int = 0  # slot on this host: with device auto, GPU = index mod GPU count
    backend: str = "torch"  # torch | null
    max_batch: int = 4
    max_delay_ms: float = 5.0  # how long to wait for a batch to fill
    # "deadline": each batch as large as gets the most of its jobs answered by their
    # deadlines (measured batch times, workers.batchsize); "fixed": always max_batch
    batch_sizing: str = "deadline"
    capacity: int = 0  # 0 = 2 x max_batch
    fp16: bool = False  # half precision on CUDA (ignored on CPU)
    null_delay_ms: float = 0.0  # service time of the null backend
    null_jpeg_bytes: int = 20_000  # size of the null backend's fixed JPEG
    null_frame_tags: bool = False  # null backend: frame id in a JPEG comment (order checks)
    heartbeat_s: float = 1.0
    liveness: int = 3
    jpeg_quality: int = 85
    threads: int = 0  # torch intra-op threads; 0 = torch default
    skip_cache_mb: float = 512.0  # per model, image-half features per frame (workers.skipcache)
    gpu_frames_mb: float = 2048.0  # per model, avatar frames held on a CUDA device
    cuda_graphs: bool = True  # replay the decoder from CUDA graphs (CUDA only)
    worker_id: str = ""  # empty = host:pid
    curve_server_key: str = ""  # broker's public CURVE key (z85) when it uses CURVE
    log_level: str = "INFO"


@dataclass(frozen=True, kw_only=True)
class GatewayConfig:
    broker: str = field(default="tcp://127.0.0.1:5555", metadata={"env": "LIPSYNC_GATEWAY_BROKER"})
    host: str = "127.0.0.1"
    port: int = 8086
    web_dir: str = ""  # empty = the repo's web/ next to the gateway package
    token: str = ""  # LIPSYNC_TOKEN: when set, every connection must present it
    allowed_origins: str = ""  # comma list; empty = same origin and localhost
    max_message_bytes: int = 1 << 20
    max_in_flight: int = 32  # per connection
    # A connection's undelivered answers (waiting for order or for the socket): past this
    # many it is closed (a client pipelining without limit against a stall); past
    # max_undelivered_mb of images (each of the two queues), the oldest images are replaced
    # by their error shapes; an answer its client has not taken for slow_client_ms (the
    # socket did not move) goes out as its error shape too.
    max_undelivered: int = 2048
    max_undelivered_mb: float = 16.0
    slow_client_ms: int = 3000
    request_timeout_ms: int = 2000  # default deadline of an infer request
    max_deadline_ms: int = 60_000  # the longest deadline a request may ask for
    ping_interval_s: float = 20.0
    log_level: str = "INFO"


def _stream_env(name: str) -> dict[str, Any]:
    return {"env": f"LIPSYNC_STREAM_{name.upper()}"}


@dataclass(frozen=True, kw_only=True)
class StreamConfig:
    """A gateway's server-driven streams (docs/streams.md). Every bound a client could
    otherwise push is here. Each field is read from ``LIPSYNC_STREAM_<NAME>`` (named in its
    metadata, e.g. ``LIPSYNC_STREAM_GRACE_FRAMES``): a CPU demo may rather show late frames
    than none, a GPU deployment wants the defaults."""

    max_ahead: int = field(default=8, metadata=_stream_env("max_ahead"))  # issued, not sent
    max_streams_per_connection: int = field(default=8, metadata=_stream_env("per_connection"))
    max_streams: int = field(default=256, metadata=_stream_env("max_streams"))  # per gateway
    # a frame may be this many frame times late before the pacer acts on it
    grace_frames: float = field(default=1.0, metadata=_stream_env("grace_frames"))
    # how far late frames may push a stream's playout back before they are dropped instead
    max_delay_ms: int = field(default=200, metadata=_stream_env("max_delay_ms"))
    # RMS of the 200 ms around a frame (dBFS), below which it is idle
    silence_dbfs: float = field(default=-45.0, metadata=_stream_env("silence_dbfs"))
    # audio held ahead of the next frame to issue
    max_buffer_s: float = field(default=10.0, metadata=_stream_env("max_buffer_s"))
    ttl_ms: int = field(default=2000, metadata=_stream_env("ttl_ms"))  # one frame's request
    # once a stream's clock runs, a frame's request lives only until the frame could no
    # longer be shown, so that a worker never computes it for nobody (workers.servicetime)
    slot_deadlines: bool = field(default=True, metadata=_stream_env("slot_deadlines"))
    start_ttl_ms: int = field(default=5000, metadata=_stream_env("start_ttl_ms"))  # metadata
    # consecutive failed frames (2 s at 25 fps) before giving up
    max_failures: int = field(default=50, metadata=_stream_env("max_failures"))
    # raw full frames for composite-mode idle frames, all models
    idle_cache_items: int = field(default=64, metadata=_stream_env("idle_cache_items"))
    idle_cache_bytes: int = field(default=32 << 20, metadata=_stream_env("idle_cache_bytes"))
    # consecutive frames one worker request asks for, unless stream_start says (1..8):
    # fewer messages per frame, each frame issued up to (n - 1) frame times later
    frames_per_request: int = field(default=1, metadata=_stream_env("frames_per_request"))


def from_env(cls: type[_C], env: Mapping[str, str] | None = None, **overrides: Any) -> _C:
    """Build ``cls`` from ``LIPSYNC_<FIELD>`` variables, then apply non-None overrides.

    ``LIPSYNC_TOKEN`` etc. are shared by name across processes on purpose: one environment
    configures a whole deployment. A field whose meaning differs per process (the broker
    address a gateway or a worker dials) names its own variable in its metadata.
    """
    env = os.environ if env is None else env
    values: dict[str, Any] = {}
    for f in fields(cls):  # type: ignore[arg-type]
        variable = f.metadata.get("env", f"LIPSYNC_{f.name.upper()}")
        raw = env.get(variable)
        if raw is not None and raw != "":
            values[f.name] = _convert(raw, type(f.default), variable)
    values.update({k: v for k, v in overrides.items() if v is not None})
    return cls(**values)


def _convert(raw: str, kind: type, variable: str) -> Any:
    try:
        if kind is bool:
            if raw.lower() in {"1", "true", "yes", "on"}:
                return True
            if raw.lower() in {"0", "false", "no", "off"}:
                return False
            raise ValueError(raw)
        return kind(raw)
    except ValueError:
        raise ValueError(f"{variable}={raw!r} is not a valid {kind.__name__}") from None
