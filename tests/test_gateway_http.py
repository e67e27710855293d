"""The gateway without a broker: HTTP on the WebSocket port (static files, /health, /metrics),
handshake refusals (Origin, token), and every malformed or unanswerable message getting an
answer in its closest shape while the connection stays up."""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import Processes
from gateway_harness import System, http_get, metric, metrics
from hypothesis import HealthCheck, given, settings, strategies as st
from websockets.exceptions import ConnectionClosedError, InvalidStatus
from websockets.sync.client import ClientConnection, connect

from shared.browser import (
    MAX_BINARY_REQUEST_BYTES,
    MAX_JSON_BYTES,
    ErrorResponseC,
    ProtocolError,
    RequestA,
    RequestB,
    parse_binary_request,
    parse_inference_response,
)


SECRET = b"SECRET-OUTSIDE-THE-WEB-DIR"


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A web dir with one file of each type, a hidden file, a symlink out and one in."""
    base = tmp_path_factory.mktemp("site")
    (base / "secret.txt").write_bytes(SECRET)
    web = base / "web"
    (web / "sub").mkdir(parents=True)
    files = {
        "index.html": b"<!doctype html><title>t</title>",
        "app.js": b"export const a = 1;",
        "mod.mjs": b"export default 2;",
        "style.css": b"body{}",
        "data.json": b"{}",
        "icon.svg": b"<svg/>",
        "pic.png": b"\x89PNG\r\n\x1a\n",
        "sound.wav": b"RIFF",
        "code.wasm": b"\x00asm",
        "blob.bin": b"\x00\x01",
        "sub/index.html": b"<p>sub</p>",
        ".hidden": b"hidden",
    }
    for name, data in files.items():
        (web / name).write_bytes(data)
    os.symlink(base / "secret.txt", web / "out.txt")
    os.symlink(web / "app.js", web / "alias.js")
    return web


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory, site: Path) -> Iterator[tuple[System, int]]:
    """A gateway whose broker never answers (nothing listens at its address)."""
    logs = tmp_path_factory.mktemp("logs")
    processes = Processes(logs)
    try:
        system = System(processes)
        _, port = system.start_gateway(web_dir=str(site))
        yield system, port
    finally:
        processes.stop_all()


@pytest.fixture(scope="module")
def client(gateway: tuple[System, int]) -> Iterator[ClientConnection]:
    _, port = gateway
    with connect(f"ws://127.0.0.1:{port}/ws", open_timeout=10) as ws:
        yield ws


# -- static files ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "content_type", "body"),
    [
        ("/", "text/html; charset=utf-8", b"<!doctype html><title>t</title>"),
        ("/index.html", "text/html; charset=utf-8", b"<!doctype html><title>t</title>"),
        ("/app.js", "text/javascript; charset=utf-8", b"export const a = 1;"),
        ("/mod.mjs", "text/javascript; charset=utf-8", b"export default 2;"),
        ("/style.css", "text/css; charset=utf-8", b"body{}"),
        ("/data.json", "application/json", b"{}"),
        ("/icon.svg", "image/svg+xml", b"<svg/>"),
        ("/pic.png", "image/png", b"\x89PNG\r\n\x1a\n"),
        ("/sound.wav", "audio/wav", b"RIFF"),
        ("/code.wasm", "application/wasm", b"\x00asm"),
        ("/blob.bin", "application/octet-stream", b"\x00\x01"),
        ("/sub/", "text/html; charset=utf-8", b"<p>sub</p>"),
        ("/sub", "text/html; charset=utf-8", b"<p>sub</p>"),
        ("/app.js?v=3", "text/javascript; charset=utf-8", b"export const a = 1;"),
        ("/alias.js", "text/javascript; charset=utf-8", b"export const a = 1;"),
        ("/%61pp.js", "text/javascript; charset=utf-8", b"export const a = 1;"),
    ],
)
def test_static_files(gateway, path, content_type, body):
    _, port = gateway
    status, headers, data = http_get(port, path)
    assert (status, headers["content-type"], data) == (200, content_type, body)
    assert headers["content-length"] == str(len(body))
    assert headers["x-content-type-options"] == "nosniff"


@pytest.mark.parametrize(
    "path",
    [
        "/../secret.txt",
        "/sub/../../secret.txt",
        "/%2e%2e/secret.txt",
        "/%2E%2E/secret.txt",
        "/..%2fsecret.txt",
        "/%2e%2e%2fsecret.txt",
        "/sub/%2e%2e/%2e%2e/secret.txt",
        "/%252e%252e/secret.txt",
        "/..\\secret.txt",
        "/..%5csecret.txt",
        "//secret.txt",
        "/out.txt",
        "/.hidden",
        "/sub/./../../secret.txt",
        "/%00",
        "/app.js%00.html",
        "/%ff",
        "http://127.0.0.1/../secret.txt",
        "secret.txt",
        "/nope.js",
    ],
)
def test_static_never_leaves_the_web_dir(gateway, path):
    _, port = gateway
    status, _, body = http_get(port, path)
    assert status in (400, 404), path
    assert SECRET not in body


def test_only_get(gateway):
    _, port = gateway
    status, headers, _ = http_get(port, "/", method="DELETE")
    assert status in (400, 405)


def test_upgrade_elsewhere_than_ws_is_refused(gateway):
    _, port = gateway
    with pytest.raises(InvalidStatus) as info:
        connect(f"ws://127.0.0.1:{port}/", open_timeout=10)
    assert info.value.response.status_code == 404


# -- health and metrics ----------------------------------------------------------------------


def test_health_without_broker_is_503(gateway):
    system, port = gateway
    status, body = system.health(port)
    assert status == 503
    assert body["healthy"] is False and body["broker"] is False
    assert body["workers"] == 0 and body["models"] == []


def test_metrics_parse(gateway):
    _, port = gateway
    http_get(port, "/health")
    samples = metrics(port)
    names = {name for name, _ in samples}
    for expected in (
        "lipsync_gateway_in_flight",
        "lipsync_gateway_connections",
        "lipsync_gateway_bytes_out_total",
        "lipsync_gateway_broker_up",
        "lipsync_gateway_reordered_answers_total",
    ):
        assert expected in names
    assert samples[("lipsync_gateway_broker_up", ())] == 0
    lost = ("lipsync_gateway_broker_client_events_total", (("event", "broker_lost"),))
    assert samples[lost] == 0
    health_503 = ("lipsync_gateway_http_requests_total", (("route", "health"), ("status", "503")))
    assert samples[health_503] >= 1
    # no broker, no broker numbers (rather than zeros that would look like an idle one)
    assert not [n for n in names if n.startswith(("lipsync_broker_", "lipsync_worker_"))]


def test_broker_series_from_a_stats_answer():
    """The broker collector turns a stats answer into series; a worker's own error code
    becomes ``other`` (labels from a closed set), malformed numbers count as 0."""
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    from gateway.modelmetrics import BrokerCollector

    stats = {
        "broker": {
            "requests": 7,
            "answered": {"ok": 4, "unknown_model": 1, "made_up_by_a_worker": 2},
            "overloaded": 1,
            "expired": "x",
            "warming_up": True,
            "pending": 2,
        },
        "workers": [{"id": "w1", "capacity": 8, "in_flight": 2, "served": 4, "errors": None}],
    }
    registry = CollectorRegistry()
    registry.register(BrokerCollector(lambda: stats))
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(generate_latest(registry).decode())
        for s in family.samples
    }
    answers = {
        dict(labels)["outcome"]: v
        for (name, labels), v in samples.items()
        if name == "lipsync_broker_answers_total"
    }
    assert answers == {"ok": 4, "unknown_model": 1, "other": 2}
    assert samples[("lipsync_broker_requests_total", ())] == 7
    assert samples[("lipsync_broker_events_total", (("event", "overloaded"),))] == 1
    assert samples[("lipsync_broker_events_total", (("event", "expired"),))] == 0
    assert samples[("lipsync_broker_warming_up", ())] == 1
    assert samples[("lipsync_broker_pending", ())] == 2
    assert samples[("lipsync_worker_in_flight", (("worker", "w1"),))] == 2
    assert samples[("lipsync_worker_errors_total", (("worker", "w1"),))] == 0
    stats = {"broker": "garbage", "workers": ["nope"]}
    assert "lipsync_broker" not in generate_latest(registry).decode()


# -- handshake: Origin and token -------------------------------------------------------------


@pytest.mark.parametrize(
    "origin",
    [
        None,
        "http://localhost:3000",
        "https://localhost",
        "http://127.0.0.1:9",
        "http://[::1]:8080",
        "SAME",  # the gateway's own origin
    ],
)
def test_allowed_origins(gateway, origin):
    _, port = gateway
    if origin == "SAME":
        origin = f"http://127.0.0.1:{port}"
    with connect(f"ws://127.0.0.1:{port}/ws", origin=origin, open_timeout=10) as ws:
        ws.send('{"type":"test_binary"}')
        assert json.loads(ws.recv(timeout=10))["type"] == "protocol_ack"


@pytest.mark.parametrize(
    "origin",
    ["https://evil.example", "http://localhost.evil.example", "null", "file://", "ftp://127.0.0.1"],
)
def test_disallowed_origins_refused_at_handshake(gateway, origin):
    _, port = gateway
    before = metric(port, "lipsync_gateway_handshakes_refused_total", reason="origin")
    with pytest.raises(InvalidStatus) as info:
        connect(f"ws://127.0.0.1:{port}/ws", origin=origin, open_timeout=10)
    assert info.value.response.status_code == 403
    assert metric(port, "lipsync_gateway_handshakes_refused_total", reason="origin") == before + 1


def test_token_and_explicit_origins(tmp_path):
    processes = Processes(tmp_path)
    try:
        system = System(processes)
        env = {"LIPSYNC_TOKEN": "s3cret"}
        _, port = system.start_gateway("--allowed-origins", "https://app.example", env=env)
        url = f"ws://127.0.0.1:{port}/ws"
        with pytest.raises(InvalidStatus) as info:
            connect(url, open_timeout=10)
        assert info.value.response.status_code == 401
        assert info.value.response.headers["WWW-Authenticate"] == "Bearer"
        for bad in (f"{url}?token=wrong", f"{url}?token="):
            with pytest.raises(InvalidStatus) as info:
                connect(bad, open_timeout=10)
            assert info.value.response.status_code in (401, 403)
        with pytest.raises(InvalidStatus) as info:
            connect(url, additional_headers={"Authorization": "Bearer nope"}, open_timeout=10)
        assert info.value.response.status_code == 403
        # an explicit list replaces the defaults, localhost included
        with pytest.raises(InvalidStatus) as info:
            connect(f"{url}?token=s3cret", origin="http://localhost:1", open_timeout=10)
        assert info.value.response.status_code == 403
        for kwargs in (
            {"uri": f"{url}?token=s3cret"},
            {"uri": url, "additional_headers": {"Authorization": "Bearer s3cret"}},
            {"uri": f"{url}?token=s3cret", "origin": "https://app.example"},
        ):
            with connect(open_timeout=10, **kwargs) as ws:
                ws.send('{"type":"switch_to_binary"}')
                assert ws.recv(timeout=10) == (
                    '{"type":"protocol_ack","message":"Binary protocol supported"}'
                )
        assert metric(port, "lipsync_gateway_handshakes_refused_total", reason="token") == 4
        status, _, _ = http_get(port, "/health")
        assert status == 503  # plain HTTP needs no token
    finally:
        processes.stop_all()


# -- answers without a broker ----------------------------------------------------------------

UNAVAILABLE = "broker_unavailable: broker unavailable"


@pytest.mark.parametrize(
    ("request_text", "answer"),
    [
        ('{"type":"list_models"}', {"type": "model_list", "error": UNAVAILABLE}),
        (
            '{"type":"get_metadata","model_name":"demo"}',
            {"type": "metadata", "success": False, "model_name": "demo", "error": UNAVAILABLE},
        ),
        (
            '{"type":"get_video_frame","model_name":"demo","frame_id":2,"video_type":"full_body"}',
            {"type": "video_frame", "error": UNAVAILABLE, "model_name": "demo", "frame_id": 2},
        ),
        (
            '{"model_name":"demo","frame_id":4}',
            {"success": False, "frame_id": 4, "processing_time_ms": 0, "error": UNAVAILABLE},
        ),
        (
            '{"type":"inference","model_name":"demo","frame_id":-1}',
            {
                "success": False,
                "frame_id": -1,
                "processing_time_ms": 0,
                "error": "frame_out_of_range: frame -1 out of range",
            },
        ),
        (
            '{"type":"get_metadata"}',
            {
                "type": "metadata",
                "success": False,
                "model_name": "",
                "error": "bad_request: model_name is required",
            },
        ),
        ('{"type":"nope"}', {"type": "error", "error": "Unknown message type: nope"}),
        ("not json", {"type": "error", "error": "bad_request: invalid json"}),
        ("[]", {"type": "error", "error": "bad_request: message is not a json object"}),
        (
            '{"type":"inference","frame_id":"x"}',
            {"type": "error", "error": "bad_request: frame_id must be an integer"},
        ),
        (
            '{"type":"stream_start","stream":7}',
            {
                "type": "stream_error",
                "stream": 7,
                "code": "bad_request",
                "error": "model_name must be 1-64 characters of [A-Za-z0-9_.-]",
            },
        ),
    ],
)
def test_json_error_shapes(client, request_text, answer):
    client.send(request_text)
    text = client.recv(timeout=10)
    assert json.loads(text) == answer
    assert list(json.loads(text)) == list(answer)  # field order, as the original wrote it


def test_hello(client):
    client.send('{"type":"hello","version":3,"mode_a":"crop","quality":70}')
    answer = json.loads(client.recv(timeout=10))
    assert answer["type"] == "hello" and answer["version"] == 1 and answer["server"] == "lipsync"
    assert {"layout_a", "layout_b", "output_mode"} <= set(answer["features"])
    assert (answer["mode_a"], answer["mode_b"], answer["quality"]) == ("crop", "crop", 70)
    client.send('{"type":"hello","version":1,"mode_a":"composite","quality":null}')
    answer = json.loads(client.recv(timeout=10))
    assert (answer["mode_a"], "quality" in answer) == ("composite", False)
    client.send('{"type":"hello","mode_b":"sideways"}')
    assert json.loads(client.recv(timeout=10)) == {
        "type": "error",
        "error": "bad_request: mode_b must be crop or composite",
    }


def _check_binary_answer(data: bytes, answer: bytes | str) -> None:
    """The one answer a binary message must get when no broker answers."""
    if data[:1] == b"\x00":  # a stream's audio chunk (docs/streams.md): no such stream here
        assert isinstance(answer, str)
        error = json.loads(answer)
        assert error["type"] == "stream_error" and error["code"] == "bad_request"
        return
    assert isinstance(answer, bytes)
    try:
        request = parse_binary_request(data)
    except ProtocolError as exc:
        assert parse_inference_response(answer) == ErrorResponseC(0, 0, f"bad_request: {exc}")
        return
    if isinstance(request, RequestA):
        assert answer == b""  # the original proxy's error answer to layout A
    else:
        parsed = parse_inference_response(answer)
        assert isinstance(parsed, ErrorResponseC)
        assert parsed.frame_id == request.frame_id
        assert parsed.error == UNAVAILABLE


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\x07sanders\x01\x00",  # truncated A
        RequestA("demo", 1).serialize(),
        RequestB("demo", 9, bytes(30_720)).serialize(),
        RequestB("demo", 9, bytes(64)).serialize()[:-3],  # truncated audio
        b"\x05\x00\x00\x00de",  # truncated B
        b"\x00\x01\x00\x00\x00\x00" + bytes(100),  # our extension: audio for no stream
        b"\x01" + bytes(MAX_BINARY_REQUEST_BYTES + 10),  # oversized (below max_size)
        b"\x04\x00\x00\x00demo" + struct.pack("<II", 1, 1 << 30),  # audio_len lies
    ],
)
def test_binary_errors(client, data):
    client.send(data)
    _check_binary_answer(data, client.recv(timeout=10))


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    st.one_of(
        st.binary(max_size=64),
        st.binary(min_size=4, max_size=40).map(lambda b: b"\x04\x00\x00\x00demo" + b),
        st.binary(max_size=12).map(lambda b: b"\x04demo" + b),
    )
)
def test_fuzz_binary_each_gets_one_answer(client, data):
    client.send(data)
    _check_binary_answer(data, client.recv(timeout=10))


def test_oversized_json_gets_an_error(client):
    client.send('{"type":"list_models","pad":"' + "x" * MAX_JSON_BYTES + '"}')
    assert json.loads(client.recv(timeout=10)) == {
        "type": "error",
        "error": "bad_request: message too large",
    }


def test_connection_survived_everything(client, gateway):
    _, port = gateway
    client.send('{"type":"test_binary"}')
    assert json.loads(client.recv(timeout=10))["type"] == "protocol_ack"
    assert metric(port, "lipsync_gateway_malformed_messages_total", kind="binary") > 5
    assert metric(port, "lipsync_gateway_malformed_messages_total", kind="text") >= 3


def test_message_over_max_size_closes_with_1009(gateway):
    _, port = gateway
    with connect(f"ws://127.0.0.1:{port}/ws", open_timeout=10, max_size=None) as ws:
        ws.send(b"\x01" + bytes(1 << 20))
        with pytest.raises(ConnectionClosedError) as info:
            ws.recv(timeout=10)
    assert info.value.rcvd is not None and info.value.rcvd.code == 1009
