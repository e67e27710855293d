"""Per-model series on /metrics, labelled by model, from the workers' own statistics.

Why a collector and not counters the gateway increments: the numbers belong to the
workers (each counts what it computed, per model, in bounded memory: ``shared.modelstats``)
and reach the gateway in the broker's ``stats`` answer, which the health cache already
fetches. The collector turns the last such answer into series at scrape time. Labels come
from the models workers hold (operator-chosen package names), never from client input, so
the number of series stays what the deployment serves. Counters are sums over the live
workers: a worker that leaves takes its counts with it (Prometheus sees a reset).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from shared.modelstats import EDGES_MS, merge


__all__ = ["LATENCY_EDGES_MS", "ModelCollector"]

LATENCY_EDGES_MS = EDGES_MS[::4]
"""Histogram buckets exported: one per octave, 0.25 ms .. 65.5 s."""


class ModelCollector(Collector):
    """``stats`` returns the broker's last ``stats`` answer (a dict), or None."""

    def __init__(self, stats: Callable[[], dict[str, Any] | None]) -> None:
        self._stats = stats

    def collect(self) -> Iterator[Metric]:
        stats = self._stats() or {}
        merged = merge(stats)
        requests = CounterMetricFamily(
            "lipsync_model_requests",
            "Frames answered by workers (successes and errors), by model.",
            labels=["model"],
        )
        errors = CounterMetricFamily(
            "lipsync_model_errors",
            "Frames answered with an error by workers, by model and error code.",
            labels=["model", "code"],
        )
        fps = GaugeMetricFamily(
            "lipsync_model_frames_per_second",
            "Frames served per second over the last 10 s, summed over workers, by model.",
            labels=["model"],
        )
        workers = GaugeMetricFamily(
            "lipsync_model_workers", "Workers holding the model.", labels=["model"]
        )
        queue = GaugeMetricFamily(
            "lipsync_model_queue", "Requests queued at the broker, by model.", labels=["model"]
        )
        batches = CounterMetricFamily(
            "lipsync_model_batches",
            "Forward batches run by workers, by model and batch size.",
            labels=["model", "size"],
        )
        latency = HistogramMetricFamily(
            "lipsync_model_latency_seconds",
            "Time a frame spent in its worker (received to encoded), by model.",
            labels=["model"],
        )
        for name, m in merged.items():
            requests.add_metric([name], m.requests)
            for code, n in m.codes.items():
                errors.add_metric([name, code], n)
            fps.add_metric([name], m.fps)
            workers.add_metric([name], len(m.workers))
            queue.add_metric([name], m.queue)
            for size, n in sorted(m.batches.items()):
                batches.add_metric([name, str(size)], n)
            buckets = [
                (_le(edge / 1000), float(n)) for edge, n in m.latency.cumulative(LATENCY_EDGES_MS)
            ]
            buckets.append(("+Inf", float(m.latency.count)))
            latency.add_metric([name], buckets, m.latency.sum / 1000)
        yield from (requests, errors, fps, workers, queue, batches, latency)


def _le(seconds: float) -> str:
    return f"{seconds:.9g}"
