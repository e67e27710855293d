"""A throwaway system for the suite: broker, gateway and workers on free loopback ports.

Each process is a real ``python -m lipsync <role>`` in its own session (so a benchmark that
dies never leaves workers behind: ``stop()`` kills whole process groups), logging to a file
in the run directory. ``start`` returns once the gateway answers ``/health`` and the broker
has registered every worker, so the first measured request never pays for start-up.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from lipsync.bench.procs import Proc, find_processes


__all__ = ["System", "free_port", "kill_all"]

REPO = Path(__file__).resolve().parents[2]
FAST_ENV = {"LIPSYNC_LOG_LEVEL": "WARNING"}


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def kill_all(procs: Iterable[subprocess.Popen[Any]]) -> None:
    """SIGKILL each process's group (each was started in its own session), then reap."""
    procs = list(procs)
    for proc in procs:
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    for proc in procs:
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass


class System:
    """One broker, one gateway, any number of workers (added with :meth:`add_worker`)."""

    def __init__(self, run_dir: Path, *, env: dict[str, str] | None = None) -> None:
        self.run_dir = run_dir
        run_dir.mkdir(parents=True, exist_ok=True)
        self.env = {**os.environ, **FAST_ENV, **(env or {})}
        self.frontend = f"tcp://127.0.0.1:{free_port()}"
        self.backend = f"tcp://127.0.0.1:{free_port()}"
        self.port = free_port()
        self.url = f"ws://127.0.0.1:{self.port}/ws"
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self._n = 0

    # -- processes ---------------------------------------------------------------------

    def _start(self, name: str, *argv: str) -> subprocess.Popen[bytes]:
        log = open(self.run_dir / f"{name}.log", "wb")  # noqa: SIM115
        proc = subprocess.Popen(
            [sys.executable, "-m", "lipsync", *argv],
            cwd=REPO,
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        self.procs[name] = proc
        return proc

    def start_core(self, *, max_in_flight: int = 64) -> None:
        self._start("broker", "broker", "--frontend", self.frontend, "--backend", self.backend)
        self._start(
            "gateway", "gateway", "--broker", self.frontend, "--port", str(self.port),
            "--max-in-flight", str(max_in_flight),
        )  # fmt: skip

    def add_worker(
        self,
        models_dir: Path,
        *,
        backend: str = "null",
        models: str = "",
        max_batch: int = 4,
        max_delay_ms: float = 5.0,
        null_delay_ms: float = 0.0,
        threads: int = 0,
        capacity: int = 0,
        device: str = "cpu",
        fp16: bool = False,
    ) -> str:
        name = f"w{self._n}"
        self._n += 1
        args = [
            "worker", "--broker", self.backend, "--models-dir", str(models_dir),
            "--backend", backend, "--worker-id", name, "--max-batch", str(max_batch),
            "--max-delay-ms", str(max_delay_ms), "--device", device,
        ]  # fmt: skip
        if fp16:
            args.append("--fp16")
        if models:
            args += ["--models", models]
        if backend == "null":
            args += ["--null-delay-ms", str(null_delay_ms)]
        if threads:
            args += ["--threads", str(threads)]
        if capacity:
            args += ["--capacity", str(capacity)]
        self._start(name, *args)
        return name

    def stop(self) -> None:
        kill_all(self.procs.values())
        self.procs.clear()

    def stop_worker(self, name: str) -> None:
        proc = self.procs.pop(name)
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=10)

    def __enter__(self) -> System:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- readiness ---------------------------------------------------------------------

    def _check_alive(self) -> None:
        for name, proc in self.procs.items():
            if proc.poll() is not None:
                tail = (self.run_dir / f"{name}.log").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"{name} exited with {proc.returncode}:\n{tail}")

    def wait_ready(self, workers: int, timeout: float = 300.0) -> None:
        """Until /health answers 200 and the broker has ``workers`` workers registered."""
        deadline = time.monotonic() + timeout
        health = f"http://127.0.0.1:{self.port}/health"
        while True:
            self._check_alive()
            try:
                with urllib.request.urlopen(health, timeout=2) as resp:
                    if resp.status == 200 and len(self.broker_stats()["workers"]) == workers:
                        return
            except (urllib.error.URLError, OSError, TimeoutError):
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"system not ready after {timeout:.0f} s (see {self.run_dir})")
            time.sleep(0.2)

    def broker_stats(self) -> dict[str, Any]:
        """The broker's ``stats`` (workers with their pids, queues, totals)."""
        from gateway.brokerclient import BrokerClient

        async def ask() -> dict[str, Any]:
            client = BrokerClient(self.frontend)
            try:
                await client.start(wait_s=5)
                answer = await client.request("stats")
                return answer.header.result  # type: ignore[no-any-return]
            finally:
                await client.close()

        return asyncio.run(ask())

    def processes(self) -> list[Proc]:
        """The live broker, gateway and worker processes, for CPU and memory sampling."""
        pids = [p.pid for p in self.procs.values() if p.poll() is None]
        return find_processes(pids)

    def worker_pids(self) -> dict[str, int]:
        return {n: p.pid for n, p in self.procs.items() if n.startswith("w") and p.poll() is None}
