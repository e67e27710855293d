"""Server-driven streams end to end (docs/streams.md): real broker, workers and gateway
processes on loopback, a real WebSocket client pushing audio in real time.

What is checked: frames come in sequence order, evenly paced (the p95 gap is printed, not
asserted), on the ping-pong frame walk, with timestamps covering the audio; silence gives
idle frames that cost no inference; an interrupt stops frames at once and the stream goes
on with new audio; concurrent streams on different models never mix; the same audio gives
the same picture on any worker; the broker keeps a stream on one worker (affinity) but not
at the price of credits. Bounds are generous: the CI machine has 2 busy cores.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import numpy as np
import pytest
from gateway_harness import http_get, metrics
from speechlike import speechlike
from stream_harness import (
    RATE,
    Received,
    System,
    client,
    gaps_ms,
    null_models,
    p95,
    wait_for,
)

from shared.streamproto import encode_audio_chunk
from shared.streamtime import frames_in, lookahead_ms, walk_frame


pytestmark = pytest.mark.slow

# -- fixtures -----------------------------------------------------------------------------------


@pytest.fixture
def null_system(processes, tmp_path) -> System:
    """Four null models whose frame counts differ (so their frame walks differ)."""
    models = null_models(tmp_path / "models", {"m5": 5, "m7": 7, "m11": 11, "m13": 13})
    system = System(processes)
    system.broker()
    system.worker(models, name="w1", null_delay_ms="5")
    system.gateway()
    system.wait_models("m5", "m7", "m11", "m13")
    return system


# -- tests --------------------------------------------------------------------------------------


async def test_five_seconds_in_real_time(null_system):
    """125 frames for 5 s of audio, in order, paced, on the walk, covering the audio; the
    pause gives idle frames that cost no inference."""
    system = null_system
    audio = speechlike(5.0, RATE, seed=11, pauses=((2.0, 2.8),))
    async with client(system) as c:
        rec = await c.start(7, "m13")
        assert rec.started == {
            "type": "stream_started",
            "stream": 7,
            "model_name": "m13",
            "fps": 25.0,
            "frame_count": 13,
            "sample_rate": 16000,
            "mode": "crop",
            "lookahead_ms": lookahead_ms(25, 16000),
            "bounds": [480.0, 160.0, 800.0, 480.0],
        }
        await c.push(7, audio)
        await c.stop(7)
    ended = rec.ended
    frames = [f for _, f in rec.frames]
    expected = frames_in(len(audio), 25, RATE)
    assert expected == 125
    assert ended is not None and ended["type"] == "stream_ended", ended
    assert ended["frames"] == len(frames) and ended["frames"] + ended["dropped"] == expected
    assert len(frames) >= 100, f"{ended['dropped']} of 125 frames dropped"
    seqs = [f.seq for f in frames]
    assert seqs == sorted(set(seqs)) and seqs[-1] <= expected - 1
    assert all(f.frame_id == walk_frame(f.seq, 13) for f in frames)
    assert all(f.audio_ms == f.seq * 40 for f in frames)
    assert frames[0].audio_ms <= 80 and frames[-1].audio_ms >= 4880  # covers the audio
    idle = [f for f in frames if f.idle]
    spoken = [f for f in frames if not f.idle]
    assert all(2000 <= f.audio_ms <= 2800 for f in idle) and len(idle) >= 10
    assert all(f.no_image and not f.image for f in idle)
    assert all(f.image[:2] == b"\xff\xd8" and f.worker == "w1" for f in spoken)
    assert ended["idle_frames"] == len(idle)
    events = system.events()
    assert events["inferred"] <= expected - len(idle)  # idle frames asked nobody
    gaps = gaps_ms(rec)
    print(
        f"\n5 s stream: {len(frames)} frames ({len(idle)} idle, {ended['dropped']} dropped), "
        f"inter-frame gap p50 {gaps[len(gaps) // 2]:.1f} ms p95 {p95(gaps):.1f} ms "
        f"max {gaps[-1]:.1f} ms"
    )
    status, _, body = http_get(system.port, "/metrics")
    assert b"lipsync_gateway_stream_latency_seconds_bucket" in body


async def test_silence_costs_no_inference(null_system):
    system = null_system
    before = system.events().get("inferred", 0)
    async with client(system) as c:
        rec = await c.start(1, "m5", mode="composite")
        await c.push(1, np.zeros(RATE, np.int16), realtime=False)
        await c.stop(1)
    frames = [f for _, f in rec.frames]
    assert rec.ended is not None and rec.ended["type"] == "stream_ended"
    assert len(frames) + rec.ended["dropped"] == 25 and len(frames) >= 15
    assert all(f.idle and f.composite and f.image[:2] == b"\xff\xd8" for f in frames)
    assert rec.ended["idle_frames"] == len(frames)
    events = system.events()
    assert events.get("inferred", 0) == before
    assert 1 <= events["idle_fetches"] <= 5  # the five full frames of m5, each fetched once


async def test_interrupt_stops_frames_at_once_and_the_stream_goes_on(null_system):
    system = null_system
    audio = speechlike(4.0, RATE, seed=12)
    async with client(system) as c:
        rec = await c.start(3, "m7")
        pushing = asyncio.create_task(c.push(3, audio))
        await wait_for(lambda: len(rec.frames) >= 15, timeout=30, what="15 frames")
        pushing.cancel()
        try:
            await pushing
        except asyncio.CancelledError:
            pass
        t_interrupt = time.monotonic()
        await c.ws.send(json.dumps({"type": "stream_interrupt", "stream": 3}))
        await wait_for(lambda: rec.of_type("stream_interrupted"), what="stream_interrupted")
        (t_answer,) = [t for t, m in rec.messages if m["type"] == "stream_interrupted"]
        after = [t for t, _ in rec.frames if t > t_interrupt]
        last_seq = rec.frames[-1][1].seq
        count = len(rec.frames)
        await asyncio.sleep(0.6)  # no audio: nothing may come
        assert len(rec.frames) == count
        # a new epoch: time restarts at 0, sequence numbers and the walk carry on
        await c.push(3, speechlike(1.0, RATE, seed=13))
        await c.stop(3)
    print(
        f"\ninterrupt: answered in {1000 * (t_answer - t_interrupt):.1f} ms, "
        f"{len(after)} frame(s) after it was sent"
    )
    assert len(after) <= 2  # at most what was already on its way
    new = [f for _, f in rec.frames[count:]]
    assert new and new[0].seq > last_seq and new[0].audio_ms < 200
    assert all(f.frame_id == walk_frame(f.seq, 7) for _, f in rec.frames)
    assert rec.ended is not None and rec.ended["type"] == "stream_ended"
    assert system.events()["interrupts"] >= 1


async def test_concurrent_streams_on_different_models_never_mix(null_system):
    system = null_system
    models = {21: "m5", 22: "m7", 23: "m11", 24: "m13"}
    counts = {"m5": 5, "m7": 7, "m11": 11, "m13": 13}
    audio = {sid: speechlike(2.0, RATE, seed=sid) for sid in models}
    recs: dict[int, Received] = {}
    # two connections, two streams each
    async with client(system) as a, client(system) as b:
        owners = {21: a, 22: a, 23: b, 24: b}
        for sid, model in models.items():
            recs[sid] = await owners[sid].start(sid, model)
        await asyncio.gather(*(owners[sid].push(sid, audio[sid]) for sid in models))
        await asyncio.gather(*(owners[sid].stop(sid) for sid in models))
        assert not a.stray and not b.stray
    for sid, model in models.items():
        rec = recs[sid]
        frames = [f for _, f in rec.frames]
        assert rec.ended is not None and rec.ended["type"] == "stream_ended", rec.ended
        assert rec.ended["frames"] + rec.ended["dropped"] == 50
        assert len(frames) >= 35
        assert all(f.stream == sid for f in frames)
        assert all(f.frame_id == walk_frame(f.seq, counts[model]) for f in frames)
        assert [f.seq for f in frames] == sorted({f.seq for f in frames})


async def test_bad_stream_messages_are_answered(null_system):
    system = null_system
    async with client(system) as c:
        rec = c._stream(5)
        await c.ws.send(json.dumps({"type": "stream_start", "model_name": "nope", "stream": 5}))
        await c.ws.send(json.dumps({"type": "stream_start", "model_name": "m5", "quality": 0}))
        await c.ws.send(json.dumps({"type": "stream_stop", "stream": 99}))
        await c.ws.send(encode_audio_chunk(98, b"\x00\x00"))
        await c.ws.send(b"\x00\x01\x05")
        await wait_for(lambda: len(c.stray) >= 4, what="four stray errors")
        await wait_for(rec.done.is_set, what="stream 5's error")
        assert rec.ended is not None and rec.ended["code"] == "unknown_model"
        errors = [(m.get("stream"), m["code"], m["error"]) for m in c.stray]
        assert (None, "bad_request", "quality must be an integer 1..100") in errors
        assert (99, "bad_request", "unknown stream") in errors
        assert (98, "bad_request", "audio for an unknown stream") in errors
        assert (None, "bad_request", "audio chunk shorter than its header") in errors
        # the connection still works
        rec = await c.start(6, "m5")
        await c.stop(6)
        assert rec.ended is not None and rec.ended["frames"] == 0


async def test_same_audio_gives_the_same_frame_on_any_worker(processes, tiny_package):
    """Two torch workers: a stream served by one, then the same audio served by the other
    (the first is gone), give the same pictures frame by frame."""
    cv2 = pytest.importorskip("cv2")
    system = System(processes)
    system.broker()
    first = system.worker(tiny_package, backend="torch", name="t1", threads="1")
    # A busy 2-core CPU runs the tiny model far below 25 fps: let frames be late, not dropped.
    system.gateway(env={"LIPSYNC_STREAM_GRACE_FRAMES": "2000", "LIPSYNC_STREAM_TTL_MS": "60000"})
    system.wait_models("tiny", timeout=180)
    audio = speechlike(1.2, RATE, seed=21)
    runs: list[dict[int, Any]] = []
    for sid in (1, 2):
        async with client(system) as c:
            rec = await c.start(sid, "tiny", quality=95)
            await c.push(sid, audio)
            await c.stop(sid, timeout=120)
        assert rec.ended is not None and rec.ended["type"] == "stream_ended", rec.ended
        runs.append({f.seq: f for _, f in rec.frames if not f.idle})
        if sid == 1:  # hand over to a second worker
            system.worker(tiny_package, backend="torch", name="t2", threads="1")
            await wait_for(lambda: _workers(system) >= 2, timeout=180, what="worker t2")
            first.kill()
            await wait_for(lambda: _workers(system) == 1, timeout=60, what="t1 gone")
    assert {f.worker for f in runs[0].values()} == {"t1"}
    assert {f.worker for f in runs[1].values()} == {"t2"}
    common = sorted(set(runs[0]) & set(runs[1]))
    identical = sum(runs[0][s].image == runs[1][s].image for s in common)
    print(f"\nsame audio on two workers: {len(common)} frames in common, {identical} identical")
    assert len(common) >= 20
    for seq in common:
        a, b = runs[0][seq], runs[1][seq]
        assert a.frame_id == b.frame_id and a.bounds == b.bounds
        if a.image == b.image:
            continue
        pa = cv2.imdecode(np.frombuffer(a.image, np.uint8), cv2.IMREAD_COLOR).astype(int)
        pb = cv2.imdecode(np.frombuffer(b.image, np.uint8), cv2.IMREAD_COLOR).astype(int)
        assert np.abs(pa - pb).mean() < 0.5, seq


def _workers(system: System) -> int:
    status, _, body = http_get(system.port, "/health")
    return int(json.loads(body).get("workers", 0))


async def test_broker_keeps_a_stream_on_its_worker_while_it_can(processes, tmp_path):
    """Affinity: a stream's requests go to the worker that served it last, unless that one
    has no free credit (then the usual choice) or is gone."""
    from gateway.brokerclient import BrokerClient

    system = System(processes)
    system.broker()
    models = null_models(tmp_path / "models", {"m": 10})
    workers = {
        name: system.worker(models, name=name, capacity="1", null_delay_ms="150")
        for name in ("w1", "w2")
    }
    client = BrokerClient(system.frontend, heartbeat_s=0.2, liveness=5)
    await client.start(wait_s=30)
    try:

        async def ask(stream: str | None = None) -> str:
            opts = {"stream": stream} if stream else {}
            answer = await client.request("infer", model="m", frame=1, opts=opts, ttl_ms=10_000)
            return answer.header.worker

        async def registered() -> bool:
            stats = (await client.request("stats")).header.result
            return len(stats["workers"]) == 2

        deadline = time.monotonic() + 60
        while not await registered():
            assert time.monotonic() < deadline, "workers did not register"
            await asyncio.sleep(0.1)
        plain = [await ask() for _ in range(4)]
        assert set(plain) == {"w1", "w2"}  # idle workers take turns
        for key in ("a", "b", "c"):
            assert len({await ask(key) for _ in range(4)}) == 1
        await ask("d")  # "d" now has a worker
        both = await asyncio.gather(ask("d"), ask("d"))  # capacity 1: one must go elsewhere
        assert set(both) == {"w1", "w2"}
        home = await ask("e")
        workers[home].kill()
        other = ({"w1", "w2"} - {home}).pop()
        assert await ask("e") == other  # its worker is gone: the stream moves
    finally:
        await client.close()


async def test_limits_end_streams_cleanly(null_system):
    """Audio far ahead of the frames ends the stream; the per-connection bound refuses a
    stream; neither harms the connection's other streams."""
    system = null_system
    async with client(system) as c:
        flood = await c.start(40, "m5")
        await c.push(40, speechlike(12.0, RATE, seed=40), realtime=False)
        await wait_for(flood.done.is_set, what="the flooded stream to end")
        assert flood.ended is not None and flood.ended["type"] == "stream_error"
        assert flood.ended["code"] == "overloaded" and "ahead of the frames" in flood.ended["error"]
        recs = [await c.start(50 + i, "m7") for i in range(8)]
        extra = c._stream(60)
        await c.ws.send(json.dumps({"type": "stream_start", "model_name": "m7", "stream": 60}))
        await wait_for(extra.done.is_set, what="the ninth stream's refusal")
        assert extra.ended is not None and extra.ended["code"] == "overloaded"
        for rec in recs:
            await c.stop(rec.sid)
            assert rec.ended is not None and rec.ended["type"] == "stream_ended"


