"""Wire formats of server-driven streams (docs/streams.md), sans-I/O.

Client → gateway: JSON ``stream_start`` / ``stream_stop`` / ``stream_interrupt``, and binary
audio chunks ``0x00 0x01 | u32 stream | int16 LE PCM``. Gateway → client: JSON
``stream_started`` / ``stream_ended`` / ``stream_interrupted`` / ``stream_error``, and binary
tagged frames (first byte 3). All integers little-endian.

Like ``shared.browser``, nothing here touches a socket or a clock, and every parser raises
:class:`StreamProtocolError` (never another exception) for anything that is not a valid
message, whatever the input: the gateway answers it instead of crashing. The JSON answers
are written by ``shared.browser.dumps``, the one writer of a browser's text messages
(``stream_error`` is ``shared.browser``'s own, re-exported here).
"""

from __future__ import annotations

import math
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeGuard

from shared.browser import dumps, stream_error_message, valid_model_name
from shared.errors import WireFormatError
from shared.opts import MAX_FRAMES_PER_REQUEST
from shared.streamtime import SUPPORTED_RATES


__all__ = [
    "AUDIO",
    "AUDIO_HEADER",
    "DEFAULT_QUALITY",
    "DEFAULT_SAMPLE_RATE",
    "EXTENSION",
    "FLAG_COMPOSITE",
    "FLAG_IDLE",
    "FLAG_NO_IMAGE",
    "MAX_CHUNK_BYTES",
    "MAX_WORKER_ID_BYTES",
    "MODES",
    "REQUEST_TYPES",
    "TAGGED_FRAME",
    "TAGGED_HEADER",
    "AudioChunk",
    "StreamInterrupt",
    "StreamProtocolError",
    "StreamStart",
    "StreamStop",
    "TaggedFrame",
    "encode_audio_chunk",
    "encode_tagged_frame",
    "is_audio_chunk",
    "parse_audio_chunk",
    "parse_stream_request",
    "parse_tagged_frame",
    "stream_ended_message",
    "stream_error_message",
    "stream_interrupted_message",
    "stream_started_message",
]

EXTENSION = 0x00
"""First byte of this project's client → gateway binary messages (never a layout A/B)."""
AUDIO = 0x01
TAGGED_FRAME = 3
"""First byte of a tagged frame (0/1 are layout C, 2 is layout D)."""

FLAG_IDLE = 0x01  # no speech: no inference was run
FLAG_COMPOSITE = 0x02  # the image is the whole frame
FLAG_NO_IMAGE = 0x04  # idle in crop mode: draw the preloaded full frame ``frame_id``

MAX_CHUNK_BYTES = 2 * 48_000
"""One second of the fastest supported rate. ``Stream`` holds each stream to one second of
its own rate."""
MAX_WORKER_ID_BYTES = 255
MODES = ("crop", "composite")
DEFAULT_SAMPLE_RATE = 16_000
DEFAULT_QUALITY = 80
REQUEST_TYPES = ("stream_start", "stream_stop", "stream_interrupt")

AUDIO_HEADER = struct.Struct("<BBI")  # 0x00, 0x01, stream
TAGGED_HEADER = struct.Struct("<BIIIIB4fI")  # 3, stream, seq, frame, audio ms, flags, bounds, us
_U8 = struct.Struct("<B")
_U32 = struct.Struct("<I")
_U32_MAX = 0xFFFFFFFF


class StreamProtocolError(WireFormatError):
    """Not a valid stream message. ``stream`` is the stream id when it could be read (so the
    answer can name it); messages are short and lowercase."""

    def __init__(self, message: str, stream: int | None = None) -> None:
        super().__init__(message)
        self.stream = stream


# -- audio chunks (client → gateway) ---------------------------------------------------------


@dataclass(frozen=True, slots=True)
class AudioChunk:
    stream: int
    pcm: bytes  # int16 LE mono at the stream's rate; even length


def is_audio_chunk(data: bytes | bytearray | memoryview) -> bool:
    """Whether a binary message is this extension's (first byte 0x00): route it here, not
    to the layout A/B parser."""
    return len(data) > 0 and data[0] == EXTENSION


