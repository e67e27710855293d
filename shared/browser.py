"""The browser protocol's wire formats (DESIGN.md section 4, docs/protocol.md), sans-I/O.

The gateway must answer the original system's clients byte for byte, so every layout here
is pinned by a literal-bytes test. Nothing in this module touches a socket or a clock: bytes
and strings come in, dataclasses and bytes/strings go out, and anything that is not a valid
message raises :class:`ProtocolError` (never another exception), whatever the input.

Binary messages, all integers little-endian::

    A  request  (original proxy)  u8 name_len | name | i32 frame_id | (rest ignored)
    B  request  (original page)   u32 name_len | name | u32 frame_id | u32 audio_len | audio
    C  response (to B)            u8 1 | u32 frame_id | u32 ms | u32 image_len | JPEG
                                       | u32 bounds_len_bytes | f32 x bounds_len/4
                  error form      u8 0 | u32 frame_id | u32 ms | u32 error_len | UTF-8 error
    D  response (video frame)     u8 2 | u32 frame_id | u8 type_len | video_type
                                       | u32 data_len | JPEG
    B with a deadline (ours)      u8 0 | u8 2 | u32 deadline_ms | B request
                                       (answered with C, like the B inside)

A and B are told apart by bytes 1..3: a model name is 1..64 bytes of ``[A-Za-z0-9_.-]``, so
in B (a small u32 length) they are zero and in A byte 1 is the name's first letter. A first
byte of 0x00 is never a valid A or B request: it marks this project's own messages.

Text messages are JSON. The answers are encoded the way the original Go proxy's
``encoding/json`` wrote them (compact, field order of the Go structs, ``omitempty`` fields
left out, ``<>&`` escaped, floats in Go's shortest form: ``480`` not ``480.0``), so that even
a client comparing text sees no difference.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
import struct
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from shared.errors import WireFormatError


__all__ = [
    "A_FRAME",
    "A_NAME_LEN",
    "B_U32",
    "C_HEADER",
    "D_HEADER",
    "D_LEN",
    "DEADLINE",
    "DEADLINE_HEADER",
    "EXTENSION",
    "MAX_AUDIO_BYTES",
    "MAX_BINARY_REQUEST_BYTES",
    "MAX_JSON_BYTES",
    "MAX_JSON_DEPTH",
    "MAX_NAME_BYTES",
    "MAX_VIDEO_TYPE_BYTES",
    "PREDICTION_DATA",
    "VIDEO_FRAME",
    "DeadlineRequest",
    "ErrorResponseC",
    "F32",
    "JsonRequest",
    "ProtocolError",
    "RequestA",
    "RequestB",
    "ResponseC",
    "VideoFrameD",
    "check_model_name",
    "dumps",
    "error_message",
    "hello_message",
    "inference_message",
    "metadata_error_message",
    "metadata_message",
    "model_list_error_message",
    "model_list_message",
    "parse_binary_request",
    "parse_inference_response",
    "parse_json_request",
    "protocol_ack_message",
    "stats_message",
    "stream_error_message",
    "unknown_type_message",
    "valid_model_name",
    "video_frame_error_message",
]


# -- limits --------------------------------------------------------------------------------

MAX_NAME_BYTES = 64
MAX_AUDIO_BYTES = 192_000
"""4 s of 24 kHz int16 mono. The original page sends 30,720 bytes (640 ms) per request."""
MAX_BINARY_REQUEST_BYTES = 12 + MAX_NAME_BYTES + MAX_AUDIO_BYTES
"""The largest well-formed B request; anything longer is answered with an error."""
MAX_JSON_BYTES = 320 * 1024
"""Room for an ``audio_override`` of ``MAX_AUDIO_BYTES`` in base64, plus the rest."""
MAX_JSON_DEPTH = 8
MAX_VIDEO_TYPE_BYTES = 64

EXTENSION = 0x00
"""First byte of this project's own client -> gateway binary messages (docs/streams.md)."""
DEADLINE = 0x02
"""Second byte of a B request with its own deadline (``0x01`` is a stream's audio)."""
VIDEO_FRAME = 2
"""First byte of layout D. 0 and 1 are layout C; 3 and up are this project's own."""

