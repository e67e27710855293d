"""Per-model statistics (shared/modelstats.py): bounded, mergeable, tolerant of bad input."""

from __future__ import annotations

import random

import msgpack
import pytest

from shared.modelstats import (
    EDGES_MS,
    MAX_MODELS,
    LatencyHistogram,
    ModelStatsBook,
    RateWindow,
    merge_models,
)


def test_histogram_quantiles_within_a_bucket():
    rng = random.Random(1)
    values = [rng.lognormvariate(3, 1) for _ in range(10_000)]
    h = LatencyHistogram()
    for v in values:
        h.add(v)
    values.sort()
    for q in (0.5, 0.9, 0.99):
        exact = values[int(q * len(values)) - 1]
        assert abs(h.quantile(q) - exact) / exact < 0.2, q
    assert h.count == 10_000
    assert h.min == values[0] and h.max == values[-1]
    assert h.quantile(0.0) >= h.min and h.quantile(1.0) <= h.max


def test_histogram_memory_is_fixed_and_merge_adds():
    a, b = LatencyHistogram(), LatencyHistogram()
    for v in range(1, 100_001):
        a.add(v / 100)
    b.add(5000.0)
    b.add(1e9)  # past the last edge: the overflow bucket
    b.add(float("nan"))  # ignored
    assert len(a.counts) == len(EDGES_MS) + 1
    a.merge(b)
    assert a.count == 100_002 and a.max == 1e9
    wire = a.to_wire()
    assert len(msgpack.packb(wire)) < 2048
    back = LatencyHistogram.from_wire(msgpack.unpackb(msgpack.packb(wire)))
    assert back.counts == a.counts and back.count == a.count
    assert LatencyHistogram.from_wire({"h": [["x", 1], [10**6, 1], [3, -2]]}).count == 0
    assert LatencyHistogram.from_wire("garbage").count == 0


def test_cumulative_buckets_are_monotonic():
    h = LatencyHistogram()
    for v in (0.1, 1, 1, 10, 100, 1000):
        h.add(v)
    edges = EDGES_MS[::4]
    cum = h.cumulative(edges)
    counts = [n for _, n in cum]
    assert counts == sorted(counts) and counts[-1] == 6
    assert dict(cum)[EDGES_MS[8]] == 3  # 0.1, 1, 1 are <= 1 ms


def test_rate_window_counts_the_last_seconds_only():
    r = RateWindow(now=100.0)
    for t in range(100, 120):
        r.add(25, now=t + 0.5)
    assert r.rate(120.0) == pytest.approx(25, rel=0.15)
    assert r.rate(200.0) == 0.0  # long idle: the ring was cleared


def test_book_bounds_models_and_snapshot_fields():
    book = ModelStatsBook()
    for i in range(MAX_MODELS + 10):
        book.served(f"m{i}", 5.0, now=1.0)
    assert len(book.snapshot(2.0)) == MAX_MODELS
    book.served("a", 10.0, now=1.0)
    book.failed("a", "frame_out_of_range", now=1.0)
    book.batch("a", 4, now=1.0)
    snap = book.snapshot(2.0)["a"]
    assert snap["requests"] == 2 and snap["errors"] == 1
    assert snap["codes"] == [["frame_out_of_range", 1]]
    assert snap["batches"] == [[4, 1]]
    book.drop("a")
    assert "a" not in book.snapshot(2.0)


def test_merge_adds_workers_up():
    def worker(wid, device, models, snapshot):
        return {"id": wid, "device": device, "models": models, "counters": {"models": snapshot}}

    b1, b2 = ModelStatsBook(), ModelStatsBook()
    for _ in range(10):
        b1.served("x", 10.0, now=1.0)
    b1.batch("x", 2, now=1.0)
    b2.served("x", 30.0, now=1.0)
    b2.failed("x", "deadline_exceeded", now=1.0)
    b2.batch("x", 2, now=1.0)
    b2.batch("x", 1, now=1.0)
    stats = {
        "workers": [
            worker("w1", "cpu", ["x"], b1.snapshot(2.0)),
            worker("w2", "cuda:0", ["x", "y"], b2.snapshot(2.0)),
            {"id": "w3", "counters": "junk"},
        ],
        "models": {"x": {"queue": 3, "workers": ["w1", "w2"]}, "y": {"queue": 0}},
    }
    merged = merge_models(stats)
    assert sorted(merged) == ["x", "y"]
    x = merged["x"]
    assert x["requests"] == 12 and x["errors"] == 1
    assert x["error_codes"] == {"deadline_exceeded": 1}
    assert x["latency_ms"]["count"] == 11
    assert x["latency_ms"]["min"] == 10.0 and x["latency_ms"]["max"] == 30.0
    assert x["latency_ms"]["avg"] == pytest.approx(130 / 11, abs=1e-3)
    assert x["batch_sizes"] == {"1": 1, "2": 2}
    assert x["workers"] == ["w1", "w2"] and x["devices"] == ["cpu", "cuda:0"]
    assert x["queue"] == 3 and x["frames_per_s"] > 0
    assert merged["y"]["requests"] == 0 and merged["y"]["workers"] == ["w2"]
    assert merge_models({}) == {}
