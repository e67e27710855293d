"""The gateway in front of a real broker and null workers, all real processes, spoken to by
a real websockets client: every JSON type and both binary layouts checked byte by byte,
request-order answers for layout A, pipelining limits, a client that never reads, health
following the workers, and a graceful SIGTERM."""

from __future__ import annotations

import asyncio
import base64
import json
import signal
import struct
from collections.abc import Iterator

import psutil
import pytest
from conftest import Processes, wait_until
from gateway_harness import System, http_get, metric, metrics
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from shared.browser import (
    DeadlineRequest,
    ErrorResponseC,
    RequestA,
    RequestB,
    ResponseC,
    parse_inference_response,
)
from workers.null import fixed_jpeg


JPEG = fixed_jpeg(20_000)  # what every null worker answers with by default
BIG = 100_000  # bytes of the "big" model's JPEG
BOUNDS = (480.0, 160.0, 800.0, 480.0)  # the null backend's crop rectangle
BOUNDS_BYTES = b"\x10\x00\x00\x00" + struct.pack("<4f", *BOUNDS)
MODELS = ["big", "demo", "other", "slow"]
SLOW_MS = 250


@pytest.fixture(scope="module")
def system(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[System, int]]:
    """Broker; two workers for demo/other, one fast and one slow, so that answers finish
    out of order; one for "big" (100 kB JPEGs); one for "slow" (250 ms a frame); and a
    gateway with the default settings."""
    processes = Processes(tmp_path_factory.mktemp("logs"))
    try:
        system = System(processes)
        system.start_broker()
        system.start_worker("demo,other", delay_ms=0)
        system.start_worker("demo,other", delay_ms=60)
        system.start_worker("big", jpeg_bytes=BIG)
        system.start_worker("slow", delay_ms=SLOW_MS)
        _, port = system.start_gateway()
        system.wait_models(port, *MODELS)
        wait_until(lambda: system.health(port)[1]["workers"] == 4, what="four workers")
        yield system, port
    except BaseException:
        print(processes.logs())
        raise
    finally:
        processes.stop_all()


def url(port: int) -> str:
    return f"ws://127.0.0.1:{port}/ws"


async def ask(ws, message, timeout: float = 10):
    await ws.send(message)
    return await asyncio.wait_for(ws.recv(), timeout)


# -- JSON ------------------------------------------------------------------------------------


async def test_list_models(system):
    _, port = system
    async with connect(url(port)) as ws:
        text = await ask(ws, '{"type":"list_models"}')
    assert text == '{"type":"model_list","models":["big","demo","other","slow"],"count":4}'


async def test_metadata(system):
    _, port = system
    async with connect(url(port)) as ws:
        text = await ask(ws, '{"type":"get_metadata","model_name":"demo"}')
        assert text == (
            '{"type":"metadata","success":true,"model_name":"demo","frame_count":100,'
            '"available_videos":["full_body","crops_328","rois_320","model_inputs"],'
            '"audio_path":"","bounds":[480,160,800,480]}'
        )
        text = await ask(ws, '{"type":"get_metadata","model_name":"ghost"}')
        assert text == (
            '{"type":"metadata","success":false,"model_name":"ghost",'
            '"error":"unknown_model: no worker holds model \'ghost\'"}'
        )


async def test_video_frame(system):
    _, port = system
    async with connect(url(port)) as ws:
        data = await ask(
            ws,
            '{"type":"get_video_frame","model_name":"demo","frame_id":3,"video_type":"full_body"}',
        )
        assert data == b"\x02\x03\x00\x00\x00\x09full_body" + struct.pack("<I", len(JPEG)) + JPEG
        text = await ask(
            ws, '{"type":"get_video_frame","model_name":"demo","frame_id":3,"video_type":"x"}'
        )
        assert text == (
            '{"type":"video_frame","error":"unknown_video: unknown video \'x\'",'
            '"model_name":"demo","frame_id":3}'
        )
        answer = json.loads(
            await ask(
                ws,
                '{"type":"get_video_frame","model_name":"demo","frame_id":100,'
                '"video_type":"full_body"}',
            )
        )
        assert list(answer) == ["type", "error", "model_name", "frame_id"]
        assert answer["error"].startswith("frame_out_of_range: ")


