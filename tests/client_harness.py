"""A system for the client and admin tests: broker, torch or null workers with chosen ids,
and a gateway (with or without a token), as real processes on free loopback ports.

Module-scoped systems use their own ``Processes`` (the conftest fixture is per test), still
killed at teardown."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psutil
from conftest import Processes
from gateway_harness import FAST_BEATS, System


__all__ = ["ClientSystem", "module_processes", "rss_mb"]


@contextmanager
def module_processes(log_dir: Path) -> Iterator[Processes]:
    log_dir.mkdir(parents=True, exist_ok=True)
    procs = Processes(log_dir)
    try:
        yield procs
    finally:
        procs.stop_all()


class ClientSystem(System):
    def start_torch_worker(
        self, models_dir: Path, worker_id: str, *, max_batch: int = 1, models: str = ""
    ) -> subprocess.Popen[bytes]:
        """A torch worker on CPU with one thread. ``max_batch`` 1 by default: a frame's
        bytes then do not depend on which requests it happened to be batched with."""
        argv = [
            "worker", "--backend", "torch", "--broker", self.backend,
            "--models-dir", str(models_dir), "--device", "cpu", "--threads", "1",
            "--max-batch", str(max_batch), "--worker-id", worker_id,
        ]  # fmt: skip
        if models:
            argv += ["--models", models]
        return self.processes.start(*argv, env=FAST_BEATS, name=worker_id)

    def start_null_worker(self, models: str, worker_id: str) -> subprocess.Popen[bytes]:
        return self.processes.start(
            "worker", "--backend", "null", "--broker", self.backend, "--models", models,
            "--worker-id", worker_id, env=FAST_BEATS, name=worker_id,
        )  # fmt: skip


def rss_mb(pid: int) -> float:
    """Resident memory of a process, MiB (mapped file pages it has touched included)."""
    return float(psutil.Process(pid).memory_info().rss) / 2**20