PREDICTION_DATA = "use_binary_protocol_for_image_data"
"""What the original proxy put in a successful JSON inference answer instead of an image."""

# -- struct formats, named after the layout they belong to ----------------------------------

A_NAME_LEN = struct.Struct("<B")
A_FRAME = struct.Struct("<i")
B_U32 = struct.Struct("<I")
C_HEADER = struct.Struct("<BIII")  # success, frame_id, processing_time_ms, image/error length
D_HEADER = struct.Struct("<BIB")  # type = 2, frame_id, video_type length
D_LEN = struct.Struct("<I")
DEADLINE_HEADER = struct.Struct("<BBI")  # 0x00, 0x02, deadline_ms
_F32 = struct.Struct("<f")

_U32_MAX = 0xFFFFFFFF
_NAME_RE = re.compile(rb"[A-Za-z0-9_.\-]{1,64}")
_VIDEO_TYPE_RE = re.compile(r"[A-Za-z0-9_.\-]{1,64}")
_SURROGATE_RE = re.compile("[\ud800-\udfff]")


class ProtocolError(WireFormatError):
    """A message that breaks the browser protocol. Messages are short and lowercase."""


# -- model names -----------------------------------------------------------------------------


def valid_model_name(name: str | bytes) -> bool:
    """1..64 bytes of ``[A-Za-z0-9_.-]``, and not ``.`` or ``..`` (a name is also a
    package directory, which must never leave the models dir)."""
    raw = name.encode("utf-8", "surrogatepass") if isinstance(name, str) else name
    return _NAME_RE.fullmatch(raw) is not None and raw not in (b".", b"..")


def check_model_name(name: str | bytes) -> str:
    """``name`` as a str, or ProtocolError."""
    if not valid_model_name(name):
        raise ProtocolError("bad model name")
    return name if isinstance(name, str) else name.decode("ascii")


# -- layout A --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RequestA:
    """Layout A, the original proxy's binary inference request: ``u8 name_len | name |
    i32 frame_id``; bytes after the frame id are ignored, as the proxy did. Answered with the
    raw JPEG of the composited full frame (an empty message on error)."""

    model_name: str
    frame_id: int

    @classmethod
    def parse(cls, data: bytes) -> RequestA:
        if len(data) < 1:
            raise ProtocolError("empty message")
        n = data[0]
        if n == EXTENSION:
            raise ProtocolError("reserved extension message")
        if len(data) < 1 + n + A_FRAME.size:
            raise ProtocolError("truncated request")
        name = check_model_name(bytes(data[1 : 1 + n]))
        (frame_id,) = A_FRAME.unpack_from(data, 1 + n)
        return cls(name, frame_id)

    def serialize(self) -> bytes:
        name = check_model_name(self.model_name).encode("ascii")
        if not -(2**31) <= self.frame_id < 2**31:
            raise ProtocolError("frame id out of i32 range")
        return A_NAME_LEN.pack(len(name)) + name + A_FRAME.pack(self.frame_id)


