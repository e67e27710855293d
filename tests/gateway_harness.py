"""Helpers for the gateway tests: a broker, null workers and gateways as real processes on
free loopback ports, a raw HTTP client (so that paths reach the server unnormalised), and
/metrics read with prometheus_client's own parser."""

from __future__ import annotations

import json
import socket
import subprocess
import time
from typing import Any

from conftest import Processes, free_port, wait_until
from prometheus_client.parser import text_string_to_metric_families


__all__ = ["FAST_BEATS", "System", "http_get", "metric", "metrics"]

FAST_BEATS = {"LIPSYNC_HEARTBEAT_S": "0.2", "LIPSYNC_LIVENESS": "5"}
"""Broker and workers notice a death within about a second; liveness 5 keeps a busy 2-core
machine from declaring healthy processes dead."""


def http_get(
    port: int, path: str, headers: dict[str, str] | None = None, method: str = "GET"
) -> tuple[int, dict[str, str], bytes]:
    """One raw HTTP/1.1 request; (status, lowercase headers, body)."""
    lines = [f"{method} {path} HTTP/1.1", f"Host: 127.0.0.1:{port}", "Connection: close"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    parsed = {}
    for line in header_lines:
        key, _, value = line.partition(":")
        parsed[key.strip().lower()] = value.strip()
    return int(status_line.split()[1]), parsed, body


def metrics(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of /metrics, keyed by (name, sorted labels)."""
    status, headers, body = http_get(port, "/metrics")
    assert status == 200
    assert headers["content-type"].startswith("text/plain")
    out = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def metric(port: int, name: str, **labels: str) -> float:
    """One sample's value (0 when the series does not exist yet)."""
    return metrics(port).get((name, tuple(sorted(labels.items()))), 0.0)


class System:
    """Broker, workers and gateways of one test (or module), all killed at teardown by
    ``processes``."""

    def __init__(self, processes: Processes) -> None:
        self.processes = processes
        self.frontend = f"tcp://127.0.0.1:{free_port()}"
        self.backend = f"tcp://127.0.0.1:{free_port()}"

    def start_broker(self, *args: str) -> subprocess.Popen[bytes]:
        """The broker, on this system's addresses (also to restart it): ``args`` are extra
        ``lipsync broker`` flags."""
        return self.processes.start(
            "broker",
            "--frontend",
            self.frontend,
            "--backend",
            self.backend,
            *args,
            env=FAST_BEATS,
            name="broker",
        )

    def start_worker(
        self, models: str, *, delay_ms: float = 0, jpeg_bytes: int | None = None
    ) -> subprocess.Popen[bytes]:
        env = dict(FAST_BEATS)
        if jpeg_bytes is not None:
            env["LIPSYNC_NULL_JPEG_BYTES"] = str(jpeg_bytes)
        return self.processes.start(
            "worker",
            "--backend",
            "null",
            "--broker",
            self.backend,
            "--models",
            models,
            "--null-delay-ms",
            str(delay_ms),
            env=env,
            name="worker",
        )

    def start_gateway(
        self,
        *args: str,
        env: dict[str, str] | None = None,
        web_dir: str | None = None,
        port: int | None = None,
    ) -> tuple[subprocess.Popen[bytes], int]:
        """A gateway on a free port, or on ``port`` (to restart one where clients expect it)."""
        port = port or free_port()
        argv = ["gateway", "--port", str(port), "--broker", self.frontend, *args]
        if web_dir is not None:
            argv += ["--web-dir", web_dir]
        proc = self.processes.start(*argv, env=env, name="gateway")
        wait_until(lambda: _listening(port, proc), timeout=30, what="the gateway to listen")
        return proc, port

    def health(self, port: int) -> tuple[int, dict[str, Any]]:
        status, _, body = http_get(port, "/health")
        return status, json.loads(body)

    def wait_models(self, port: int, *models: str, timeout: float = 60) -> None:
        """Until /health lists every one of ``models``."""
        wait_until(
            lambda: set(models) <= set(self.health(port)[1]["models"]),
            timeout=timeout,
            what=f"workers holding {', '.join(models)}",
        )


def _listening(port: int, proc: subprocess.Popen[bytes]) -> bool:
    if proc.poll() is not None:
        raise AssertionError(f"gateway exited with {proc.returncode}")
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        time.sleep(0.05)
        return False
