"""Per-model serving statistics in bounded memory: what the original ``GetStats`` reported
(requests, latency min/avg/max, device) plus percentiles, frames/s and batch sizes.

Why fixed buckets and not a list of timings: the original kept every inference time in a
list that grew for the life of the process. A histogram with fixed log-spaced edges costs
the same few hundred bytes after a billion requests, merges across workers by adding
counts (percentiles cannot be averaged), and its percentiles are within one bucket (about
19 %) of the truth, which is plenty to tell 20 ms from 200 ms.

Who does what (sans-I/O; callers pass the clock):

- a worker keeps a :class:`ModelStatsBook` and records each answered frame and each batch;
  ``snapshot`` is sent in every heartbeat (``Heartbeat.stats["models"]``);
- the broker shows each worker's snapshot in its ``stats`` answer as it is;
- the gateway (or anyone holding a ``stats`` result) calls :func:`merge_models` to get one
  summary per model over every worker that holds it.

Wire form of one model in one worker (msgpack-safe: string keys, lists for number-keyed
maps)::

    {"requests": n, "errors": n, "codes": [[code, n], ...], "fps": f,
     "latency": {"n": n, "sum": ms, "min": ms, "max": ms, "h": [[bucket, n], ...]},
     "batches": [[size, n], ...]}
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any


__all__ = [
    "BUCKETS",
    "EDGES_MS",
    "FPS_WINDOW_S",
    "MAX_BATCH_SIZES",
    "MAX_CODES",
    "MAX_MODELS",
    "LatencyHistogram",
    "LogBuckets",
    "MergedModel",
    "ModelCounters",
    "ModelStatsBook",
    "RateWindow",
    "merge",
    "merge_models",
    "summary",
]


class LogBuckets:
    """Log-spaced upper bucket edges ``lo_ms * ratio**k`` for ``k < n``, and one bucket
    above the last. A value goes in the first bucket whose edge is not below it, with a
    relative tolerance of about 1e-9, so that a round value computed at an edge (1 ms, 2 ms:
    ``0.25 * 2**0.25 ** 8`` is 0.9999999999999998) counts as at most that edge."""

    __slots__ = ("edges", "_lo", "_log_ratio")

    def __init__(self, lo_ms: float, ratio: float, n: int) -> None:
        self.edges: tuple[float, ...] = tuple(lo_ms * ratio**k for k in range(n))
        self._lo = lo_ms
        self._log_ratio = math.log(ratio)

    @classmethod
    def spanning(cls, lo_ms: float, hi_ms: float, ratio: float) -> LogBuckets:
        """Edges from ``lo_ms`` up to the first at or past ``hi_ms``."""
        return cls(lo_ms, ratio, math.ceil(math.log(hi_ms / lo_ms) / math.log(ratio)) + 1)

    def __len__(self) -> int:
        """Buckets, the one above the last edge included."""
        return len(self.edges) + 1

    def index(self, ms: float) -> int:
        if ms <= self._lo:
            return 0
        k = math.ceil(math.log(ms / self._lo) / self._log_ratio - 1e-9)
        return min(max(k, 0), len(self.edges))


BUCKETS = LogBuckets(0.25, 2**0.25, 4 * 18 + 1)
"""Per-model serving latency: 0.25 ms .. 65.5 s, four per octave. Their indices are part of
the heartbeat's wire form: never change them."""
EDGES_MS: tuple[float, ...] = BUCKETS.edges
"""Upper bucket edges of :data:`BUCKETS`; one more bucket above the last."""
FPS_WINDOW_S = 10
"""frames/s is the count of the last this-many whole seconds (plus the current one)."""
MAX_MODELS = 64
"""A worker never tracks more models than this (oldest-touched dropped first), which also
keeps its heartbeat well under the envelope's 64 KiB header limit."""
MAX_CODES = 32
MAX_BATCH_SIZES = 1024


