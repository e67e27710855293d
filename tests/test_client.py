"""lipsync.client against a real system: broker, a torch worker on a 32-frame package, and a
gateway, as processes on loopback (docs: README "Python client").

The worker runs with ``--max-batch 1`` so that a frame's bytes do not depend on which other
requests it happened to share a batch with (CPU convolutions round differently per batch
size); the client pipelines either way.
"""

from __future__ import annotations

import asyncio
import os
import signal

import cv2
import numpy as np
import pytest
from client_harness import ClientSystem, module_processes
from cluster import eventually
from gateway_harness import metrics
from speechlike import speechlike

from lipsync.client import (
    ConnectionLost,
    ErrorCode,
    Frame,
    LipsyncClient,
    ServerError,
    Timeout,
)


pytestmark = pytest.mark.slow

MODEL = "tiny32"
FRAMES = 32
WORKER = "torch-1"


@pytest.fixture(scope="module")
def system(tmp_path_factory):
    pytest.importorskip("torch")
    from workers.make_package import make_package

    root = tmp_path_factory.mktemp("client")
    models = root / "models"
    make_package(models, name=MODEL, frames=FRAMES, size=(320, 240), width="quarter")
    with module_processes(root / "logs") as procs:
        s = ClientSystem(procs)
        s.start_broker()
        s.start_torch_worker(models, WORKER)
        # generous deadline: 32 frames queued behind one single-threaded CPU worker on a
        # shared 2-core machine can take longer than the default 2 s
        _, s.port = s.start_gateway(env={"LIPSYNC_REQUEST_TIMEOUT_MS": "30000"})
        s.wait_models(s.port, MODEL, timeout=180)
        yield s


@pytest.fixture
async def client(system):
    async with LipsyncClient(f"ws://127.0.0.1:{system.port}/ws", timeout=30) as c:
        yield c


def decode(jpeg: bytes) -> np.ndarray:
    image = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR)
    assert image is not None, "not a JPEG"
    return image


async def test_batch_of_32_equals_32_single_requests(client):
    singles = [await client.infer(MODEL, i) for i in range(FRAMES)]
    batch = await client.infer_batch(MODEL, range(FRAMES))
    windowed = await client.infer_batch(MODEL, range(FRAMES), window=2)
    assert [f.jpeg for f in windowed] == [f.jpeg for f in batch]
    assert len(batch) == FRAMES
    for i, (one, many) in enumerate(zip(singles, batch, strict=True)):
        assert isinstance(many, Frame)
        assert many.frame_id == one.frame_id == i
        assert many.jpeg == one.jpeg, f"frame {i}"
        assert many.bounds == one.bounds
    unordered = [f async for f in client.infer_batch(MODEL, range(FRAMES), ordered=False)]
    assert sorted(f.frame_id for f in unordered) == list(range(FRAMES))
    assert {f.frame_id: f.jpeg for f in unordered} == {f.frame_id: f.jpeg for f in singles}


async def test_window_and_deadline_per_request(client):
    """The default window is what the model's one worker may hold (capacity 2 x max batch
    1); a request may ask for its own deadline within the gateway's bound, and the client
    refuses one beyond it before sending anything."""
    assert await client.serving_window(MODEL) == 2
    assert client.max_deadline_ms == 60_000
    frame = await client.infer(MODEL, 3, deadline_ms=45_000)
    assert frame.frame_id == 3 and frame.jpeg == (await client.infer(MODEL, 3)).jpeg
    frames = await client.infer_batch(MODEL, range(4), deadline_ms=45_000)
    assert [f.frame_id for f in frames] == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="deadline_ms must be an integer in 1..60000"):
        await client.infer(MODEL, 3, deadline_ms=60_001)


async def test_repeated_frame_ids_in_one_batch_are_not_mixed_up(client):
    ids = [5, 5, 7, 5, 7]
    frames = await client.infer_batch(MODEL, ids)
    assert [f.frame_id for f in frames] == ids
    assert frames[0].jpeg == frames[1].jpeg == frames[3].jpeg != frames[2].jpeg


async def test_crop_and_composite_images(client):
    meta = await client.metadata(MODEL)
    assert meta.frame_count == FRAMES
    crop = await client.infer(MODEL, 0)
    whole = await client.infer(MODEL, 0, mode="composite")
    again = await client.infer(MODEL, 0)  # and back
    x1, y1, x2, y2 = crop.bounds
    assert crop.bounds == meta.bounds == whole.bounds
    assert decode(crop.jpeg).shape == (y2 - y1, x2 - x1, 3)
    assert decode(whole.jpeg).shape == (240, 320, 3)
    assert (crop.mode, whole.mode) == ("crop", "composite")
    assert again.jpeg == crop.jpeg


async def test_models_metadata_video_frames_and_health(client):
    assert await client.list_models() == [MODEL]
    meta = await client.metadata(MODEL)
    assert set(meta.available_videos) == {"full_body", "crops_328", "rois_320", "model_inputs"}
    full = await client.video_frame(MODEL, 3)
    crop = await client.video_frame(MODEL, 3, "crops_328")
    assert (full.frame_id, full.video_type) == (3, "full_body")
    assert decode(full.jpeg).shape == (240, 320, 3)
    assert decode(crop.jpeg).shape == (328, 328, 3)
    health = await client.health()
    assert health.healthy and health.status == 200
    assert health.models == (MODEL,) and health.workers == 1


