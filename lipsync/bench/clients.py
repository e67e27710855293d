"""The load modes: what one benchmark client does on its WebSocket connection.

- **closed** loop: keep ``in_flight`` requests outstanding; every answer sends the next one.
  Layout B (crop mode, answered with layout C, 640 ms of 24 kHz audio unless ``no_audio``)
  or layout A (composite, answered with the raw JPEG, in request order).
- **sequential**: a closed loop with one request in flight, as the original page did.
- **stream**: one server-driven stream per connection (docs/streams.md): 16 kHz audio sent
  in real time in 20 ms chunks (as a microphone would), tagged frames received at 25 fps.

Each client stops sending at ``plan.stop_at`` and then waits up to ``plan.drain_s`` for what
it still expects; whatever has not come by then is counted as lost. A latency is taken from
the moment a request was handed to the socket to the moment its answer was read; for
streams, from the moment the audio that a frame shows was captured (sent in real time) to
the moment the frame was read ("audio-in to frame-out", which includes the stream's
lookahead).
"""

from __future__ import annotations

import asyncio
import json
import struct
import time
from collections import defaultdict, deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from lipsync.bench.audio import b_window
from lipsync.bench.stats import Recorder, classify_error
from shared.browser import A_FRAME, A_NAME_LEN, B_U32, C_HEADER


__all__ = ["STREAM_CHUNK_MS", "STREAM_RATE", "Plan", "open_connection", "run_client"]

STREAM_RATE = 16_000
STREAM_CHUNK_MS = 20
_TAGGED = struct.Struct("<BIIIIB4fIB")  # up to the worker id length (docs/streams.md)
_U32 = struct.Struct("<I")
TAGGED_FRAME = 3
FLAG_IDLE = 1


@dataclass(slots=True)
class Plan:
    """What every client of one run does."""

    url: str
    model: str
    frame_count: int
    fps: float
    mode: str  # closed | sequential | stream
    layout: str = "B"  # A | B
    in_flight: int = 4
    audio: bool = True  # layout B carries 640 ms of audio
    rate: float = 0.0  # closed loop: at most this many requests/s per client (0 = no limit)
    stop_at: float = 0.0  # monotonic: stop sending
    drain_s: float = 4.0
    token: str = ""
    deflate: bool = False
    frames_per_request: int = 0  # streams: 0 = the gateway's default
    b_track: np.ndarray | None = None  # 24 kHz int16
    stream_track: np.ndarray | None = None  # 16 kHz int16
    _b_cache: dict[int, bytes] = field(default_factory=dict)

    def request(self, frame_id: int) -> bytes:
        """The binary request for ``frame_id`` in this plan's layout (cached: the same frame
        always carries the same audio)."""
        data = self._b_cache.get(frame_id)
        if data is None:
            name = self.model.encode()
            if self.layout == "A":
                data = A_NAME_LEN.pack(len(name)) + name + A_FRAME.pack(frame_id)
            else:
                track = self.b_track
                audio = (
                    b_window(track, frame_id, self.fps) if self.audio and track is not None else b""
                )
                data = b"".join(
                    (B_U32.pack(len(name)), name, struct.pack("<II", frame_id, len(audio)), audio)
                )
            self._b_cache[frame_id] = data
        return data


async def open_connection(plan: Plan) -> ClientConnection:
    headers = {"Authorization": f"Bearer {plan.token}"} if plan.token else None
    return await connect(
        plan.url,
        additional_headers=headers,
        compression="deflate" if plan.deflate else None,
        max_size=16 << 20,
        ping_interval=None,
        open_timeout=30,
        close_timeout=2,
    )


async def run_client(index: int, ws: ClientConnection, plan: Plan, rec: Recorder) -> None:
    """Run one client to the end of the plan (stop, then drain)."""
    try:
        if plan.mode == "stream":
            await _stream(index, ws, plan, rec)
        else:
            await _closed(index, ws, plan, rec)
    except ConnectionClosed:
        rec.errors["connection_closed"] += 1


