"""How long a batch takes, from its start to its answers being ready, per model and size.

Why: a job whose deadline comes before its batch could finish is work nobody will see
(a stream's frame that would arrive after its slot), and a batch too large for its jobs'
deadlines answers none of them in time. The compute loop asks for these times before each
batch: to size it (``workers.batchsize``) and to answer at once, ``deadline_exceeded``,
the jobs that cannot make it even so. Measured, not configured: the time depends on the
device, the model, the batch size and the load.

Steady state, not first passes: each size keeps its last few times and the estimate is
their lower median, so one slow batch (a first call at a new size, the image-half features
of avatar frames seen for the first time, a pause of the host) weighs nothing once a
second batch of that size has run. Sizes not measured are guessed on the low side
(``workers.batchsize.batch_time``), so a job is refused only when even that says it is
too late, never on a guess that would make the worker do less than before. And they must
not go stale: a worker that
refuses everything measures nothing, so ``age`` lets the caller run a batch anyway when
the last measurement is old (``PROBE_AFTER_S``).
"""

from __future__ import annotations

import threading
import time
from collections import deque


__all__ = ["PROBE_AFTER_S", "WINDOW", "ServiceTimes"]

PROBE_AFTER_S = 1.0
"""A model whose last batch ended longer ago than this gets its next batch run whatever the
estimate says: it is measured again."""
WINDOW = 8
"""Batch times kept per model and size."""


class ServiceTimes:
    """Recent batch times per (model, batch size); thread-safe (the encode thread records,
    the compute thread asks)."""

    def __init__(self, window: int = WINDOW) -> None:
        if window < 1:
            raise ValueError("window must be >= 1")
        self.window = window
        self._times: dict[tuple[str, int], deque[float]] = {}
        self._last: dict[str, float] = {}  # model -> when its last batch was recorded
        self._lock = threading.Lock()

    def record(self, model: str, size: int, seconds: float) -> None:
        with self._lock:
            times = self._times.get((model, size))
            if times is None:
                times = self._times[(model, size)] = deque(maxlen=self.window)
            times.append(seconds)
            self._last[model] = time.monotonic()

    def age(self, model: str) -> float:
        """Seconds since the model's last measured batch (infinite if none)."""
        with self._lock:
            last = self._last.get(model)
        return float("inf") if last is None else time.monotonic() - last

    def table(self, model: str) -> dict[int, float]:
        """Every measured size of ``model`` and its estimate (seconds)."""
        with self._lock:
            return {n: _lower_median(t) for (m, n), t in self._times.items() if m == model}

    def forget(self, model: str) -> None:
        """The model was unloaded (or reloaded): its times no longer apply."""
        with self._lock:
            for key in [k for k in self._times if k[0] == model]:
                del self._times[key]
            self._last.pop(model, None)


def _lower_median(times: deque[float]) -> float:
    ordered = sorted(times)
    return ordered[(len(ordered) - 1) // 2]
