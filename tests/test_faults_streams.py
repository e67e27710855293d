"""Live streams (docs/streams.md) under faults: the broker killed and restarted, the worker
serving a stream killed. Real processes on loopback, a real WebSocket client pushing
speech-like audio in real time; null workers (5 ms a frame) so that 2 busy cores keep up.

What a person talking to the page should see: a pause, not the end of the conversation.
The stream must end normally (``stream_ended``, not ``stream_error``), its books must
balance (every frame of the audio delivered or counted dropped), its frames must stay in
order, and frames must flow again a moment after the fault. How many were dropped and the
longest gap are printed, not asserted.
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import time

import pytest
from conftest import wait_until
from gateway_harness import http_get, metrics
from speechlike import speechlike
from stream_harness import RATE, Received, System, client, null_models, wait_for

from shared.streamtime import frames_in


pytestmark = [pytest.mark.fault, pytest.mark.slow]

SECONDS = 8.0
BACK_WITHIN_S = 3.0
"""Frames must flow again this long after the fault (null workers, 0.2 s heartbeats)."""


@pytest.fixture
def system(processes, tmp_path) -> tuple[System, dict[str, subprocess.Popen[bytes]]]:
    """Broker, gateway, two null workers holding one model of 13 frames."""
    models = null_models(tmp_path / "models", {"m13": 13})
    system = System(processes)
    system.broker()
    workers = {name: system.worker(models, name=name, null_delay_ms="5") for name in ("w1", "w2")}
    system.gateway()
    system.wait_models("m13")
    wait_until(lambda: _workers(system) == 2, timeout=60, what="both workers registered")
    return system, workers


def _workers(system: System) -> int:
    status, _, body = http_get(system.port, "/health")
    return int(json.loads(body).get("workers", 0))


async def _stream_through(system: System, fault) -> tuple[Received, float]:
    """One stream of SECONDS of speech; ``fault()`` runs once a second of frames is in.
    Returns what the stream got and when the fault struck."""
    audio = speechlike(SECONDS, RATE, seed=21)
    async with client(system) as c:
        rec = await c.start(1, "m13")
        pushing = asyncio.create_task(c.push(1, audio))
        await wait_for(lambda: len(rec.frames) >= 25, timeout=30, what="a second of frames")
        struck = time.monotonic()
        await asyncio.to_thread(fault, rec)
        await pushing
        await c.stop(1)
    ended = rec.ended
    assert ended is not None and ended["type"] == "stream_ended", ended
    frames = [f for _, f in rec.frames]
    assert ended["frames"] == len(frames)
    assert ended["frames"] + ended["dropped"] == frames_in(len(audio), 25, RATE)
    seqs = [f.seq for f in frames]
    assert seqs == sorted(set(seqs)), "frames out of order or repeated"
    times = [t for t, _ in rec.frames]
    gap = max(b - a for a, b in zip(times, times[1:], strict=False))
    print(f"\n{len(frames)} frames, {ended['dropped']} dropped, longest gap {gap:.2f} s")
    return rec, struck


def _spoken_after(rec: Received, t: float) -> list:
    return [f for when, f in rec.frames if when > t and not f.idle]


async def test_a_stream_goes_on_through_a_broker_restart(system):
    """The broker is SIGKILLed mid-stream and started again at once: the frames in flight
    are lost (dropped), the workers re-register, and the same stream carries on."""
    system, _ = system

    def restart(_rec: Received) -> None:
        assert system.broker_process is not None
        system.broker_process.send_signal(signal.SIGKILL)
        system.broker_process.wait()
        system.broker()

    rec, struck = await _stream_through(system, restart)
    back = _spoken_after(rec, struck + BACK_WITHIN_S)
    assert len(back) >= 25, f"only {len(back)} frames more than {BACK_WITHIN_S} s after"
    events = {
        dict(labels)["event"]: value
        for (name, labels), value in metrics(system.port).items()
        if name == "lipsync_gateway_broker_client_events_total"
    }
    assert events["broker_restarts"] == 1, events  # the gateway did talk to a new broker


async def test_a_stream_moves_on_when_its_worker_dies(system):
    """The worker serving a stream is SIGKILLed: the broker sends what it held to the other
    worker (or the frames are dropped), and the stream carries on there."""
    system, workers = system
    victim: list[str] = []

    def kill_its_worker(rec: Received) -> None:
        name = next(f.worker for _, f in reversed(rec.frames) if not f.idle)
        victim.append(name)
        workers[name].send_signal(signal.SIGKILL)
        workers[name].wait()

    rec, struck = await _stream_through(system, kill_its_worker)
    back = _spoken_after(rec, struck + BACK_WITHIN_S)
    assert len(back) >= 25, f"only {len(back)} frames more than {BACK_WITHIN_S} s after"
    assert {f.worker for f in back} == {"w1", "w2"} - set(victim)