# -- layout B --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RequestB:
    """Layout B, the original page's binary inference request: ``u32 name_len | name |
    u32 frame_id | u32 audio_len | audio`` (int16 LE mono PCM at 24 kHz; the page sends
    640 ms centred on the frame). Answered with layout C."""

    model_name: str
    frame_id: int
    audio: bytes = b""

    @classmethod
    def parse(cls, data: bytes) -> RequestB:
        if len(data) > MAX_BINARY_REQUEST_BYTES:
            raise ProtocolError("message too large")
        if len(data) < B_U32.size:
            raise ProtocolError("truncated request")
        (n,) = B_U32.unpack_from(data, 0)
        if not 1 <= n <= MAX_NAME_BYTES:
            raise ProtocolError("bad model name length")
        if len(data) < 4 + n + 8:
            raise ProtocolError("truncated request")
        name = check_model_name(bytes(data[4 : 4 + n]))
        frame_id, audio_len = struct.unpack_from("<II", data, 4 + n)
        if audio_len > MAX_AUDIO_BYTES:
            raise ProtocolError("audio too long")
        if audio_len % 2:
            raise ProtocolError("odd audio length")
        start = 12 + n
        if len(data) < start + audio_len:
            raise ProtocolError("truncated audio")
        if len(data) > start + audio_len:
            raise ProtocolError("trailing bytes")
        return cls(name, frame_id, bytes(data[start : start + audio_len]))

    def serialize(self) -> bytes:
        name = check_model_name(self.model_name).encode("ascii")
        if not 0 <= self.frame_id <= _U32_MAX:
            raise ProtocolError("frame id out of u32 range")
        return b"".join(
            (
                B_U32.pack(len(name)),
                name,
                struct.pack("<II", self.frame_id, len(self.audio)),
                self.audio,
            )
        )


@dataclass(frozen=True, slots=True)
class DeadlineRequest:
    """Ours: a layout B request that asks for its own deadline, ``u8 0 | u8 2 |
    u32 deadline_ms | B request``, answered with layout C like any B request. For clients
    that render offline (a batch job, a server-to-server client) and would rather wait
    than get ``deadline_exceeded``; the gateway bounds it (``max_deadline_ms``)."""

    deadline_ms: int
    request: RequestB

    @classmethod
    def parse(cls, data: bytes) -> DeadlineRequest:
        if len(data) < DEADLINE_HEADER.size:
            raise ProtocolError("truncated deadline request")
        marker, kind, deadline_ms = DEADLINE_HEADER.unpack_from(data, 0)
        if marker != EXTENSION or kind != DEADLINE:
            raise ProtocolError("not a deadline request")
        inner = data[DEADLINE_HEADER.size :]
        if not _is_layout_b(inner):
            raise ProtocolError("a deadline request must hold a layout B request")
        return cls(deadline_ms, RequestB.parse(inner))

    def serialize(self) -> bytes:
        return (
            DEADLINE_HEADER.pack(EXTENSION, DEADLINE, _u32(self.deadline_ms, "deadline_ms"))
            + self.request.serialize()
        )


def _is_layout_b(data: bytes) -> bool:
    return len(data) >= 4 and data[1:4] == b"\x00\x00\x00"


def parse_binary_request(data: bytes) -> RequestA | RequestB:
    """Parse a client's binary message as layout A or B (told apart by bytes 1..3).

    Raises:
        ProtocolError: empty, truncated or oversized messages, bad model names, audio that
            is too long or odd-sized, and messages whose first byte is 0x00 (this project's
            own extensions: see docs/streams.md).
    """
    if not data:
        raise ProtocolError("empty message")
    if data[0] == EXTENSION:
        raise ProtocolError("reserved extension message")
    if len(data) > MAX_BINARY_REQUEST_BYTES:
        raise ProtocolError("message too large")
    if _is_layout_b(data):
        return RequestB.parse(data)
    return RequestA.parse(data)


# -- layout C --------------------------------------------------------------------------------


def _u32(value: int, what: str) -> int:
    if not 0 <= value <= _U32_MAX:
        raise ProtocolError(f"{what} out of u32 range")
    return value


def _ms(value: float) -> int:
    """A processing time for a u32 field: rounded, clamped to 0..2**32-1."""
    if not math.isfinite(value):
        return 0
    return min(max(round(value), 0), _U32_MAX)


@dataclass(frozen=True, slots=True)
class ResponseC:
    """Layout C, success form: ``u8 1 | u32 frame_id | u32 processing_time_ms |
    u32 image_len | JPEG | u32 bounds_len_bytes | f32 x bounds_len/4``. ``bounds`` is
    ``(x1, y1, x2, y2)`` in full-frame pixels; the image is drawn there."""

    frame_id: int
    processing_time_ms: float  # rounded to a u32 on the wire
    image: bytes
    bounds: tuple[float, ...] = ()

    def serialize(self) -> bytes:
        return b"".join(
            (
                C_HEADER.pack(
                    1,
                    _u32(self.frame_id, "frame id"),
                    _ms(self.processing_time_ms),
                    len(self.image),
                ),
                self.image,
                B_U32.pack(4 * len(self.bounds)),
                struct.pack(f"<{len(self.bounds)}f", *self.bounds),
            )
        )


