"""``lipsync bench --soak MINUTES``: steady load plus random faults, then the books.

It starts its own system on free loopback ports (broker, gateway, three null workers,
default heartbeats: this is the configuration people run), puts steady load on it from
several WebSocket clients (layout B, each request with its own frame id, so every answer
is matched to exactly one request: ``lipsync.bench.ledger``), and every few seconds
injects one fault at random:

- ``kill_worker``: SIGKILL a worker, start a new one a moment later;
- ``stall_worker``: SIGSTOP a worker for a few seconds (long enough to be declared dead
  or not), then SIGCONT;
- ``restart_broker``: SIGKILL the broker, start it again on the same addresses;
- ``restart_gateway``: SIGKILL the gateway, start it again on its port (clients
  reconnect);
- ``drop_client``: a client leaves without a close handshake, with requests in flight;
  a new one takes its place.

After each fault it waits until the system is whole again (``/health`` 200 with every
worker registered) and notes how long that took. At the end it stops the load, waits for
every outstanding answer, and prints requests sent and answered, errors by kind,
duplicates, lost, and the RSS and open fds of each process at start and end. Exit status
1 if anything was lost or answered twice, or if something stayed held.

``--clients`` (default here 6), ``--in-flight`` (4), ``--rate`` (requests/s per client;
default here 40, so the machine stays usable) and ``--json`` are the bench's own flags;
``--out`` keeps the processes' logs (default: a temporary directory).
``LIPSYNC_SOAK_SEED`` repeats a run's choices; ``LIPSYNC_SOAK_FAULTS`` (a comma list of the
kinds above) limits the faults drawn, e.g. to compare two builds on broker restarts alone.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psutil

from lipsync.bench.ledger import Ledger, LedgerClient, write_null_package
from lipsync.bench.system import kill_all


__all__ = ["FAULTS", "SoakSystem", "run_soak"]

REPO = Path(__file__).resolve().parents[2]
MODEL = "soak"
WORKERS = 3
FAULTS = ("kill_worker", "stall_worker", "restart_broker", "restart_gateway", "drop_client")
FAULT_GAP_S = (6.0, 12.0)  # quiet time between the end of one fault and the next
RECOVERY_TIMEOUT_S = 90.0
DRAIN_S = 20.0  # after the load stops: deadline (2 s) + grace, with a wide margin
CLIENT_SPACING = 1_000_000
"""Frame ids of one client: [base, base + spacing), 7 hours at 40 requests/s. With the
package's 2**31 - 1 frames that is room for 2,147 clients (each dropped client is
replaced by a new one with the next base: with 100 million, the 11th went out of range)."""


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class SoakSystem:
    """The processes of one soak run, each restartable on the same addresses."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self.models_dir = write_null_package(run_dir / "models", MODEL)
        self.frontend = f"tcp://127.0.0.1:{_free_port()}"
        self.backend = f"tcp://127.0.0.1:{_free_port()}"
        self.port = _free_port()
        self.url = f"ws://127.0.0.1:{self.port}/ws"
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.starts: Counter[str] = Counter()
        self.env = {**os.environ, "LIPSYNC_LOG_LEVEL": "INFO"}

    def _start(self, name: str, *argv: str) -> None:
        self.starts[name] += 1
        log = open(self.run_dir / f"{name}.log", "ab")  # noqa: SIM115
        self.procs[name] = subprocess.Popen(
            [sys.executable, "-m", "lipsync", *argv],
            cwd=REPO,
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()

    def start_broker(self) -> None:
        self._start("broker", "broker", "--frontend", self.frontend, "--backend", self.backend)

    def start_gateway(self) -> None:
        self._start("gateway", "gateway", "--broker", self.frontend, "--port", str(self.port))

    def start_worker(self, name: str) -> None:
        self._start(
            name, "worker", "--backend", "null", "--broker", self.backend,
            "--models-dir", str(self.models_dir), "--worker-id", name,
            "--null-delay-ms", "4", "--max-batch", "4", "--max-delay-ms", "2",
        )  # fmt: skip

    def start(self) -> None:
        self.start_broker()
        for i in range(WORKERS):
            self.start_worker(f"w{i}")
        self.start_gateway()

    def kill(self, name: str) -> None:
        proc = self.procs[name]
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)

    def signal(self, name: str, sig: signal.Signals) -> None:
        self.procs[name].send_signal(sig)

    def stop(self) -> None:
        kill_all(self.procs.values())

    def exited(self) -> dict[str, int]:
        """Processes that died without being killed by us: name -> exit code."""
        return {n: p.returncode for n, p in self.procs.items() if p.poll() is not None}

    def resources(self) -> dict[str, dict[str, Any]]:
        """RSS (MiB) and open fds of every live process, by name."""
        out: dict[str, dict[str, Any]] = {}
        for name, proc in sorted(self.procs.items()):
            try:
                p = psutil.Process(proc.pid)
                out[name] = {
                    "pid": proc.pid,
                    "rss_mib": round(p.memory_info().rss / 2**20, 1),
                    "fds": p.num_fds(),
                }
            except psutil.Error:
                continue
        return out

    def health(self) -> dict[str, Any] | None:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=2) as r:
                return json.loads(r.read())  # type: ignore[no-any-return]
        except urllib.error.HTTPError as exc:
            return json.loads(exc.read()) if exc.code == 503 else None
        except (urllib.error.URLError, OSError, ValueError):
            return None

    def whole(self) -> bool:
        """Gateway up, broker seen, every worker registered."""
        h = self.health()
        return bool(h and h.get("healthy") and h.get("workers") == WORKERS)

    def metric(self, name: str) -> float | None:
        try:
            url = f"http://127.0.0.1:{self.port}/metrics"
            with urllib.request.urlopen(url, timeout=2) as r:
                text = r.read().decode()
        except (urllib.error.URLError, OSError):
            return None
        for line in text.splitlines():
            if line.startswith(name + " ") or line.startswith(name + "{}"):
                return float(line.rsplit(" ", 1)[1])
        return None


