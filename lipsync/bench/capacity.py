"""How many concurrent streams a system sustains: the criterion, and the search for the
largest count that meets it. No I/O: ``lipsync.bench.gpu`` runs the trials.

A count of 25 fps streams is *sustained* when, over the measured window, the streams
together are shown at least ``MIN_SHOWN`` of the frames they are owed (25 a second each),
and the 99th percentile of the extra latency (audio-in to frame-out, less the lookahead
floor every stream pays) stays under ``MAX_EXTRA_P99_MS``.

The search starts from a guess (the in-process worker's frames/s over 25, discounted),
grows by ``GROW`` while trials pass and halves while they fail, then bisects between the
largest pass and the smallest fail while trials remain. A handful of trials suffice: the
answer is bracketed to within a factor of ``GROW``, then narrowed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


__all__ = [
    "GROW",
    "MAX_EXTRA_P99_MS",
    "MIN_SHOWN",
    "Trial",
    "next_count",
    "sustained",
]

FPS = 25.0
MIN_SHOWN = 0.95
MAX_EXTRA_P99_MS = 100.0
GROW = 1.6


@dataclass(frozen=True, slots=True)
class Trial:
    streams: int
    shown_per_s: float  # frames shown per second, all streams together
    extra_p99_ms: float | None  # None: no frame in the window
    passed: bool


def sustained(streams: int, shown_per_s: float, extra_p99_ms: float | None) -> bool:
    """The criterion above."""
    if streams < 1 or extra_p99_ms is None:
        return False
    return shown_per_s >= MIN_SHOWN * FPS * streams and extra_p99_ms < MAX_EXTRA_P99_MS


def next_count(trials: list[Trial], first: int, limit: int) -> int | None:
    """The stream count to try next, or None when the search is done (``limit``: the
    most streams worth trying)."""
    if not trials:
        return max(1, min(first, limit))
    passed = [t.streams for t in trials if t.passed]
    failed = [t.streams for t in trials if not t.passed]
    best = max(passed, default=0)
    worst = min(failed, default=None)
    if worst is None:  # every trial passed: grow
        n = min(limit, math.ceil(best * GROW))
        return n if n > best else None
    if not passed:  # every trial failed: shrink
        n = worst // 2
        return n if n >= 1 else None
    if worst - best <= max(1, best // 10):  # bracketed to 10 %
        return None
    return (best + worst) // 2