class LatencyHistogram:
    """Counts of latencies (ms) in fixed log-spaced buckets (:class:`LogBuckets`, by default
    :data:`BUCKETS`), plus exact count, sum, min and max: bounded memory whatever the
    traffic.

    ``quantile`` answers with the upper edge of the bucket holding the quantile, clamped to
    [min, max]: never below the true value, at most one bucket above it (19 % with
    :data:`BUCKETS`, 2 % with the streams' finer buckets), and exact at the top. An upper
    bound is what a bucket knows (a count of latencies at most its edge, Prometheus's
    ``le``), and it is what a latency percentile is read for: whether frames made their
    deadline. (The bucket's geometric middle would be closer on average but can claim a
    p99 below the one that happened.)"""

    __slots__ = ("buckets", "count", "counts", "max", "min", "sum")

    def __init__(self, buckets: LogBuckets = BUCKETS) -> None:
        self.buckets = buckets
        self.counts = [0] * len(buckets)
        self.count = 0
        self.sum = 0.0
        self.min = math.inf
        self.max = 0.0

    def add(self, ms: float) -> None:
        if not math.isfinite(ms) or ms < 0:
            return
        self.counts[self.buckets.index(ms)] += 1
        self.count += 1
        self.sum += ms
        if ms < self.min:
            self.min = ms
        if ms > self.max:
            self.max = ms

    def merge(self, other: LatencyHistogram) -> None:
        if other.buckets is not self.buckets:
            raise ValueError("histograms with different buckets cannot be merged")
        for k, n in enumerate(other.counts):
            self.counts[k] += n
        self.count += other.count
        self.sum += other.sum
        self.min = min(self.min, other.min)
        self.max = max(self.max, other.max)

    def quantile(self, q: float) -> float | None:
        """Quantile ``q`` (ms), see the class docstring; None when empty."""
        if not self.count:
            return None
        rank = max(1, math.ceil(q * self.count))
        edges = self.buckets.edges
        seen = 0
        for k, n in enumerate(self.counts):
            seen += n
            if seen >= rank:
                edge = edges[k] if k < len(edges) else self.max
                return min(max(edge, self.min), self.max)
        return self.max

    def snapshot(self) -> dict[str, float | int | None]:
        """Count, mean and p50/p95/p99 (ms, to 0.1 ms; None when empty): a quick look."""

        def r(x: float | None) -> float | None:
            return None if x is None else round(x, 1)

        return {
            "count": self.count,
            "mean_ms": r(self.sum / self.count) if self.count else None,
            "p50_ms": r(self.quantile(0.5)),
            "p95_ms": r(self.quantile(0.95)),
            "p99_ms": r(self.quantile(0.99)),
        }

    def cumulative(self, edges_ms: Iterable[float]) -> list[tuple[float, int]]:
        """(edge, count of latencies <= edge) for each of ``edges_ms``, which must be among
        the buckets' edges (Prometheus histogram buckets)."""
        out = []
        for edge in edges_ms:
            k = self.buckets.index(edge)
            out.append((edge, sum(self.counts[: k + 1])))
        return out

    def to_wire(self) -> dict[str, Any]:
        return {
            "n": self.count,
            "sum": round(self.sum, 3),
            "min": round(self.min, 3) if self.count else 0.0,
            "max": round(self.max, 3),
            "h": [[k, n] for k, n in enumerate(self.counts) if n],
        }

    @classmethod
    def from_wire(cls, data: Any) -> LatencyHistogram:
        """Tolerant: anything malformed reads as an empty histogram (it came from another
        process; a bad snapshot must not break the stats answer). Wire indices are
        :data:`BUCKETS`'s."""
        h = cls()
        if not isinstance(data, Mapping):
            return h
        try:
            for k, n in data.get("h", ()):
                if isinstance(k, int) and isinstance(n, int) and 0 <= k < len(h.counts) and n > 0:
                    h.counts[k] += n
            h.count = sum(h.counts)
            if h.count:
                h.sum = float(data.get("sum", 0.0))
                h.min = float(data.get("min", 0.0))
                h.max = float(data.get("max", 0.0))
        except (TypeError, ValueError):
            return cls()
        return h


