"""The internal envelope: exact bytes of every kind, both ways, and what it refuses."""

from __future__ import annotations

import msgpack
import pytest

from shared.envelope import (
    MAX_HEADER_BYTES,
    Cancel,
    Disconnect,
    EnvelopeError,
    Error,
    Heartbeat,
    Kind,
    Ready,
    Reply,
    Request,
    decode,
    encode,
    peek_id,
)


def assert_envelope(header, payload, frames):
    """``header`` + ``payload`` encodes to exactly ``frames``, which decode back to them."""
    assert encode(header, payload) == frames
    message = decode(frames)
    assert message.header == header
    assert message.kind is header.KIND
    assert message.payload == list(payload)


def test_request():
    """A request: kind 0x01, header fields in declaration order, payload untouched."""
    assert_envelope(
        Request(id=1, op="infer", model="m", frame=3, ttl_ms=2000, opts={"mode": "crop"}),
        [b"PCM"],
        [
            b"\x01",
            b"\x86\xa2id\x01\xa2op\xa5infer\xa5model\xa1m\xa5frame\x03"
            b"\xa6ttl_ms\xcd\x07\xd0\xa4opts\x81\xa4mode\xa4crop",
            b"PCM",
        ],
    )


def test_reply():
    """A reply: floats travel as float64; the JPEG is its own frame."""
    assert_envelope(
        Reply(id=7, worker="w1", timings={"inference": 1.5}, bounds=[1.0, 2.0, 3.0, 4.0]),
        [b"JPEG"],
        [
            b"\x02",
            b"\x85\xa2id\x07\xa6worker\xa2w1\xa7timings\x81\xa9inference"
            b"\xcb?\xf8\x00\x00\x00\x00\x00\x00\xa6bounds\x94"
            b"\xcb?\xf0\x00\x00\x00\x00\x00\x00\xcb@\x00\x00\x00\x00\x00\x00\x00"
            b"\xcb@\x08\x00\x00\x00\x00\x00\x00\xcb@\x10\x00\x00\x00\x00\x00\x00"
            b"\xa6result\xc0",
            b"JPEG",
        ],
    )


def test_error():
    assert_envelope(
        Error(id=7, code="overloaded", message="full"),
        [],
        [b"\x03", b"\x84\xa2id\x07\xa4code\xaaoverloaded\xa7message\xa4full\xa6worker\xa0"],
    )


def test_cancel_with_large_id():
    """Ids are unbounded ints (uint64 on the wire when large)."""
    assert_envelope(
        Cancel(id=2**40), [], [b"\x04", b"\x81\xa2id\xcf\x00\x00\x01\x00\x00\x00\x00\x00"]
    )


def test_ready():
    assert_envelope(
        Ready(
            worker="h:1",
            capacity=8,
            host="h",
            pid=1,
            device="cpu",
            backend="null",
            models={"a": {"frame_count": 16}},
        ),
        [],
        [
            b"\x05",
            b"\x87\xa6worker\xa3h:1\xa8capacity\x08\xa4host\xa1h\xa3pid\x01\xa6device\xa3cpu"
            b"\xa7backend\xa4null\xa6models\x81\xa1a\x81\xabframe_count\x10",
        ],
    )


def test_heartbeat():
    assert_envelope(
        Heartbeat(), [], [b"\x06", b"\x83\xa9in_flight\x00\xa5stats\x80\xa8instance\xa0"]
    )
    assert_envelope(
        Heartbeat(in_flight=3, stats={"computed": 5}, instance="b1"),
        [],
        [b"\x06", b"\x83\xa9in_flight\x03\xa5stats\x81\xa8computed\x05\xa8instance\xa2b1"],
    )
    # a peer from before ``instance`` existed still decodes
    old = decode([b"\x06", b"\x82\xa9in_flight\x00\xa5stats\x80"]).header
    assert old == Heartbeat() and old.instance == ""


def test_disconnect():
    assert_envelope(Disconnect(reason="bye"), [], [b"\x07", b"\x81\xa6reason\xa3bye"])


def test_defaults_fill_missing_optional_fields():
    """Only required fields need to be on the wire; unknown fields are ignored."""
    message = decode([b"\x01", msgpack.packb({"id": 5, "op": "stats", "future": 1})])
    assert message.header == Request(id=5, op="stats")
    assert decode([b"\x06", b"\x80"]).header == Heartbeat()


def test_decode_accepts_memoryviews():
    frames = encode(Cancel(id=3))
    assert decode([memoryview(f) for f in frames]).header == Cancel(id=3)