def parse_audio_chunk(data: bytes | bytearray | memoryview) -> AudioChunk:
    """``0x00 0x01 | u32 stream | PCM`` → :class:`AudioChunk`.

    Raises:
        StreamProtocolError: shorter than the header, not ``0x00 0x01``, an odd number of
            PCM bytes, or more than ``MAX_CHUNK_BYTES`` of PCM.
    """
    if len(data) < AUDIO_HEADER.size:
        raise StreamProtocolError("audio chunk shorter than its header")
    marker, kind, stream = AUDIO_HEADER.unpack_from(data)
    if marker != EXTENSION:
        raise StreamProtocolError("not an extension message")
    if kind != AUDIO:
        raise StreamProtocolError(f"unknown extension message kind {kind}", stream)
    n = len(data) - AUDIO_HEADER.size
    if n % 2:
        raise StreamProtocolError("audio is not int16: odd number of bytes", stream)
    if n > MAX_CHUNK_BYTES:
        raise StreamProtocolError("audio chunk longer than one second", stream)
    return AudioChunk(stream, bytes(data[AUDIO_HEADER.size :]))


def encode_audio_chunk(stream: int, pcm: bytes | bytearray | memoryview) -> bytes:
    """The client's side (tests, tools): header plus PCM."""
    if not 0 <= stream <= _U32_MAX:
        raise ValueError(f"stream id {stream} is not a u32")
    return AUDIO_HEADER.pack(EXTENSION, AUDIO, stream) + bytes(pcm)


# -- tagged frames (gateway → client) --------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TaggedFrame:
    stream: int
    seq: int
    frame_id: int
    audio_ms: int
    flags: int
    bounds: tuple[float, float, float, float]
    processing_us: int
    worker: str
    image: bytes

    @property
    def idle(self) -> bool:
        return bool(self.flags & FLAG_IDLE)

    @property
    def composite(self) -> bool:
        return bool(self.flags & FLAG_COMPOSITE)

    @property
    def no_image(self) -> bool:
        return bool(self.flags & FLAG_NO_IMAGE)


def _clamp_u32(value: float) -> int:
    if not math.isfinite(value):
        return 0
    return min(max(int(value), 0), _U32_MAX)


def _worker_bytes(worker: str) -> bytes:
    """UTF-8, cut to ``MAX_WORKER_ID_BYTES`` on a character boundary."""
    raw = worker.encode("utf-8", "replace")
    if len(raw) <= MAX_WORKER_ID_BYTES:
        return raw
    return raw[:MAX_WORKER_ID_BYTES].decode("utf-8", "ignore").encode("utf-8")


def encode_tagged_frame(frame: TaggedFrame) -> bytes:
    """Serialize one frame. Counters are clamped to u32 (an hour-long stream's sequence
    numbers fit many times over); the worker id is cut to 255 bytes."""
    worker = _worker_bytes(frame.worker)
    head = TAGGED_HEADER.pack(
        TAGGED_FRAME,
        _clamp_u32(frame.stream),
        _clamp_u32(frame.seq),
        _clamp_u32(frame.frame_id),
        _clamp_u32(frame.audio_ms),
        frame.flags & 0xFF,
        *(float(b) for b in frame.bounds),
        _clamp_u32(frame.processing_us),
    )
    return b"".join((head, _U8.pack(len(worker)), worker, _U32.pack(len(frame.image)), frame.image))


def parse_tagged_frame(data: bytes | bytearray | memoryview) -> TaggedFrame:
    """The client's side (tests, tools).

    Raises:
        StreamProtocolError: not a tagged frame, truncated, trailing bytes, or a worker id
            that is not UTF-8.
    """
    size = TAGGED_HEADER.size
    if len(data) < size + 1:
        raise StreamProtocolError("tagged frame shorter than its header")
    kind, stream, seq, frame_id, audio_ms, flags, x1, y1, x2, y2, us = TAGGED_HEADER.unpack_from(
        data
    )
    if kind != TAGGED_FRAME:
        raise StreamProtocolError("not a tagged frame")
    w = data[size]
    offset = size + 1 + w
    if len(data) < offset + _U32.size:
        raise StreamProtocolError("tagged frame truncated", stream)
    try:
        worker = bytes(data[size + 1 : offset]).decode("utf-8")
    except UnicodeDecodeError:
        raise StreamProtocolError("worker id is not utf-8", stream) from None
    (n,) = _U32.unpack_from(data, offset)
    offset += _U32.size
    if len(data) != offset + n:
        raise StreamProtocolError("tagged frame image length does not match", stream)
    return TaggedFrame(
        stream=stream,
        seq=seq,
        frame_id=frame_id,
        audio_ms=audio_ms,
        flags=flags,
        bounds=(x1, y1, x2, y2),
        processing_us=us,
        worker=worker,
        image=bytes(data[offset:]),
    )


# -- JSON requests (client → gateway) -------------------------------------------------------


@dataclass(frozen=True, slots=True)
class StreamStart:
    model_name: str
    sample_rate: int = DEFAULT_SAMPLE_RATE
    mode: str = "crop"
    quality: int = DEFAULT_QUALITY
    stream: int | None = None  # None: the gateway assigns one
    frames_per_request: int | None = None  # None: the gateway's default


