"""Helpers of the fault suite (``tests/test_faults_*.py``): a whole system (broker, workers,
gateway) whose processes can be killed, stalled and restarted on the same addresses;
ledger clients that account for every request (``lipsync.bench.ledger``); process probes
(RSS, open fds); and one summary line per fault, which RELIABILITY.md is built from.

Set ``LIPSYNC_FAULT_REPORT=FILE`` to also append each summary to FILE as a JSON line.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import time
from collections import Counter
from pathlib import Path
from typing import Any

import psutil
from cluster import eventually
from conftest import Processes
from gateway_harness import FAST_BEATS, System, metric, metrics

from gateway.brokerclient import BrokerClient
from lipsync.bench.ledger import Ledger, LedgerClient, write_null_package
from shared.errors import ServiceError


__all__ = [
    "MIB",
    "FaultSystem",
    "Probe",
    "answered_at_least",
    "eventually",
    "gateway_outcomes",
    "make_clients",
    "report",
    "run_clients",
]

MIB = 1 << 20
HEARTBEAT_S = float(FAST_BEATS["LIPSYNC_HEARTBEAT_S"])
LIVENESS = int(FAST_BEATS["LIPSYNC_LIVENESS"])


class Probe:
    """RSS and open file descriptors of one process, sampled on demand."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        self.pid = proc.pid
        self.process = psutil.Process(proc.pid)

    def sample(self) -> tuple[int, int]:
        """(rss bytes, open fds); (0, 0) once the process is gone."""
        try:
            return self.process.memory_info().rss, self.process.num_fds()
        except psutil.Error:
            return 0, 0


