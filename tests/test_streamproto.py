"""Stream wire formats (docs/streams.md) pinned to literal bytes, the JSON messages and their
limits, the shared timing arithmetic, and fuzzing: the parsers raise only
``StreamProtocolError``, whatever the input."""

from __future__ import annotations

import json
import struct

import pytest
from hypothesis import given, settings, strategies as st

from shared import streamtime as t
from shared.streamproto import (
    FLAG_COMPOSITE,
    FLAG_IDLE,
    FLAG_NO_IMAGE,
    MAX_CHUNK_BYTES,
    AudioChunk,
    StreamInterrupt,
    StreamProtocolError,
    StreamStart,
    StreamStop,
    TaggedFrame,
    encode_audio_chunk,
    encode_tagged_frame,
    is_audio_chunk,
    parse_audio_chunk,
    parse_stream_request,
    parse_tagged_frame,
    stream_ended_message,
    stream_error_message,
    stream_interrupted_message,
    stream_started_message,
)


# -- audio chunks ---------------------------------------------------------------------------


def test_audio_chunk_bytes_pinned():
    data = bytes.fromhex("0001 78563412 0100 ffff".replace(" ", ""))
    chunk = parse_audio_chunk(data)
    assert chunk == AudioChunk(stream=0x12345678, pcm=b"\x01\x00\xff\xff")
    assert encode_audio_chunk(0x12345678, b"\x01\x00\xff\xff") == data
    assert is_audio_chunk(data)
    assert not is_audio_chunk(b"\x05tiny\x00\x00\x00\x00")  # layout A
    assert not is_audio_chunk(b"")


def test_audio_chunk_may_be_empty():
    assert parse_audio_chunk(b"\x00\x01\x07\x00\x00\x00") == AudioChunk(7, b"")


@pytest.mark.parametrize(
    ("data", "message", "stream"),
    [
        (b"\x00\x01\x07\x00\x00", "shorter than its header", None),
        (b"\x01\x01\x07\x00\x00\x00", "not an extension message", None),
        (b"\x00\x02\x07\x00\x00\x00", "unknown extension message kind 2", 7),
        (b"\x00\x01\x07\x00\x00\x00\x01", "odd number of bytes", 7),
        (b"\x00\x01\x07\x00\x00\x00" + bytes(MAX_CHUNK_BYTES + 2), "longer than one second", 7),
    ],
    ids=["short", "marker", "kind", "odd", "long"],
)
def test_audio_chunk_rejected(data, message, stream):
    with pytest.raises(StreamProtocolError, match=message) as info:
        parse_audio_chunk(data)
    assert info.value.stream == stream


def test_audio_chunk_of_exactly_one_second_at_48k_is_accepted():
    chunk = parse_audio_chunk(b"\x00\x01\x01\x00\x00\x00" + bytes(MAX_CHUNK_BYTES))
    assert len(chunk.pcm) == 96_000


# -- tagged frames ----------------------------------------------------------------------------


def test_tagged_frame_bytes_pinned():
    frame = TaggedFrame(
        stream=5,
        seq=2,
        frame_id=9,
        audio_ms=80,
        flags=FLAG_COMPOSITE,
        bounds=(1.0, 2.5, 300.0, 400.0),
        processing_us=1234,
        worker="w1",
        image=b"\xff\xd8JPEG",
    )
    expected = (
        b"\x03"
        + b"\x05\x00\x00\x00"  # stream
        + b"\x02\x00\x00\x00"  # seq
        + b"\x09\x00\x00\x00"  # frame id
        + b"\x50\x00\x00\x00"  # audio ms
        + b"\x02"  # flags
        + struct.pack("<4f", 1.0, 2.5, 300.0, 400.0)
        + b"\xd2\x04\x00\x00"  # processing us
        + b"\x02w1"
        + b"\x06\x00\x00\x00\xff\xd8JPEG"
    )
    assert encode_tagged_frame(frame) == expected
    # the documented offsets
    assert expected[17] == FLAG_COMPOSITE
    assert struct.unpack_from("<I", expected, 34) == (1234,)
    assert expected[38] == 2
    assert parse_tagged_frame(expected) == frame
    assert not frame.idle and frame.composite and not frame.no_image


def test_tagged_idle_crop_frame_has_no_image():
    frame = TaggedFrame(7, 0, 3, 0, FLAG_IDLE | FLAG_NO_IMAGE, (0, 0, 320, 240), 0, "", b"")
    data = encode_tagged_frame(frame)
    assert len(data) == 38 + 1 + 0 + 4
    back = parse_tagged_frame(data)
    assert back.idle and back.no_image and back.image == b""


