"""Layout A through stalls and deaths: every request gets exactly one answer, in request
order (DESIGN.md section 4, rule 1 of section 3).

A layout A client matches answers to requests by order alone, so one missing answer puts
every later frame on the wrong request. These tests pipeline A requests at a steady rate
over real connections while a worker is SIGKILLed or stalled with SIGSTOP, and check on
every connection that as many answers came back as requests went out, each the frame its
request asked for (the null workers write the frame id into each JPEG), and that the
gateway gave up none of them (``lipsync_gateway_dropped_frames_total``) for these clients,
which read everything promptly. Each scenario runs several times: the losses these tests
were written for were timing-dependent.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time

import pytest
from fault_harness import FaultSystem
from gateway_harness import metric
from websockets.asyncio.client import connect

from shared.browser import RequestA
from workers.null import jpeg_frame_tag


pytestmark = pytest.mark.fault

RUNS = 3


async def pipeline_a(url: str, model: str, frames: list[int], rate: float) -> list[bytes]:
    """Send one A request per frame id at ``rate`` per second without waiting for answers,
    read every answer as it comes; the answers in arrival order."""
    answers: list[bytes] = []
    async with connect(url, max_size=None) as ws:

        async def read() -> None:
            while len(answers) < len(frames):
                message = await asyncio.wait_for(ws.recv(), 30)
                assert isinstance(message, bytes), message
                answers.append(message)

        reader = asyncio.create_task(read())
        start = time.monotonic()
        for i, frame in enumerate(frames):
            await ws.send(RequestA(model, frame).serialize())
            await asyncio.sleep(max(0.0, start + (i + 1) / rate - time.monotonic()))
        await reader
    return answers


def check_order(frames: list[int], answers: list[bytes]) -> int:
    """Exactly one answer per request, each (where it is an image) the frame its request
    asked for; the number of error answers (empty messages)."""
    assert len(answers) == len(frames)
    tags = [jpeg_frame_tag(a) if a else None for a in answers]
    misplaced = [
        (i, frame, tag)
        for i, (frame, tag, answer) in enumerate(zip(frames, tags, answers, strict=True))
        if answer and tag != frame
    ]
    assert not misplaced, f"answers out of place (index, asked, got): {misplaced[:5]}"
    return sum(1 for a in answers if not a)


def dropped(port: int) -> float:
    return metric(port, "lipsync_gateway_dropped_frames_total", kind="a")


async def test_a_order_and_count_survive_a_worker_sigkill(fault_system: FaultSystem):
    """Three null workers; four connections each pipelining 150 A requests at 100/s; one
    worker SIGKILLed 0.7 s in. Every connection gets 150 answers in order, none dropped."""
    system = fault_system
    system.start_broker()
    names = ["w1", "w2", "victim"]
    for name in names:
        system.start_null_worker(name, delay_ms=5, frame_tags=True)
    system.start_gateway_process(timeout_ms=2000)
    await system.wait_ready(*names)
    for run in range(RUNS):
        frame_lists = [[run * 1_000_000 + c * 10_000 + i for i in range(150)] for c in range(4)]
        clients = [
            asyncio.create_task(pipeline_a(system.url, system.model, frames, 100))
            for frames in frame_lists
        ]
        await asyncio.sleep(0.7)
        system.workers["victim"].send_signal(signal.SIGKILL)
        results = await asyncio.gather(*clients)
        errors = [check_order(f, a) for f, a in zip(frame_lists, results, strict=True)]
        print(f"run {run}: error answers per connection {errors}")
        assert await asyncio.to_thread(dropped, system.port) == 0
        system.workers["victim"].wait()
        system.start_null_worker("victim", delay_ms=5, frame_tags=True)
        await system.wait_ready(*names)


async def test_a_order_and_count_survive_a_stalled_worker(fault_system: FaultSystem):
    """Two null workers (2 ms a frame); one connection pipelining 300 A requests at 100/s;
    one worker SIGSTOPped for 2.5 s (declared dead meanwhile), then resumed. All 300
    answers arrive in order, none dropped by the gateway."""
    system = fault_system
    system.start_broker()
    system.start_null_worker("w1", delay_ms=2, frame_tags=True)
    stalled = system.start_null_worker("stalled", delay_ms=2, frame_tags=True)
    system.start_gateway_process(timeout_ms=2000)
    await system.wait_ready("w1", "stalled")
    for run in range(RUNS):
        frames = [run * 1_000_000 + i for i in range(300)]
        client = asyncio.create_task(pipeline_a(system.url, system.model, frames, 100))
        await asyncio.sleep(0.5)
        os.kill(stalled.pid, signal.SIGSTOP)
        await asyncio.sleep(2.5)
        os.kill(stalled.pid, signal.SIGCONT)
        errors = check_order(frames, await client)
        print(f"run {run}: {errors} error answers of {len(frames)}")
        assert await asyncio.to_thread(dropped, system.port) == 0
        await system.wait_ready("w1", "stalled")