async def test_json_inference(system):
    _, port = system
    pcm = bytes(30_720)
    chunks = "".join(base64.b64encode(pcm[i : i + 1920]).decode() for i in range(0, 30_720, 1920))
    async with connect(url(port)) as ws:
        for message in (
            '{"model_name":"demo","frame_id":3}',
            '{"type":"inference","model_name":"demo","frame_id":3}',
            json.dumps({"model_name": "demo", "frame_id": 3, "audio_override": chunks}),
        ):
            text = await ask(ws, message)
            assert text.startswith(
                '{"success":true,"frame_id":3,'
                '"prediction_data":"use_binary_protocol_for_image_data",'
                '"prediction_shape":"320x320x3","bounds":[480,160,800,480],'
                '"processing_time_ms":'
            ), text
            answer = json.loads(text)
            assert isinstance(answer["processing_time_ms"], int)
            assert set(answer) <= {
                "success",
                "frame_id",
                "prediction_data",
                "prediction_shape",
                "bounds",
                "processing_time_ms",
                "prepare_time_ms",
                "inference_time_ms",
                "composite_time_ms",
            }
        answer = json.loads(await ask(ws, '{"model_name":"demo","frame_id":500}'))
        assert list(answer) == ["success", "frame_id", "processing_time_ms", "error"]
        assert answer["success"] is False and answer["frame_id"] == 500
        assert answer["error"].startswith("frame_out_of_range: ")


async def test_stats_and_protocol_ack(system):
    _, port = system
    async with connect(url(port)) as ws:
        for kind in ("switch_to_binary", "test_binary"):
            text = await ask(ws, json.dumps({"type": kind}))
            assert text == '{"type":"protocol_ack","message":"Binary protocol supported"}'
        stats = json.loads(await ask(ws, '{"type":"get_stats"}'))
    assert list(stats)[:7] == [
        "type",
        "total_requests",
        "binary_requests",
        "json_requests",
        "binary_percentage",
        "average_time_ms",
        "connected_clients",
    ]
    assert stats["type"] == "stats" and stats["broker"] is True
    assert stats["workers"] == 4 and stats["models"] == MODELS
    assert stats["connected_clients"] >= 1 and stats["json_requests"] >= 3


async def test_metrics_show_the_broker_and_its_workers(system):
    """/metrics carries the broker's totals and each worker's credits and counts (from the
    broker's stats, so no second scrape target is needed), outcomes from a closed set."""
    _, port = system
    async with connect(url(port)) as ws:
        assert await ask(ws, RequestA("demo", 5).serialize()) == JPEG
        assert await ask(ws, RequestA("demo", 100).serialize()) == b""  # worker: out of range
        assert await ask(ws, RequestA("ghost", 1).serialize()) == b""  # broker: unknown

    def seen() -> dict | None:
        m = metrics(port)
        answers = {
            dict(labels)["outcome"]: v
            for (name, labels), v in m.items()
            if name == "lipsync_broker_answers_total"
        }
        wanted = ("ok", "frame_out_of_range", "unknown_model")
        return m if all(answers.get(k, 0) >= 1 for k in wanted) else None

    m = await asyncio.to_thread(wait_until, seen, 10, 0.1, "the broker's answers on /metrics")
    assert m[("lipsync_broker_requests_total", ())] >= 3
    events = {
        dict(labels)["event"]
        for (name, labels), _ in m.items()
        if name == "lipsync_broker_events_total"
    }
    assert {"overloaded", "expired", "redispatched", "waited_for_workers"} <= events
    assert m[("lipsync_broker_warming_up", ())] == 0 and m[("lipsync_broker_gateways", ())] >= 1
    capacity = {
        dict(labels)["worker"]: v for (n, labels), v in m.items() if n == "lipsync_worker_capacity"
    }
    assert len(capacity) == 4 and all(v > 0 for v in capacity.values())
    served = sum(v for (n, _), v in m.items() if n == "lipsync_worker_served_total")
    assert served >= 1


