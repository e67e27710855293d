"""shared/browser.py: every layout pinned to literal bytes both ways, the JSON answers pinned
to the text the original Go proxy wrote, and fuzzed parsers that only ever raise
ProtocolError."""

from __future__ import annotations

import base64
import json
import struct

import pytest
from hypothesis import given, settings, strategies as st

from shared.browser import (
    MAX_AUDIO_BYTES,
    MAX_BINARY_REQUEST_BYTES,
    MAX_JSON_BYTES,
    DeadlineRequest,
    ErrorResponseC,
    JsonRequest,
    ProtocolError,
    RequestA,
    RequestB,
    ResponseC,
    VideoFrameD,
    dumps,
    error_message,
    hello_message,
    inference_message,
    metadata_error_message,
    metadata_message,
    model_list_error_message,
    model_list_message,
    parse_binary_request,
    parse_inference_response,
    parse_json_request,
    protocol_ack_message,
    stats_message,
    unknown_type_message,
    valid_model_name,
    video_frame_error_message,
)


# -- layout A ------------------------------------------------------------------------------

A_BYTES = b"\x07sanders\x0c\x00\x00\x00"


def test_a_parse():
    assert parse_binary_request(A_BYTES) == RequestA("sanders", 12)


def test_a_serialize():
    assert RequestA("sanders", 12).serialize() == A_BYTES


def test_a_negative_frame_and_rest_ignored():
    data = b"\x01x\xff\xff\xff\xff" + b"anything after the frame id"
    assert parse_binary_request(data) == RequestA("x", -1)


def test_a_truncated():
    with pytest.raises(ProtocolError, match="truncated"):
        parse_binary_request(A_BYTES[:-1])


def test_a_bad_name():
    with pytest.raises(ProtocolError, match="bad model name"):
        parse_binary_request(b"\x03a/b\x00\x00\x00\x00")


# -- layout B ------------------------------------------------------------------------------

B_BYTES = (
    b"\x07\x00\x00\x00"  # name length
    b"sanders"
    b"\xe8\x03\x00\x00"  # frame 1000
    b"\x04\x00\x00\x00"  # audio length
    b"\x01\x00\xff\x7f"  # two samples: 1, 32767
)


def test_b_parse():
    assert parse_binary_request(B_BYTES) == RequestB("sanders", 1000, b"\x01\x00\xff\x7f")


def test_b_serialize():
    assert RequestB("sanders", 1000, b"\x01\x00\xff\x7f").serialize() == B_BYTES


def test_b_original_page_size():
    audio = bytes(30_720)  # 16 chunks of 960 samples
    data = RequestB("sanders", 3, audio).serialize()
    assert len(data) == 30_739
    assert parse_binary_request(data).audio == audio


def test_b_without_audio():
    data = b"\x01\x00\x00\x00d\x05\x00\x00\x00\x00\x00\x00\x00"
    assert parse_binary_request(data) == RequestB("d", 5, b"")


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (B_BYTES[:-1], "truncated audio"),
        (B_BYTES + b"\x00", "trailing bytes"),
        (b"\x41\x00\x00\x00" + b"a" * 65 + bytes(8), "bad model name length"),
        (b"\x01\x00\x00\x00a\x00\x00\x00\x00\x03\x00\x00\x00abc", "odd audio length"),
        (
            b"\x01\x00\x00\x00a\x00\x00\x00\x00" + struct.pack("<I", MAX_AUDIO_BYTES + 2),
            "audio too long",
        ),
        (b"\x01\x00\x00\x00a\x00\x00\x00", "truncated request"),
    ],
)
def test_b_rejects(data, message):
    with pytest.raises(ProtocolError, match=message):
        parse_binary_request(data)


def test_extension_byte_is_reserved():
    with pytest.raises(ProtocolError, match="reserved extension"):
        parse_binary_request(b"\x00\x01\x00\x00\x00\x00")


def test_too_large():
    with pytest.raises(ProtocolError, match="too large"):
        parse_binary_request(b"\x01" + bytes(MAX_BINARY_REQUEST_BYTES))


