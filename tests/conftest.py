"""Fixtures shared by the whole suite: free loopback ports and real subprocesses.

Add a fixture here only when several test modules need it; keep module-specific helpers in
the module.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest


ROOT = Path(__file__).resolve().parents[1]
REFERENCE = ROOT.parent / "shared" / "reference"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Processes:
    """Starts ``python -m lipsync ...`` subprocesses and guarantees they die at teardown."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(
        self, *argv: str, env: dict[str, str] | None = None, name: str = ""
    ) -> subprocess.Popen[bytes]:
        name = name or argv[0]
        log = open(self.log_dir / f"{name}-{len(self.procs)}.log", "wb")  # noqa: SIM115
        proc = subprocess.Popen(
            [sys.executable, "-m", "lipsync", *argv],
            cwd=ROOT,
            env={**os.environ, **(env or {})},
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        self.procs.append(proc)
        return proc

    def stop_all(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        for proc in self.procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass

    def logs(self) -> str:
        return "\n".join(
            f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}"
            for p in sorted(self.log_dir.glob("*.log"))
        )


@pytest.fixture
def processes(tmp_path: Path) -> Iterator[Processes]:
    log_dir = tmp_path / "logs"
    log_dir.mkdir()
    procs = Processes(log_dir)
    try:
        yield procs
    finally:
        procs.stop_all()


@pytest.fixture
async def fault_system(processes: Processes, tmp_path: Path):
    """``fault_harness.FaultSystem``, closed after the test; its processes' logs are
    printed when the test fails (the fault tests' first clue)."""
    from fault_harness import FaultSystem  # it imports this module

    system = FaultSystem(processes, tmp_path)
    try:
        yield system
    except BaseException:
        print(processes.logs())
        raise
    finally:
        await system.close()


def wait_until(predicate, timeout: float = 30.0, interval: float = 0.05, what: str = "condition"):
    """Poll ``predicate`` until it returns a truthy value; fail with ``what`` on timeout."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


@pytest.fixture(scope="session")
def tiny_package(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 16-frame 320x240 quarter-width synthetic package, built once per session.

    Returns the models dir (the package itself is ``<dir>/tiny``)."""
    from workers.make_package import make_package

    models = tmp_path_factory.mktemp("models")
    make_package(models, name="tiny", frames=16, size=(320, 240), width="quarter", seed=0)
    return models