@dataclass(frozen=True, slots=True)
class ErrorResponseC:
    """Layout C, error form: ``u8 0 | u32 frame_id | u32 processing_time_ms | u32 error_len
    | UTF-8 error``. ``frame_id`` is 0 when the request could not be read at all."""

    frame_id: int
    processing_time_ms: float  # rounded to a u32 on the wire
    error: str

    def serialize(self) -> bytes:
        text = self.error.encode("utf-8", "replace")
        return (
            C_HEADER.pack(
                0, _u32(self.frame_id, "frame id"), _ms(self.processing_time_ms), len(text)
            )
            + text
        )


def parse_inference_response(data: bytes) -> ResponseC | ErrorResponseC:
    """Parse layout C (what a client does). The bounds section of the success form may be
    absent (the original proxy left it out when the backend failed); bytes after a complete
    message are an error."""
    if len(data) < C_HEADER.size:
        raise ProtocolError("truncated response")
    success, frame_id, ms, length = C_HEADER.unpack_from(data, 0)
    end = C_HEADER.size + length
    if len(data) < end:
        raise ProtocolError("truncated response")
    body = bytes(data[C_HEADER.size : end])
    if success == 0:
        if len(data) != end:
            raise ProtocolError("trailing bytes")
        return ErrorResponseC(frame_id, ms, body.decode("utf-8", "replace"))
    if success != 1:
        raise ProtocolError("not an inference response")
    bounds: tuple[float, ...] = ()
    if len(data) > end:
        if len(data) < end + 4:
            raise ProtocolError("truncated bounds")
        (blen,) = B_U32.unpack_from(data, end)
        if blen % 4 or len(data) != end + 4 + blen:
            raise ProtocolError("bad bounds length")
        bounds = struct.unpack_from(f"<{blen // 4}f", data, end + 4)
    return ResponseC(frame_id, ms, body, tuple(bounds))


# -- layout D --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class VideoFrameD:
    """Layout D: ``u8 2 | u32 frame_id | u8 video_type_len | video_type | u32 data_len |
    JPEG``, the answer to ``get_video_frame``."""

    frame_id: int
    video_type: str
    image: bytes

    @classmethod
    def parse(cls, data: bytes) -> VideoFrameD:
        if len(data) < D_HEADER.size:
            raise ProtocolError("truncated video frame")
        kind, frame_id, t = D_HEADER.unpack_from(data, 0)
        if kind != VIDEO_FRAME:
            raise ProtocolError("not a video frame")
        start = D_HEADER.size + t
        if len(data) < start + D_LEN.size:
            raise ProtocolError("truncated video frame")
        (n,) = D_LEN.unpack_from(data, start)
        if len(data) != start + D_LEN.size + n:
            raise ProtocolError("bad video frame length")
        video_type = bytes(data[D_HEADER.size : start]).decode("utf-8", "replace")
        return cls(frame_id, video_type, bytes(data[start + D_LEN.size :]))

    def serialize(self) -> bytes:
        vt = self.video_type.encode("utf-8")
        if len(vt) > 255:
            raise ProtocolError("video type too long")
        return b"".join(
            (
                D_HEADER.pack(VIDEO_FRAME, _u32(self.frame_id, "frame id"), len(vt)),
                vt,
                D_LEN.pack(len(self.image)),
                self.image,
            )
        )


# -- JSON requests ---------------------------------------------------------------------------

_INT32 = (-(2**31), 2**31 - 1)
_GO_FIELDS = ("type", "model_name", "frame_id", "video_type")