def test_latency_histogram_is_bounded_and_close():
    from gateway.streams import StreamMetrics

    h = StreamMetrics().latency
    assert h.quantile(0.5) is None
    values = np.random.default_rng(0).uniform(400, 600, 20_000)
    for v in values:
        h.add(float(v))
    h.add(10**9)  # beyond the last bucket: counted, not stored
    assert len(h.counts) < 700
    for q in (0.5, 0.95):
        exact = float(np.quantile(values, q))
        assert exact <= h.quantile(q) <= exact * 1.03
    assert h.snapshot()["count"] == 20_001


async def test_slow_workers_get_fewer_requests_each_in_time(processes, tmp_path):
    """A worker at 5 frames/s cannot serve 25: the stream asks for fewer frames (the rest are
    skipped, never requested) and shows those in time, instead of asking for all and
    showing none."""
    models = null_models(tmp_path / "models", {"m": 10})
    system = System(processes)
    system.broker()
    system.worker(models, name="slow", null_delay_ms="200", max_batch="1")
    system.gateway()
    system.wait_models("m")
    async with client(system) as c:
        rec = await c.start(1, "m")
        await c.push(1, speechlike(3.0, RATE, seed=3))
        await c.stop(1)
    events = system.events()
    frames = [f for _, f in rec.frames]
    assert rec.ended is not None and rec.ended["type"] == "stream_ended"
    assert rec.ended["frames"] + rec.ended["dropped"] == 75
    print(
        f"\nslow worker: {len(frames)} frames shown, {events['inferred']:.0f} requested, "
        f"{events['skipped']:.0f} skipped"
    )
    assert len(frames) >= 4
    assert events["skipped"] >= 30 and events["inferred"] <= 40