@dataclass(frozen=True, slots=True)
class StreamStop:
    stream: int


@dataclass(frozen=True, slots=True)
class StreamInterrupt:
    stream: int


StreamRequest = StreamStart | StreamStop | StreamInterrupt


def _is_int(value: Any) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def _stream_id(value: Any, *, required: bool) -> int | None:
    if value is None and not required:
        return None
    if not _is_int(value) or not 0 <= value <= _U32_MAX:
        raise StreamProtocolError("stream must be a u32 integer")
    return int(value)


def parse_stream_request(message: Mapping[str, Any]) -> StreamRequest:
    """A decoded JSON object whose ``type`` is one of ``REQUEST_TYPES`` → its dataclass.

    Unknown fields are ignored (forward compatibility).

    Raises:
        StreamProtocolError: another type, or a field of the wrong type or out of range
            (``stream`` a u32; ``model_name`` a valid model name; ``sample_rate`` one of
            16000/24000/44100/48000; ``mode`` crop or composite; ``quality`` 1..100).
            ``stream`` is set on the error when it could be read.
    """
    if not isinstance(message, Mapping):
        raise StreamProtocolError("message is not a json object")
    kind = message.get("type")
    raw_stream = message.get("stream")
    known = raw_stream if _is_int(raw_stream) and 0 <= raw_stream <= _U32_MAX else None
    try:
        if kind == "stream_stop":
            return StreamStop(_stream_id(raw_stream, required=True))  # type: ignore[arg-type]
        if kind == "stream_interrupt":
            return StreamInterrupt(_stream_id(raw_stream, required=True))  # type: ignore[arg-type]
        if kind != "stream_start":
            raise StreamProtocolError(f"not a stream request: {str(kind)[:40]!r}")
        stream = _stream_id(raw_stream, required=False)
        name = message.get("model_name")
        if not isinstance(name, str) or not valid_model_name(name):
            raise StreamProtocolError("model_name must be 1-64 characters of [A-Za-z0-9_.-]")
        rate = message.get("sample_rate", DEFAULT_SAMPLE_RATE)
        if rate is None:
            rate = DEFAULT_SAMPLE_RATE
        if not _is_int(rate) or rate not in SUPPORTED_RATES:
            rates = ", ".join(str(r) for r in SUPPORTED_RATES)
            raise StreamProtocolError(f"sample_rate must be one of {rates}")
        mode = message.get("mode", "crop")
        if mode is None:
            mode = "crop"
        if mode not in MODES:
            raise StreamProtocolError("mode must be crop or composite")
        quality = message.get("quality", DEFAULT_QUALITY)
        if quality is None:
            quality = DEFAULT_QUALITY
        if not _is_int(quality) or not 1 <= quality <= 100:
            raise StreamProtocolError("quality must be an integer 1..100")
        per = message.get("frames_per_request")
        if per is not None and (not _is_int(per) or not 1 <= per <= MAX_FRAMES_PER_REQUEST):
            raise StreamProtocolError(
                f"frames_per_request must be an integer 1..{MAX_FRAMES_PER_REQUEST}"
            )
        return StreamStart(name, int(rate), str(mode), int(quality), stream, per)
    except StreamProtocolError as exc:
        if exc.stream is None:
            exc.stream = known
        raise


# -- JSON answers (gateway → client) --------------------------------------------------------


def _dumps(value: Mapping[str, Any]) -> str:
    return dumps(value, float_repr=True)


def stream_started_message(
    *,
    stream: int,
    model_name: str,
    fps: float,
    frame_count: int,
    sample_rate: int,
    mode: str,
    lookahead_ms: int,
    bounds: Sequence[float],
    frames_per_request: int = 1,
) -> str:
    message: dict[str, Any] = {
        "type": "stream_started",
        "stream": stream,
        "model_name": model_name,
        "fps": fps,
        "frame_count": frame_count,
        "sample_rate": sample_rate,
        "mode": mode,
        "lookahead_ms": lookahead_ms,
        "bounds": [float(b) for b in bounds],
    }
    if frames_per_request > 1:
        message["frames_per_request"] = frames_per_request
    return _dumps(message)


def stream_ended_message(*, stream: int, frames: int, idle_frames: int, dropped: int) -> str:
    return _dumps(
        {
            "type": "stream_ended",
            "stream": stream,
            "frames": frames,
            "idle_frames": idle_frames,
            "dropped": dropped,
        }
    )


def stream_interrupted_message(stream: int) -> str:
    return _dumps({"type": "stream_interrupted", "stream": stream})
