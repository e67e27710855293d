"""Coverage-guided fuzzing of every parser in shared/ with atheris (libFuzzer for Python).

Not run in CI (the hypothesis tests in tests/test_fuzz_*.py are); run it by hand for as
long as you like, e.g. five minutes on two cores::

    pip install atheris
    python fuzzing/fuzz_parsers.py -max_total_time=300 -jobs=2 -workers=2 fuzzing/corpus

The first input byte picks a parser; the rest is its input. A parser may refuse input only
with its documented error (``EnvelopeError``, ``ProtocolError``, ``StreamProtocolError``);
anything else, a hang (``-timeout``) or a crash is a finding, saved by libFuzzer as
``crash-<sha1>`` for replay (``python fuzzing/fuzz_parsers.py crash-...``).
"""

from __future__ import annotations

import json
import sys

import atheris


with atheris.instrument_imports():
    from shared import browser, envelope, streamproto


__all__ = ["main", "one_input"]


def _frames(data: bytes) -> list[bytes]:
    """Multipart frames from one buffer: ``0xFF 0x00`` separates frames."""
    return data.split(b"\xff\x00")


def _envelope(data: bytes) -> None:
    frames = _frames(data)
    try:
        message = envelope.decode(frames)
    except envelope.EnvelopeError:
        pass
    else:  # compared as bytes: a NaN in a header is not equal to itself
        again = envelope.encode(envelope.decode(envelope.encode(message.header)).header)
        assert again == envelope.encode(message.header)
    rid = envelope.peek_id(frames)
    assert rid is None or (isinstance(rid, int) and not isinstance(rid, bool))


def _binary_request(data: bytes) -> None:
    try:
        request = browser.parse_binary_request(data)
    except browser.ProtocolError:
        return
    if isinstance(request, browser.RequestB):
        assert browser.parse_binary_request(request.serialize()) == request


def _json_request(data: bytes) -> None:
    try:
        browser.parse_json_request(data)
    except browser.ProtocolError:
        pass
    try:
        browser.parse_json_request(data.decode("utf-8", "surrogateescape"))
    except browser.ProtocolError:
        pass


def _responses(data: bytes) -> None:
    try:
        answer = browser.parse_inference_response(data)
    except browser.ProtocolError:
        pass
    else:
        data = answer.serialize()
        assert browser.parse_inference_response(data).serialize() == data
    try:
        browser.VideoFrameD.parse(data)
    except browser.ProtocolError:
        pass


def _stream_binary(data: bytes) -> None:
    try:
        streamproto.parse_audio_chunk(data)
    except streamproto.StreamProtocolError:
        pass
    try:
        streamproto.parse_tagged_frame(data)
    except streamproto.StreamProtocolError:
        pass


def _stream_json(data: bytes) -> None:
    try:
        message = json.loads(data)
    except (ValueError, RecursionError):
        return
    try:
        streamproto.parse_stream_request(message)
    except streamproto.StreamProtocolError:
        pass


_TARGETS = (_envelope, _binary_request, _json_request, _responses, _stream_binary, _stream_json)


def one_input(data: bytes) -> None:
    if not data:
        return
    _TARGETS[data[0] % len(_TARGETS)](data[1:])


def main() -> None:
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