def _deadline(plan: Plan) -> float:
    """The drain deadline on the event loop's clock (``plan`` uses ``time.monotonic``)."""
    loop = asyncio.get_running_loop()
    return loop.time() + (plan.stop_at + plan.drain_s - time.monotonic())


async def _closed(index: int, ws: ClientConnection, plan: Plan, rec: Recorder) -> None:
    in_flight = 1 if plan.mode == "sequential" else max(1, plan.in_flight)
    fc = plan.frame_count
    cursor = (index * 37) % fc  # clients spread over the avatar's frames
    by_frame: defaultdict[int, deque[float]] = defaultdict(deque)  # layout B: match by id
    in_order: deque[float] = deque()  # layout A: answers come in request order
    outstanding = 0
    interval = 1.0 / plan.rate if plan.rate > 0 else 0.0
    next_send = time.monotonic()

    async def send_one() -> None:
        nonlocal cursor, outstanding, next_send
        if interval:
            delay = next_send - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            next_send = max(next_send + interval, time.monotonic() - interval)
        fid = cursor
        cursor = (cursor + 1) % fc
        data = plan.request(fid)
        now = time.monotonic()
        (in_order if plan.layout == "A" else by_frame[fid]).append(now)
        outstanding += 1
        await ws.send(data)
        rec.on_send(len(data), now)

    for _ in range(in_flight):
        await send_one()
    try:
        async with asyncio.timeout_at(_deadline(plan)):
            while outstanding:
                msg = await ws.recv()
                now = time.monotonic()
                if isinstance(msg, str):
                    if not _text_answer(msg, plan, in_order, rec, now):
                        continue
                elif plan.layout == "A":
                    sent_at = in_order.popleft() if in_order else now
                    if msg:
                        rec.on_answer(sent_at, len(msg), now=now)
                    else:
                        rec.on_error("error_a", now=now)
                else:
                    if not _c_answer(msg, by_frame, rec, now):
                        continue
                outstanding -= 1
                if now < plan.stop_at:
                    await send_one()
    except TimeoutError:
        pass
    rec.lost += outstanding


def _c_answer(
    msg: bytes, by_frame: defaultdict[int, deque[float]], rec: Recorder, now: float
) -> bool:
    """Account for one layout C answer; False if it answers no request of ours."""
    if len(msg) < C_HEADER.size or msg[0] > 1:
        rec.unexpected[f"binary_{msg[0] if msg else 'empty'}"] += 1
        return False
    success, fid, ms, length = C_HEADER.unpack_from(msg, 0)
    waiting = by_frame.get(fid)
    if not waiting:
        rec.unexpected["unmatched_c"] += 1
        return False
    sent_at = waiting.popleft()
    if not waiting:
        del by_frame[fid]
    if success:
        rec.on_answer(sent_at, len(msg), server_ms=float(ms), now=now)
    else:
        text = msg[C_HEADER.size : C_HEADER.size + length].decode("utf-8", "replace")
        rec.on_error(classify_error(text), len(msg), now=now)
    return True


def _text_answer(msg: str, plan: Plan, in_order: deque[float], rec: Recorder, now: float) -> bool:
    """A text message during a binary closed loop. Layout A errors are empty binary
    messages, so text only answers a request if it is an error while A requests wait."""
    try:
        kind = str(json.loads(msg).get("type", "json"))
    except (ValueError, AttributeError):
        kind = "text"
    if plan.layout == "A" and kind == "error" and in_order:
        in_order.popleft()
        rec.on_error(classify_error(msg), now=now)
        return True
    rec.unexpected[f"text_{kind}"] += 1
    return False


# -- streams -------------------------------------------------------------------------------