@pytest.mark.parametrize(
    ("frames", "why"),
    [
        ([], "too few frames"),
        ([b"\x01"], "too few frames"),
        ([b"", b"\x80"], "kind frame must be one byte"),
        ([b"\x01\x01", b"\x80"], "kind frame must be one byte"),
        ([b"\x00", b"\x80"], "unknown kind 0x00"),
        ([b"\x08", b"\x80"], "unknown kind 0x08"),
        ([b"\xff", b"\x80"], "unknown kind 0xff"),
        ([b"\x01", b""], "header is not valid msgpack"),
        ([b"\x01", b"\xc1"], "header is not valid msgpack"),
        ([b"\x01", b"\x81\xa2id"], "header is not valid msgpack"),
        ([b"\x01", msgpack.packb({1: 2})], "header is not valid msgpack"),  # int key
        ([b"\x01", msgpack.packb([1, "infer"])], "header is not a map"),
        ([b"\x01", msgpack.packb(7)], "header is not a map"),
        ([b"\x01", msgpack.packb({"op": "infer"})], "request header lacks 'id'"),
        ([b"\x01", msgpack.packb({"id": "1", "op": "infer"})], "field 'id': bad type"),
        ([b"\x01", msgpack.packb({"id": True, "op": "infer"})], "field 'id': bad type"),
        ([b"\x01", msgpack.packb({"id": 1, "op": "x", "ttl_ms": 1.5})], "'ttl_ms': bad type"),
        ([b"\x01", msgpack.packb({"id": 1, "op": "x", "opts": []})], "'opts': bad type"),
        ([b"\x02", msgpack.packb({"id": 1, "bounds": "x"})], "'bounds': bad type"),
        ([b"\x03", msgpack.packb({"id": 1, "code": "x"})], "error header lacks 'message'"),
        ([b"\x05", msgpack.packb({"worker": "w"})], "ready header lacks 'capacity'"),
        ([b"\x05", msgpack.packb({"worker": "w", "capacity": 1, "models": [1]})], "bad type"),
        ([b"\x06", msgpack.packb({"stats": 1})], "'stats': bad type"),
        ([b"\x01", b"\xda\xff\xff" + b"x" * (MAX_HEADER_BYTES + 1)], "header too large"),
        ([b"\x01", 5], "frame is not bytes"),
    ],
)
def test_rejects(frames, why):
    """Every malformed envelope raises EnvelopeError with a short reason."""
    with pytest.raises(EnvelopeError, match=why):
        decode(frames)


def test_rejects_bin_header_keys():
    """Map keys must be strings: bytes keys do not name fields."""
    with pytest.raises(EnvelopeError):
        decode([b"\x01", msgpack.packb({b"id": 1, b"op": b"infer"}, use_bin_type=True)])


def test_kind_values_are_stable():
    """Byte values are part of the wire format: changing one breaks mixed deployments."""
    assert {k.name: k.value for k in Kind} == {
        "REQUEST": 1,
        "REPLY": 2,
        "ERROR": 3,
        "CANCEL": 4,
        "READY": 5,
        "HEARTBEAT": 6,
        "DISCONNECT": 7,
    }


@pytest.mark.parametrize(
    ("frames", "expected"),
    [
        ([b"\x01", msgpack.packb({"id": 42, "op": 3})], 42),  # bad op type, id usable
        ([b"\x09", msgpack.packb({"id": 42})], 42),  # unknown kind, id usable
        ([b"\x01", msgpack.packb({"id": "42"})], None),
        ([b"\x01", msgpack.packb({"id": True})], None),
        ([b"\x01", msgpack.packb([42])], None),
        ([b"\x01", b"\xc1garbage"], None),
        ([b"\x01"], None),
        ([b"\x01", 5], None),
    ],
)
def test_peek_id(frames, expected):
    """The id of a message that failed to decode, when one can be trusted."""
    assert peek_id(frames) == expected


def test_header_field_types_come_from_the_annotations():
    """The strict decoder's table of field types is derived from the dataclasses; it must
    say what the hand-written table said (any drift would change what is accepted)."""
    from shared.envelope import _FIELD_TYPES

    expected = {
        "Request": {"id": int, "op": str, "model": str, "frame": int, "ttl_ms": int, "opts": dict},
        "Reply": {
            "id": int,
            "worker": str,
            "timings": dict,
            "bounds": (list, type(None)),
            "result": object,
        },
        "Error": {"id": int, "code": str, "message": str, "worker": str},
        "Cancel": {"id": int},
        "Ready": {
            "worker": str,
            "capacity": int,
            "host": str,
            "pid": int,
            "device": str,
            "backend": str,
            "models": dict,
        },
        "Heartbeat": {"in_flight": int, "stats": dict, "instance": str},
        "Disconnect": {"reason": str},
    }
    assert {(c, f): t for c, fs in expected.items() for f, t in fs.items()} == _FIELD_TYPES


def test_every_wire_format_error_is_one_kind():
    from shared.browser import ProtocolError
    from shared.errors import WireFormatError
    from shared.streamproto import StreamProtocolError

    for cls in (EnvelopeError, ProtocolError, StreamProtocolError):
        assert issubclass(cls, WireFormatError) and issubclass(cls, ValueError)
