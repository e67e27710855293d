"""``lipsync up`` end to end: supervisord runs broker, gateway and workers; a worker started
by hand joins and takes work; a killed worker is restarted while requests keep being
answered; Ctrl-C leaves no process behind."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import struct
import subprocess
import sys
import urllib.request
from pathlib import Path

import psutil
import pytest
import websockets
from conftest import ROOT, free_port, wait_until

from gateway.brokerclient import BrokerClient
from lipsync.up import supervisorctl


pytestmark = pytest.mark.slow


def _health(port: int) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as resp:
            return resp.status
    except OSError as exc:
        return getattr(exc, "code", 0) or 0


def _request_a(model: str, frame: int) -> bytes:
    name = model.encode()
    return bytes([len(name)]) + name + struct.pack("<i", frame)


async def _frames(port: int, count: int, model: str = "tiny") -> list[bytes]:
    """Send ``count`` layout-A requests pipelined on one connection; answers come in order."""
    async with websockets.connect(f"ws://127.0.0.1:{port}/ws", max_size=None) as ws:
        for i in range(count):
            await ws.send(_request_a(model, i % 16))
        return [await asyncio.wait_for(ws.recv(), 60) for _ in range(count)]


async def _broker_stats(frontend: str) -> dict:
    client = BrokerClient(frontend)
    await client.start()
    try:
        return (await client.request("stats", ttl_ms=5000)).header.result
    finally:
        await client.close()


def _ctl_pid(run_dir: Path, name: str) -> int | None:
    match = re.search(r"RUNNING\s+pid (\d+)", supervisorctl(run_dir, "status", name).stdout)
    return int(match.group(1)) if match else None


def test_up_serves_scales_heals_and_stops_cleanly(tmp_path, tiny_package, processes):
    run_dir = tmp_path / "run"
    port = free_port()
    frontend = f"tcp://127.0.0.1:{free_port()}"
    backend = f"tcp://127.0.0.1:{free_port()}"
    env = {
        **os.environ,
        "LIPSYNC_RUN_DIR": str(run_dir),
        "LIPSYNC_BROKER_FRONTEND": frontend,
        "LIPSYNC_BROKER_BACKEND": backend,
        "LIPSYNC_SPARE_WORKERS": "1",
        "LIPSYNC_HEARTBEAT_S": "0.5",
        # a loaded 2-core CI machine can take seconds per CPU batch: don't test deadlines here
        "LIPSYNC_REQUEST_TIMEOUT_MS": "30000",
    }
    log = open(tmp_path / "up.log", "wb")  # noqa: SIM115
    up = subprocess.Popen(
        [sys.executable, "-m", "lipsync", "up", "--workers", "2", "--models-dir", str(tiny_package),
         "--port", str(port)],
        cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    log.close()
    try:
        wait_until(lambda: _health(port) == 200, timeout=180, what="/health 200")
        wait_until(
            lambda: "serving on http://127.0.0.1" in (tmp_path / "up.log").read_text(),
            timeout=30, what="the URL printed",
        )  # fmt: skip

        frames = asyncio.run(_frames(port, 8))
        assert all(f[:2] == b"\xff\xd8" for f in frames), [len(f) for f in frames]

        # a third worker started by hand joins the running system and takes work
        extra = processes.start(
            "worker", "--broker", backend, "--models-dir", str(tiny_package),
            "--worker-id", "by-hand", env={"LIPSYNC_HEARTBEAT_S": "0.5"}, name="extra",
        )  # fmt: skip

        def joined() -> bool:
            stats = asyncio.run(_broker_stats(frontend))
            return any(w["id"] == "by-hand" for w in stats["workers"])

        wait_until(joined, timeout=120, what="the hand-started worker to register")
        asyncio.run(_frames(port, 48))
        stats = asyncio.run(_broker_stats(frontend))
        served = {w["id"]: w["served"] for w in stats["workers"]}
        assert served["by-hand"] > 0, served
        assert len(served) == 3

        # SIGKILL a supervisord-managed worker: requests keep being answered, and it comes back
        victim = _ctl_pid(run_dir, "worker:worker_00")
        assert victim, supervisorctl(run_dir, "status").stdout
        os.kill(victim, signal.SIGKILL)
        frames = asyncio.run(_frames(port, 24))
        assert len(frames) == 24 and all(f[:2] == b"\xff\xd8" for f in frames)

        def restarted() -> bool:
            pid = _ctl_pid(run_dir, "worker:worker_00")
            return pid is not None and pid != victim

        wait_until(restarted, timeout=60, what="supervisord to restart worker_00")

        extra.send_signal(signal.SIGTERM)
        assert extra.wait(timeout=30) == 0, "a worker leaves cleanly on SIGTERM"

        # Ctrl-C: everything under lipsync up goes away
        family = psutil.Process(up.pid).children(recursive=True)
        assert len(family) >= 5  # supervisord, broker, gateway, two workers
        up.send_signal(signal.SIGINT)
        assert up.wait(timeout=60) == 0
        gone, alive = psutil.wait_procs(family, timeout=10)
        assert not alive, [p.info if hasattr(p, "info") else p.pid for p in alive]
        assert not (run_dir / "supervisor.sock").exists() or _health(port) == 0
    finally:
        if up.poll() is None:
            up.send_signal(signal.SIGTERM)
            try:
                up.wait(timeout=30)
            except subprocess.TimeoutExpired:
                up.kill()
        print((tmp_path / "up.log").read_text())
        for name in sorted(run_dir.glob("*.log")) if run_dir.exists() else ():
            print(f"--- {name.name}\n{name.read_text(errors='replace')[-2000:]}")


def test_status_without_a_running_system(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "lipsync", "status", "--run-dir", str(tmp_path)],
        capture_output=True, text=True, check=False, cwd=ROOT,
    )  # fmt: skip
    assert result.returncode != 0
    assert "no running system" in result.stderr + result.stdout


def test_print_env_fills_every_variable_supervisord_needs(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "lipsync", "up", "--print-env", "--workers", "3",
         "--run-dir", str(tmp_path)],
        capture_output=True, text=True, check=True, cwd=ROOT,
    )  # fmt: skip
    exported = dict(
        line.removeprefix("export ").split("=", 1) for line in result.stdout.splitlines()
    )
    needed = set(re.findall(r"%\(ENV_(\w+)\)s", (ROOT / "supervisord.conf").read_text()))
    assert needed <= set(exported), needed - set(exported)
    assert exported["LIPSYNC_WORKERS"] == "3"
    assert json.dumps(exported)  # plain strings only
