"""Per-model, broker and per-worker series on /metrics, from the broker's ``stats`` answer.

Why a collector and not counters the gateway increments: the numbers belong to the
workers (each counts what it computed, per model, in bounded memory: ``shared.modelstats``)
and reach the gateway in the broker's ``stats`` answer, which the health cache already
fetches. The collector turns the last such answer into series at scrape time. Labels come
from the models workers hold (operator-chosen package names), never from client input, so
the number of series stays what the deployment serves. Counters are sums over the live
workers: a worker that leaves takes its counts with it (Prometheus sees a reset).

``BrokerCollector`` does the same for the broker's own totals (what it answered and how,
requests re-sent after a worker died, refused as overloaded, expired in its queues) and
for each worker's credits and counts, so that an operator sees the broker without a
second scrape target. Every gateway shows the same broker numbers; scrape one of them, or
sum with care. A broker restart resets its counters (Prometheus sees a reset).
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

from shared.errors import ErrorCode
from shared.modelstats import EDGES_MS, merge


__all__ = ["BROKER_EVENTS", "LATENCY_EDGES_MS", "BrokerCollector", "ModelCollector"]

BROKER_EVENTS = (
    "overloaded",
    "expired",
    "redispatched",
    "cancelled",
    "stale",
    "undeliverable",
    "malformed",
    "waited_for_workers",
    "discarded",
)
"""Broker totals exported as ``lipsync_broker_events_total{event}`` (docs/broker.md)."""
_OUTCOMES = frozenset({"ok", *(code.value for code in ErrorCode)})

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


class BrokerCollector(Collector):
    """The broker's totals and its workers, from the same last ``stats`` answer."""

    def __init__(self, stats: Callable[[], dict[str, Any] | None]) -> None:
        self._stats = stats

    def collect(self) -> Iterator[Metric]:
        stats = self._stats() or {}
        totals = stats.get("broker")
        workers = stats.get("workers")
        if isinstance(totals, dict):
            yield from _broker_series(totals)
        if isinstance(workers, list):
            yield from _worker_series([w for w in workers if isinstance(w, dict)])


def _broker_series(totals: dict[str, Any]) -> Iterator[Metric]:
    requests = CounterMetricFamily(
        "lipsync_broker_requests", "Requests the broker received from gateways."
    )
    requests.add_metric([], _num(totals.get("requests")))
    answers = CounterMetricFamily(
        "lipsync_broker_answers",
        "Answers the broker sent to gateways, by outcome (ok or an error code).",
        labels=["outcome"],
    )
    answered = totals.get("answered")
    by_outcome: dict[str, float] = {}
    for outcome, n in answered.items() if isinstance(answered, dict) else ():
        key = outcome if outcome in _OUTCOMES else "other"  # a worker's own code
        by_outcome[key] = by_outcome.get(key, 0.0) + _num(n)
    for outcome, n in sorted(by_outcome.items()):
        answers.add_metric([outcome], n)
    events = CounterMetricFamily(
        "lipsync_broker_events",
        "What the broker did besides routing: overloaded (refused, queue full), expired "
        "(deadline passed in its queue or at a worker), redispatched (a dead worker's "
        "request sent to another), cancelled, stale (answers from a worker that no longer "
        "owned the request), undeliverable (gateway gone), malformed, waited_for_workers "
        "(held during its warm-up for a model nobody held yet), discarded (a worker's answer "
        "to a request already cancelled or answered: computed, seen by nobody).",
        labels=["event"],
    )
    for event in BROKER_EVENTS:
        events.add_metric([event], _num(totals.get(event)))
    yield from (requests, answers, events)
    for name, key, doc in (
        ("lipsync_broker_pending", "pending", "Requests the broker holds (queued or at a worker)."),
        ("lipsync_broker_queued", "queued", "Requests waiting in the broker's queues."),
        ("lipsync_broker_gateways", "gateways", "Gateways connected to the broker."),
        ("lipsync_broker_uptime_seconds", "uptime_s", "Seconds since the broker started."),
        ("lipsync_broker_warming_up", "warming_up", "1 while the broker is in its warm-up."),
    ):
        gauge = GaugeMetricFamily(name, doc)
        gauge.add_metric([], _num(totals.get(key)))
        yield gauge


def _worker_series(workers: list[dict[str, Any]]) -> Iterator[Metric]:
    capacity = GaugeMetricFamily(
        "lipsync_worker_capacity", "Requests a worker may hold at once.", labels=["worker"]
    )
    in_flight = GaugeMetricFamily(
        "lipsync_worker_in_flight", "Requests a worker holds now.", labels=["worker"]
    )
    served = CounterMetricFamily(
        "lipsync_worker_served", "Requests a worker answered with a result.", labels=["worker"]
    )
    errors = CounterMetricFamily(
        "lipsync_worker_errors", "Requests a worker answered with an error.", labels=["worker"]
    )
    for w in workers:
        label = [str(w.get("id", "?"))]
        capacity.add_metric(label, _num(w.get("capacity")))
        in_flight.add_metric(label, _num(w.get("in_flight")))
        served.add_metric(label, _num(w.get("served")))
        errors.add_metric(label, _num(w.get("errors")))
    yield from (capacity, in_flight, served, errors)


def _num(value: Any) -> float:
    """A number from the stats answer; anything else (missing, malformed) counts as 0."""
    if isinstance(value, bool):
        return float(value)
    return float(value) if isinstance(value, int | float) else 0.0
