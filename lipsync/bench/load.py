"""One load run against a running gateway: connect N clients, run a mode, report.

    lipsync bench --url ws://127.0.0.1:8086/ws --mode closed --clients 8 --in-flight 4

Timeline: all connections are opened first (not timed); then every client starts at once;
after ``warmup`` seconds the measurement window opens (rates, latencies and process CPU are
taken in it only) and after ``duration`` more seconds clients stop sending and drain.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any
from urllib.parse import urlsplit

import psutil

from lipsync.bench.audio import B_RATE, speech_like
from lipsync.bench.clients import STREAM_RATE, Plan, open_connection, run_client
from lipsync.bench.procs import Proc, Sampler, find_processes
from lipsync.bench.report import format_run, machine, write_json
from lipsync.bench.stats import Recorder, Window


__all__ = ["LoadConfig", "measure", "run_load", "run_sync", "touch_frames"]

MODES = ("closed", "sequential", "stream")
TRACK_S = 20.0  # seconds of test audio, reused round and round


@dataclass(slots=True)
class LoadConfig:
    url: str = "ws://127.0.0.1:8086/ws"
    mode: str = "closed"
    clients: int = 1
    in_flight: int = 4
    layout: str = "B"
    audio: bool = True
    rate: float = 0.0
    duration: float = 10.0
    warmup: float = 2.0
    drain: float = 4.0
    model: str = ""
    token: str = ""
    deflate: bool = False
    frames_per_request: int = 0  # streams: 0 = the gateway's default
    pids: tuple[int, ...] = ()
    scan: bool = True  # find the system's processes when no pids are given


_TRACKS: dict[int, Any] = {}


def _track(rate: int) -> Any:
    if rate not in _TRACKS:
        _TRACKS[rate] = speech_like(TRACK_S, rate, seed=rate)
    return _TRACKS[rate]


async def _ask(ws: Any, message: dict[str, Any], answer_type: str) -> dict[str, Any]:
    await ws.send(json.dumps(message))
    async with asyncio.timeout(30):
        while True:
            msg = await ws.recv()
            if isinstance(msg, str):
                data = json.loads(msg)
                if data.get("type") == answer_type:
                    return data  # type: ignore[no-any-return]


async def describe(plan: Plan, model: str) -> tuple[str, int]:
    """The model to use (``model``, or the first one listed) and its frame count."""
    ws = await open_connection(plan)
    try:
        if not model:
            models = (await _ask(ws, {"type": "list_models"}, "model_list")).get("models") or []
            if not models:
                raise SystemExit("lipsync bench: the gateway lists no model")
            model = str(models[0])
        meta = await _ask(ws, {"type": "get_metadata", "model_name": model}, "metadata")
        if not meta.get("success"):
            raise SystemExit(f"lipsync bench: no metadata for {model!r}: {meta.get('error')}")
        return model, int(meta["frame_count"])
    finally:
        await ws.close()


async def measure(cfg: LoadConfig, procs: list[Proc] | None = None) -> dict[str, Any]:
    """Run ``cfg`` and return the report (a JSON-ready dict)."""
    if cfg.mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}")
    plan = Plan(
        url=cfg.url,
        model=cfg.model,
        frame_count=1,
        fps=25.0,
        mode=cfg.mode,
        layout=cfg.layout.upper(),
        in_flight=cfg.in_flight,
        audio=cfg.audio,
        rate=cfg.rate,
        drain_s=cfg.drain,
        token=cfg.token,
        deflate=cfg.deflate,
        frames_per_request=cfg.frames_per_request,
    )
    plan.model, plan.frame_count = await describe(plan, cfg.model)
    if cfg.mode == "stream":
        plan.stream_track = _track(STREAM_RATE)
    elif plan.layout == "B" and cfg.audio:
        plan.b_track = _track(B_RATE)
        for fid in range(min(plan.frame_count, 1000)):
            plan.request(fid)  # build requests before the clock starts
    if procs is None:
        procs = find_processes(cfg.pids, urlsplit(cfg.url).port) if (cfg.pids or cfg.scan) else []
    # The load generator shares the machine: its own CPU is part of the picture.
    sampler = Sampler([*procs, Proc(os.getpid(), "bench", psutil.Process())])

    gate = asyncio.Semaphore(32)  # do not storm the gateway's accept queue

    async def connect() -> Any:
        async with gate:
            return await open_connection(plan)

    conns = await asyncio.gather(*(connect() for _ in range(cfg.clients)))
    load_before = machine()["loadavg"]
    now = time.monotonic()
    window = Window(now + cfg.warmup, now + cfg.warmup + cfg.duration)
    plan.stop_at = window.end
    rec = Recorder(window)

    async def sample() -> list[dict[str, Any]]:
        await asyncio.sleep(max(0.0, window.start - time.monotonic()))
        sampler.start()
        await asyncio.sleep(max(0.0, window.end - time.monotonic()))
        return sampler.stop()

    sampling = asyncio.create_task(sample())
    try:
        await asyncio.gather(*(run_client(i, ws, plan, rec) for i, ws in enumerate(conns)))
    finally:
        await asyncio.gather(*(ws.close() for ws in conns), return_exceptions=True)
    rows = await sampling
    info = machine()
    info["loadavg_before"] = load_before
    return {
        "config": {**asdict(cfg), "model": plan.model, "frame_count": plan.frame_count},
        "machine": info,
        "result": rec.summary(),
        "processes": rows,
    }


def run_sync(cfg: LoadConfig, procs: list[Proc] | None = None) -> dict[str, Any]:
    """``measure`` on a fresh event loop (uvloop when installed: the client must not be the
    bottleneck it measures)."""
    try:
        import uvloop

        factory = uvloop.new_event_loop
    except ImportError:
        factory = None
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(measure(cfg, procs))


def config_from_args(args: argparse.Namespace) -> LoadConfig:
    pids = tuple(int(p) for p in (args.pids or "").split(",") if p.strip())
    return LoadConfig(
        url=args.url,
        mode=args.mode,
        clients=args.clients,
        in_flight=args.in_flight,
        layout=args.layout,
        audio=not args.no_audio,
        rate=args.rate,
        duration=args.duration,
        warmup=args.warmup,
        model=args.model or "",
        token=args.token or os.environ.get("LIPSYNC_TOKEN", ""),
        deflate=args.deflate,
        frames_per_request=getattr(args, "frames_per_request", 0) or 0,
        pids=pids,
    )


def run_load(args: argparse.Namespace) -> int:
    report = run_sync(config_from_args(args))
    print(format_run(report), flush=True)
    if args.json:
        write_json(args.json, report)
        print(f"wrote {args.json}", file=sys.stderr)
    r = report["result"]
    return 0 if r["answered"] > 0 else 1


VIDEO_TYPES = ("full_body", "crops_328", "rois_320", "model_inputs")


async def _touch(url: str, model: str, frame_count: int, rounds: int, clients: int) -> int:
    """Ask for every frame of every video ``rounds`` times over ``clients`` connections
    (``get_video_frame``, 4 in flight each); the number of frames answered."""
    plan = Plan(url=url, model=model, frame_count=frame_count, fps=25.0, mode="closed")
    work = [
        json.dumps({"type": "get_video_frame", "model_name": model, "frame_id": f, "video_type": v})
        for _ in range(rounds)
        for f in range(frame_count)
        for v in VIDEO_TYPES
    ]
    answered = 0

    async def one(ws: Any, items: list[str]) -> None:
        nonlocal answered
        pending = 0
        it = iter(items)
        for msg in it:
            await ws.send(msg)
            pending += 1
            if pending >= 4:
                break
        async with asyncio.timeout(120):
            while pending:
                reply = await ws.recv()
                pending -= 1
                answered += isinstance(reply, bytes)
                nxt = next(it, None)
                if nxt is not None:
                    await ws.send(nxt)
                    pending += 1

    conns = [await open_connection(plan) for _ in range(clients)]
    try:
        await asyncio.gather(*(one(ws, work[i::clients]) for i, ws in enumerate(conns)))
    finally:
        await asyncio.gather(*(ws.close() for ws in conns), return_exceptions=True)
    return answered


def touch_frames(url: str, model: str, frame_count: int, *, rounds: int, clients: int) -> int:
    """Make the workers read every decoded frame (so their mappings of the shared frame
    caches are fully resident before memory is measured)."""
    return asyncio.run(_touch(url, model, frame_count, rounds, clients))
