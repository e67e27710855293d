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
    "EDGES_MS",
    "FPS_WINDOW_S",
    "MAX_BATCH_SIZES",
    "MAX_CODES",
    "MAX_MODELS",
    "LatencyHistogram",
    "MergedModel",
    "ModelCounters",
    "ModelStatsBook",
    "RateWindow",
    "merge",
    "merge_models",
    "summary",
]

_RATIO = 2**0.25
EDGES_MS: tuple[float, ...] = tuple(0.25 * _RATIO**k for k in range(4 * 18 + 1))
"""Upper bucket edges, 0.25 ms .. 65.5 s, four per octave; one more bucket above the last."""
FPS_WINDOW_S = 10
"""frames/s is the count of the last this-many whole seconds (plus the current one)."""
MAX_MODELS = 64
"""A worker never tracks more models than this (oldest-touched dropped first), which also
keeps its heartbeat well under the envelope's 64 KiB header limit."""
MAX_CODES = 32
MAX_BATCH_SIZES = 1024


def _bucket(ms: float) -> int:
    if ms <= EDGES_MS[0]:
        return 0
    k = math.ceil(math.log(ms / EDGES_MS[0], _RATIO) - 1e-9)
    return min(max(k, 0), len(EDGES_MS))


class LatencyHistogram:
    """Counts of latencies (ms) in fixed log-spaced buckets, plus exact count, sum, min and
    max. ``quantile`` answers with the bucket's geometric middle, clamped to [min, max]."""

    __slots__ = ("count", "counts", "max", "min", "sum")

    def __init__(self) -> None:
        self.counts = [0] * (len(EDGES_MS) + 1)
        self.count = 0
        self.sum = 0.0
        self.min = math.inf
        self.max = 0.0

    def add(self, ms: float) -> None:
        if not math.isfinite(ms) or ms < 0:
            return
        self.counts[_bucket(ms)] += 1
        self.count += 1
        self.sum += ms
        self.min = min(self.min, ms)
        self.max = max(self.max, ms)

    def merge(self, other: LatencyHistogram) -> None:
        for k, n in enumerate(other.counts):
            self.counts[k] += n
        self.count += other.count
        self.sum += other.sum
        self.min = min(self.min, other.min)
        self.max = max(self.max, other.max)

    def quantile(self, q: float) -> float:
        if not self.count:
            return 0.0
        rank = max(1, math.ceil(q * self.count))
        seen = 0
        for k, n in enumerate(self.counts):
            seen += n
            if seen >= rank:
                lo = EDGES_MS[k - 1] if k > 0 else 0.0
                hi = EDGES_MS[k] if k < len(EDGES_MS) else self.max
                mid = math.sqrt(lo * hi) if lo > 0 else hi / 2
                return min(max(mid, self.min), self.max)
        return self.max

    def cumulative(self, edges_ms: Iterable[float]) -> list[tuple[float, int]]:
        """(edge, count of latencies <= edge) for each of ``edges_ms``, which must be among
        ``EDGES_MS`` (Prometheus histogram buckets)."""
        out = []
        for edge in edges_ms:
            k = _bucket(edge)
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
        process; a bad snapshot must not break the stats answer)."""
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
            "p50": round(latency.quantile(0.5), 3),
            "p99": round(latency.quantile(0.99), 3),
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