@dataclass(frozen=True, slots=True)
class JsonRequest:
    """A client's JSON message, with the original proxy's fields typed the way its Go
    struct read them (absent or null = zero value; keys matched case-insensitively, as
    Go's ``encoding/json`` does). ``type`` is ``""`` when absent (an inference request).
    ``audio_override`` is the decoded int16 PCM (24 kHz), or None. ``extra`` holds every
    other field, for this project's extensions (``hello``...)."""

    type: str = ""
    model_name: str = ""
    frame_id: int = 0
    video_type: str = ""
    audio_override: bytes | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)


def parse_json_request(text: str | bytes) -> JsonRequest:
    """Parse one text message.

    Raises:
        ProtocolError: over ``MAX_JSON_BYTES``, not JSON, not an object, nested deeper than
            ``MAX_JSON_DEPTH``, or a known field of the wrong type (``frame_id`` must be an
            int32, the strings strings, ``audio_override`` base64 of even length within
            ``MAX_AUDIO_BYTES``).
    """
    size = len(text.encode("utf-8", "surrogatepass")) if isinstance(text, str) else len(text)
    if size > MAX_JSON_BYTES:
        raise ProtocolError("message too large")
    try:
        data = json.loads(text, parse_constant=_reject_constant)
    except RecursionError:
        raise ProtocolError("json too deeply nested") from None
    except ValueError:  # JSONDecodeError, UnicodeDecodeError, huge ints
        raise ProtocolError("invalid json") from None
    if not isinstance(data, dict):
        raise ProtocolError("message is not a json object")
    if _depth(data) > MAX_JSON_DEPTH:
        raise ProtocolError("json too deeply nested")
    known: dict[str, Any] = {}
    extra: dict[str, Any] = {}
    for key, value in data.items():
        name = key if key in _GO_FIELDS else key.lower()
        if name in _GO_FIELDS and (key == name or name not in data):
            known[name] = value
        else:
            extra[key] = value
    audio = extra.pop("audio_override", None)
    return JsonRequest(
        type=_string(known.get("type"), "type"),
        model_name=_string(known.get("model_name"), "model_name"),
        frame_id=_int32(known.get("frame_id"), "frame_id"),
        video_type=_string(known.get("video_type"), "video_type"),
        audio_override=None if audio is None else _decode_audio(audio),
        extra=extra,
    )


def _reject_constant(name: str) -> Any:
    raise ProtocolError(f"invalid json number {name}")


def _depth(value: Any) -> int:
    """Nesting depth, iteratively (a deep value must not blow the stack here either)."""
    deepest = 0
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict | list):
            deepest = max(deepest, depth)
            if deepest > MAX_JSON_DEPTH:
                return deepest
            children = item.values() if isinstance(item, dict) else item
            stack.extend((child, depth + 1) for child in children)
    return deepest


def _string(value: Any, name: str) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise ProtocolError(f"{name} must be a string")
    return _SURROGATE_RE.sub("\ufffd", value)


def _int32(value: Any, name: str) -> int:
    if value is None:
        return 0
    if not isinstance(value, int) or isinstance(value, bool):
        raise ProtocolError(f"{name} must be an integer")
    if not _INT32[0] <= value <= _INT32[1]:
        raise ProtocolError(f"{name} out of range")
    return value


def _decode_audio(value: Any) -> bytes:
    """``audio_override``: base64 int16 PCM. The original page concatenates 16 separately
    encoded chunks, so padding may appear in the middle: each padded piece is decoded on
    its own."""
    if not isinstance(value, str):
        raise ProtocolError("audio_override must be a base64 string")
    if len(value) > (MAX_AUDIO_BYTES + 2) // 3 * 4 + 64:
        raise ProtocolError("audio too long")
    pieces = [p for p in re.split(r"(?<==)(?=[^=])", value) if p]
    try:
        audio = b"".join(base64.b64decode(p, validate=True) for p in pieces)
    except (binascii.Error, ValueError):
        raise ProtocolError("audio_override is not valid base64") from None
    if len(audio) > MAX_AUDIO_BYTES:
        raise ProtocolError("audio too long")
    if len(audio) % 2:
        raise ProtocolError("odd audio length")
    return audio