async def test_frames_that_would_be_ready_too_late_are_not_computed(processes, tmp_path):
    """Two streams on a worker that makes 12 frames/s, where 50 are asked for: each frame's
    request carries the frame's own deadline, the worker refuses those it could not have
    ready in time (``too_late``: dropped like late frames, not failures that end the
    stream) and few frames are computed for nobody (the broker's ``discarded``)."""
    models = null_models(tmp_path / "models", {"m": 10})
    system = System(processes)
    system.broker()
    system.worker(models, name="w", null_delay_ms="80", max_batch="1", max_delay_ms="0")
    system.gateway()
    system.wait_models("m")
    audio = speechlike(6.0, RATE, seed=4)
    async with client(system) as c:
        recs = [await c.start(sid, "m") for sid in (1, 2)]
        await asyncio.gather(*(c.push(sid, audio) for sid in (1, 2)))
        for sid in (1, 2):
            await c.stop(sid)
    for rec in recs:
        assert rec.ended is not None and rec.ended["type"] == "stream_ended", rec.ended
        assert rec.ended["frames"] + rec.ended["dropped"] == 150
    events = system.events()
    samples = metrics(system.port)
    discarded = samples[("lipsync_broker_events_total", (("event", "discarded"),))]
    served = sum(v for (n, _), v in samples.items() if n == "lipsync_worker_served_total")
    print(
        f"\ntwo streams on a slow worker: {sum(r.ended['frames'] for r in recs)} frames shown, "
        f"{events['inferred']:.0f} requested, {events.get('too_late', 0):.0f} refused too late, "
        f"{served:.0f} computed, {discarded:.0f} of them discarded"
    )
    assert events.get("too_late", 0) >= 1
    assert served >= 30 and discarded <= served / 8


