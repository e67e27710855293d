"""``lipsync bench --soak`` end to end, briefly: it starts its own system, injects at least one
fault, and its books balance (every request answered once, or failed visibly by a closed or
abandoned connection; nothing lost, nothing twice). Long runs are for RELIABILITY.md."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import ROOT


@pytest.mark.fault
def test_short_soak_balances_its_books(tmp_path):
    report_file = tmp_path / "soak.json"
    result = subprocess.run(
        [sys.executable, "-m", "lipsync", "bench", "--soak", "0.3", "--clients", "3",
         "--json", str(report_file), "--out", str(tmp_path / "run")],
        cwd=ROOT,
        env={**os.environ, "LIPSYNC_SOAK_SEED": "3"},
        capture_output=True,
        text=True,
        timeout=170,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(report_file.read_text())
    outcomes = report["outcomes"]
    assert report["lost"] == report["duplicates"] == report["unexpected"] == 0
    assert report["sent"] == sum(outcomes.values()) > 100
    assert report["sent"] == (
        report["answered"] + outcomes.get("connection_closed", 0) + outcomes.get("abandoned", 0)
    )
    assert len(report["faults"]) >= 1 and report["not_recovered"] == 0
    assert report["gateway_in_flight_at_end"] == 0
    assert set(report["resources_end"]) == {"broker", "gateway", "w0", "w1", "w2"}
    assert "sent" in result.stdout and "duplicates 0" in result.stdout


def test_soak_refuses_unknown_fault_kinds():
    """``LIPSYNC_SOAK_FAULTS`` limits the faults drawn; a misspelt kind stops it before it
    starts anything, naming the kinds it knows."""
    result = subprocess.run(
        [sys.executable, "-m", "lipsync", "bench", "--soak", "0.3"],
        cwd=ROOT,
        env={**os.environ, "LIPSYNC_SOAK_FAULTS": "restart_broker,kill_wroker"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2, result.stdout + result.stderr
    assert "unknown fault kinds ['kill_wroker']" in result.stderr
    assert "restart_broker" in result.stderr and "sent" not in result.stdout