# -- JSON answers ----------------------------------------------------------------------------


class F32(float):
    """A float that was a float32 on the original wire (bounds): :func:`dumps` writes it
    in float32's shortest form, as Go does for ``[]float32``."""

    __slots__ = ()


def dumps(value: Any, *, float_repr: bool = False) -> str:
    """JSON exactly as Go's ``encoding/json.Marshal`` writes it: no spaces, dict order
    kept, ``<``, ``>``, ``&``, U+2028 and U+2029 escaped, lone surrogates replaced, non-ASCII
    raw, floats in Go's shortest form (``3`` for 3.0, exponent only below 1e-6 or from
    1e21). Non-finite floats, which Go refuses to encode, are written as 0.

    The one writer of every text message a browser gets. This project's own messages
    (``shared.streamproto``) are written the same way except for ``float_repr``: floats as
    Python writes them (``25.0``), which their pinned bytes have always had."""
    out: list[str] = []
    _encode(value, out, _repr_float if float_repr else _go_float_of)
    return "".join(out)


def _encode(value: Any, out: list[str], float_text: Callable[[float], str]) -> None:
    if value is None:
        out.append("null")
    elif value is True:
        out.append("true")
    elif value is False:
        out.append("false")
    elif isinstance(value, str):
        out.append(_go_string(value))
    elif isinstance(value, int):
        out.append(str(int(value)))
    elif isinstance(value, float):
        out.append(float_text(value))
    elif isinstance(value, Mapping):
        out.append("{")
        for i, (key, item) in enumerate(value.items()):
            if i:
                out.append(",")
            out.append(_go_string(str(key)))
            out.append(":")
            _encode(item, out, float_text)
        out.append("}")
    elif isinstance(value, list | tuple):
        out.append("[")
        for i, item in enumerate(value):
            if i:
                out.append(",")
            _encode(item, out, float_text)
        out.append("]")
    else:
        raise TypeError(f"cannot encode {type(value).__name__}")


def _go_float_of(x: float) -> str:
    return _go_float(x, 32 if isinstance(x, F32) else 64)


def _repr_float(x: float) -> str:
    return repr(float(x)) if math.isfinite(x) else "0.0"


_GO_ESCAPES = str.maketrans(
    {"<": "\\u003c", ">": "\\u003e", "&": "\\u0026", "\u2028": "\\u2028", "\u2029": "\\u2029"}
)


def _go_string(s: str) -> str:
    s = _SURROGATE_RE.sub("\ufffd", s)
    return json.dumps(s, ensure_ascii=False).translate(_GO_ESCAPES)


def _go_float(x: float, bits: int) -> str:
    if not math.isfinite(x):
        return "0"
    if bits == 32:
        x = _F32.unpack(_F32.pack(x))[0] if abs(x) <= 3.4028234663852886e38 else 0.0
        digits = _shortest32(x)
    else:
        digits = repr(x)
    if x == 0:
        return "-0" if math.copysign(1.0, x) < 0 else "0"
    d = Decimal(digits)
    if 1e-6 <= abs(x) < 1e21:
        text = format(d.normalize(), "f")
        return text
    sign, ds, exp = d.normalize().as_tuple()
    assert isinstance(exp, int)
    mantissa = str(ds[0]) + ("." + "".join(map(str, ds[1:])) if len(ds) > 1 else "")
    e = exp + len(ds) - 1
    return f"{'-' if sign else ''}{mantissa}e{'-' if e < 0 else '+'}{abs(e):02d}".replace(
        "e-0", "e-"
    )


def _shortest32(x: float) -> str:
    """The shortest decimal that reads back as the same float32."""
    for precision in range(1, 10):
        text = f"{x:.{precision - 1}e}"
        if _F32.unpack(_F32.pack(float(text)))[0] == x:
            return text
    return repr(x)


