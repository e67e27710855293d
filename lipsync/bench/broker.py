"""``python -m lipsync.bench.broker``: what the broker and worker runtime cost, without a model.

Starts a broker and N null workers (``--backend null``) as subprocesses on free loopback
ports, drives them with ``BrokerClient``, and prints three tables:

1. **scaling**: 1, 2, 4 workers with a fixed per-request service time (``--delay-ms``,
   default 20 ms, so one worker can do at most 1000/delay requests/s) at a load that keeps
   every credit busy. Reported as requests/s and as a ratio to that ideal, measured in the
   same run: 1.0 means the infrastructure adds no throughput loss.
2. **added latency**: one request at a time through one worker, p50/p99 of request ->
   answer minus the service time: what the client, broker and worker runtime add.
3. **ceiling**: zero service time, many requests in flight: the most requests/s the broker
   and runtime pass on this machine (the client shares the CPU with them).

The scaling and ceiling tables also give the broker process's own CPU time per request
answered in the window (user + system, from ``psutil``): the rates move with whatever
else runs on the machine, the broker's cost per request much less.

This is a tool, not a test: it prints numbers and asserts nothing. It lives apart from
``broker/`` because it drives the system from outside, through the gateway's
``BrokerClient`` (``broker/`` imports only ``shared/``).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Coroutine, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar


__all__ = ["main"]

HEARTBEAT_S = 0.5
_T = TypeVar("_T")


@dataclass
class Result:
    workers: int
    delay_ms: float
    concurrency: int
    requests: int
    errors: int
    seconds: float
    latencies_ms: list[float]
    broker_cpu_s: float  # the broker process's CPU time (user + system) in the window

    @property
    def rate(self) -> float:
        return self.requests / self.seconds

    @property
    def broker_us(self) -> float:
        """Broker CPU microseconds per request answered in the window."""
        answered = self.requests + self.errors
        return self.broker_cpu_s / answered * 1e6 if answered else float("nan")

    def percentile(self, q: float) -> float:
        values = sorted(self.latencies_ms)
        if not values:
            return float("nan")
        return values[min(len(values) - 1, int(q / 100 * len(values)))]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def _system(workers: int, args: argparse.Namespace, delay_ms: float) -> Iterator[tuple[str, int]]:
    """Broker + ``workers`` null workers; yields the frontend address and the broker's pid;
    kills all after."""
    frontend = f"tcp://127.0.0.1:{_free_port()}"
    backend = f"tcp://127.0.0.1:{_free_port()}"
    env = {**os.environ, "LIPSYNC_HEARTBEAT_S": str(HEARTBEAT_S), "LIPSYNC_LOG_LEVEL": "WARNING"}
    procs: list[subprocess.Popen[bytes]] = []
    lipsync = [sys.executable, "-m", "lipsync"]
    with tempfile.TemporaryDirectory() as empty:
        try:
            procs.append(
                subprocess.Popen(
                    [
                        *lipsync,
                        "broker",
                        "--frontend",
                        frontend,
                        "--backend",
                        backend,
                        "--queue-limit",
                        "100000",
                    ],
                    env=env,
                )
            )
            for i in range(workers):
                procs.append(
                    subprocess.Popen(
                        [
                            *lipsync,
                            "worker",
                            "--backend",
                            "null",
                            "--broker",
                            backend,
                            "--models-dir",
                            empty,
                            "--models",
                            "bench",
                            "--worker-id",
                            f"bench{i}",
                            "--null-delay-ms",
                            str(delay_ms),
                            "--max-batch",
                            str(args.max_batch),
                            "--capacity",
                            str(args.capacity),
                            "--max-delay-ms",
                            "1",
                        ],
                        env=env,
                    )
                )
            yield frontend, procs[0].pid
        finally:
            for proc in procs:
                proc.send_signal(signal.SIGTERM)
            for proc in procs:
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


async def _measure(
    frontend: str, broker_pid: int, workers: int, delay_ms: float, concurrency: int, seconds: float
) -> Result:
    import psutil

    from gateway.brokerclient import BrokerClient
    from shared.errors import ServiceError

    client = BrokerClient(frontend, heartbeat_s=HEARTBEAT_S)
    await client.start(wait_s=30)
    try:
        deadline = time.monotonic() + 60
        while True:  # until every worker has registered (a handshake, not a sleep)
            stats = (await client.request("stats")).header.result
            if len(stats["workers"]) == workers:
                break
            if time.monotonic() > deadline:
                raise SystemExit(f"bench: only {len(stats['workers'])}/{workers} workers joined")
            await asyncio.sleep(0.1)

        # Count the answers that arrive inside the window, whenever their request left:
        # the system is busy at both edges, so this is the steady-state rate.
        latencies: list[float] = []
        counts = {"ok": 0, "errors": 0}
        window = [float("inf"), float("inf")]

        async def loop(i: int) -> None:
            while time.perf_counter() < window[1]:
                start = time.perf_counter()
                try:
                    await client.request("infer", model="bench", frame=i % 100, ttl_ms=10_000)
                    ok = True
                except ServiceError:
                    ok = False
                end = time.perf_counter()
                if window[0] <= end < window[1]:
                    latencies.append((end - start) * 1000)
                    counts["ok" if ok else "errors"] += 1

        broker = psutil.Process(broker_pid)

        def broker_cpu_s() -> float:
            times = broker.cpu_times()
            return float(times.user + times.system)

        tasks = [asyncio.create_task(loop(i)) for i in range(concurrency)]
        await asyncio.sleep(min(1.0, seconds / 2))  # warm-up, not measured
        window[0] = time.perf_counter()
        window[1] = window[0] + seconds
        cpu_start = broker_cpu_s()
        await asyncio.sleep(seconds)
        cpu = broker_cpu_s() - cpu_start
        await asyncio.gather(*tasks)
        ok, errors = counts["ok"], counts["errors"]
        return Result(workers, delay_ms, concurrency, ok, errors, seconds, latencies, cpu)
    finally:
        await client.close()


def _run_point(args: argparse.Namespace, workers: int, delay_ms: float, concurrency: int) -> Result:
    with _system(workers, args, delay_ms) as (frontend, broker_pid):
        point = _measure(frontend, broker_pid, workers, delay_ms, concurrency, args.seconds)
        return _run_async(point)


def _run_async(coro: Coroutine[Any, Any, _T]) -> _T:
    try:
        import uvloop

        return uvloop.run(coro)
    except ImportError:
        return asyncio.run(coro)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m lipsync.bench.broker", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--workers", default="1,2,4", help="worker counts to scale over")
    parser.add_argument(
        "--delay-ms", type=float, default=20.0, help="null service time per request"
    )
    parser.add_argument("--capacity", type=int, default=4, help="credits per worker")
    parser.add_argument("--max-batch", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=5.0, help="measured time per point")
    parser.add_argument("--ceiling-concurrency", type=int, default=128)
    args = parser.parse_args(argv)
    try:
        counts = [int(n) for n in args.workers.split(",")]
    except ValueError:
        parser.error(f"--workers: a comma-separated list of counts, not {args.workers!r}")
    if min(counts) < 1:
        parser.error("--workers: each count must be at least 1")
    if args.delay_ms < 0:
        parser.error("--delay-ms must be >= 0")
    if args.seconds <= 0:
        parser.error("--seconds must be > 0")
    if args.capacity < 1 or args.max_batch < 1 or args.ceiling_concurrency < 1:
        parser.error("--capacity, --max-batch and --ceiling-concurrency must be at least 1")

    print(
        f"# broker bench: {platform.node()}, {os.cpu_count()} CPUs, "
        f"Python {platform.python_version()}, {time.strftime('%Y-%m-%d')}"
    )
    print(
        f"# null workers: {args.delay_ms:g} ms per request, capacity {args.capacity}, "
        f"max batch {args.max_batch}; {args.seconds:g} s per point\n"
    )

    print("## scaling (load: 2 x total credits in flight)\n")
    print(
        "| workers | ideal req/s | req/s | ratio to ideal | p50 ms | p99 ms | errors "
        "| broker CPU us/req |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for n in counts:
        r = _run_point(args, n, args.delay_ms, 2 * n * args.capacity)
        if args.delay_ms > 0:
            ideal = n * 1000 / args.delay_ms
            ideal_cells = f"{ideal:.0f} | {r.rate:.1f} | {r.rate / ideal:.3f}"
        else:  # no service time: no ideal rate to compare with (the ceiling table's case)
            ideal_cells = f"- | {r.rate:.1f} | -"
        print(
            f"| {n} | {ideal_cells} | "
            f"{r.percentile(50):.1f} | {r.percentile(99):.1f} | {r.errors} | "
            f"{r.broker_us:.0f} |",
            flush=True,
        )

    print("\n## added latency (one request at a time, one worker)\n")
    print("| service time ms | req/s | p50 ms | p99 ms | added p50 ms | added p99 ms |")
    print("|---:|---:|---:|---:|---:|---:|")
    for delay in sorted({0.0, args.delay_ms}):
        r = _run_point(args, 1, delay, 1)
        print(
            f"| {delay:g} | {r.rate:.1f} | {r.percentile(50):.2f} | {r.percentile(99):.2f} | "
            f"{r.percentile(50) - delay:.2f} | {r.percentile(99) - delay:.2f} |",
            flush=True,
        )

    print(f"\n## ceiling (service time 0, {args.ceiling_concurrency} in flight)\n")
    print("| workers | req/s | p50 ms | p99 ms | errors | broker CPU us/req |")
    print("|---:|---:|---:|---:|---:|---:|")
    for n in sorted({1, max(counts)}):
        r = _run_point(args, n, 0.0, args.ceiling_concurrency)
        print(
            f"| {n} | {r.rate:.0f} | {r.percentile(50):.1f} | {r.percentile(99):.1f} | "
            f"{r.errors} | {r.broker_us:.0f} |",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