@dataclass(slots=True)
class FaultRecord:
    kind: str
    target: str
    at_s: float  # since the load started
    recovered_s: float | None  # injection -> system whole again
    errors: dict[str, int] = field(default_factory=dict)  # outcomes != ok in the window


class _Slots:
    """The clients of a run: one slot per client; a dropped client is replaced."""

    def __init__(self, url: str, ledger: Ledger, n: int, window: int, rate: float) -> None:
        self.url, self.ledger, self.window, self.rate = url, ledger, window, rate
        self.clients: list[LedgerClient] = []
        self.stops: list[asyncio.Event] = []
        self.tasks: list[asyncio.Task[None]] = []
        self.retired: list[LedgerClient] = []
        self._next_base = 0
        for _ in range(n):
            self._add()

    def _add(self, index: int | None = None) -> None:
        if self._next_base + CLIENT_SPACING > 2**31 - 1:
            raise RuntimeError("soak: out of frame ids for new clients")
        client = LedgerClient(
            self.url, MODEL, self.ledger, first_frame=self._next_base, window=self.window,
            reconnect=True, connect_timeout=RECOVERY_TIMEOUT_S,
        )  # fmt: skip
        self._next_base += CLIENT_SPACING
        stop = asyncio.Event()
        task = asyncio.create_task(_paced(client, stop, self.rate))
        if index is None:
            self.clients.append(client)
            self.stops.append(stop)
            self.tasks.append(task)
        else:
            self.clients[index], self.stops[index], self.tasks[index] = client, stop, task

    async def drop(self, index: int) -> None:
        self.stops[index].set()
        await self.tasks[index]
        await self.clients[index].leave(abort=True)
        self.retired.append(self.clients[index])
        self._add(index)

    async def finish(self) -> None:
        for stop in self.stops:
            stop.set()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        await asyncio.gather(*(c.wait_answers(DRAIN_S) for c in self.clients))
        for c in self.clients:
            await c.close()


