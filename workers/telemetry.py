"""What every thread of the worker reports into: its counters (sent to the broker in
heartbeats, shown in the broker's ``stats``) and one rate-limited warning log (a broken
request repeated thousands of times a second must not flood the log, nor slow the threads
that write it)."""

from __future__ import annotations

import logging
import threading
import time


__all__ = ["LOG_EVERY_S", "Counters", "LimitedLog"]

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


class LimitedLog:
    """Warnings at most once per ``every_s``; the ones in between are not logged. Shared by
    the worker's threads (a lost race logs one warning more, which is harmless)."""

    def __init__(self, logger: logging.Logger, every_s: float = LOG_EVERY_S) -> None:
        self.logger = logger
        self.every_s = every_s
        self._logged_at = -every_s

    def warning(self, fmt: str, *args: object, exc_info: BaseException | None = None) -> None:
        now = time.monotonic()
        if now - self._logged_at >= self.every_s:
            self._logged_at = now
            self.logger.warning(fmt, *args, exc_info=exc_info)