def test_tagged_frame_clamps_and_cuts():
    frame = TaggedFrame(1, 2**40, 0, -5, 0, (0, 0, 1, 1), 10**12, "é" * 200, b"")
    back = parse_tagged_frame(encode_tagged_frame(frame))
    assert back.seq == 0xFFFFFFFF and back.audio_ms == 0 and back.processing_us == 0xFFFFFFFF
    assert back.worker == "é" * 127  # 254 bytes: cut on a character boundary


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"\x03" + bytes(37), "shorter than its header"),
        (b"\x02" + bytes(42), "not a tagged frame"),
        (b"\x03" + bytes(37) + b"\x05ab", "truncated"),
        (b"\x03" + bytes(37) + b"\x01\xff\x00\x00\x00\x00", "not utf-8"),
        (b"\x03" + bytes(37) + b"\x00\x02\x00\x00\x00x", "does not match"),
        (b"\x03" + bytes(37) + b"\x00\x00\x00\x00\x00x", "does not match"),
    ],
    ids=["short", "kind", "worker", "utf8", "image-short", "image-long"],
)
def test_tagged_frame_rejected(data, message):
    with pytest.raises(StreamProtocolError, match=message):
        parse_tagged_frame(data)


# -- JSON requests ----------------------------------------------------------------------------


def test_stream_start_defaults_and_fields():
    assert parse_stream_request({"type": "stream_start", "model_name": "tiny"}) == StreamStart(
        "tiny", 16000, "crop", 80, None
    )
    full = {
        "type": "stream_start",
        "model_name": "a.b-c_1",
        "sample_rate": 48000,
        "mode": "composite",
        "quality": 100,
        "stream": 4294967295,
        "future_field": [1, 2],
    }
    assert parse_stream_request(full) == StreamStart("a.b-c_1", 48000, "composite", 100, 2**32 - 1)
    assert parse_stream_request({"type": "stream_stop", "stream": 0}) == StreamStop(0)
    assert parse_stream_request({"type": "stream_interrupt", "stream": 9}) == StreamInterrupt(9)


@pytest.mark.parametrize(
    ("message", "error", "stream"),
    [
        ({"type": "stream_start"}, "model_name", None),
        ({"type": "stream_start", "model_name": "../etc", "stream": 3}, "model_name", 3),
        ({"type": "stream_start", "model_name": "x" * 65}, "model_name", None),
        ({"type": "stream_start", "model_name": "m", "sample_rate": 22050}, "sample_rate", None),
        ({"type": "stream_start", "model_name": "m", "sample_rate": True}, "sample_rate", None),
        ({"type": "stream_start", "model_name": "m", "sample_rate": 16000.0}, "sample_rate", None),
        ({"type": "stream_start", "model_name": "m", "mode": "full"}, "mode", None),
        ({"type": "stream_start", "model_name": "m", "mode": ["crop"]}, "mode", None),
        ({"type": "stream_start", "model_name": "m", "quality": 0, "stream": 1}, "quality", 1),
        ({"type": "stream_start", "model_name": "m", "quality": 101}, "quality", None),
        ({"type": "stream_start", "model_name": "m", "stream": -1}, "u32", None),
        ({"type": "stream_start", "model_name": "m", "stream": 2**32}, "u32", None),
        ({"type": "stream_stop"}, "u32", None),
        ({"type": "stream_stop", "stream": "1"}, "u32", None),
        ({"type": "stream_interrupt", "stream": 1.5}, "u32", None),
        ({"type": "inference"}, "not a stream request", None),
    ],
)
def test_stream_request_rejected(message, error, stream):
    with pytest.raises(StreamProtocolError, match=error) as info:
        parse_stream_request(message)
    assert info.value.stream == stream


# -- JSON answers -----------------------------------------------------------------------------


def test_answers_pinned():
    started = stream_started_message(
        stream=7,
        model_name="tiny",
        fps=25.0,
        frame_count=16,
        sample_rate=16000,
        mode="crop",
        lookahead_ms=493,
        bounds=(80, 40, 240, 200),
    )
    assert started == (
        '{"type":"stream_started","stream":7,"model_name":"tiny","fps":25.0,"frame_count":16,'
        '"sample_rate":16000,"mode":"crop","lookahead_ms":493,"bounds":[80.0,40.0,240.0,200.0]}'
    )
    assert stream_ended_message(stream=7, frames=10, idle_frames=3, dropped=1) == (
        '{"type":"stream_ended","stream":7,"frames":10,"idle_frames":3,"dropped":1}'
    )
    assert stream_interrupted_message(7) == '{"type":"stream_interrupted","stream":7}'
    assert stream_error_message(None, "bad_request", "bad") == (
        '{"type":"stream_error","stream":null,"code":"bad_request","error":"bad"}'
    )