async def _paced(client: LedgerClient, stop: asyncio.Event, rate: float) -> None:
    """The closed loop in short steps, at most ``rate`` requests/s."""
    interval = 1.0 / rate if rate > 0 else 0.0
    try:
        while not stop.is_set():
            started = time.monotonic()
            await client.run(stop, limit=1)
            if interval:
                await asyncio.sleep(max(0.0, started + interval - time.monotonic()))
    except Exception as exc:  # a client must never take the run down: report and stop
        print(f"soak: client failed: {type(exc).__name__}: {exc}", file=sys.stderr)


async def _wait_whole(system: SoakSystem, since: float) -> float | None:
    deadline = since + RECOVERY_TIMEOUT_S
    while time.monotonic() < deadline:
        if await asyncio.to_thread(system.whole):
            return time.monotonic() - since
        await asyncio.sleep(0.2)
    return None


async def _inject(
    system: SoakSystem, slots: _Slots, rng: random.Random, kinds: Sequence[str]
) -> tuple[str, str]:
    kind = rng.choice(kinds)
    if kind == "kill_worker":
        target = f"w{rng.randrange(WORKERS)}"
        system.kill(target)
        await asyncio.sleep(rng.uniform(0.5, 2.0))
        system.start_worker(target)
    elif kind == "stall_worker":
        target = f"w{rng.randrange(WORKERS)}"
        system.signal(target, signal.SIGSTOP)
        await asyncio.sleep(rng.uniform(1.0, 6.0))  # the broker gives up after 3 s
        system.signal(target, signal.SIGCONT)
    elif kind == "restart_broker":
        target = "broker"
        system.kill(target)
        await asyncio.sleep(rng.uniform(0.5, 4.0))
        system.start_broker()
    elif kind == "restart_gateway":
        target = "gateway"
        system.kill(target)
        await asyncio.sleep(rng.uniform(0.2, 2.0))
        system.start_gateway()
    else:
        index = rng.randrange(len(slots.clients))
        target = f"client {index}"
        await slots.drop(index)
    return kind, target


async def soak(minutes: float, *, clients: int, window: int, rate: float, run_dir: Path,
               seed: int, kinds: Sequence[str] = FAULTS) -> dict[str, Any]:  # fmt: skip
    """Run the soak; its report (also printed)."""
    rng = random.Random(seed)
    system = SoakSystem(run_dir)
    system.start()
    try:
        started_whole = time.monotonic()
        if await _wait_whole(system, started_whole) is None:
            raise RuntimeError(f"system did not come up (logs in {run_dir})")
        ledger = Ledger()
        slots = _Slots(system.url, ledger, clients, window, rate)
        await asyncio.sleep(3.0)  # warm: steady state before the first sample
        resources_start = system.resources()
        t0 = time.monotonic()
        end = t0 + minutes * 60
        faults: list[FaultRecord] = []
        while time.monotonic() < end - 5:
            await asyncio.sleep(min(rng.uniform(*FAULT_GAP_S), max(0.0, end - time.monotonic())))
            if time.monotonic() >= end - 5:
                break
            at = time.monotonic()
            kind, target = await _inject(system, slots, rng, kinds)
            recovered = await _wait_whole(system, at)
            window_end = time.monotonic() + 1.0
            await asyncio.sleep(1.0)
            errors: Counter[str] = Counter(
                o.kind
                for o in ledger.outcomes
                if o.kind != "ok" and at <= o.answered_at <= window_end
            )
            faults.append(FaultRecord(kind, target, round(at - t0, 1), recovered, dict(errors)))
            shown = "not recovered" if recovered is None else f"whole again in {recovered:.1f} s"
            print(f"[{at - t0:6.1f} s] {kind} {target}: {shown}, errors {dict(errors)}")
        await slots.finish()
        duration = time.monotonic() - t0
        pending = None
        for _ in range(50):  # the gateway's in-flight gauge settles to 0 once all answered
            pending = await asyncio.to_thread(system.metric, "lipsync_gateway_in_flight")
            if pending == 0:
                break
            await asyncio.sleep(0.2)
        resources_end = system.resources()
        died = system.exited()
    finally:
        system.stop()
    summary = ledger.summary()
    error_kinds = dict(sorted(ledger.errors().items()))
    return {
        "minutes": round(duration / 60, 2),
        "clients": clients,
        "window": window,
        "rate_per_client": rate,
        "seed": seed,
        "fault_kinds": list(kinds),
        **summary,
        "errors": error_kinds,
        "requests_per_s": round(ledger.sent / duration, 1) if duration else 0,
        "faults": [asdict(f) for f in faults],
        "fault_counts": dict(Counter(f.kind for f in faults)),
        "slowest_recovery_s": max(
            (f.recovered_s for f in faults if f.recovered_s is not None), default=0.0
        ),
        "not_recovered": sum(f.recovered_s is None for f in faults),
        "gateway_in_flight_at_end": pending,
        "process_starts": dict(system.starts),
        "died_unexpectedly": died,
        "resources_start": resources_start,
        "resources_end": resources_end,
        "run_dir": str(run_dir),
    }