async def test_a_stream_asking_for_four_frames_per_request(null_system):
    """``frames_per_request`` 4: the same frames as one at a time (in order, on the walk,
    each its own image), from about a quarter of the requests; the stream says its larger
    lookahead."""
    system = null_system
    audio = speechlike(3.0, RATE, seed=5)
    before = system.events().get("inferred", 0)
    async with client(system) as c:
        rec = await c.start(3, "m11", frames_per_request=4)
        assert rec.started is not None
        assert rec.started["frames_per_request"] == 4
        assert rec.started["lookahead_ms"] == lookahead_ms(25, 16000) + 120
        await c.push(3, audio)
        await c.stop(3)
    ended = rec.ended
    frames = [f for _, f in rec.frames]
    expected = frames_in(len(audio), 25, RATE)
    assert ended is not None and ended["type"] == "stream_ended", ended
    assert ended["frames"] + ended["dropped"] == expected
    assert len(frames) >= expected * 0.8
    seqs = [f.seq for f in frames]
    assert seqs == sorted(set(seqs))
    assert all(f.frame_id == walk_frame(f.seq, 11) for f in frames)
    spoken = [f for f in frames if not f.idle]
    assert spoken and all(f.image[:2] == b"\xff\xd8" for f in spoken)
    requests = system.events()["inferred"] - before
    print(f"\n4 frames per request: {len(spoken)} spoken frames from {requests:.0f} requests")
    assert requests <= len(spoken) / 3  # about a quarter (groups end at pauses and the stop)


async def test_frames_per_request_out_of_range_is_refused(null_system):
    async with client(null_system) as c:
        rec = c._stream(4)
        start = {"type": "stream_start", "model_name": "m11", "stream": 4}
        await c.ws.send(json.dumps({**start, "frames_per_request": 9}))
        await wait_for(lambda: rec.ended, what="the refusal")
    assert rec.started is None and rec.ended is not None
    assert rec.ended["code"] == "bad_request"
    assert rec.ended["error"] == "frames_per_request must be an integer 1..8"
