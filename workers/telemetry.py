"""What every thread of the worker reports into: its counters (sent to the broker in
heartbeats, shown in the broker's ``stats``), and how often its threads' shared
rate-limited warning log (``shared.logs.RateLimitedLog``) may speak: a broken request
repeated thousands of times a second must not flood the log, nor slow the threads that
write it."""

from __future__ import annotations

import threading


__all__ = ["LOG_EVERY_S", "Counters"]

LOG_EVERY_S = 5.0
"""At most one warning this often, from all threads together."""


class Counters:
    """The worker's own counters. Written from several threads, hence the lock; read as a
    snapshot. Each request counts once: received = served + errors + dropped."""

    NAMES = (
        "received",
        "computed",
        "batches",
        "served",
        "errors",
        "expired",
        "too_late",  # of "expired": refused because its batch would be ready too late
        "cancelled",
        "dropped",
        "video_frames",
        "reconnects",
    )

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._values = dict.fromkeys(self.NAMES, 0)

    def add(self, name: str, n: int = 1) -> None:
        with self._lock:
            self._values[name] += n

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self._values)
