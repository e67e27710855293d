"""The code base stays ruff clean (lint and format) and type-checks, as CI would otherwise
not notice."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest


ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(shutil.which("ruff") is None, reason="ruff is not installed")
@pytest.mark.parametrize("argv", [["check"], ["format", "--check"]], ids=["lint", "format"])
def test_ruff(argv):
    result = subprocess.run(["ruff", *argv, "."], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.skipif(shutil.which("mypy") is None, reason="mypy is not installed")
def test_mypy_on_every_package():
    """Every package type-checks; the wire formats, the sans-I/O cores and the worker's
    runtime strictly (pyproject.toml lists them)."""
    packages = ["shared", "broker", "gateway", "workers", "lipsync"]
    result = subprocess.run(["mypy", *packages], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
