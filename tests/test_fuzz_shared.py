"""Property tests of the sans-I/O parsers in shared/ that the other test modules do not fuzz.

- ``shared.envelope`` (pinned by test_envelope.py, fuzzed only through the broker's socket
  in test_broker.py): ``decode`` raises ``EnvelopeError`` and nothing else, whatever the
  frames; what it accepts has the documented field types; every valid header survives
  ``encode`` -> ``decode``; ``peek_id`` never raises and returns an int or None.
- ``shared.browser`` (random bytes fuzzed in test_browser_protocol.py): every layout
  round-trips (``parse(serialize(x)) == x``) over its whole value range, and JSON requests
  read their fields back whatever their spelling (Go's case-insensitive keys).

streamproto's parsers are fuzzed in test_streamproto.py.
"""

from __future__ import annotations

import base64
import dataclasses
import json

import msgpack
from hypothesis import HealthCheck, given, settings, strategies as st

from shared import envelope
from shared.browser import (
    MAX_AUDIO_BYTES,
    ErrorResponseC,
    ProtocolError,
    RequestA,
    ResponseC,
    VideoFrameD,
    parse_binary_request,
    parse_inference_response,
    parse_json_request,
)
from shared.envelope import (
    Cancel,
    Disconnect,
    EnvelopeError,
    Error,
    Heartbeat,
    Kind,
    Message,
    Ready,
    Reply,
    Request,
    decode,
    encode,
    peek_id,
)


FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# -- strategies --------------------------------------------------------------------------------

_scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=True)
    | st.text(max_size=12)
    | st.binary(max_size=12)
)
_msgpack_values = st.recursive(
    _scalars,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(
            st.text(max_size=8) | st.binary(max_size=4) | st.integers(-9, 9), inner, max_size=4
        )
    ),
    max_leaves=12,
)
_field_names = st.sampled_from(
    sorted({f.name for h in envelope._HEADERS.values() for f in dataclasses.fields(h)})
)
_header_maps = st.dictionaries(_field_names | st.text(max_size=6), _msgpack_values, max_size=8)
_kinds = st.sampled_from([bytes([k]) for k in Kind]) | st.binary(max_size=3)
_packed = st.builds(lambda v: msgpack.packb(v, use_bin_type=True), _header_maps | _msgpack_values)
_frames = st.lists(st.binary(max_size=40), max_size=5) | st.builds(
    lambda kind, header, payload: [kind, header, *payload],
    _kinds,
    _packed | st.binary(max_size=60),
    st.lists(st.binary(max_size=8), max_size=2),
)

_str = st.text(max_size=20)
_int = st.integers(-(2**63), 2**63 - 1)
_opts = st.dictionaries(st.text(max_size=8), _scalars.filter(lambda v: v == v), max_size=4)
_headers = st.one_of(
    st.builds(Request, id=_int, op=_str, model=_str, frame=_int, ttl_ms=_int, opts=_opts),
    st.builds(
        Reply,
        id=_int,
        worker=_str,
        timings=st.dictionaries(st.text(max_size=8), st.floats(-1e9, 1e9), max_size=4),
        bounds=st.none() | st.lists(st.floats(-1e6, 1e6), max_size=4),
        result=_scalars.filter(lambda v: v == v) | _opts,
    ),
    st.builds(Error, id=_int, code=_str, message=_str, worker=_str),
    st.builds(Cancel, id=_int),
    st.builds(
        Ready,
        worker=_str,
        capacity=_int,
        host=_str,
        pid=_int,
        device=_str,
        backend=_str,
        models=st.dictionaries(st.text(max_size=8), _opts, max_size=3),
    ),
    st.builds(Heartbeat, in_flight=_int, stats=_opts),
    st.builds(Disconnect, reason=_str),
)


# -- envelope ------------------------------------------------------------------------------------


def _check_types(message: Message) -> None:
    """What ``decode`` accepts has the types its header declares (bool is never an int)."""
    header = message.header
    for f in dataclasses.fields(header):
        expected = envelope._FIELD_TYPES[(type(header).__name__, f.name)]
        value = getattr(header, f.name)
        if expected is object:
            continue
        types = expected if isinstance(expected, tuple) else (expected,)
        assert isinstance(value, types), (f.name, value)
        assert not (isinstance(value, bool) and bool not in types), (f.name, value)


@FUZZ
@given(_frames)
def test_decode_raises_only_envelope_error(frames):
    try:
        message = decode(frames)
    except EnvelopeError as exc:
        assert str(exc) and str(exc) == str(exc).lower()
        return
    _check_types(message)
    assert message.payload == frames[2:]