def test_empty():
    with pytest.raises(ProtocolError, match="empty"):
        parse_binary_request(b"")


@pytest.mark.parametrize(
    ("name", "ok"),
    [
        ("a", True),
        ("sanders_v2.1-x", True),
        ("A" * 64, True),
        ("A" * 65, False),
        ("", False),
        (".", False),
        ("..", False),
        ("a/b", False),
        ("é", False),
        ("a b", False),
    ],
)
def test_model_names(name, ok):
    assert valid_model_name(name) is ok


# -- layout C ------------------------------------------------------------------------------

C_BYTES = (
    b"\x01"
    b"\x05\x00\x00\x00"  # frame 5
    b"\x2a\x00\x00\x00"  # 42 ms
    b"\x03\x00\x00\x00"  # image length
    b"JPG"
    b"\x10\x00\x00\x00" + struct.pack("<4f", 480.0, 160.0, 800.0, 480.0)  # 16 bytes of bounds
)
C_ERROR_BYTES = b"\x00\x09\x00\x00\x00\x01\x00\x00\x00\x04\x00\x00\x00oops"


def test_c_serialize():
    assert ResponseC(5, 42, b"JPG", (480.0, 160.0, 800.0, 480.0)).serialize() == C_BYTES


def test_c_parse():
    assert parse_inference_response(C_BYTES) == ResponseC(5, 42, b"JPG", (480, 160, 800, 480))


def test_c_error_serialize():
    assert ErrorResponseC(9, 1, "oops").serialize() == C_ERROR_BYTES


def test_c_error_parse():
    assert parse_inference_response(C_ERROR_BYTES) == ErrorResponseC(9, 1, "oops")


def test_c_without_bounds_section():
    # the original proxy sent success=1, image_len=0 and no bounds when the backend failed
    data = b"\x01\x05\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00"
    assert parse_inference_response(data) == ResponseC(5, 0, b"", ())


def test_c_processing_time_is_clamped():
    data = ResponseC(1, 2**40, b"", ()).serialize()
    assert data[5:9] == b"\xff\xff\xff\xff"


@pytest.mark.parametrize(
    "data",
    [b"\x01\x00", C_BYTES[:-1], C_BYTES + b"\x00", C_ERROR_BYTES[:-1], b"\x07" + bytes(12)],
)
def test_c_parse_rejects(data):
    with pytest.raises(ProtocolError):
        parse_inference_response(data)


# -- layout D ------------------------------------------------------------------------------

D_BYTES = b"\x02\x07\x00\x00\x00\x09full_body\x03\x00\x00\x00JPG"


def test_d_serialize():
    assert VideoFrameD(7, "full_body", b"JPG").serialize() == D_BYTES


def test_d_parse():
    assert VideoFrameD.parse(D_BYTES) == VideoFrameD(7, "full_body", b"JPG")


@pytest.mark.parametrize("data", [D_BYTES[:-1], D_BYTES + b"x", b"\x01" + D_BYTES[1:], b"\x02"])
def test_d_parse_rejects(data):
    with pytest.raises(ProtocolError):
        VideoFrameD.parse(data)


# -- JSON requests -------------------------------------------------------------------------


def test_json_inference_without_type():
    req = parse_json_request('{"model_name":"sanders","frame_id":3}')
    assert req == JsonRequest(type="", model_name="sanders", frame_id=3)


def test_json_go_semantics():
    # null is the zero value, keys match case-insensitively (exact keys win)
    req = parse_json_request('{"TYPE":"get_metadata","Model_Name":"a","frame_id":null}')
    assert (req.type, req.model_name, req.frame_id) == ("get_metadata", "a", 0)
    req = parse_json_request('{"model_name":"exact","MODEL_NAME":"folded"}')
    assert req.model_name == "exact"


def test_json_extra_fields_kept():
    req = parse_json_request('{"type":"hello","version":1,"mode_a":"crop"}')
    assert dict(req.extra) == {"version": 1, "mode_a": "crop"}


