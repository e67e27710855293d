"""The internal envelope spoken between gateway, broker and workers over ZeroMQ (sans-I/O).

Every message is multipart::

    [kind: 1 byte][header: msgpack map][payload frame ...]

ROUTER sockets prepend routing identities; callers strip those before ``decode`` and put
them back after ``encode``. Binary data (JPEG, PCM) always travels in payload frames, never
inside the msgpack map, so the broker can forward it without copying or parsing it.

Deadlines travel as ``ttl_ms`` (time left when the message was sent), never as an absolute
time: each hop converts it to its own monotonic clock, so hosts need no clock sync.
"""

from __future__ import annotations

import dataclasses
import functools
import threading
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any, ClassVar, TypeVar

import msgpack

from shared.errors import WireFormatError


__all__ = [
    "MAX_HEADER_BYTES",
    "Cancel",
    "Disconnect",
    "EnvelopeError",
    "Error",
    "Heartbeat",
    "Kind",
    "Message",
    "Op",
    "Ready",
    "Reply",
    "Request",
    "decode",
    "encode",
]

MAX_HEADER_BYTES = 64 * 1024
"""Headers are small maps; anything bigger is garbage or abuse."""

_UNPACK_LIMITS: dict[str, Any] = {
    "raw": False,
    "strict_map_key": True,
    "max_str_len": MAX_HEADER_BYTES,
    "max_bin_len": MAX_HEADER_BYTES,
    "max_array_len": 4096,
    "max_map_len": 4096,
    "max_ext_len": 0,
}


_unpack = functools.partial(msgpack.unpackb, **_UNPACK_LIMITS)
_local = threading.local()  # each thread's msgpack packer (one per call was a third slower)


class EnvelopeError(WireFormatError):
    """A multipart message that is not a valid envelope. Messages are short and lowercase."""


class Kind(IntEnum):
    """First frame of every message. Names are the contract; values are ours."""

    REQUEST = 0x01  # gateway -> broker -> worker
    REPLY = 0x02  # worker -> broker -> gateway
    ERROR = 0x03  # worker -> broker -> gateway, or broker -> gateway
    CANCEL = 0x04  # gateway -> broker (-> worker)
    READY = 0x05  # worker -> broker: registration, also after a broker restart
    HEARTBEAT = 0x06  # both directions on both sockets
    DISCONNECT = 0x07  # worker -> broker (leaving) or broker -> worker (re-register)


class Op:
    """Request operations (plain strings on the wire)."""

    INFER = "infer"
    VIDEO_FRAME = "video_frame"
    METADATA = "metadata"
    LIST_MODELS = "list_models"
    STATS = "stats"
    LOAD_PACKAGE = "load_package"
    UNLOAD_PACKAGE = "unload_package"

    ALL: ClassVar[frozenset[str]] = frozenset(
        {INFER, VIDEO_FRAME, METADATA, LIST_MODELS, STATS, LOAD_PACKAGE, UNLOAD_PACKAGE}
    )
    WORKER_OPS: ClassVar[frozenset[str]] = frozenset(
        {INFER, VIDEO_FRAME, LOAD_PACKAGE, UNLOAD_PACKAGE}
    )


_H = TypeVar("_H", bound="_Header")


@dataclass(slots=True)
class _Header:
    """Base of the typed headers: strict conversion from and to a msgpack map."""

    KIND: ClassVar[Kind]

    def to_map(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in _names(type(self))}

    @classmethod
    def from_map(cls: type[_H], data: dict[str, Any]) -> _H:
        kwargs: dict[str, Any] = {}
        for name, expected, required, bool_ok in _spec(cls):
            if name in data:
                value = data[name]
                if expected is not object and (
                    not isinstance(value, expected) or (type(value) is bool and not bool_ok)
                ):
                    raise EnvelopeError(f"{cls.KIND.name.lower()} header field {name!r}: bad type")
                kwargs[name] = value
            elif required:
                raise EnvelopeError(f"{cls.KIND.name.lower()} header lacks {name!r}")
        return cls(**kwargs)


