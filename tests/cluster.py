"""A broker and null workers as real processes on free loopback ports, and a client.

Used by test_broker.py and test_worker_runtime.py. Heartbeats are fast (0.2 s) so that
deaths are noticed quickly, with a liveness of 5 intervals so that a busy 2-core CI
machine does not declare healthy processes dead.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from conftest import Processes, free_port

from gateway.brokerclient import BrokerClient


__all__ = ["ENV", "HEARTBEAT_S", "LIVENESS", "Cluster", "eventually"]

HEARTBEAT_S = 0.2
LIVENESS = 5
ENV = {"LIPSYNC_HEARTBEAT_S": str(HEARTBEAT_S), "LIPSYNC_LIVENESS": str(LIVENESS)}


async def eventually(predicate: Callable[[], Any], *, timeout: float = 30.0, what: str) -> Any:
    """Poll ``predicate`` (sync or async) until truthy; fail naming ``what``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        await asyncio.sleep(0.05)


class Cluster:
    def __init__(self, processes: Processes, tmp_path: Path, *, ipc: bool = False) -> None:
        self.processes = processes
        if ipc:
            self.frontend = f"ipc://{tmp_path}/frontend.sock"
            self.backend = f"ipc://{tmp_path}/backend.sock"
        else:
            self.frontend = f"tcp://127.0.0.1:{free_port()}"
            self.backend = f"tcp://127.0.0.1:{free_port()}"
        self.no_models = tmp_path / "no-models"
        self.no_models.mkdir(exist_ok=True)
        self.clients: list[BrokerClient] = []

    def start_broker(self, *args: str) -> Any:
        return self.processes.start(
            "broker", "--frontend", self.frontend, "--backend", self.backend, *args,
            env=ENV, name="broker",
        )  # fmt: skip

    def start_worker(
        self,
        name: str,
        *,
        models: str = "m",
        delay_ms: float = 0,
        max_batch: int = 4,
        capacity: int = 0,
        max_delay_ms: float = 2,
        args: tuple[str, ...] = (),
        env: dict[str, str] | None = None,
    ) -> Any:
        return self.processes.start(
            "worker", "--backend", "null", "--broker", self.backend,
            "--models-dir", str(self.no_models), "--models", models, "--worker-id", name,
            "--null-delay-ms", str(delay_ms), "--max-batch", str(max_batch),
            "--capacity", str(capacity), "--max-delay-ms", str(max_delay_ms), *args,
            env={**ENV, **(env or {})}, name=name,
        )  # fmt: skip

    async def client(self) -> BrokerClient:
        client = BrokerClient(self.frontend, heartbeat_s=HEARTBEAT_S, liveness=LIVENESS)
        self.clients.append(client)
        await client.start(wait_s=30)
        return client

    async def stats(self, client: BrokerClient) -> dict[str, Any]:
        return (await client.request("stats")).header.result  # type: ignore[no-any-return]

    async def wait_workers(self, client: BrokerClient, *names: str) -> dict[str, Any]:
        """Until exactly ``names`` are registered (and the client hears the broker)."""

        async def registered() -> dict[str, Any] | None:
            if not client.broker_alive:
                return None
            stats = await self.stats(client)
            ids = sorted(w["id"] for w in stats["workers"])
            return stats if ids == sorted(names) else None

        return await eventually(registered, what=f"workers {names} registered")

    async def close(self) -> None:
        for client in self.clients:
            await client.close()