async def _stream(index: int, ws: ClientConnection, plan: Plan, rec: Recorder) -> None:
    sid = index + 1
    start = {
        "type": "stream_start",
        "model_name": plan.model,
        "sample_rate": STREAM_RATE,
        "mode": "crop",
        "stream": sid,
    }
    if plan.frames_per_request:
        start["frames_per_request"] = plan.frames_per_request
    await ws.send(json.dumps(start))
    async with asyncio.timeout(30):
        while True:
            msg = await ws.recv()
            if isinstance(msg, str):
                answer = json.loads(msg)
                if answer.get("type") == "stream_started":
                    break
                if answer.get("type") == "stream_error":
                    rec.errors[f"stream_{answer.get('code', 'error')}"] += 1
                    return
    track = plan.stream_track
    assert track is not None
    chunk = STREAM_RATE * STREAM_CHUNK_MS // 1000
    head = b"\x00\x01" + _U32.pack(sid)
    # Clients start at different offsets of the track, and the first chunk goes out at once.
    offset = (index * 7919) % len(track)
    state: dict[str, Any] = {"t0": time.monotonic(), "next_seq": 0, "gaps": 0, "ended": None}

    async def sender() -> None:
        k = 0
        t0 = time.monotonic()
        state["t0"] = t0  # time of the stream's first sample: capture starts now
        while True:
            due = t0 + (k + 1) * STREAM_CHUNK_MS / 1000  # a chunk leaves once captured
            delay = due - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            if time.monotonic() >= plan.stop_at:
                break
            idx = (offset + k * chunk + np.arange(chunk)) % len(track)
            data = head + track[idx].tobytes()
            await ws.send(data)
            if time.monotonic() in rec.window:
                rec.bytes_out += len(data)
            k += 1
        await ws.send(json.dumps({"type": "stream_stop", "stream": sid}))
        state["audio_s"] = k * STREAM_CHUNK_MS / 1000

    send_task = asyncio.create_task(sender())
    try:
        async with asyncio.timeout_at(_deadline(plan) + 2.0):
            while state["ended"] is None:
                msg = await ws.recv()
                now = time.monotonic()
                if isinstance(msg, str):
                    answer = json.loads(msg)
                    kind = answer.get("type")
                    if kind == "stream_ended" and answer.get("stream") == sid:
                        state["ended"] = answer
                    elif kind == "stream_error":
                        rec.errors[f"stream_{answer.get('code', 'error')}"] += 1
                    else:
                        rec.unexpected[f"text_{kind}"] += 1
                    continue
                if not msg or msg[0] != TAGGED_FRAME or len(msg) < _TAGGED.size:
                    rec.unexpected["binary"] += 1
                    continue
                _, stream, seq, _fid, audio_ms, flags, *_b, proc_us, wlen = _TAGGED.unpack_from(
                    msg, 0
                )
                if stream != sid:
                    rec.unexpected["other_stream"] += 1
                    continue
                if seq > state["next_seq"]:
                    state["gaps"] += seq - state["next_seq"]
                state["next_seq"] = seq + 1
                if flags & FLAG_IDLE:
                    rec.idle += 1
                worker = bytes(msg[_TAGGED.size : _TAGGED.size + wlen]).decode("utf-8", "replace")
                rec.workers[worker or "-"] += 1
                shown_at = state["t0"] + audio_ms / 1000
                rec.on_answer(shown_at, len(msg), server_ms=proc_us / 1000, now=now)
    except TimeoutError:
        rec.errors["stream_end_timeout"] += 1
    finally:
        if not send_task.done():
            send_task.cancel()
        try:
            await send_task
        except (asyncio.CancelledError, ConnectionClosed):
            pass
    # Dropped frames leave gaps in the sequence; the server also counts them in
    # stream_ended (plus any at the very end, which leave no gap we could see).
    ended = state["ended"] or {}
    dropped = max(state["gaps"], int(ended.get("dropped", 0) or 0))
    rec.dropped += dropped
    rec.sent += state["next_seq"] + dropped - state["gaps"]  # frames the server owed us