# -- binary ----------------------------------------------------------------------------------


async def test_layout_a(system):
    _, port = system
    async with connect(url(port)) as ws:
        assert await ask(ws, b"\x04demo\x05\x00\x00\x00") == JPEG
        assert await ask(ws, RequestA("other", 99).serialize()) == JPEG
        assert await ask(ws, RequestA("demo", 100).serialize()) == b""  # out of range
        assert await ask(ws, RequestA("demo", -3).serialize()) == b""
        assert await ask(ws, RequestA("ghost", 1).serialize()) == b""


async def test_layout_b(system):
    _, port = system
    audio = bytes(range(256)) * 120  # 30,720 bytes, as the original page sends
    async with connect(url(port)) as ws:
        for request in (RequestB("demo", 7, audio), RequestB("demo", 8)):
            data = await ask(ws, request.serialize())
            header = b"\x01" + struct.pack("<I", request.frame_id)
            assert data[:5] == header
            assert data[9:13] == struct.pack("<I", len(JPEG))
            assert data[13 : 13 + len(JPEG)] == JPEG
            assert data[13 + len(JPEG) :] == BOUNDS_BYTES
            ms = parse_inference_response(data).processing_time_ms
            assert data == ResponseC(request.frame_id, ms, JPEG, BOUNDS).serialize()
        data = await ask(ws, RequestB("demo", 100, audio).serialize())
        error = parse_inference_response(data)
        assert isinstance(error, ErrorResponseC) and error.frame_id == 100
        assert error.error.startswith("frame_out_of_range: ")
        text = error.error.encode()
        assert (
            data
            == b"\x00d\x00\x00\x00"
            + struct.pack("<II", int(error.processing_time_ms), len(text))
            + text
        )


async def test_hello_switches_output_modes(system):
    _, port = system
    async with connect(url(port)) as ws:
        answer = json.loads(await ask(ws, '{"type":"hello","version":1,"mode_b":"composite"}'))
        assert (answer["mode_a"], answer["mode_b"]) == ("composite", "composite")
        # the null worker answers every mode with the same JPEG; the answer keeps its layout
        data = await ask(ws, RequestB("demo", 1).serialize())
        assert parse_inference_response(data) == ResponseC(
            1, parse_inference_response(data).processing_time_ms, JPEG, BOUNDS
        )


async def test_a_answers_in_request_order(system):
    """20 A requests back to back, spread over a fast and a slow worker, every third one out
    of range (answered at once with an empty message): answers come back in request order,
    although many finished out of order."""
    _, port = system
    before = metric(port, "lipsync_gateway_reordered_answers_total")
    frames = [1000 + i if i % 3 == 2 else i for i in range(20)]
    async with connect(url(port)) as ws:
        for frame in frames:
            await ws.send(RequestA("demo", frame).serialize())
        answers = [await asyncio.wait_for(ws.recv(), 10) for _ in frames]
    assert [len(a) for a in answers] == [0 if f >= 100 else len(JPEG) for f in frames]
    assert all(a == JPEG for a in answers if a)
    assert metric(port, "lipsync_gateway_reordered_answers_total") > before


