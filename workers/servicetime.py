"""How long a batch takes, from its start to its answers being ready, per model and size.

Why: a job whose deadline comes before its batch could finish is work nobody will see
(a stream's frame that would arrive after its slot). The compute loop asks for an
estimate before each batch and answers such jobs ``deadline_exceeded`` at once, leaving
the time to jobs that can still make it. Measured, not configured: the time depends on
the device, the model, the batch size and the load.

Estimates err low on purpose: an unknown size borrows the largest measured size below it
(on a CPU a batch of n costs about n singles, on a GPU about one), so a job is refused
only when even that says it is too late, never on a guess that would make the worker do
less than before. And they must not go stale: a worker that refuses everything measures
nothing, so one slow batch (a first CUDA call, a pause of the host) could otherwise keep
it refusing for ever. ``age`` lets the caller run a batch anyway when the last
measurement is old (``PROBE_AFTER_S``).
"""

from __future__ import annotations

import threading
import time


__all__ = ["PROBE_AFTER_S", "ServiceTimes"]

PROBE_AFTER_S = 1.0
"""A model whose last batch ended longer ago than this gets its next batch run whatever the
estimate says: it is measured again."""


class ServiceTimes:
    """Exponentially weighted mean seconds per (model, batch size); thread-safe (the encode
    thread records, the compute thread asks)."""

    def __init__(self, weight: float = 0.2) -> None:
        self.weight = weight
        self._mean: dict[tuple[str, int], float] = {}
        self._last: dict[str, float] = {}  # model -> when its last batch was recorded
        self._lock = threading.Lock()

    def record(self, model: str, size: int, seconds: float) -> None:
        key = (model, size)
        with self._lock:
            old = self._mean.get(key)
            self._mean[key] = seconds if old is None else old + self.weight * (seconds - old)
            self._last[model] = time.monotonic()

    def age(self, model: str) -> float:
        """Seconds since the model's last measured batch (infinite if none)."""
        with self._lock:
            last = self._last.get(model)
        return float("inf") if last is None else time.monotonic() - last

    def estimate(self, model: str, size: int) -> float | None:
        """Seconds a batch of ``size`` of ``model`` takes, or None before any was measured
        at that size or below."""
        with self._lock:
            exact = self._mean.get((model, size))
            if exact is not None:
                return exact
            below = [(n, s) for (m, n), s in self._mean.items() if m == model and n < size]
        return max(below)[1] if below else None

    def forget(self, model: str) -> None:
        """The model was unloaded (or reloaded): its times no longer apply."""
        with self._lock:
            for key in [k for k in self._mean if k[0] == model]:
                del self._mean[key]
            self._last.pop(model, None)
