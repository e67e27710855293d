"""``python -m lipsync.bench.forwarder``: the broker against the least a broker can be.

The reference is a minimal credit-based forwarder: a ROUTER facing clients, a ROUTER facing
workers, one loop that gives each request to the worker with the most free credits (queued
when none has any), rewrites the request id in the small msgpack header both ways (as any
broker must, to tell clients' ids apart) and passes payload frames through untouched. It
sends and receives with the broker's own frame functions (``shared.zmqwire``), so that the
ratio prices the broker's logic, not a difference in how the two call ZeroMQ. No
deadlines, heartbeats, re-dispatch, warm-up, bounds or stats: what the real broker does
beyond it is what the ratio prices.

Both are driven by the same raw client (a DEALER keeping ``--in-flight`` requests out) and
the same echo workers (a DEALER each that registers with READY, heartbeats, and answers
every request at once with a ``--reply-bytes`` payload), all speaking our envelope, each
its own process, in alternated runs: ``broker, forwarder, broker, forwarder, ...``. It
prints requests/s for each run and the ratio broker / forwarder of the medians.

A tool, not a test: it prints numbers and asserts nothing.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import time
from collections import deque
from typing import Any

import msgpack
import zmq

from shared.envelope import Heartbeat, Kind, Ready, Reply, Request, decode, encode
from shared.zmqwire import recv_parts, send_parts


__all__ = ["main", "serve_echo", "serve_forwarder", "drive"]

HEARTBEAT_S = 0.5
MODEL = "m"
_META = {"frame_count": 1 << 30, "fps": 25.0, "size": [1280, 720], "bounds": [0, 0, 1, 1]}


def serve_echo(backend: str, name: str, capacity: int, reply_bytes: int) -> None:
    """An echo worker: READY, then a REPLY with ``reply_bytes`` for every REQUEST."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(backend)
    sock.send_multipart(encode(Ready(worker=name, capacity=capacity, models={MODEL: _META})))
    payload = b"\xff" * reply_bytes
    heartbeat = encode(Heartbeat())
    next_beat = time.monotonic() + HEARTBEAT_S
    while True:
        if sock.poll(int(HEARTBEAT_S * 1000)):
            while True:
                try:
                    frames = sock.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
                if frames[0][0] == Kind.REQUEST:
                    rid = msgpack.unpackb(frames[1])["id"]
                    sock.send_multipart(encode(Reply(id=rid, worker=name), [payload]))
        now = time.monotonic()
        if now >= next_beat:
            sock.send_multipart(heartbeat)
            next_beat = now + HEARTBEAT_S


def serve_forwarder(frontend: str, backend: str) -> None:
    """The minimal credit-based forwarder (see the module docstring)."""
    ctx = zmq.Context()
    front = ctx.socket(zmq.ROUTER)
    back = ctx.socket(zmq.ROUTER)
    for s in (front, back):
        s.setsockopt(zmq.LINGER, 0)
        s.setsockopt(zmq.SNDHWM, 0)
        s.setsockopt(zmq.RCVHWM, 0)
    front.bind(frontend)
    back.bind(backend)
    credits: dict[bytes, int] = {}
    routes: dict[int, tuple[bytes, int, bytes]] = {}  # our id -> client, its id, worker
    waiting: deque[list[Any]] = deque()
    ids = iter(range(1, 1 << 62))
    poller = zmq.Poller()
    poller.register(front, zmq.POLLIN)
    poller.register(back, zmq.POLLIN)

    def dispatch(frames: list[Any]) -> bool:
        if not credits:
            return False
        worker = max(credits, key=credits.__getitem__)
        if credits[worker] <= 0:
            return False
        client, kind, header, *payload = frames
        data = msgpack.unpackb(header.bytes)
        bid = next(ids)
        routes[bid] = (client.bytes, data["id"], worker)
        data["id"] = bid
        credits[worker] -= 1
        send_parts(back, [worker, kind, msgpack.packb(data), *payload])
        return True

    while True:
        for sock, _ in poller.poll():
            while True:
                try:
                    frames = recv_parts(sock)
                except zmq.Again:
                    break
                kind = frames[1].bytes[0]
                if sock is front:
                    if kind == Kind.REQUEST and not dispatch(frames):
                        waiting.append(frames)
                    continue
                worker = frames[0].bytes
                if kind == Kind.READY:
                    credits[worker] = msgpack.unpackb(frames[2].bytes)["capacity"]
                elif kind in (Kind.REPLY, Kind.ERROR):
                    data = msgpack.unpackb(frames[2].bytes)
                    route = routes.pop(data["id"], None)
                    if route is None:
                        continue
                    client, cid, owner = route
                    data["id"] = cid
                    send_parts(front, [client, frames[1], msgpack.packb(data), *frames[3:]])
                    credits[owner] += 1
                    while waiting and dispatch(waiting[0]):
                        waiting.popleft()