def _print(report: dict[str, Any]) -> None:
    r = report
    print()
    print(f"soak: {r['minutes']} min, {r['clients']} clients, {r['requests_per_s']} requests/s")
    print(f"  faults: {r['fault_counts']} (slowest recovery {r['slowest_recovery_s']:.1f} s,"
          f" not recovered {r['not_recovered']})")  # fmt: skip
    print(f"  sent {r['sent']}, answered {r['answered']}, lost {r['lost']}, "
          f"duplicates {r['duplicates']}, unexpected {r['unexpected']}")  # fmt: skip
    print(f"  outcomes: {r['outcomes']}")
    print(f"  gateway in flight at end: {r['gateway_in_flight_at_end']}")
    print("  process      start: rss MiB / fds      end: rss MiB / fds   (starts)")
    for name in sorted(set(r["resources_start"]) | set(r["resources_end"])):
        a, b = r["resources_start"].get(name, {}), r["resources_end"].get(name, {})
        print(
            f"  {name:<10} {a.get('rss_mib', '-'):>10} / {a.get('fds', '-'):<6}"
            f" {b.get('rss_mib', '-'):>14} / {b.get('fds', '-'):<6}"
            f" ({r['process_starts'].get(name, 0)})"
        )
    if r["died_unexpectedly"]:
        print(f"  died unexpectedly: {r['died_unexpectedly']}")
    print(f"  logs: {r['run_dir']}")


def run_soak(args: argparse.Namespace) -> int:
    """Entry point for ``lipsync bench --soak MINUTES``."""
    clients = args.clients if getattr(args, "clients", 1) > 1 else 6
    window = max(1, getattr(args, "in_flight", 4))
    rate = getattr(args, "rate", 0.0) or 40.0
    seed = int(os.environ.get("LIPSYNC_SOAK_SEED", "0")) or random.randrange(1 << 30)
    kinds = [k for k in os.environ.get("LIPSYNC_SOAK_FAULTS", "").split(",") if k] or FAULTS
    unknown = sorted(set(kinds) - set(FAULTS))
    if unknown:
        print(f"soak: unknown fault kinds {unknown}; known: {', '.join(FAULTS)}", file=sys.stderr)
        return 2
    out = getattr(args, "out", None)
    with tempfile.TemporaryDirectory(prefix="lipsync-soak-") as tmp:
        run_dir = Path(out) if out else Path(tmp)
        run_dir.mkdir(parents=True, exist_ok=True)
        report = asyncio.run(soak(
            args.soak, clients=clients, window=window, rate=rate, run_dir=run_dir, seed=seed,
            kinds=kinds,
        ))  # fmt: skip
        _print(report)
        if getattr(args, "json", None):
            Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    bad = (
        report["lost"]
        or report["duplicates"]
        or report["unexpected"]
        or report["gateway_in_flight_at_end"] != 0
        or report["died_unexpectedly"]
    )
    return 1 if bad else 0
