"""A broker, workers and a gateway as real processes, and a WebSocket client for
server-driven streams (docs/streams.md): used by test_streams.py and test_faults_streams.py."""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from conftest import Processes, free_port, wait_until
from gateway_harness import http_get, metrics
from websockets.asyncio.client import ClientConnection, connect

from shared.streamproto import encode_audio_chunk, parse_tagged_frame


BEATS = {"LIPSYNC_HEARTBEAT_S": "0.2", "LIPSYNC_LIVENESS": "5"}
RATE = 16_000
CHUNK_S = 0.02


# -- system -------------------------------------------------------------------------------------


class System:
    """Broker, workers and a gateway as real processes (killed by ``processes``)."""

    def __init__(self, processes: Processes) -> None:
        self.processes = processes
        self.frontend = f"tcp://127.0.0.1:{free_port()}"
        self.backend = f"tcp://127.0.0.1:{free_port()}"
        self.port = 0
        self.broker_process: subprocess.Popen[bytes] | None = None

    def broker(self) -> subprocess.Popen[bytes]:
        self.broker_process = self.processes.start(
            "broker", "--frontend", self.frontend, "--backend", self.backend, env=BEATS
        )
        return self.broker_process

    def worker(
        self, models_dir: Path, *, backend: str = "null", name: str = "w", **kw: str
    ) -> subprocess.Popen[bytes]:
        argv = ["worker", "--backend", backend, "--broker", self.backend]
        argv += ["--models-dir", str(models_dir), "--worker-id", name]
        for key, value in kw.items():
            argv += [f"--{key.replace('_', '-')}", value]
        return self.processes.start(*argv, env=BEATS, name=name)

    def gateway(self, env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.processes.start(
            "gateway", "--port", str(self.port), "--broker", self.frontend, env=env
        )
        wait_until(self._health_ok, timeout=60, what="the gateway to answer /health")

    def _health_ok(self) -> bool:
        try:
            return http_get(self.port, "/health")[0] in (200, 503)
        except OSError:
            return False

    def wait_models(self, *models: str, timeout: float = 120) -> None:
        def holds() -> bool:
            try:
                status, _, body = http_get(self.port, "/health")
            except OSError:
                return False
            return set(models) <= set(json.loads(body).get("models", []))

        wait_until(holds, timeout=timeout, what=f"workers holding {', '.join(models)}")

    def events(self) -> dict[str, float]:
        """The gateway's stream counters from /metrics."""
        out = {}
        for (name, labels), value in metrics(self.port).items():
            if name == "lipsync_gateway_stream_events_total":
                out[dict(labels)["event"]] = value
        return out

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"


def null_models(root: Path, counts: dict[str, int]) -> Path:
    """Package directories the null backend reads its models (and frame counts) from."""
    for name, frames in counts.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        info = {"videos": {"full_body_img": {"frame_count": frames, "fps": 25}}}
        (root / name / "package_info.json").write_text(json.dumps(info))
    return root


# -- client -------------------------------------------------------------------------------------


@dataclass
class Received:
    """Everything one stream got back, with arrival times."""

    sid: int
    started: dict[str, Any] | None = None
    frames: list[tuple[float, Any]] = field(default_factory=list)  # (time, TaggedFrame)
    messages: list[tuple[float, dict[str, Any]]] = field(default_factory=list)
    ended: dict[str, Any] | None = None
    done: asyncio.Event = field(default_factory=asyncio.Event)

    def of_type(self, kind: str) -> list[dict[str, Any]]:
        return [m for _, m in self.messages if m["type"] == kind]


class Client:
    """One WebSocket with a reader that files every answer under its stream."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.streams: dict[int, Received] = {}
        self.stray: list[Any] = []
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        async for message in self.ws:
            now = time.monotonic()
            if isinstance(message, bytes):
                frame = parse_tagged_frame(message)
                self._stream(frame.stream).frames.append((now, frame))
                continue
            data = json.loads(message)
            rec = self.streams.get(data.get("stream"))
            if rec is None:
                self.stray.append(data)
                continue
            rec.messages.append((now, data))
            if data["type"] == "stream_started":
                rec.started = data
            if data["type"] in ("stream_ended", "stream_error"):
                rec.ended = data
                rec.done.set()

    def _stream(self, sid: int) -> Received:
        return self.streams.setdefault(sid, Received(sid))

    async def start(self, sid: int, model: str, **fields: Any) -> Received:
        rec = self._stream(sid)
        msg = {"type": "stream_start", "model_name": model, "stream": sid, **fields}
        await self.ws.send(json.dumps(msg))
        await wait_for(lambda: rec.started or rec.ended, what=f"stream {sid} to start")
        assert rec.started is not None, rec.ended
        return rec

    async def push(self, sid: int, pcm: np.ndarray, *, realtime: bool = True) -> float:
        """Send ``pcm`` in 20 ms chunks, in real time; returns when the last went out."""
        step = int(CHUNK_S * RATE)
        t0 = time.monotonic()
        for i in range(0, len(pcm), step):
            await self.ws.send(encode_audio_chunk(sid, pcm[i : i + step].astype("<i2").tobytes()))
            if realtime:
                await asyncio.sleep(max(0.0, t0 + (i + step) / RATE - time.monotonic()))
        return time.monotonic()

    async def stop(self, sid: int, timeout: float = 60) -> Received:
        rec = self.streams[sid]
        await self.ws.send(json.dumps({"type": "stream_stop", "stream": sid}))
        await wait_for(rec.done.is_set, timeout=timeout, what=f"stream {sid} to end")
        return rec

    async def close(self) -> None:
        await self.ws.close()
        self._reader.cancel()
        try:
            await self._reader
        except (asyncio.CancelledError, Exception):
            pass


async def wait_for(predicate, *, timeout: float = 30, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        await asyncio.sleep(0.02)
    return value


@contextlib.asynccontextmanager
async def client(system: System) -> AsyncIterator[Client]:
    async with connect(system.url, max_size=None) as ws:
        c = Client(ws)
        try:
            yield c
        finally:
            await c.close()


def gaps_ms(rec: Received) -> list[float]:
    times = [t for t, _ in rec.frames]
    return sorted(1000 * (b - a) for a, b in zip(times, times[1:], strict=False))


def p95(values: list[float]) -> float:
    return values[min(len(values) - 1, int(0.95 * len(values)))] if values else float("nan")
