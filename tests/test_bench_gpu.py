"""The GPU benchmark command (lipsync/bench/gpu.py) on a CPU with a tiny package, so that it
keeps working where there is no GPU; and its stream-capacity search (sans I/O). No timed
assertions: its numbers belong in BENCHMARKS.md."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import ROOT

from lipsync.bench.capacity import Trial, next_count, sustained


pytest.importorskip("gateway.server", reason="the gateway has not landed in this checkout")


def test_sustained_needs_the_frames_and_the_latency():
    assert sustained(4, 95.0, 99.0)  # 4 streams owe 100 frames/s: 95 % shown
    assert not sustained(4, 94.9, 10.0)
    assert not sustained(4, 100.0, 100.0)
    assert not sustained(4, 100.0, None)  # nothing shown in the window
    assert not sustained(0, 0.0, 0.0)


def search(capacity: int, first: int, limit: int = 1024, trials: int = 20) -> list[int]:
    """The counts the search tries against a system that sustains ``capacity``."""
    done: list[Trial] = []
    while len(done) < trials:
        n = next_count(done, first, limit)
        if n is None:
            break
        done.append(Trial(n, 0.0, 0.0, n <= capacity))
    return [t.streams for t in done]


def test_search_brackets_then_narrows():
    tried = search(capacity=130, first=40)
    assert tried[:4] == [40, 64, 103, 165]  # grows by 1.6 while it passes
    best = max(n for n in tried if n <= 130)
    assert 130 - best <= 13  # within 10 %
    assert search(capacity=3, first=40)[:5] == [40, 20, 10, 5, 2]  # halves while it fails
    assert search(capacity=0, first=4) == [4, 2, 1]
    assert search(capacity=5000, first=600, limit=1000) == [600, 960, 1000]
    assert len(search(capacity=130, first=40, trials=5)) == 5  # the trial budget holds


@pytest.mark.slow
def test_benchmark_runs_on_cpu_with_a_tiny_package(tmp_path):
    out = tmp_path / "bench"
    proc = subprocess.run(
        [sys.executable, "-m", "lipsync.bench.gpu", "--tiny", "--device", "cpu", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=170,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((out / "gpu_bench.json").read_text())
    ip = report["in_process"]
    assert ip["device"] == "cpu" and ip["jpeg"] == "opencv"
    assert [(r["variant"], r["batch"]) for r in ip["bare"]] == [("fp32", 1), ("fp32", 2)]
    assert [(r["mode"], r["batch"]) for r in ip["worker"]] == [
        ("crop", 1),
        ("crop", 2),
        ("composite", 1),
        ("composite", 2),
    ]
    for row in ip["worker"]:
        assert row["frames"] > 0 and row["failed"] == 0
        assert set(row["stage_ms_per_frame"]) == {"prepare", "inference", "composite", "encode"}
    (system,) = report["system"]
    assert system["workers"] == 1 and len(system["stream_trials"]) == 1
    assert system["layout_b"]["answered"] > 0 and system["layout_b"]["errors"] == 0
    text = (out / "gpu_bench.md").read_text()
    assert text in proc.stdout  # the printed table is the written one
    for heading in ("**Bare model**", "**Whole worker**", "**Through the system**", "**Targets**"):
        assert heading in text