_Spec = tuple[tuple[str, type | tuple[type, ...], bool, bool], ...]
_SPECS: dict[type, _Spec] = {}
_NAMES: dict[type, tuple[str, ...]] = {}


def _names(cls: type) -> tuple[str, ...]:
    """A header class's field names, looked up once (``dataclasses.fields`` per message
    was a third of a header's encoding time)."""
    names = _NAMES.get(cls)
    if names is None:
        names = _NAMES[cls] = tuple(f.name for f in dataclasses.fields(cls))
    return names


def _spec(cls: type) -> _Spec:
    """Per field: name, the types its value may have, whether it is required, whether a
    bool is allowed (bool is an int to ``isinstance``); computed once per class."""
    spec = _SPECS.get(cls)
    if spec is None:
        spec = _SPECS[cls] = tuple(
            (
                f.name,
                _FIELD_TYPES[(cls.__name__, f.name)],
                f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING,
                bool in _as_tuple(_FIELD_TYPES[(cls.__name__, f.name)]),
            )
            for f in dataclasses.fields(cls)
        )
    return spec


def _as_tuple(t: type | tuple[type, ...]) -> tuple[type, ...]:
    return t if isinstance(t, tuple) else (t,)


@dataclass(slots=True)
class Request(_Header):
    """One unit of work. ``opts`` holds op-specific options (``mode``, ``quality``,
    ``video_type``, ``audio_sr``, ``affinity``, admin arguments...); the payload holds
    the optional audio (int16 LE mono PCM)."""

    KIND: ClassVar[Kind] = Kind.REQUEST
    id: int
    op: str
    model: str = ""
    frame: int = -1
    ttl_ms: int = 2000
    opts: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class Reply(_Header):
    """A successful answer. ``result`` is op-specific structured data (metadata map, model
    list, stats...); for ``infer`` and ``video_frame`` the JPEG is payload frame 0."""

    KIND: ClassVar[Kind] = Kind.REPLY
    id: int
    worker: str = ""
    timings: dict[str, float] = field(default_factory=dict)
    bounds: list[float] | None = None
    result: Any = None


@dataclass(slots=True)
class Error(_Header):
    KIND: ClassVar[Kind] = Kind.ERROR
    id: int
    code: str
    message: str
    worker: str = ""


@dataclass(slots=True)
class Cancel(_Header):
    KIND: ClassVar[Kind] = Kind.CANCEL
    id: int


@dataclass(slots=True)
class Ready(_Header):
    """Worker registration. ``models`` maps each loaded model's name to its metadata
    (``frame_count``, ``fps``, ``videos``, ``size``, ``bounds``, ``audio``...)."""

    KIND: ClassVar[Kind] = Kind.READY
    worker: str
    capacity: int
    host: str = ""
    pid: int = 0
    device: str = ""
    backend: str = ""
    models: dict[str, dict[str, Any]] = field(default_factory=dict)


@dataclass(slots=True)
class Heartbeat(_Header):
    """Liveness. Workers add how much they hold so the broker can detect drift, and their
    own counters (``stats``: computed, expired, ...) which the broker shows in ``stats``.
    The broker adds ``instance``, an id drawn at its start: a broker restarted faster than
    the liveness period is otherwise invisible to a gateway, which would wait out the
    deadlines of requests the old one took with it."""

    KIND: ClassVar[Kind] = Kind.HEARTBEAT
    in_flight: int = 0
    stats: dict[str, Any] = field(default_factory=dict)
    instance: str = ""  # the broker's, new at each start: a peer sees a restart at once


@dataclass(slots=True)
class Disconnect(_Header):
    KIND: ClassVar[Kind] = Kind.DISCONNECT
    reason: str = ""


_HEADERS: dict[Kind, type[_Header]] = {
    h.KIND: h for h in (Request, Reply, Error, Cancel, Ready, Heartbeat, Disconnect)
}


