"""The gateway's message handling fuzzed over a real socket, with a real broker and a null
worker behind it (test_gateway_http.py fuzzes binary messages against a gateway with no
broker; here every kind of message reaches the code that talks to the broker).

Each generated message must get exactly one answer, in the shape docs/protocol.md gives
for what the message is, on a connection that stays open; afterwards the gateway is alive
and counted no ``internal`` outcome (an internal error is a bug that was caught).
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator

import pytest
from conftest import Processes, wait_until
from gateway_harness import System, metrics
from hypothesis import HealthCheck, given, settings, strategies as st
from websockets.sync.client import ClientConnection, connect

from shared.browser import (
    ErrorResponseC,
    ProtocolError,
    RequestA,
    ResponseC,
    VideoFrameD,
    parse_binary_request,
    parse_inference_response,
    parse_json_request,
)


FUZZ = settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
MODELS = ("m", "n")
STREAM_TYPES = ("stream_start", "stream_stop", "stream_interrupt")


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[System, int, object]]:
    processes = Processes(tmp_path_factory.mktemp("logs"))
    try:
        system = System(processes)
        system.start_broker()
        system.start_worker(",".join(MODELS))
        proc, port = system.start_gateway()
        system.wait_models(port, *MODELS)
        yield system, port, proc
    except BaseException:
        print(processes.logs())
        raise
    finally:
        processes.stop_all()


@pytest.fixture(scope="module")
def client(gateway) -> Iterator[ClientConnection]:
    _, port, _ = gateway
    with connect(f"ws://127.0.0.1:{port}/ws", open_timeout=10, max_size=None) as ws:
        yield ws


# -- strategies ------------------------------------------------------------------------------

_json = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**40), 2**40) | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner),
    max_leaves=6,
)
_model = st.sampled_from([*MODELS, "ghost", "", "../etc", "a" * 65, "m\u00e9"]) | _json
_frame = st.integers(-3, 105) | st.integers(-(2**31), 2**31 - 1) | _json
_audio = (
    st.binary(max_size=96).map(lambda b: base64.b64encode(b).decode())
    | st.text(alphabet="AQgw=+/", max_size=20)
    | _json
)
_types = st.sampled_from(
    [
        "",
        "inference",
        "list_models",
        "get_metadata",
        "get_video_frame",
        "get_stats",
        "hello",
        "switch_to_binary",
        "test_binary",
        "nope",
        "LIST_MODELS",
    ]
)
_messages = st.fixed_dictionaries(
    {},
    optional={
        "type": _types | _json,
        "model_name": _model,
        "frame_id": _frame,
        "video_type": st.sampled_from(["full_body", "rois_320", "crops_328", "x", ""]) | _json,
        "audio_override": _audio,
        "version": st.integers(-1, 3) | _json,
        "mode_a": st.sampled_from(["crop", "composite", "x"]) | _json,
        "mode_b": st.sampled_from(["crop", "composite"]) | _json,
        "quality": st.integers(-1, 101) | st.none() | _json,
        "video_quality": st.integers(0, 101) | st.none(),
        "Model_Name": _model,
    },
)
_texts = _messages.map(json.dumps) | st.text(max_size=40) | _json.map(json.dumps)
_binaries = st.one_of(
    st.builds(
        lambda m, f: RequestA(m, f).serialize(), st.sampled_from(MODELS), st.integers(-3, 105)
    ),
    st.builds(
        lambda m, f, a: (
            len(m).to_bytes(4, "little")
            + m
            + f.to_bytes(4, "little")
            + len(a).to_bytes(4, "little")
            + a
        ),
        st.sampled_from([b"m", b"n", b"ghost", b"b@d"]),
        st.integers(0, 120),
        st.binary(max_size=64),
    ),
    st.binary(min_size=1, max_size=48).filter(lambda b: b[0] != 0),
)


# -- expectations ----------------------------------------------------------------------------


def _check_text(message: str, answer: bytes | str) -> None:
    """``answer`` is the one answer ``message`` may get (docs/protocol.md sections 3, 6)."""
    try:
        request = parse_json_request(message)
    except ProtocolError as exc:
        assert json.loads(answer) == {"type": "error", "error": f"bad_request: {exc}"}
        return
    kind = request.type
    if kind == "get_video_frame" and isinstance(answer, bytes):
        d = VideoFrameD.parse(answer)
        assert (d.frame_id, d.video_type) == (request.frame_id, request.video_type)
        assert d.image[:2] == b"\xff\xd8"
        return
    assert isinstance(answer, str), (message, answer)
    body = json.loads(answer)
    assert isinstance(body, dict)
    if kind in ("", "inference"):
        assert body["frame_id"] == request.frame_id
        assert body["success"] is (request.model_name in MODELS and 0 <= request.frame_id < 100)
    elif kind == "list_models":
        assert body == {"type": "model_list", "models": list(MODELS), "count": len(MODELS)}
    elif kind == "get_metadata":
        assert body["type"] == "metadata"
        assert body["success"] is (request.model_name in MODELS)
    elif kind == "get_video_frame":
        assert body["type"] == "video_frame" and body["error"]
        assert body["frame_id"] == request.frame_id
    elif kind == "get_stats":
        assert body["type"] == "stats"
    elif kind == "hello":
        assert body["type"] in ("hello", "error")
    elif kind in ("switch_to_binary", "test_binary"):
        assert body == {"type": "protocol_ack", "message": "Binary protocol supported"}
    elif kind in STREAM_TYPES:
        assert body["type"].startswith("stream_")
    else:
        assert body == {"type": "error", "error": f"Unknown message type: {kind}"}
    assert not str(body.get("error", "")).startswith("internal"), body


def _check_binary(data: bytes, answer: bytes | str) -> None:
    assert isinstance(answer, bytes)
    try:
        request = parse_binary_request(data)
    except ProtocolError as exc:
        assert parse_inference_response(answer) == ErrorResponseC(0, 0, f"bad_request: {exc}")
        return
    ok = request.model_name in MODELS and 0 <= request.frame_id < 100
    if isinstance(request, RequestA):
        assert (answer[:2] == b"\xff\xd8") is ok and (answer == b"") is not ok
        return
    parsed = parse_inference_response(answer)
    assert parsed.frame_id == request.frame_id
    assert isinstance(parsed, ResponseC) is ok, parsed
    if isinstance(parsed, ErrorResponseC):
        assert not parsed.error.startswith("internal"), parsed


# -- tests -----------------------------------------------------------------------------------


@pytest.mark.fault
@FUZZ
@given(_texts)
def test_fuzz_text_messages_each_get_their_answer(client, text):
    client.send(text)
    _check_text(text, client.recv(timeout=15))


@pytest.mark.fault
@FUZZ
@given(_binaries)
def test_fuzz_binary_messages_each_get_their_answer(client, data):
    client.send(data)
    _check_binary(data, client.recv(timeout=15))


@pytest.mark.fault
def test_gateway_survived_without_internal_errors(gateway, client):
    """After the fuzz: same connection still served, no ``internal`` outcome counted."""
    _, port, proc = gateway
    client.send('{"type":"list_models"}')
    assert json.loads(client.recv(timeout=15))["type"] == "model_list"
    assert proc.poll() is None
    samples = wait_until(lambda: metrics(port), what="metrics")
    internal = {k: v for k, v in samples.items() if ("outcome", "internal") in k[1] and v}
    assert internal == {}
    malformed = sum(
        v for (name, _), v in samples.items() if name == "lipsync_gateway_malformed_messages_total"
    )
    assert malformed > 0  # the fuzz did reach the error paths
