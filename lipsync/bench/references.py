"""The references every pipeline number is divided by, measured in the same run.

- **bare model**: UNet-328 forward frames/s at the workers' batch size and device, and the
  audio encoder's time per window, by ``workers.bench_model`` (its code, in a subprocess so
  that torch's threads and memory are gone before the pipeline runs).
- **broker direct**: requests sent straight to the broker's frontend with the gateway's own
  client, which sees the worker's time in every reply (``timings["worker"]``). The gap
  between a WebSocket client's latency and the worker's time is what gateway + broker add.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

from lipsync.bench.audio import B_RATE, b_window, speech_like
from lipsync.bench.stats import percentiles


__all__ = ["bare_model", "broker_direct"]

REPO = Path(__file__).resolve().parents[2]


def bare_model(
    width: str,
    batches: list[int],
    *,
    seconds: float = 4.0,
    device: str = "cpu",
    threads: int = 0,
) -> dict[str, Any]:
    """``workers.bench_model``'s UNet and audio-encoder timings for one width, plus CPU ms
    per frame (:mod:`lipsync.bench.bare`), in a subprocess so that torch's threads and
    memory are gone before the pipeline runs. ``threads`` > 0 sets torch's intra-op
    threads, as ``lipsync worker --threads`` does for a worker."""
    cmd = [
        sys.executable, "-m", "lipsync.bench.bare", "--width", width,
        "--batches", ",".join(str(b) for b in batches), "--seconds", str(seconds),
        "--threads", str(threads), "--device", device,
    ]  # fmt: skip
    done = subprocess.run(cmd, cwd=REPO, check=True, capture_output=True, text=True)
    report: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return report


async def _direct(
    frontend: str, model: str, frame_count: int, rate: float, seconds: float, audio: bool, mode: str
) -> dict[str, Any]:
    from gateway.brokerclient import BrokerClient
    from shared.errors import ServiceError

    track = speech_like(4.0, B_RATE, seed=1) if audio else None
    opts: dict[str, Any] = {"mode": mode}
    if audio:
        opts["audio_sr"] = B_RATE
    client = BrokerClient(frontend)
    await client.start(wait_s=10)
    # the worker's own count (a null worker told --models serves 100 frames whatever the
    # package holds)
    meta = await client.request("metadata", model=model)
    frame_count = min(frame_count, int(meta.header.result.get("frame_count", frame_count)))
    rtt: list[float] = []
    worker: list[float] = []
    errors: Counter[str] = Counter()
    try:
        end = time.monotonic() + seconds
        next_at = time.monotonic()
        frame = 0
        while time.monotonic() < end:
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))
            next_at += 1 / rate
            payload = (b_window(track, frame),) if track is not None else ()
            t0 = time.monotonic()
            try:
                answer = await client.request(
                    "infer", model=model, frame=frame, opts=opts, payload=payload
                )
            except ServiceError as exc:
                errors[exc.code.value] += 1
                continue
            rtt.append((time.monotonic() - t0) * 1000)
            worker.append(float(answer.header.timings.get("worker", 0.0)))
            frame = (frame + 1) % frame_count
    finally:
        await client.close()
    return {
        "rate": rate,
        "errors": dict(errors),
        "broker_rtt_ms": percentiles(rtt),
        "worker_ms": percentiles(worker),
        "broker_minus_worker_ms": percentiles([r - w for r, w in zip(rtt, worker, strict=True)]),
    }


def broker_direct(
    frontend: str,
    model: str,
    frame_count: int,
    *,
    rate: float = 25.0,
    seconds: float = 5.0,
    audio: bool = True,
    mode: str = "crop",
) -> dict[str, Any]:
    """One request at a time at ``rate``/s straight to the broker: round trip, worker's own
    time, and their difference per request, as percentiles (ms)."""
    return asyncio.run(_direct(frontend, model, frame_count, rate, seconds, audio, mode))