@FUZZ
@given(_headers, st.lists(st.binary(max_size=16), max_size=3))
def test_every_valid_header_round_trips(header, payload):
    message = decode(encode(header, payload))
    assert message.header == header
    assert message.kind is header.KIND
    assert message.payload == payload


@FUZZ
@given(_headers, st.data())
def test_mutated_headers_decode_or_are_refused(header, data):
    frames = encode(header)
    raw = bytearray(frames[1])
    for _ in range(data.draw(st.integers(1, 4))):
        if not raw:
            break
        i = data.draw(st.integers(0, len(raw) - 1))
        raw[i] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(raw)))
    try:
        message = decode([frames[0], bytes(raw[:cut])])
    except EnvelopeError:
        return
    _check_types(message)


@FUZZ
@given(_frames | st.lists(_scalars, max_size=3))
def test_peek_id_never_raises(frames):
    rid = peek_id(frames)
    assert rid is None or (isinstance(rid, int) and not isinstance(rid, bool))


@FUZZ
@given(_int)
def test_peek_id_finds_the_id_of_a_broken_request(rid):
    frames = [b"\x01", msgpack.packb({"id": rid, "op": 7})]
    assert peek_id(frames) == rid
    try:
        decode(frames)
    except EnvelopeError:
        pass
    else:
        raise AssertionError("an int op must be refused")


# -- browser layouts -----------------------------------------------------------------------------

_names = st.text(alphabet="abcxyzABCXYZ0189_.-", min_size=1, max_size=64).filter(
    lambda s: s not in (".", "..")
)
_u32 = st.integers(0, 2**32 - 1)
_f32 = st.floats(width=32, allow_nan=False, allow_infinity=False)


@FUZZ
@given(_names, st.integers(-(2**31), 2**31 - 1), st.binary(max_size=6))
def test_a_round_trips(name, frame_id, tail):
    data = RequestA(name, frame_id).serialize()
    assert parse_binary_request(data) == RequestA(name, frame_id)
    assert parse_binary_request(data + tail) == RequestA(name, frame_id)  # the rest is ignored


@FUZZ
@given(_u32, _u32, st.binary(max_size=64), st.lists(_f32, max_size=6))
def test_c_round_trips(frame_id, ms, image, bounds):
    c = ResponseC(frame_id, ms, image, tuple(bounds))
    assert parse_inference_response(c.serialize()) == c


@FUZZ
@given(_u32, _u32, st.text(max_size=40))
def test_c_error_round_trips(frame_id, ms, error):
    e = ErrorResponseC(frame_id, ms, error)
    parsed = parse_inference_response(e.serialize())
    assert parsed == ErrorResponseC(frame_id, ms, error.encode("utf-8", "replace").decode())


@FUZZ
@given(_u32, st.text(max_size=30).filter(lambda t: len(t.encode()) <= 255), st.binary(max_size=64))
def test_d_round_trips(frame_id, video_type, image):
    d = VideoFrameD(frame_id, video_type, image)
    assert VideoFrameD.parse(d.serialize()) == d


def _spellings(key: str) -> st.SearchStrategy[str]:
    return st.sampled_from([key, key.upper(), key.title(), key.swapcase()])


@FUZZ
@given(
    st.text(max_size=20),
    st.text(max_size=20),
    st.integers(-(2**31), 2**31 - 1),
    st.text(max_size=20),
    st.binary(max_size=64).map(lambda b: b[: len(b) // 2 * 2]),
    st.data(),
)
def test_json_fields_read_back_in_any_spelling(kind, model, frame_id, video_type, audio, data):
    fields = {"type": kind, "model_name": model, "frame_id": frame_id, "video_type": video_type}
    message = {data.draw(_spellings(k)): v for k, v in fields.items()}
    if audio:
        message["audio_override"] = base64.b64encode(audio).decode()
    request = parse_json_request(json.dumps(message))
    assert request.type == kind
    assert request.model_name == model
    assert request.video_type == video_type
    assert request.frame_id == frame_id
    assert request.audio_override == (audio or None)


@FUZZ
@given(st.integers(MAX_AUDIO_BYTES - 4, MAX_AUDIO_BYTES + 4))
def test_json_audio_limit_is_exact(size):
    text = json.dumps({"model_name": "m", "audio_override": base64.b64encode(bytes(size)).decode()})
    try:
        request = parse_json_request(text)
    except ProtocolError as exc:
        assert size > MAX_AUDIO_BYTES or size % 2, exc
        return
    assert size <= MAX_AUDIO_BYTES and size % 2 == 0
    assert request.audio_override == bytes(size)
