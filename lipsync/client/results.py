"""Typed results of the client's calls (frozen dataclasses), built from the gateway's
answers. ``from_json`` constructors are tolerant of extra fields (newer gateways add some)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from shared.streamproto import TaggedFrame


__all__ = [
    "AdminResult",
    "Frame",
    "Health",
    "LatencySummary",
    "Metadata",
    "ModelStats",
    "Stats",
    "StreamEnd",
    "StreamFrame",
    "StreamInfo",
    "VideoFrame",
    "WorkerOutcome",
]

Bounds = tuple[float, float, float, float]

StreamFrame = TaggedFrame
"""A frame of a server-driven stream: ``stream``, ``seq``, ``frame_id``, ``audio_ms``,
``flags`` (``idle``, ``composite``, ``no_image`` properties), ``bounds``, ``processing_us``,
``worker``, ``image`` (JPEG; empty when ``no_image``). See docs/streams.md."""


def _bounds(value: Any) -> Bounds:
    if isinstance(value, list | tuple) and len(value) == 4:
        x1, y1, x2, y2 = (float(v) for v in value)
        return (x1, y1, x2, y2)
    return (0.0, 0.0, 0.0, 0.0)


def _dict(value: Any) -> dict[Any, Any]:
    return value if isinstance(value, dict) else {}


def _float(value: Any) -> float:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else 0.0


def _int(value: Any) -> int:
    return int(value) if isinstance(value, int | float) and not isinstance(value, bool) else 0


@dataclass(frozen=True, slots=True)
class Frame:
    """One inferred frame. ``jpeg`` is the crop (draw it at ``bounds`` over the full frame)
    in ``crop`` mode, or the whole frame in ``composite`` mode; ``processing_time_ms`` is
    the gateway's time from receipt to answer."""

    model: str
    frame_id: int
    jpeg: bytes
    bounds: Bounds
    processing_time_ms: int
    mode: str


@dataclass(frozen=True, slots=True)
class VideoFrame:
    model: str
    frame_id: int
    video_type: str
    jpeg: bytes


@dataclass(frozen=True, slots=True)
class Metadata:
    model_name: str
    frame_count: int
    available_videos: tuple[str, ...]
    audio_path: str
    bounds: Bounds
    workers: int = 0  # how many workers hold the model (0: the gateway did not say)
    capacity: int = 0  # how many requests they may hold at once, all together

    @classmethod
    def from_json(cls, m: dict[str, Any]) -> Metadata:
        found = m.get("serving")
        serving: dict[str, Any] = found if isinstance(found, dict) else {}
        return cls(
            model_name=str(m.get("model_name", "")),
            frame_count=_int(m.get("frame_count")),
            available_videos=tuple(str(v) for v in m.get("available_videos") or ()),
            audio_path=str(m.get("audio_path", "")),
            bounds=_bounds(m.get("bounds")),
            workers=_int(serving.get("workers")),
            capacity=_int(serving.get("capacity")),
        )


@dataclass(frozen=True, slots=True)
class LatencySummary:
    """Milliseconds a frame spent in its worker (received to encoded)."""

    count: int = 0
    min: float = 0.0
    avg: float = 0.0
    p50: float = 0.0
    p99: float = 0.0
    max: float = 0.0

    @classmethod
    def from_json(cls, m: Any) -> LatencySummary:
        if not isinstance(m, dict):
            return cls()
        return cls(
            count=_int(m.get("count")),
            min=_float(m.get("min")),
            avg=_float(m.get("avg")),
            p50=_float(m.get("p50")),
            p99=_float(m.get("p99")),
            max=_float(m.get("max")),
        )


@dataclass(frozen=True, slots=True)
class ModelStats:
    """One model over every worker that holds it (like the original ``GetStats``)."""

    name: str
    requests: int
    errors: int
    error_codes: dict[str, int]
    latency_ms: LatencySummary
    frames_per_s: float
    batch_sizes: dict[int, int]
    workers: tuple[str, ...]
    devices: tuple[str, ...]
    queue: int

    @classmethod
    def from_json(cls, name: str, m: dict[str, Any]) -> ModelStats:
        codes = _dict(m.get("error_codes"))
        sizes = _dict(m.get("batch_sizes"))
        return cls(
            name=name,
            requests=_int(m.get("requests")),
            errors=_int(m.get("errors")),
            error_codes={str(k): _int(v) for k, v in codes.items()},
            latency_ms=LatencySummary.from_json(m.get("latency_ms")),
            frames_per_s=_float(m.get("frames_per_s")),
            batch_sizes={int(k): _int(v) for k, v in sizes.items() if str(k).isdigit()},
            workers=tuple(str(w) for w in m.get("workers") or ()),
            devices=tuple(str(d) for d in m.get("devices") or ()),
            queue=_int(m.get("queue")),
        )