class RateWindow:
    """Events per second over the last ``FPS_WINDOW_S`` whole seconds: a ring of per-second
    counts, so memory is fixed whatever the rate."""

    __slots__ = ("_counts", "_second", "_start")

    def __init__(self, now: float) -> None:
        self._counts = [0] * (FPS_WINDOW_S + 1)
        self._second = int(now)
        self._start = now

    def _advance(self, now: float) -> None:
        second = int(now)
        if second <= self._second:
            return
        for s in range(self._second + 1, min(second, self._second + len(self._counts)) + 1):
            self._counts[s % len(self._counts)] = 0
        self._second = second

    def add(self, n: int, now: float) -> None:
        self._advance(now)
        self._counts[self._second % len(self._counts)] += n

    def rate(self, now: float) -> float:
        self._advance(now)
        span = min(now - self._start, now - (self._second - FPS_WINDOW_S))
        return sum(self._counts) / span if span > 0 else 0.0


@dataclass(slots=True)
class ModelCounters:
    """One model in one worker."""

    rate: RateWindow
    requests: int = 0
    errors: int = 0
    codes: dict[str, int] = field(default_factory=dict)
    latency: LatencyHistogram = field(default_factory=LatencyHistogram)
    batches: dict[int, int] = field(default_factory=dict)

    def to_wire(self, now: float) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "errors": self.errors,
            "codes": [[c, n] for c, n in sorted(self.codes.items())],
            "fps": round(self.rate.rate(now), 3),
            "latency": self.latency.to_wire(),
            "batches": [[s, n] for s, n in sorted(self.batches.items())],
        }