async def test_errors_are_typed(client):
    with pytest.raises(ServerError) as err:
        await client.infer(MODEL, FRAMES)
    assert err.value.code == ErrorCode.FRAME_OUT_OF_RANGE
    with pytest.raises(ServerError) as err:
        await client.infer("nobody", 0)
    assert err.value.code == ErrorCode.UNKNOWN_MODEL
    with pytest.raises(ServerError) as err:
        await client.metadata("nobody")
    assert err.value.code == ErrorCode.UNKNOWN_MODEL
    with pytest.raises(ServerError) as err:
        await client.video_frame(MODEL, 0, "nonsense")
    assert err.value.code == ErrorCode.UNKNOWN_VIDEO
    with pytest.raises(ValueError):
        await client.infer("bad name!", 0)
    mixed = await client.infer_batch(MODEL, [1, 99, 2], return_exceptions=True)
    assert isinstance(mixed[0], Frame) and isinstance(mixed[2], Frame)
    assert isinstance(mixed[1], ServerError)
    assert mixed[1].code == ErrorCode.FRAME_OUT_OF_RANGE
    with pytest.raises(ServerError):
        await client.infer_batch(MODEL, [1, 99, 2])


async def test_a_timed_out_request_does_not_steal_the_next_answer(client):
    """The late answer to a timed-out request must not be taken for the next request with
    the same frame id: use a different mode so the two answers differ."""
    expected = await client.infer(MODEL, 9, mode="composite")
    crop = await client.infer(MODEL, 9)
    with pytest.raises(Timeout):
        await client.infer(MODEL, 9, timeout=0.001)
    after = await client.infer(MODEL, 9, mode="composite")
    assert after.jpeg == expected.jpeg != crop.jpeg


async def test_per_model_stats(system, client):
    before = (await client.stats()).model_stats[MODEL]
    await client.infer_batch(MODEL, range(8))
    with pytest.raises(ServerError):
        await client.infer(MODEL, 1000)

    async def updated():
        s = (await client.stats()).model_stats[MODEL]
        return s if s.requests >= before.requests + 9 and s.errors >= before.errors + 1 else None

    s = await eventually(updated, what="the worker's heartbeat with the new counts")
    assert s.name == MODEL
    assert s.workers == (WORKER,) and s.devices == ("cpu",)
    assert s.error_codes.get("frame_out_of_range", 0) >= 1
    lat = s.latency_ms
    assert lat.count == s.requests - s.errors
    assert 0 < lat.min <= lat.p50 <= lat.p99 <= lat.max
    assert lat.min <= lat.avg <= lat.max
    assert s.frames_per_s > 0
    assert set(s.batch_sizes) == {1} and s.batch_sizes[1] >= 8  # --max-batch 1
    stats = await client.stats()
    assert stats.models == (MODEL,) and stats.workers == 1 and stats.broker
    assert stats.total_requests >= 3
    m = await asyncio.to_thread(metrics, system.port)
    labels = (("model", MODEL),)
    assert m[("lipsync_model_requests_total", labels)] >= s.requests
    assert m[("lipsync_model_latency_seconds_count", labels)] >= lat.count
    assert m[("lipsync_model_workers", labels)] == 1
    assert m[("lipsync_model_batches_total", (("model", MODEL), ("size", "1")))] >= 8


async def test_stream(client):
    rate = 16_000
    stream = await client.stream(MODEL, sample_rate=rate)
    assert stream.info is not None and stream.info.model_name == MODEL
    assert stream.info.fps == 25 and stream.info.lookahead_ms > 0
    audio = speechlike(1.2, rate, seed=5)
    await stream.push(audio.tobytes())
    end = await stream.stop(timeout=60)
    frames = [f async for f in stream.frames()]
    assert len(frames) == end.frames > 0
    assert [f.seq for f in frames] == sorted(f.seq for f in frames)
    assert all(0 <= f.frame_id < FRAMES and f.stream == stream.sid for f in frames)
    shown = [f for f in frames if not f.no_image]
    assert all(decode(f.image).shape[2] == 3 for f in shown)


async def test_connection_lost_and_refused(system):
    _, port = system.start_gateway(env={"LIPSYNC_REQUEST_TIMEOUT_MS": "30000"})
    async with LipsyncClient(f"ws://127.0.0.1:{port}/ws", timeout=30) as c:
        assert await c.list_models() == [MODEL]
        gateway = system.processes.procs[-1]
        os.killpg(gateway.pid, signal.SIGKILL)
        gateway.wait(timeout=10)
        with pytest.raises(ConnectionLost):
            for _ in range(100):  # the first call may still find the socket open
                await c.list_models()
                await asyncio.sleep(0.1)
    with pytest.raises(ConnectionLost):
        async with LipsyncClient(f"ws://127.0.0.1:{port}/ws", open_timeout=5):
            pass