@dataclass(frozen=True, slots=True)
class Stats:
    """``get_stats``: this gateway's counters, the system's shape, and per-model numbers.
    ``raw`` is the whole answer (fields this client does not know yet)."""

    total_requests: int
    binary_requests: int
    json_requests: int
    average_time_ms: float
    connected_clients: int
    in_flight: int
    dropped_frames: int
    broker: bool
    workers: int
    models: tuple[str, ...]
    model_stats: dict[str, ModelStats]
    raw: dict[str, Any] = field(repr=False)

    @classmethod
    def from_json(cls, m: dict[str, Any]) -> Stats:
        per_model = _dict(m.get("model_stats"))
        return cls(
            total_requests=_int(m.get("total_requests")),
            binary_requests=_int(m.get("binary_requests")),
            json_requests=_int(m.get("json_requests")),
            average_time_ms=_float(m.get("average_time_ms")),
            connected_clients=_int(m.get("connected_clients")),
            in_flight=_int(m.get("in_flight")),
            dropped_frames=_int(m.get("dropped_frames")),
            broker=m.get("broker") is True,
            workers=_int(m.get("workers")),
            models=tuple(str(x) for x in m.get("models") or ()),
            model_stats={
                str(k): ModelStats.from_json(str(k), v)
                for k, v in per_model.items()
                if isinstance(v, dict)
            },
            raw=m,
        )


@dataclass(frozen=True, slots=True)
class Health:
    """``GET /health``: ``healthy`` when the broker answers and a worker holds a model."""

    healthy: bool
    status: int  # HTTP status: 200 or 503
    broker: bool
    workers: int
    models: tuple[str, ...]
    connections: int
    in_flight: int
    uptime_s: float
    error: str = ""

    @classmethod
    def from_json(cls, status: int, m: dict[str, Any]) -> Health:
        return cls(
            healthy=m.get("healthy") is True,
            status=status,
            broker=m.get("broker") is True,
            workers=_int(m.get("workers")),
            models=tuple(str(x) for x in m.get("models") or ()),
            connections=_int(m.get("connections")),
            in_flight=_int(m.get("in_flight")),
            uptime_s=_float(m.get("uptime_s")),
            error=str(m.get("error", "")),
        )


@dataclass(frozen=True, slots=True)
class WorkerOutcome:
    """What one worker did with an admin operation. ``metadata`` (after a load) is what the
    worker announces: ``frame_count``, ``fps``, ``size``, ``bounds``, ``videos``..."""

    worker: str
    success: bool
    error: str = ""
    time_ms: float = 0.0
    metadata: dict[str, Any] | None = None


@dataclass(frozen=True, slots=True)
class AdminResult:
    """The answer to ``load_package`` / ``unload_package`` / ``reload_package``:
    ``success`` when every chosen worker succeeded."""

    op: str
    model_name: str
    success: bool
    workers: tuple[WorkerOutcome, ...]
    error: str = ""

    @classmethod
    def from_json(cls, m: dict[str, Any]) -> AdminResult:
        outcomes = []
        for w in m.get("workers") or ():
            if isinstance(w, dict):
                meta = w.get("metadata")
                outcomes.append(
                    WorkerOutcome(
                        worker=str(w.get("worker", "")),
                        success=w.get("success") is True,
                        error=str(w.get("error", "")),
                        time_ms=_float(w.get("time_ms")),
                        metadata=meta if isinstance(meta, dict) else None,
                    )
                )
        return cls(
            op=str(m.get("op", "")),
            model_name=str(m.get("model_name", "")),
            success=m.get("success") is True,
            workers=tuple(outcomes),
            error=str(m.get("error", "")),
        )


@dataclass(frozen=True, slots=True)
class StreamInfo:
    """``stream_started``: what the gateway settled on for a stream."""

    stream: int
    model_name: str
    fps: float
    frame_count: int
    sample_rate: int
    mode: str
    lookahead_ms: int
    bounds: Bounds

    @classmethod
    def from_json(cls, m: dict[str, Any]) -> StreamInfo:
        return cls(
            stream=_int(m.get("stream")),
            model_name=str(m.get("model_name", "")),
            fps=_float(m.get("fps")),
            frame_count=_int(m.get("frame_count")),
            sample_rate=_int(m.get("sample_rate")),
            mode=str(m.get("mode", "")),
            lookahead_ms=_int(m.get("lookahead_ms")),
            bounds=_bounds(m.get("bounds")),
        )


@dataclass(frozen=True, slots=True)
class StreamEnd:
    """``stream_ended``: frames sent, of which idle, and frames the gateway dropped;
    ``client_dropped`` counts frames this client discarded because nobody read them."""

    stream: int
    frames: int
    idle_frames: int
    dropped: int
    client_dropped: int = 0