class FaultSystem(System):
    """Broker, null workers serving one model with a huge frame count (so that every
    request of a run can have its own frame id) and a gateway, all restartable in place."""

    def __init__(self, processes: Processes, tmp_path: Path, *, model: str = "m") -> None:
        super().__init__(processes)
        self.model = model
        self.models_dir = write_null_package(tmp_path / "null-models", model)
        self.workers: dict[str, subprocess.Popen[bytes]] = {}
        self.broker: subprocess.Popen[bytes] | None = None
        self.gateway: subprocess.Popen[bytes] | None = None
        self.port = 0
        self._client: BrokerClient | None = None

    # -- processes ---------------------------------------------------------------------

    def start_broker(self, *args: str) -> subprocess.Popen[bytes]:
        self.broker = super().start_broker(*args)
        return self.broker

    def start_null_worker(
        self,
        name: str,
        *,
        delay_ms: float = 10,
        max_batch: int = 4,
        capacity: int = 0,
        max_delay_ms: float = 2,
        jpeg_bytes: int = 20_000,
        frame_tags: bool = False,
    ) -> subprocess.Popen[bytes]:
        env = {**FAST_BEATS, "LIPSYNC_NULL_JPEG_BYTES": str(jpeg_bytes)}
        if frame_tags:  # each answer names its frame (workers.null.tag_jpeg)
            env["LIPSYNC_NULL_FRAME_TAGS"] = "1"
        proc = self.processes.start(
            "worker", "--backend", "null", "--broker", self.backend,
            "--models-dir", str(self.models_dir), "--worker-id", name,
            "--null-delay-ms", str(delay_ms), "--max-batch", str(max_batch),
            "--capacity", str(capacity), "--max-delay-ms", str(max_delay_ms),
            env=env, name=name,
        )  # fmt: skip
        self.workers[name] = proc
        return proc

    def start_gateway_process(
        self, *args: str, timeout_ms: int = 10_000, env: dict[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        """The gateway, on the same port as the previous one if there was one. A long
        request deadline by default, so that a fault's answers are results or the error the
        fault itself causes, not deadlines missed by a busy 2-core machine."""
        env = {"LIPSYNC_REQUEST_TIMEOUT_MS": str(timeout_ms), **(env or {})}
        self.gateway, self.port = self.start_gateway(*args, env=env, port=self.port or None)
        return self.gateway

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    def probes(self) -> dict[str, Probe]:
        named = {"broker": self.broker, "gateway": self.gateway, **self.workers}
        return {n: Probe(p) for n, p in named.items() if p is not None and p.poll() is None}

    # -- broker view -------------------------------------------------------------------

    async def client(self) -> BrokerClient:
        """A broker client of the test itself (stats, admin ops); survives broker restarts."""
        if self._client is None:
            self._client = BrokerClient(self.frontend, heartbeat_s=HEARTBEAT_S, liveness=LIVENESS)
            await self._client.start(wait_s=30)
        return self._client

    async def stats(self) -> dict[str, Any] | None:
        """The broker's stats, or None while it cannot answer."""
        client = await self.client()
        try:
            return (await client.request("stats")).header.result  # type: ignore[no-any-return]
        except ServiceError:
            return None

    async def wait_workers(self, *names: str, timeout: float = 60) -> dict[str, Any]:
        """Until exactly ``names`` are registered at the broker."""

        async def registered() -> dict[str, Any] | None:
            stats = await self.stats()
            if stats is None:
                return None
            return stats if sorted(w["id"] for w in stats["workers"]) == sorted(names) else None

        return await eventually(registered, timeout=timeout, what=f"workers {names}")  # type: ignore[no-any-return]

    async def wait_ready(self, *names: str) -> None:
        """Workers registered and the gateway serving the model."""
        await self.wait_workers(*names)
        await asyncio.to_thread(self.wait_models, self.port, self.model)

    async def wait_idle(self, timeout: float = 60, *, sessions_dropped: bool = False) -> Any:
        """Until nothing is held anywhere: gateway in flight 0, broker pending 0, no worker
        holding a request, and every worker's counters settled: each request it received
        was answered once (received = served + errors + dropped; ``dropped`` are the
        requests a worker held when it lost its broker session, answered to nobody, and
        is 0 unless ``sessions_dropped``). Returns the broker's stats."""

        async def idle() -> dict[str, Any] | None:
            in_flight = await asyncio.to_thread(metric, self.port, "lipsync_gateway_in_flight")
            stats = await self.stats()
            if in_flight != 0 or stats is None or stats["broker"]["pending"] != 0:
                return None
            for w in stats["workers"]:
                c = w["counters"]
                dropped = c.get("dropped", 0)
                done = c.get("served", 0) + c.get("errors", 0) + dropped
                settled = c.get("received") == done and (sessions_dropped or dropped == 0)
                if w["in_flight"] or not settled:
                    return None
            return stats

        return await eventually(idle, timeout=timeout, what="the system to be idle")  # type: ignore[no-any-return]

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()
            self._client = None


async def run_clients(
    clients: list[LedgerClient], stop: asyncio.Event, *, drain_s: float = 30
) -> None:
    """Run ``clients`` until ``stop``, then wait (at most ``drain_s``) for their answers."""
    for c in clients:
        if c.ws is None:
            await c.open()
    await asyncio.gather(*(c.run(stop) for c in clients))
    await asyncio.gather(*(c.wait_answers(drain_s) for c in clients))
    for c in clients:
        await c.close()


def gateway_outcomes(port: int, op: str = "infer_b") -> Counter[str]:
    """How the gateway says it ended ``op`` requests, by outcome (its /metrics): the client
    side's books must match them exactly."""
    out: Counter[str] = Counter()
    for (name, labels), value in metrics(port).items():
        tags = dict(labels)
        if name == "lipsync_gateway_requests_total" and tags.get("op") == op and value:
            out[tags["outcome"]] += int(value)
    return out


def memory_line(before: dict[str, tuple[int, int]], after: dict[str, tuple[int, int]]) -> str:
    parts = []
    for name in sorted(set(before) | set(after)):
        r0, f0 = before.get(name, (0, 0))
        r1, f1 = after.get(name, (0, 0))
        parts.append(f"{name} {r0 / MIB:.0f}->{r1 / MIB:.0f} MiB fds {f0}->{f1}")
    return "; ".join(parts)


def report(
    fault: str,
    ledger: Ledger,
    *,
    recovery_s: float | None = None,
    memory: str = "",
    **extra: Any,
) -> None:
    """One line per fault on stdout (``pytest -s`` shows it), and as JSON when asked."""
    s = ledger.summary()
    row = {
        "fault": fault,
        **s,
        "recovery_s": None if recovery_s is None else round(recovery_s, 2),
        "memory": memory,
        **extra,
        "when": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    print(
        f"\nFAULT {fault}: sent {s['sent']}, answered {s['answered']}, lost {s['lost']}, "
        f"duplicates {s['duplicates']}, unexpected {s['unexpected']}, "
        f"outcomes {s['outcomes']}, recovery {row['recovery_s']} s, {extra}\n  memory: {memory}"
    )
    path = os.environ.get("LIPSYNC_FAULT_REPORT")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps(row) + "\n")


def make_clients(
    system: FaultSystem, ledger: Ledger, n: int, window: int, *, reconnect: bool = False
) -> list[LedgerClient]:
    """``n`` clients on the system's model, each with its own range of frame ids (so every
    answer names its request) and at most ``window`` requests in flight."""
    return [
        LedgerClient(
            system.url,
            system.model,
            ledger,
            first_frame=i * 10_000_000,
            window=window,
            reconnect=reconnect,
        )
        for i in range(n)
    ]


async def answered_at_least(ledger: Ledger, n: int, what: str = "") -> None:
    await eventually(lambda: ledger.answered >= n, timeout=60, what=what or f"{n} answers")
