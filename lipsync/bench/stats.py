"""What a load run counts: every request sent and how it ended, latencies, bytes.

One ``Recorder`` per run, shared by all clients of one event loop (no locks needed). Counts
cover the whole run, so that ``sent == answered + errors + lost`` can be checked; rates and
latencies cover only the measurement window (after the warm-up, before the stop), so that
connection set-up and the final drain do not dilute them.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from shared.errors import ErrorCode


__all__ = ["Recorder", "Window", "classify_error", "fitted_rate", "percentiles"]

_CODES = sorted((c.value for c in ErrorCode), key=len, reverse=True)


def classify_error(text: str) -> str:
    """An error kind for an error answer's text: the wire code it names (``overloaded``,
    ``deadline_exceeded``...), matched with spaces or underscores, else ``other``."""
    low = text.lower().replace(" ", "_").replace("-", "_")
    return next((code for code in _CODES if code in low), "other")


def percentiles(values: list[float] | np.ndarray) -> dict[str, float | int]:
    """count, mean, p50, p95, p99 and max of ``values`` (ms), rounded for reports."""
    a = np.asarray(values, dtype=float)
    if a.size == 0:
        return {"count": 0}
    p50, p95, p99 = np.percentile(a, [50, 95, 99])
    return {
        "count": int(a.size),
        "mean": round(float(a.mean()), 3),
        "p50": round(float(p50), 3),
        "p95": round(float(p95), 3),
        "p99": round(float(p99), 3),
        "max": round(float(a.max()), 3),
    }


def fitted_rate(times: list[float], min_span: float = 0.0) -> float | None:
    """Answers per second as the slope of the cumulative count over time (least squares).

    At a few frames/s answers come in batches (4 at once every second or so), and a plain
    count over the window is off by up to a batch depending on where the window edges
    fall; the slope of the staircase is not. None with fewer than 3 distinct times."""
    t = np.sort(np.asarray(times, dtype=float))
    if t.size < 3 or t[-1] - t[0] <= 0:
        return None
    slope = np.polyfit(t - t[0], np.arange(1, t.size + 1), 1)[0]
    return round(float(slope), 3)


@dataclass(slots=True)
class Window:
    """The measurement window, in ``time.monotonic()`` seconds."""

    start: float
    end: float

    def __contains__(self, t: float) -> bool:
        return self.start <= t < self.end

    @property
    def seconds(self) -> float:
        return self.end - self.start


@dataclass(slots=True)
class Recorder:
    window: Window
    sent: int = 0
    answered: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    lost: int = 0  # no answer by the end of the drain
    dropped: int = 0  # frames the server says it dropped (stream gaps, stream_ended)
    unexpected: Counter[str] = field(default_factory=Counter)  # messages answering nothing
    idle: int = 0  # stream frames without inference (silence)
    latencies: list[float] = field(default_factory=list)  # ms, answers in the window
    server_ms: list[float] = field(default_factory=list)  # server-reported time, same answers
    answer_times: list[float] = field(default_factory=list)  # monotonic, answers in the window
    answered_in_window: int = 0
    errors_in_window: int = 0
    bytes_in: int = 0  # in the window
    bytes_out: int = 0
    workers: Counter[str] = field(default_factory=Counter)  # answers per worker (streams)

    def on_send(self, size: int, now: float | None = None) -> None:
        self.sent += 1
        if (time.monotonic() if now is None else now) in self.window:
            self.bytes_out += size

    def on_answer(
        self, sent_at: float, size: int, *, server_ms: float | None = None, now: float | None = None
    ) -> None:
        now = time.monotonic() if now is None else now
        self.answered += 1
        if now in self.window:
            self.answered_in_window += 1
            self.bytes_in += size
            self.latencies.append((now - sent_at) * 1000)
            self.answer_times.append(now)
            if server_ms is not None:
                self.server_ms.append(server_ms)

    def on_error(self, kind: str, size: int = 0, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        self.errors[kind] += 1
        if now in self.window:
            self.errors_in_window += 1
            self.bytes_in += size

    def summary(self) -> dict[str, Any]:
        s = self.window.seconds
        return {
            "sent": self.sent,
            "answered": self.answered,
            "errors": sum(self.errors.values()),
            "errors_by_kind": dict(sorted(self.errors.items())),
            "lost": self.lost,
            "dropped": self.dropped,
            "idle_frames": self.idle,
            "unexpected": dict(sorted(self.unexpected.items())),
            "window_s": round(s, 3),
            "answered_in_window": self.answered_in_window,
            "frames_per_s": round(self.answered_in_window / s, 2) if s > 0 else 0.0,
            "frames_per_s_fit": fitted_rate(self.answer_times, s / 2),
            "errors_per_s": round(self.errors_in_window / s, 2) if s > 0 else 0.0,
            "bytes_in_per_s": round(self.bytes_in / s) if s > 0 else 0,
            "bytes_out_per_s": round(self.bytes_out / s) if s > 0 else 0,
            "latency_ms": percentiles(self.latencies),
            "server_ms": percentiles(self.server_ms),
            "answers_per_worker": dict(sorted(self.workers.items())),
        }
