"""ServiceTimes: the batch-time estimates the worker refuses too-late jobs by."""

from __future__ import annotations

import pytest

from workers.servicetime import ServiceTimes


def test_estimates_follow_the_measurements_and_err_low():
    times = ServiceTimes(weight=0.5)
    assert times.estimate("m", 1) is None  # nothing measured: refuse nothing
    times.record("m", 2, 0.100)
    assert times.estimate("m", 2) == pytest.approx(0.100)
    times.record("m", 2, 0.200)
    assert times.estimate("m", 2) == pytest.approx(0.150)  # moving mean
    assert times.estimate("m", 1) is None  # no smaller size measured: no guess
    assert times.estimate("m", 4) == pytest.approx(0.150)  # the largest size below
    times.record("m", 3, 0.300)
    assert times.estimate("m", 4) == pytest.approx(0.300)
    assert times.estimate("other", 2) is None  # per model
    assert times.age("m") < 5 and times.age("other") == float("inf")
    times.forget("m")
    assert times.estimate("m", 2) is None and times.age("m") == float("inf")