def test_json_audio_override_concatenated_chunks():
    # the original page concatenates separately encoded chunks; padding may sit in between
    chunks = [b"\x01\x02\x03\x04", b"\x05\x06"]
    text = "".join(base64.b64encode(c).decode() for c in chunks)
    assert "=" in text[:-1]
    req = parse_json_request(json.dumps({"model_name": "a", "audio_override": text}))
    assert req.audio_override == b"\x01\x02\x03\x04\x05\x06"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("{", "invalid json"),
        ("[1]", "not a json object"),
        ('"x"', "not a json object"),
        ('{"frame_id":1.5}', "frame_id must be an integer"),
        ('{"frame_id":true}', "frame_id must be an integer"),
        ('{"frame_id":2147483648}', "frame_id out of range"),
        ('{"type":3}', "type must be a string"),
        ('{"model_name":["a"]}', "model_name must be a string"),
        ('{"frame_id":NaN}', "invalid json"),
        ('{"audio_override":"@@@@"}', "not valid base64"),
        ('{"audio_override":"AA=="}', "odd audio length"),
        ('{"audio_override":5}', "base64 string"),
        ('{"a":' * 9 + "1" + "}" * 9, "too deeply nested"),
        ("[" * 100_000 + "]" * 100_000, "too"),
        ("1" * 5000, "invalid json"),
    ],
)
def test_json_rejects(text, message):
    with pytest.raises(ProtocolError, match=message):
        parse_json_request(text)


def test_json_size_limit():
    with pytest.raises(ProtocolError, match="too large"):
        parse_json_request('{"x":"' + "a" * MAX_JSON_BYTES + '"}')


# -- JSON answers: the text the original proxy wrote ---------------------------------------


def test_inference_success_text():
    text = inference_message(
        success=True,
        frame_id=12,
        processing_time_ms=35.6,
        prediction_shape="320x320x3",
        bounds=[480.0, 160.0, 800.0, 480.5],
        prepare_time_ms=1.25,
        inference_time_ms=20.0,
        composite_time_ms=0.0,
    )
    assert text == (
        '{"success":true,"frame_id":12,"prediction_data":"use_binary_protocol_for_image_data",'
        '"prediction_shape":"320x320x3","bounds":[480,160,800,480.5],"processing_time_ms":36,'
        '"prepare_time_ms":1.25,"inference_time_ms":20}'
    )


def test_inference_error_text():
    text = inference_message(success=False, frame_id=7, processing_time_ms=0, error="boom")
    assert text == '{"success":false,"frame_id":7,"processing_time_ms":0,"error":"boom"}'


def test_model_list_text():
    assert model_list_message(["a", "b"]) == '{"type":"model_list","models":["a","b"],"count":2}'
    assert model_list_error_message("x") == '{"type":"model_list","error":"x"}'


def test_metadata_text():
    assert metadata_message("a", 16, ["full_body"], [1.5, 2, 3, 0.1]) == (
        '{"type":"metadata","success":true,"model_name":"a","frame_count":16,'
        '"available_videos":["full_body"],"audio_path":"","bounds":[1.5,2,3,0.1]}'
    )
    # ours, for clients that said hello: appended after the original fields
    serving = {"workers": 2, "capacity": 16}
    assert metadata_message("a", 16, ["full_body"], [1, 2, 3, 4], serving=serving) == (
        '{"type":"metadata","success":true,"model_name":"a","frame_count":16,'
        '"available_videos":["full_body"],"audio_path":"","bounds":[1,2,3,4],'
        '"serving":{"workers":2,"capacity":16}}'
    )
    assert metadata_error_message("a", "e") == (
        '{"type":"metadata","success":false,"model_name":"a","error":"e"}'
    )


def test_video_frame_error_text():
    assert video_frame_error_message("a", 3, "e") == (
        '{"type":"video_frame","error":"e","model_name":"a","frame_id":3}'
    )