def drive(frontend: str, in_flight: int, seconds: float) -> float:
    """Requests/s a raw client gets with ``in_flight`` requests out for ``seconds`` (after
    a warm-up that waits for the first answer)."""
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(frontend)
    next_id = 0

    def send() -> None:
        nonlocal next_id
        next_id += 1
        sock.send_multipart(encode(Request(id=next_id, op="infer", model=MODEL, frame=0)))

    deadline = time.monotonic() + 30
    send()
    while not sock.poll(100):
        if time.monotonic() > deadline:
            raise SystemExit("no answer in 30 s: is the system up?")
        send()  # the first may have gone before any worker registered
    while sock.poll(200):
        sock.recv_multipart()
    for _ in range(in_flight):
        send()
    done = 0
    start = time.monotonic()
    end = start + seconds
    while time.monotonic() < end:
        if sock.poll(100):
            while True:
                try:
                    frames = sock.recv_multipart(zmq.NOBLOCK, copy=False)
                except zmq.Again:
                    break
                message = decode(frames)
                if isinstance(message.header, Reply):
                    done += 1
                send()
    rate = done / (time.monotonic() - start)
    sock.close(linger=0)
    return rate


def _start(args: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, *args], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def one_run(kind: str, args: argparse.Namespace) -> float:
    """Start ``kind`` (broker or forwarder) and the echo workers, drive, stop; req/s."""
    front, back = f"tcp://127.0.0.1:{_free_port()}", f"tcp://127.0.0.1:{_free_port()}"
    env = {**os.environ, "LIPSYNC_HEARTBEAT_S": str(HEARTBEAT_S), "LIPSYNC_LOG_LEVEL": "WARNING"}
    me = ["-m", "lipsync.bench.forwarder"]
    if kind == "broker":
        router = ["-m", "lipsync", "broker", "--frontend", front, "--backend", back]
    else:
        router = [*me, "--serve-forwarder", front, back]
    procs = [_start(router, env)]
    try:
        for i in range(args.workers):
            echo = [
                *me,
                "--serve-echo",
                back,
                f"echo-{i}",
                str(args.capacity),
                str(args.reply_bytes),
            ]
            procs.append(_start(echo, env))
        return drive(front, args.in_flight, args.seconds)
    finally:
        for p in procs:
            p.kill()
            p.wait()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lipsync.bench.forwarder", description=__doc__)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--capacity", type=int, default=64, help="credits per echo worker")
    parser.add_argument("--in-flight", type=int, default=128)
    parser.add_argument("--reply-bytes", type=int, default=20_000)
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--pairs", type=int, default=3, help="alternated broker/forwarder runs")
    parser.add_argument("--serve-echo", nargs=4, metavar=("BACKEND", "NAME", "CAP", "BYTES"))
    parser.add_argument("--serve-forwarder", nargs=2, metavar=("FRONTEND", "BACKEND"))
    args = parser.parse_args(argv)
    if args.serve_echo:
        backend, name, cap, size = args.serve_echo
        serve_echo(backend, name, int(cap), int(size))
        return 0
    if args.serve_forwarder:
        serve_forwarder(*args.serve_forwarder)
        return 0
    print(
        f"# broker vs minimal forwarder: {args.workers} echo workers x {args.capacity} credits, "
        f"{args.in_flight} in flight, {args.reply_bytes} B replies, {args.seconds:g} s a run; "
        f"{platform.node()} ({os.cpu_count()} CPUs), {time.strftime('%Y-%m-%d %H:%M')}"
    )
    rates: dict[str, list[float]] = {"broker": [], "forwarder": []}
    for pair in range(args.pairs):
        for kind in ("broker", "forwarder"):
            rate = one_run(kind, args)
            rates[kind].append(rate)
            print(f"pair {pair + 1} {kind:9s} {rate:9.0f} req/s", flush=True)
    b, f = statistics.median(rates["broker"]), statistics.median(rates["forwarder"])
    print(f"median: broker {b:.0f} req/s, forwarder {f:.0f} req/s, ratio {b / f:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