async def test_a_request_may_ask_for_a_longer_deadline(system):
    """A gateway whose default deadline (1 ms) is over before any worker could start: a
    plain B request fails ``deadline_exceeded``; the same request asking for 3 s (ours,
    ``0x00 0x02``) is served by the slow model (250 ms); one asking for more than the
    gateway allows is refused, naming the bound."""
    sys_, _ = system
    _, port = sys_.start_gateway(
        env={"LIPSYNC_REQUEST_TIMEOUT_MS": "1", "LIPSYNC_MAX_DEADLINE_MS": "5000"}
    )
    async with connect(url(port)) as ws:
        hello = json.loads(await ask(ws, '{"type":"hello","version":1}'))
        assert "deadlines" in hello["features"] and hello["max_deadline_ms"] == 5000
        plain = parse_inference_response(await ask(ws, RequestB("slow", 1).serialize()))
        assert isinstance(plain, ErrorResponseC)
        assert plain.error.startswith("deadline_exceeded: ")
        longer = DeadlineRequest(3000, RequestB("slow", 2)).serialize()
        answer = parse_inference_response(await ask(ws, longer))
        assert answer == ResponseC(2, answer.processing_time_ms, JPEG, BOUNDS)
        too_long = DeadlineRequest(5001, RequestB("slow", 3)).serialize()
        refused = parse_inference_response(await ask(ws, too_long))
        assert refused == ErrorResponseC(
            3,
            refused.processing_time_ms,
            "bad_request: deadline_ms must be 1..5000 on this gateway",
        )


async def test_metadata_says_who_serves_a_model_to_clients_that_said_hello(system):
    """The original answer stays byte for byte (test_metadata); after ``hello`` it also
    says how many workers hold the model and what they may hold at once."""
    _, port = system
    async with connect(url(port)) as ws:
        await ask(ws, '{"type":"hello","version":1}')
        answer = json.loads(await ask(ws, '{"type":"get_metadata","model_name":"demo"}'))
    # two null workers hold demo, each with the default capacity (2 x max batch 4)
    assert answer["serving"] == {"workers": 2, "capacity": 16}


# -- limits ----------------------------------------------------------------------------------


async def test_in_flight_limit_answers_at_once(system):
    sys_, _ = system
    _, port = sys_.start_gateway("--max-in-flight", "3")
    async with connect(url(port)) as ws:
        for frame in range(8):
            await ws.send(RequestB("slow", frame).serialize())
        answers = [parse_inference_response(await ws.recv()) for _ in range(8)]
        refused = [a for a in answers if isinstance(a, ErrorResponseC)]
        served = [a for a in answers if isinstance(a, ResponseC)]
        assert sorted(a.frame_id for a in served) == [0, 1, 2]
        assert sorted(a.frame_id for a in refused) == [3, 4, 5, 6, 7]
        assert all(a.error == "too_many_in_flight: more than 3 requests in flight" for a in refused)
        # refusals do not wait for the slow frames in flight before them
        assert answers[: len(refused)] == refused
        # layout A keeps order even for refusals; JSON gets its own error shape
        for frame in range(3):
            await ws.send(RequestA("slow", frame).serialize())
        await ws.send(RequestA("slow", 3).serialize())
        await ws.send('{"model_name":"slow","frame_id":4}')
        text = await asyncio.wait_for(ws.recv(), 10)
        assert json.loads(text) == {
            "success": False,
            "frame_id": 4,
            "processing_time_ms": 0,
            "error": "too_many_in_flight: more than 3 requests in flight",
        }
        a_answers = [await asyncio.wait_for(ws.recv(), 10) for _ in range(4)]
        assert a_answers == [JPEG, JPEG, JPEG, b""]
    outcome = "too_many_in_flight"
    assert metric(port, "lipsync_gateway_requests_total", op="infer_b", outcome=outcome) == 5