def test_small_messages_text():
    assert protocol_ack_message() == (
        '{"type":"protocol_ack","message":"Binary protocol supported"}'
    )
    assert unknown_type_message("x<y>") == (
        '{"type":"error","error":"Unknown message type: x\\u003cy\\u003e"}'
    )
    assert error_message("é & \u2028") == '{"type":"error","error":"é \\u0026 \\u2028"}'
    assert stats_message({"total_requests": 1}) == '{"type":"stats","total_requests":1}'
    assert hello_message(1, ["a"], {"mode_a": "composite"}) == (
        '{"type":"hello","version":1,"features":["a"],"server":"lipsync","mode_a":"composite"}'
    )


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (0.0, "0"),
        (3.0, "3"),
        (-2.5, "-2.5"),
        (1e20, "100000000000000000000"),
        (1e21, "1e+21"),
        (1.5e-7, "1.5e-7"),
        (1e-10, "1e-10"),
        (0.000001, "0.000001"),
        (123456.789, "123456.789"),
        (float("nan"), "0"),
    ],
)
def test_go_floats(value, text):
    assert dumps(value) == text


def test_lone_surrogates_become_replacement_characters():
    req = parse_json_request('{"type":"\\ud800x"}')
    assert unknown_type_message(req.type).encode("utf-8")


# -- fuzz: parsers raise ProtocolError and nothing else -------------------------------------


# -- ours: a B request with its own deadline ---------------------------------------------------


def test_deadline_request_bytes_both_ways():
    data = b"\x00\x02" + struct.pack("<I", 60_000) + B_BYTES
    wrapped = DeadlineRequest(60_000, RequestB.parse(B_BYTES))
    assert wrapped.serialize() == data
    assert DeadlineRequest.parse(data) == wrapped


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"\x00\x02\x10\x27", "truncated deadline request"),
        (b"\x00\x01" + struct.pack("<I", 5) + B_BYTES, "not a deadline request"),
        (b"\x00\x02" + struct.pack("<I", 5) + A_BYTES, "must hold a layout B request"),
        (b"\x00\x02" + struct.pack("<I", 5), "must hold a layout B request"),
        (b"\x00\x02" + struct.pack("<I", 5) + B_BYTES + b"x", "trailing bytes"),
    ],
)
def test_deadline_request_rejects(data, message):
    with pytest.raises(ProtocolError, match=message):
        DeadlineRequest.parse(data)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=120))
def test_fuzz_deadline_request(data):
    try:
        DeadlineRequest.parse(b"\x00\x02" + data)
    except ProtocolError:
        pass


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=200))
def test_fuzz_binary_request(data):
    try:
        parse_binary_request(data)
    except ProtocolError:
        pass


@settings(max_examples=200, deadline=None)
@given(st.sampled_from([A_BYTES, B_BYTES]), st.integers(0, 40), st.binary(max_size=8))
def test_fuzz_binary_request_mutations(base, cut, tail):
    data = base[: len(base) - cut] + tail
    try:
        req = parse_binary_request(data)
    except ProtocolError:
        return
    assert isinstance(req, RequestA | RequestB)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=120))
def test_fuzz_responses(data):
    for parse in (parse_inference_response, VideoFrameD.parse):
        try:
            parse(data)
        except ProtocolError:
            pass


_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=8,
)


@settings(max_examples=100, deadline=None)
@given(
    st.dictionaries(
        st.sampled_from(["type", "model_name", "frame_id", "video_type", "audio_override", "x"]),
        _json_values,
    )
)
def test_fuzz_json_objects(obj):
    try:
        parse_json_request(json.dumps(obj))
    except ProtocolError:
        pass


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=100) | st.binary(max_size=100))
def test_fuzz_json_text(text):
    try:
        parse_json_request(text)
    except ProtocolError:
        pass


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet="abcXYZ019_.-", min_size=1, max_size=64), st.integers(0, 2**32 - 1))
def test_roundtrip_b(name, frame):
    if not valid_model_name(name):
        return
    req = RequestB(name, frame, b"\x00\x01" * 3)
    assert parse_binary_request(req.serialize()) == req