class ModelStatsBook:
    """A worker's per-model counters. Thread-safe: the compute and encode threads record,
    the I/O thread takes snapshots for heartbeats."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._models: dict[str, ModelCounters] = {}

    def _get(self, model: str, now: float) -> ModelCounters:
        counters = self._models.pop(model, None)  # re-inserted: dict order = recency
        if counters is None:
            counters = ModelCounters(RateWindow(now))
            while len(self._models) >= MAX_MODELS:
                del self._models[next(iter(self._models))]
        self._models[model] = counters
        return counters

    def served(self, model: str, latency_ms: float, now: float) -> None:
        """One frame answered successfully after ``latency_ms`` in this worker."""
        with self._lock:
            c = self._get(model, now)
            c.requests += 1
            c.latency.add(latency_ms)
            c.rate.add(1, now)

    def failed(self, model: str, code: str, now: float) -> None:
        with self._lock:
            c = self._get(model, now)
            c.requests += 1
            c.errors += 1
            if code in c.codes or len(c.codes) < MAX_CODES:
                c.codes[code] = c.codes.get(code, 0) + 1

    def batch(self, model: str, size: int, now: float) -> None:
        with self._lock:
            c = self._get(model, now)
            if size in c.batches or len(c.batches) < MAX_BATCH_SIZES:
                c.batches[size] = c.batches.get(size, 0) + 1

    def drop(self, model: str) -> None:
        """Forget a model (unloaded): its numbers start again if it comes back."""
        with self._lock:
            self._models.pop(model, None)

    def snapshot(self, now: float) -> dict[str, dict[str, Any]]:
        with self._lock:
            return {name: c.to_wire(now) for name, c in self._models.items()}


def _pairs(value: Any) -> Iterable[tuple[Any, int]]:
    if not isinstance(value, list | tuple):
        return ()
    return [
        (p[0], p[1])
        for p in value
        if isinstance(p, list | tuple) and len(p) == 2 and isinstance(p[1], int)
    ]


def _num(value: Any) -> float:
    if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return 0.0


def summary(
    latency: LatencyHistogram,
    *,
    requests: int,
    errors: int,
    fps: float,
    batches: Mapping[int, int],
    codes: Mapping[str, int],
) -> dict[str, Any]:
    """The per-model answer clients see (docs/protocol.md, ``get_stats``)."""
    n = latency.count
    return {
        "requests": requests,
        "errors": errors,
        "error_codes": dict(sorted(codes.items())),
        "latency_ms": {
            "count": n,
            "min": round(latency.min, 3) if n else 0.0,
            "avg": round(latency.sum / n, 3) if n else 0.0,
            "p50": round(latency.quantile(0.5) or 0.0, 3),
            "p99": round(latency.quantile(0.99) or 0.0, 3),
            "max": round(latency.max, 3),
        },
        "frames_per_s": round(fps, 3),
        "batch_sizes": {str(s): c for s, c in sorted(batches.items())},
    }


@dataclass(slots=True)
class MergedModel:
    """One model over every worker that reports it (``merge``)."""

    latency: LatencyHistogram = field(default_factory=LatencyHistogram)
    requests: int = 0
    errors: int = 0
    fps: float = 0.0
    batches: dict[int, int] = field(default_factory=dict)
    codes: dict[str, int] = field(default_factory=dict)
    workers: list[str] = field(default_factory=list)
    devices: list[str] = field(default_factory=list)
    queue: int = 0

    def summary(self) -> dict[str, Any]:
        entry = summary(
            self.latency,
            requests=self.requests,
            errors=self.errors,
            fps=self.fps,
            batches=self.batches,
            codes=self.codes,
        )
        entry.update(workers=self.workers, devices=self.devices, queue=self.queue)
        return entry


def merge(stats: Mapping[str, Any]) -> dict[str, MergedModel]:
    """Every model held by any worker, from a broker ``stats`` result: each worker's
    heartbeat snapshot (``counters["models"]``) added up, plus who holds it (``workers``,
    ``devices``) and the broker's queue. Tolerates missing or odd fields."""
    workers = stats.get("workers")
    workers = workers if isinstance(workers, list) else []
    broker_models = stats.get("models")
    broker_models = broker_models if isinstance(broker_models, Mapping) else {}
    names: set[str] = {str(m) for m in broker_models}
    for w in workers:
        if isinstance(w, Mapping):
            names.update(m for m in w.get("models") or () if isinstance(m, str))
    out: dict[str, MergedModel] = {}
    for name in sorted(names):
        m = out[name] = MergedModel()
        devices: set[str] = set()
        for w in workers:
            if not isinstance(w, Mapping):
                continue
            if name in (w.get("models") or ()):
                m.workers.append(str(w.get("id", "")))
                devices.add(str(w.get("device", "")))
            counters = w.get("counters")
            per_model = counters.get("models") if isinstance(counters, Mapping) else None
            mine = per_model.get(name) if isinstance(per_model, Mapping) else None
            if not isinstance(mine, Mapping):
                continue
            m.requests += int(_num(mine.get("requests")))
            m.errors += int(_num(mine.get("errors")))
            m.fps += _num(mine.get("fps"))
            m.latency.merge(LatencyHistogram.from_wire(mine.get("latency")))
            for size, n in _pairs(mine.get("batches")):
                if isinstance(size, int):
                    m.batches[size] = m.batches.get(size, 0) + n
            for code, n in _pairs(mine.get("codes")):
                if isinstance(code, str):
                    m.codes[code] = m.codes.get(code, 0) + n
        m.workers.sort()
        m.devices = sorted(d for d in devices if d)
        info = broker_models.get(name)
        m.queue = int(_num(info.get("queue"))) if isinstance(info, Mapping) else 0
    return out


def merge_models(stats: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """``merge`` as the per-model summaries clients see (``get_stats`` ``model_stats``)."""
    return {name: m.summary() for name, m in merge(stats).items()}