async def test_client_that_never_reads(system):
    """A client that pipelines 1,600 A requests of 100 kB (within the in-flight limit) and
    reads none of them until the end: the gateway's memory stays bounded although far more
    is produced than that bound, the images it gave up are counted, and when the client
    finally reads, every request has its answer in its slot, an empty message (the A error
    shape) where the image was given up."""
    sys_, _ = system
    proc, port = sys_.start_gateway(env={"LIPSYNC_MAX_IN_FLIGHT": "64"})
    gateway = psutil.Process(proc.pid)
    request = RequestA("big", 1).serialize()
    async with connect(url(port)) as ws:  # warm up: allocate what a normal client needs
        for _ in range(50):
            assert len(await ask(ws, request)) == BIG
    rss_before = gateway.memory_info().rss
    total = 1600  # answers of 100 kB: 160 MB
    bound = 48 * 1024 * 1024

    def produced() -> float:
        return metric(port, "lipsync_gateway_requests_total", op="infer_a", outcome="ok")

    start = produced()
    dropped_before = metric(port, "lipsync_gateway_dropped_frames_total", kind="a")
    peak = rss_before
    async with connect(url(port), max_queue=1, max_size=None, close_timeout=1) as ws:
        for sent in range(0, total, 16):
            for frame in range(16):
                await ws.send(RequestA("big", frame).serialize())
            await asyncio.to_thread(  # stay within the in-flight limit: no refusals
                wait_until, lambda s=sent: produced() - start >= s - 32, what="answers"
            )
            peak = max(peak, gateway.memory_info().rss)
        await asyncio.to_thread(
            wait_until, lambda: produced() - start >= total, what="every answer computed"
        )
        peak = max(peak, gateway.memory_info().rss)
        answers = [await asyncio.wait_for(ws.recv(), 10) for _ in range(total)]
    dropped = metric(port, "lipsync_gateway_dropped_frames_total", kind="a") - dropped_before
    mib = 2**20
    print(f"rss before {rss_before / mib:.1f} MiB, peak {peak / mib:.1f} MiB, dropped {dropped}")
    assert produced() - start == total  # nothing was refused: every answer was an image
    assert len(answers) == total
    assert all(len(a) in (0, BIG) for a in answers)
    assert dropped > 0
    assert sum(1 for a in answers if not a) == dropped
    assert peak - rss_before < bound
    assert total * BIG > 2 * bound  # the bound is meaningful


# -- lifecycle -------------------------------------------------------------------------------


async def test_sigterm_answers_in_flight_then_closes_1001(system):
    sys_, _ = system
    proc, port = sys_.start_gateway()
    async with connect(url(port)) as ws:
        for frame in range(4):
            await ws.send(RequestA("slow", frame).serialize())
        await ws.send(RequestB("slow", 9).serialize())
        await asyncio.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        answers = [await asyncio.wait_for(ws.recv(), 15) for _ in range(5)]
        with pytest.raises(ConnectionClosed):
            await asyncio.wait_for(ws.recv(), 15)
    assert ws.close_code == 1001
    assert answers[:4] == [JPEG] * 4
    assert isinstance(parse_inference_response(answers[4]), ResponseC)
    assert await asyncio.to_thread(proc.wait, 15) == 0
    with pytest.raises((OSError, InvalidStatus)):
        async with connect(url(port), open_timeout=2):
            pass


def test_health_follows_workers(processes: Processes):
    system = System(processes)
    system.start_broker()
    _, port = system.start_gateway()
    wait_until(lambda: system.health(port)[1]["broker"], what="the broker to be seen")
    status, body = system.health(port)
    assert (status, body["healthy"], body["workers"]) == (503, False, 0)
    worker = system.start_worker("demo")
    wait_until(lambda: system.health(port)[0] == 200, what="health 200 with a worker")
    assert system.health(port)[1]["models"] == ["demo"]
    worker.kill()
    wait_until(lambda: system.health(port)[0] == 503, what="health 503 after the worker died")
    assert system.health(port)[1]["workers"] == 0
    system.start_worker("demo")
    wait_until(lambda: system.health(port)[0] == 200, what="health 200 with a new worker")
    status, _, _ = http_get(port, "/metrics")
    assert status == 200