def test_stream_answers_share_the_browser_writer():
    """One JSON writer for every text message a browser gets: a stream error escapes as the
    original proxy's answers do (Go's ``<>&``, U+2028, lone surrogates), only floats keep
    Python's form (``25.0``, pinned above)."""
    import shared.browser

    assert stream_error_message is shared.browser.stream_error_message
    assert stream_error_message(7, "internal", "a<b & c\u2028 \ud800") == (
        '{"type":"stream_error","stream":7,"code":"internal",'
        '"error":"a\\u003cb \\u0026 c\\u2028 \ufffd"}'
    )
    assert stream_error_message(True, "bad_request", "x").startswith(
        '{"type":"stream_error","stream":null'
    )
    assert stream_error_message(2**32, "bad_request", "x").startswith(
        '{"type":"stream_error","stream":null'
    )
    started = stream_started_message(
        stream=1,
        model_name="m",
        fps=float("nan"),
        frame_count=1,
        sample_rate=16000,
        mode="crop",
        lookahead_ms=0,
        bounds=(0.5, 1e-7, 1e21, 3),
    )
    assert '"fps":0.0,' in started and '"bounds":[0.5,1e-07,1e+21,3.0]' in started


# -- timing -----------------------------------------------------------------------------------


def test_clip_covers_every_row_and_is_aligned():
    for sr in t.SUPPORTED_RATES:
        for j in range(0, 60):
            start16, end16 = t.clip_16k(j, 25, sr)
            assert start16 % (200 if sr == 16000 else 800) == 0
            for k in range(max(j - 8, 0), j + 8):
                lo, hi = t.row_span_16k(k, 25)
                assert start16 <= lo and hi <= end16
            start, end = t.clip_samples(j, 25, sr)
            assert start * 16000 == start16 * sr  # exact at every rate
            assert end * 16000 >= end16 * sr
            assert t.clip_start_from_t0(j, 25, t.clip_t0_ms(j, 25, sr)) == start16
            assert t.clip_t0_ms(j, 25, sr) < 0


def test_lookahead_is_about_half_a_second():
    assert t.lookahead_ms(25, 16000) == 493  # (j+7)/25 s + 0.2 s + 12.5 ms, worst case
    assert 493 <= t.lookahead_ms(25, 48000) <= 500


def test_mel_start_matches_the_worker_formula():
    from workers.mel import window_start

    for fps in (25, 30, 29.97):
        assert all(t.mel_start(k, fps) == window_start(k, fps) for k in range(500))


def test_walk_is_ping_pong():
    assert [t.walk_frame(p, 4) for p in range(10)] == [0, 1, 2, 3, 2, 1, 0, 1, 2, 3]
    assert [t.walk_frame(p, 1) for p in range(3)] == [0, 0, 0]
    assert [t.walk_frame(p, 2) for p in range(4)] == [0, 1, 0, 1]


def test_frames_in_and_energy_window():
    assert t.frames_in(0, 25, 16000) == 0
    assert t.frames_in(1, 25, 16000) == 1
    assert t.frames_in(640, 25, 16000) == 1
    assert t.frames_in(641, 25, 16000) == 2
    assert t.frames_in(80_000, 25, 16000) == 125
    assert t.energy_window(0, 25, 16000) == (0, 1600)
    assert t.energy_window(10, 25, 16000) == (6400 - 1600, 6400 + 1600)


# -- fuzz -------------------------------------------------------------------------------------


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=64) | st.builds(lambda b: b"\x00\x01" + b, st.binary(max_size=64)))
def test_fuzz_audio_chunk(data):
    try:
        chunk = parse_audio_chunk(data)
    except StreamProtocolError:
        return
    assert encode_audio_chunk(chunk.stream, chunk.pcm) == data


@settings(max_examples=400, deadline=None)
@given(
    st.binary(max_size=80) | st.builds(lambda b: b"\x03" + bytes(37) + b, st.binary(max_size=12))
)
def test_fuzz_tagged_frame(data):
    try:
        frame = parse_tagged_frame(data)
    except StreamProtocolError:
        return
    assert encode_tagged_frame(frame) == data


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner),
    max_leaves=8,
)


@settings(max_examples=400, deadline=None)
@given(
    st.fixed_dictionaries(
        {"type": st.sampled_from(["stream_start", "stream_stop", "stream_interrupt", "x"])},
        optional={
            "model_name": _json | st.sampled_from(["tiny", "m.1"]),
            "stream": _json | st.integers(-2, 2**33),
            "sample_rate": _json | st.sampled_from(t.SUPPORTED_RATES),
            "mode": _json | st.sampled_from(["crop", "composite"]),
            "quality": _json | st.integers(-5, 105),
        },
    )
    | _json
)
def test_fuzz_stream_request(message):
    try:
        request = parse_stream_request(message)
    except StreamProtocolError:
        return
    assert isinstance(request, StreamStart | StreamStop | StreamInterrupt)
    assert json.dumps(message, default=str)  # what came in was a mapping we could read