def _bounds(bounds: Sequence[float] | None) -> list[F32]:
    return [F32(b) for b in bounds or ()]


def model_list_message(models: Sequence[str]) -> str:
    return dumps({"type": "model_list", "models": list(models), "count": len(models)})


def model_list_error_message(error: str) -> str:
    return dumps({"type": "model_list", "error": error})


def metadata_message(
    model_name: str,
    frame_count: int,
    available_videos: Sequence[str],
    bounds: Sequence[float],
    audio_path: str = "",
    serving: Mapping[str, Any] | None = None,
) -> str:
    """The original answer; ``serving`` (ours, only for clients that said ``hello``) is
    appended after the original fields: how many workers hold the model and how many
    requests they may hold at once (what a pipelining client should keep in flight)."""
    message: dict[str, Any] = {
        "type": "metadata",
        "success": True,
        "model_name": model_name,
        "frame_count": frame_count,
        "available_videos": list(available_videos),
        "audio_path": audio_path,
        "bounds": _bounds(bounds),
    }
    if serving is not None:
        message["serving"] = dict(serving)
    return dumps(message)


def metadata_error_message(model_name: str, error: str) -> str:
    return dumps({"type": "metadata", "success": False, "model_name": model_name, "error": error})


def video_frame_error_message(model_name: str, frame_id: int, error: str) -> str:
    """The text answer to a ``get_video_frame`` that failed (no ``video_type``, as the
    original)."""
    return dumps(
        {"type": "video_frame", "error": error, "model_name": model_name, "frame_id": frame_id}
    )


def inference_message(
    *,
    success: bool,
    frame_id: int,
    processing_time_ms: float,
    prediction_shape: str = "",
    bounds: Sequence[float] | None = None,
    prepare_time_ms: float = 0.0,
    inference_time_ms: float = 0.0,
    composite_time_ms: float = 0.0,
    error: str = "",
) -> str:
    """The JSON inference answer (the proxy's ``JSONResponse``): ``omitempty`` fields are
    left out when empty or zero, as Go did; ``processing_time_ms`` is always there."""
    msg: dict[str, Any] = {"success": success, "frame_id": frame_id}
    if success:
        msg["prediction_data"] = PREDICTION_DATA
    if prediction_shape:
        msg["prediction_shape"] = prediction_shape
    if bounds:
        msg["bounds"] = _bounds(bounds)
    msg["processing_time_ms"] = _ms(processing_time_ms)
    for key, value in (
        ("prepare_time_ms", prepare_time_ms),
        ("inference_time_ms", inference_time_ms),
        ("composite_time_ms", composite_time_ms),
    ):
        if value:
            msg[key] = float(value)
    if error:
        msg["error"] = error
    return dumps(msg)


def protocol_ack_message() -> str:
    return dumps({"type": "protocol_ack", "message": "Binary protocol supported"})


def stats_message(fields: Mapping[str, Any]) -> str:
    return dumps({"type": "stats", **fields})


def stream_error_message(stream: Any, code: str, error: str) -> str:
    """``stream_error`` (docs/streams.md): the gateway's and a stream's own, one writer.
    ``stream`` is echoed when it is a u32 and null otherwise (the request named no readable
    stream id)."""
    if not isinstance(stream, int) or isinstance(stream, bool) or not 0 <= stream <= _U32_MAX:
        stream = None
    return dumps({"type": "stream_error", "stream": stream, "code": code, "error": error})


def unknown_type_message(message_type: str) -> str:
    return dumps({"type": "error", "error": f"Unknown message type: {message_type}"})


def error_message(error: str) -> str:
    return dumps({"type": "error", "error": error})


def hello_message(version: int, features: Sequence[str], settings: Mapping[str, Any]) -> str:
    """Answer to this project's ``hello``: the version spoken, the features offered and the
    connection's settings after the hello was applied."""
    return dumps(
        {
            "type": "hello",
            "version": version,
            "features": list(features),
            "server": "lipsync",
            **settings,
        }
    )
