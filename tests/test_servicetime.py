"""ServiceTimes: the batch-time estimates the worker sizes batches and refuses too-late
jobs by."""

from __future__ import annotations

import pytest

from workers.servicetime import ServiceTimes


def test_estimates_follow_the_measurements():
    times = ServiceTimes(window=4)
    assert times.table("m") == {}  # nothing measured: refuse nothing
    times.record("m", 2, 0.100)
    assert times.table("m") == {2: pytest.approx(0.100)}
    times.record("m", 2, 0.200)
    assert times.table("m") == {2: pytest.approx(0.100)}  # lower median of the window
    times.record("m", 3, 0.300)
    assert times.table("m") == {2: pytest.approx(0.100), 3: pytest.approx(0.300)}
    assert times.table("other") == {}  # per model
    assert times.age("m") < 5 and times.age("other") == float("inf")
    times.forget("m")
    assert times.table("m") == {} and times.age("m") == float("inf")


def test_one_slow_first_batch_weighs_nothing_once_a_second_has_run():
    """The first batch at a size pays one-time costs (the image half of frames seen the
    first time, a first call): 289 ms against a steady 180 ms."""
    times = ServiceTimes()
    times.record("demo", 4, 0.289)
    assert times.table("demo")[4] == pytest.approx(0.289)
    times.record("demo", 4, 0.180)
    assert times.table("demo")[4] == pytest.approx(0.180)


def test_the_window_follows_a_change_of_regime():
    times = ServiceTimes(window=3)
    for _ in range(3):
        times.record("m", 1, 0.010)
    for _ in range(3):
        times.record("m", 1, 0.050)  # the host got busy
    assert times.table("m")[1] == pytest.approx(0.050)
    with pytest.raises(ValueError):
        ServiceTimes(window=0)