def _runtime_type(hint: Any) -> type | tuple[type, ...]:
    """What ``isinstance`` checks a header field's value against, from its annotation:
    ``int`` -> int, ``dict[str, Any]`` -> dict, ``list[float] | None`` -> (list, None),
    ``Any`` -> object (anything)."""
    if hint is Any:
        return object
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return tuple(t for arg in typing.get_args(hint) for t in _as_tuple(_runtime_type(arg)))
    origin = typing.get_origin(hint)
    return origin if origin is not None else hint  # type: ignore[no-any-return]


_BY_BYTE: list[type[_Header] | None] = [_HEADERS.get(k) for k in range(256)]  # type: ignore[call-overload]
"""Header class by kind byte: an index, where ``Kind(byte)`` is an enum call per message."""
_KIND_BYTES: dict[int, bytes] = {k: bytes((k,)) for k in Kind}

_FIELD_TYPES: dict[tuple[str, str], type | tuple[type, ...]] = {
    (cls.__name__, name): _runtime_type(hint)
    for cls in _HEADERS.values()
    for name, hint in typing.get_type_hints(cls).items()
    if name != "KIND"
}
"""Each header field's type, derived from the dataclasses' annotations (one source)."""

Header = Request | Reply | Error | Cancel | Ready | Heartbeat | Disconnect


@dataclass(slots=True)
class Message:
    """A decoded envelope: typed header plus the untouched payload frames."""

    header: Header
    payload: list[Any] = field(default_factory=list)

    @property
    def kind(self) -> Kind:
        return self.header.KIND


def encode(header: Header, payload: Sequence[Any] = ()) -> list[Any]:
    """Frames for ``header`` followed by ``payload`` (bytes, memoryviews or zmq.Frames,
    passed through untouched so large buffers are not copied)."""
    try:
        pack = _local.pack
    except AttributeError:  # a thread's first message: a packer of its own (not thread-safe)
        pack = _local.pack = msgpack.Packer(use_bin_type=True).pack
    return [_KIND_BYTES[header.KIND], pack(header.to_map()), *payload]


def decode(frames: Sequence[Any]) -> Message:
    """Parse frames (bytes, memoryviews or zmq.Frames) into a ``Message``.

    Raises:
        EnvelopeError: for an unknown kind, a header that is not a msgpack map of the
            expected fields and types, or a header over ``MAX_HEADER_BYTES``.
    """
    if len(frames) < 2:
        raise EnvelopeError("too few frames")
    kind_frame = _as_bytes(frames[0])
    if len(kind_frame) != 1:
        raise EnvelopeError("kind frame must be one byte")
    cls = _BY_BYTE[kind_frame[0]]
    if cls is None:
        raise EnvelopeError(f"unknown kind 0x{kind_frame[0]:02x}")
    raw = _as_bytes(frames[1])
    if len(raw) > MAX_HEADER_BYTES:
        raise EnvelopeError("header too large")
    try:
        data = _unpack(raw)
    except Exception as exc:  # msgpack raises several unrelated types
        raise EnvelopeError("header is not valid msgpack") from exc
    if not isinstance(data, dict):
        raise EnvelopeError("header is not a map")
    header = cls.from_map(data)
    return Message(header, list(frames[2:]))  # type: ignore[arg-type]  # _HEADERS maps to Header


def peek_id(frames: Sequence[Any]) -> int | None:
    """Best-effort request id of a message that failed to decode, so that whoever sent it
    can still get an error answer. ``None`` when there is nothing usable."""
    try:
        data = msgpack.unpackb(_as_bytes(frames[1])[:MAX_HEADER_BYTES], **_UNPACK_LIMITS)
    except Exception:
        return None
    rid = data.get("id") if isinstance(data, dict) else None
    return rid if isinstance(rid, int) and not isinstance(rid, bool) else None


def _as_bytes(frame: Any) -> bytes | memoryview:
    if type(frame) is bytes:  # the common cases first: bytes, then a zmq.Frame
        return frame
    data = getattr(frame, "bytes", None)  # zmq.Frame: a copy, cached (small frames only)
    if type(data) is bytes:
        return data
    if isinstance(frame, bytes | memoryview | bytearray):
        return frame if not isinstance(frame, bytearray) else bytes(frame)
    raise EnvelopeError("frame is not bytes")
