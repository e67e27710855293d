"""``lipsync bench`` against a tiny null-backend system: the report has its fields and no
request goes unaccounted for (sent == answered + errors, nothing lost). No timed
assertions: the numbers themselves belong in BENCHMARKS.md."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from conftest import ROOT, Processes, free_port, wait_until

from lipsync.bench.procs import role_of
from lipsync.bench.stats import classify_error, percentiles


pytest.importorskip("gateway.server", reason="the gateway has not landed in this checkout")


def _healthy(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as resp:
            return resp.status == 200
    except (urllib.error.URLError, OSError):
        return False


@pytest.fixture
def system(processes: Processes, tiny_package: Path) -> int:
    """Broker, one null worker serving ``tiny`` (16 frames), gateway; the gateway's port."""
    frontend, backend = (f"tcp://127.0.0.1:{free_port()}" for _ in range(2))
    port = free_port()
    processes.start("broker", "--frontend", frontend, "--backend", backend)
    processes.start(
        "worker", "--backend", "null", "--broker", backend, "--models-dir", str(tiny_package),
        "--null-delay-ms", "1", "--max-delay-ms", "1",
    )  # fmt: skip
    processes.start("gateway", "--broker", frontend, "--port", str(port))
    wait_until(lambda: _healthy(port), timeout=60, what=f"gateway /health on {port}")
    return port


def _bench(port: int, out: Path, *args: str) -> dict:
    cmd = [
        sys.executable, "-m", "lipsync", "bench", "--url", f"ws://127.0.0.1:{port}/ws",
        "--duration", "2", "--warmup", "0.5", "--json", str(out), *args,
    ]  # fmt: skip
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "frames/s" in done.stdout  # the readable table
    return json.loads(out.read_text())


@pytest.mark.parametrize(
    "args",
    [
        ("--mode", "closed", "--clients", "3", "--in-flight", "4", "--layout", "B"),
        ("--mode", "closed", "--clients", "2", "--in-flight", "3", "--layout", "A"),
        ("--mode", "sequential", "--clients", "2", "--no-audio"),
    ],
    ids=["closed-B-audio", "closed-A", "sequential-B"],
)
def test_bench_report_accounts_for_every_request(system, tmp_path, processes, args):
    report = _bench(system, tmp_path / "report.json", *args)
    r = report["result"]
    for key in (
        "sent", "answered", "errors", "errors_by_kind", "lost", "dropped", "frames_per_s",
        "latency_ms", "bytes_in_per_s", "bytes_out_per_s", "window_s",
    ):  # fmt: skip
        assert key in r, key
    assert r["sent"] > 0
    assert r["sent"] == r["answered"] + r["errors"], processes.logs()
    assert r["lost"] == 0
    assert r["errors"] == sum(r["errors_by_kind"].values())
    assert r["answered"] > 0 and r["frames_per_s"] > 0
    for p in ("p50", "p95", "p99"):
        assert r["latency_ms"][p] > 0
    assert r["latency_ms"]["p50"] <= r["latency_ms"]["p95"] <= r["latency_ms"]["p99"]
    assert r["bytes_in_per_s"] > 0
    assert report["config"]["model"] == "tiny"
    assert report["machine"]["cores"] >= 1 and len(report["machine"]["loadavg"]) == 3
    roles = sorted(p["role"] for p in report["processes"])
    assert roles == ["bench", "broker", "gateway", "worker"], report["processes"]
    assert all(p["cpu_percent"] is not None and p["rss"] > 0 for p in report["processes"])


def test_bench_stream_mode(system, tmp_path, processes):
    """One paced stream: every frame the server owed is either received or counted dropped."""
    report = _bench(system, tmp_path / "stream.json", "--mode", "stream")
    r = report["result"]
    assert r["answered"] > 0, processes.logs()
    assert r["sent"] == r["answered"] + r["dropped"]
    assert r["errors"] == 0, r["errors_by_kind"]
    assert r["latency_ms"]["p50"] > 0  # audio-in to frame-out, lookahead included


def test_error_kinds_and_percentiles():
    assert classify_error("overloaded: queue for tiny is full") == "overloaded"
    assert classify_error("deadline_exceeded: deadline passed") == "deadline_exceeded"
    assert classify_error("Deadline exceeded") == "deadline_exceeded"
    assert classify_error("something else") == "other"
    assert percentiles([]) == {"count": 0}
    p = percentiles(list(range(1, 101)))
    assert p["count"] == 100 and p["p50"] == pytest.approx(50.5) and p["max"] == 100


def test_roles_from_command_lines():
    assert role_of(["/usr/bin/python", "-m", "lipsync", "worker", "--backend", "null"]) == "worker"
    assert role_of(["/usr/local/bin/lipsync", "gateway", "--port", "1"]) == "gateway"
    assert role_of(["python", "-m", "lipsync", "bench"]) is None
    assert role_of(["python", "-m", "pytest"]) is None


def test_forwarder_reference_runs_side_by_side_with_the_broker():
    """``python -m lipsync.bench.forwarder``: both routers serve the same client and echo
    workers and the ratio is printed (its value belongs in BENCHMARKS.md)."""
    out = subprocess.run(
        [sys.executable, "-m", "lipsync.bench.forwarder", "--pairs", "1", "--seconds", "0.5"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert any(line.startswith("pair 1 broker") for line in lines)
    assert any(line.startswith("pair 1 forwarder") for line in lines)
    assert lines[-1].startswith("median: broker ") and " ratio " in lines[-1]


def test_broker_bench_without_a_service_time():
    """``python -m lipsync.bench.broker --delay-ms 0``: no ideal rate to divide by, so the
    scaling table says so instead of crashing; each table has its row once."""
    cmd = [
        sys.executable, "-m", "lipsync.bench.broker", "--workers", "1", "--delay-ms", "0",
        "--seconds", "0.3", "--ceiling-concurrency", "8",
    ]  # fmt: skip
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    rows = [line for line in done.stdout.splitlines() if line.startswith("| 1 |")]
    assert len(rows) == 2, done.stdout  # scaling and ceiling, one worker each
    assert rows[0].startswith("| 1 | - |") and rows[0].split("|")[4].strip() == "-"
    assert done.stdout.count("\n| 0 |") == 1  # the added-latency row, once


def test_broker_bench_refuses_bad_arguments():
    cmd = [sys.executable, "-m", "lipsync.bench.broker", "--workers", "0"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "--workers: each count must be at least 1" in done.stderr
    assert "Traceback" not in done.stderr
